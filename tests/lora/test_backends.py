"""LoRA backends, the adapter registry and the engine: every backend gives the LoopBackend's delta,
and the engine serves identical tokens (and logits) whichever backend computes the LoRA term."""

import json

import numpy as np
import pytest
import torch

from mlsys24.lora import (
    AdapterRegistry,
    LoRAEngine,
    PunicaScheduler,
    SameAdapterScheduler,
    load_peft_adapter,
    make_backend,
    punica_config,
)
from mlsys24.models import Llama, LlamaConfig
from mlsys24.serving import (
    AdapterWeights,
    Engine,
    LoopBackend,
    Request,
    SchedulerConfig,
    attach_lora,
    random_adapter,
)

CFG = LlamaConfig(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256)
TARGETS = ("q_proj", "v_proj", "down_proj")  # keeps the Triton interpreter quick; all 7 are tested in PyTorch


def tiny_model(seed=0):
    m = Llama(CFG)
    m.reset_parameters(seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # spread logits so greedy ties are rare
    return m.eval()


def adapters(model, n=3):
    return [random_adapter(model, rank=8 if a != 1 else 4, seed=a, std=0.5) for a in range(n)]


def layer_inputs(n_rows=11, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([2, -1, 0, 0, 1, 2, 2, -1, 0, 1, 1])[:n_rows]
    return torch.randn(n_rows, d, generator=g), ids


@pytest.mark.parametrize("name", ["loop", "gather_bmm", "segmented", "bgmv", "sgmv"])
def test_backend_delta_equals_loop_backend(name):
    model = tiny_model()
    ads = adapters(model)
    ref = LoopBackend()
    be = make_backend(name, model, rank=8, n_slots=4)
    for a, w in enumerate(ads):
        ref.load(a, w)
        be.load(a, w)
    x, ids = layer_inputs()
    be.prepare(ids)
    layers = ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]
    if name in ("gather_bmm", "segmented", "loop"):
        layers = list(ads[0].A)  # every projection (cheap in PyTorch)
    for layer in layers:
        xin = torch.randn(len(ids), ads[0].A[layer].shape[0], generator=torch.Generator().manual_seed(1))
        want = ref.delta(layer, xin, ids)
        got = be.delta(layer, xin, ids)
        assert (got - want).abs().max() <= 1e-5, layer
        assert got[ids < 0].abs().max() == 0


@pytest.mark.parametrize("name", ["gather_bmm", "bgmv", "sgmv"])
def test_static_buffers_equal_per_forward_path(name):
    model = tiny_model()
    be = make_backend(name, model, rank=8, n_slots=4)
    attach = attach_lora(model, be, targets=TARGETS)
    for a, w in enumerate(adapters(model)):
        be.load(a, w)
    ids = [1, 0, 2, 2, -1, 0, -1, -1]
    x = torch.randn(8, 64)
    be.prepare(torch.tensor(ids))
    dyn = be.delta("layers.0.self_attn.q_proj", x, torch.tensor(ids))
    be.set_static(attach, ids)
    assert attach.active and attach.ids.tolist() == ids
    st = be.delta("layers.0.self_attn.q_proj", x, attach.ids)
    ptr = attach.ids.data_ptr()
    be.clear_static(attach)
    assert not attach.active
    assert (st - dyn).abs().max() <= 1e-6
    be.set_static(attach, [2] * 8)  # same bucket: the same buffers, refilled
    assert attach.ids.data_ptr() == ptr
    be.clear_static(attach)
    with pytest.raises(KeyError, match="not loaded"):
        be.set_static(attach, [7] + [-1] * 7)


def test_registry_on_demand_lru_and_aliases():
    model = tiny_model()
    w = adapters(model, 3)
    reg = AdapterRegistry.for_adapter(w[0], n_slots=2, rank=8)
    for a in range(3):
        reg.register(a, w[a])
    reg.register(10, w[0])  # alias of adapter 0's weights
    assert reg.stats.loads == 0, "registering must not copy to the device"
    s = reg.slots([0, 1])
    assert reg.stats.loads == 2 and set(s.values()) == {0, 1}
    torch.testing.assert_close(reg.A["layers.0.self_attn.q_proj"][s[0]], w[0].A["layers.0.self_attn.q_proj"])
    # rank-4 adapter 1 is zero-padded to the pool rank
    assert reg.A["layers.0.self_attn.q_proj"][s[1]][:, 4:].abs().max() == 0
    reg.slots([0])       # 0 becomes most recently used
    s2 = reg.slots([2])  # evicts 1 (least recently used), not 0
    assert reg.stats.evictions == 1 and s2[2] == s[1] and 1 not in reg.resident() and 0 in reg.resident()
    assert reg.scale[s2[2]].item() == pytest.approx(w[2].scale)
    with pytest.raises(RuntimeError, match="slots"):
        reg.slots([0, 1, 2])
    with pytest.raises(KeyError, match="not registered"):
        reg.slots([5])
    # without sharing, an alias gets its own slot; with sharing it reuses the weights' slot
    assert reg.slots([0, 10]) and reg.stats.loads == 4
    shared = AdapterRegistry.for_adapter(w[0], n_slots=2, rank=8, share_aliases=True)
    shared.register(0, w[0])
    shared.register(10, w[0])
    sl = shared.slots([0, 10])
    assert sl[0] == sl[10] and shared.stats.loads == 1
    big = random_adapter(model, rank=16, seed=9)
    with pytest.raises(ValueError, match="rank"):
        reg.register(99, big)


def test_peft_adapter_roundtrip(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    ad = random_adapter(model, rank=4, seed=3, alpha=8.0)
    tensors = {}
    for name in ad.A:
        tensors[f"base_model.model.model.{name}.lora_A.weight"] = ad.A[name].t().contiguous()   # [r, d_in]
        tensors[f"base_model.model.model.{name}.lora_B.weight"] = ad.B[name].t().contiguous()   # [d_out, r]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    got = load_peft_adapter(tmp_path)
    assert got.rank == 4 and got.scale == 2.0 and set(got.A) == set(ad.A)
    for name in ad.A:
        assert torch.equal(got.A[name], ad.A[name]) and torch.equal(got.B[name], ad.B[name])


def _requests(ids=(0, 2, -1, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [Request(i, rng.integers(0, 256, int(rng.integers(2, 7))).tolist(), int(rng.integers(2, 5)), adapter_id=a)
            for i, a in enumerate(ids)]


_REF = {}


def _serve(name, graphs=False, scheduler=None):
    model = tiny_model()
    be = LoopBackend() if name == "reference" else make_backend(name, model, rank=8, n_slots=4)
    ctx = attach_lora(model, be, targets=TARGETS)
    for a, w in enumerate(adapters(model)):
        be.load(a, w)
    sch = scheduler or PunicaScheduler(punica_config(8))
    eng = LoRAEngine(model, sch, n_blocks=48, block_size=4, lora=ctx, record_logits=True, decode_graphs=graphs,
                     context_bucket=16)
    done = {s.rid: s for s in eng.run(_requests(), progress=False)}
    eng.check_invariants()
    assert eng.cache.allocator.n_free == 48
    return done, eng


@pytest.mark.parametrize("name,graphs", [("loop", False), ("gather_bmm", False), ("gather_bmm", True),
                                         ("segmented", False), ("bgmv", True), ("sgmv", False), ("sgmv", True)])
def test_engine_same_tokens_with_every_backend(name, graphs):
    if "ref" not in _REF:
        _REF["ref"] = _serve("reference")[0]
    ref = _REF["ref"]
    got, eng = _serve(name, graphs)
    log = eng.lora.backend.forward_log
    assert log and all(0 <= segs <= rows for rows, segs in log) and max(segs for _, segs in log) >= 2
    if graphs:
        assert eng.decode_graphs.calls > 0, "the static (graph) decode path was not used"
    for rid, s in ref.items():
        assert got[rid].output == s.output, (name, rid)
        torch.testing.assert_close(torch.stack(got[rid].logits), torch.stack(s.logits), atol=1e-4, rtol=1e-4)


def test_adapters_change_outputs_and_base_rows_are_untouched():
    """Requests with adapter -1 equal the model without LoRA; adapters change logits."""
    got, _ = _serve("gather_bmm")
    plain = tiny_model()
    eng = Engine(plain, "orca", n_blocks=48, block_size=4, record_logits=True)
    plain_reqs = [Request(r.rid, r.prompt, r.max_new_tokens) for r in _requests()]
    base = {s.rid: s for s in eng.run(plain_reqs, progress=False)}
    torch.testing.assert_close(torch.stack(got[2].logits), torch.stack(base[2].logits), atol=1e-5, rtol=1e-5)
    assert (torch.stack(got[0].logits)[0] - torch.stack(base[0].logits)[0]).abs().max() > 1e-2


def test_punica_scheduler_sorts_rows_by_adapter():
    from mlsys24.serving import CountingLedger, Sequence

    sch = PunicaScheduler(punica_config(8, max_new_per_step=None))
    for r in _requests((3, 0, 2, 0, -1, 1)):
        sch.add(Sequence(r))
    plan = sch.schedule(CountingLedger(100, 4))
    ids = [s.request.adapter_id for s, _ in plan.rows]
    assert ids == sorted(ids) and len(ids) == 6


@pytest.mark.parametrize("static", [True, False])
def test_same_adapter_scheduler_batches_one_adapter(static):
    """The baseline only ever runs one adapter per step, batching consecutive same-adapter requests."""
    ids = (0, 0, 1, 1, 1, 0, 2, 2)
    model = tiny_model()
    be = make_backend("gather_bmm", model, rank=8, n_slots=4)
    ctx = attach_lora(model, be, targets=TARGETS)
    for a, w in enumerate(adapters(model)):
        be.load(a, w)
    sch = SameAdapterScheduler(SchedulerConfig("orca", max_batch_size=2), static=static)
    assert (sch.config.policy == "static") == static
    eng = LoRAEngine(model, sch, n_blocks=64, block_size=4, lora=ctx)
    seen = []
    orig = sch.schedule

    def spy(ledger):
        plan = orig(ledger)
        seen.append({s.request.adapter_id for s, _ in plan.rows})
        return plan

    sch.schedule = spy
    done = eng.run(_requests(ids, seed=3), progress=False)
    eng.check_invariants()
    assert len(done) == len(ids)
    assert all(len(a) <= 1 for a in seen), "a step mixed adapters"
    assert max(len(a) for a in seen) == 1
    # the first batch is the first two requests (adapter 0, consecutive), never request 5 (adapter 0 later)
    first = [s for s in eng.sequences.values() if s.first_scheduled_s == min(x.first_scheduled_s for x in done)]
    assert sorted(s.rid for s in first) == [0, 1]


def test_backend_dtype_mismatch_is_reported():
    model = tiny_model()
    be = make_backend("sgmv", model, rank=8, n_slots=2, dtype=torch.float16)
    be.load(0, adapters(model, 1)[0])
    be.prepare(torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="dtype"):
        be.delta("layers.0.self_attn.q_proj", torch.randn(2, 64), torch.tensor([0, 0]))


def test_make_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        make_backend("cutlass", rank=8)
    assert isinstance(AdapterWeights(4, 4.0).scale, float)
