"""Decode steps through the static buffers of the decode graphs give the general path's logits, for
every system (MBGMV, padded BMM, PEFT-style), with mixed ranks, padding rows and requests that finish
and start while others decode."""

import pytest
import torch

from mlsys24.slora import SLoRAEngine, serve, slora_trace
from mlsys24.slora.mbgmv import lora_padded_bmm_rows, make_tables, mbgmm_ref


def _serve(model, ads, system, graphs, n_req=10, max_context=32):
    reqs = slora_trace(n_req, 5, len_range=(3, 12), vocab=model.cfg.vocab_size, seed=11)
    eng = SLoRAEngine(model, system, pool_slots=600, adapter_region=96, max_batch_size=6, record_logits=True,
                      policy="vllm", decode_graphs=graphs, max_context=max_context, context_bucket=16,
                      use_graphs=False)
    eng.add_adapters(ads)
    res = serve(eng, reqs)
    eng.check_invariants()
    return eng, res


@pytest.mark.parametrize("system", ["slora", "bmm", "peft"])
def test_decode_graph_path_equals_general_path(setup, system):
    model, ads = setup
    ref, r0 = _serve(model, ads, system, False)
    eng, r1 = _serve(model, ads, system, True)
    assert r0["finished"] == r1["finished"] == 10
    assert eng.graph_steps > 0 and eng.graphs.eager_calls == eng.graph_steps
    assert ref.graph_steps == 0
    # q, k, v LoRA terms of a decode step share one launch pair / one gather (PEFT-style: per projection)
    assert (eng.backend.qkv_shared > 0) == (system != "peft") and ref.backend.qkv_shared == 0
    out0 = {s.rid: s for s in ref.finished}
    err = 0.0
    for s in eng.finished:
        assert s.output == out0[s.rid].output
        err = max(err, float((torch.stack(s.logits) - torch.stack(out0[s.rid].logits)).abs().max()))
    assert err <= 1e-4, err
    assert eng.cache.allocator.n_used[1] == 0, "KV slots left after drain"
    # the counters agree: padded reads at least the ranks actually used, strictly more with mixed ranks
    assert r1["gathered_elements"] <= r1["gathered_elements_if_padded"]


def test_contexts_past_the_largest_bucket_take_the_general_path(setup):
    model, ads = setup
    ref, _ = _serve(model, ads, "slora", False)
    eng, res = _serve(model, ads, "slora", True, max_context=16)   # contexts reach 22 tokens
    assert res["finished"] == 10
    general = sum(1 for r in eng.steps if r.prefill_tokens == 0) - eng.graph_steps
    assert eng.graph_steps > 0 and general > 0, (eng.graph_steps, general)
    out0 = {s.rid: s.output for s in ref.finished}
    assert all(s.output == out0[s.rid] for s in eng.finished)


def test_padded_bmm_rows_equals_reference():
    g = torch.Generator().manual_seed(0)
    H, ranks = 32, [2, 8, 4]
    S = sum(4 * r for r in ranks) + 1
    wa, wb = torch.randn(S, H, generator=g), torch.randn(S, H, generator=g)
    wa[-1] = 0
    wb[-1] = 0
    perm = torch.randperm(S - 1, generator=g).numpy()
    starts = [0, 8, 40]
    t = make_tables([0, 1, 2], [1, 1, 1], starts, ranks, [0.5, 1.0, 2.0], perm, 3, "cpu")
    x = torch.randn(3, H, generator=g)
    R = max(ranks)
    for p in range(4):
        idx = torch.full((3, R), S - 1, dtype=torch.long)
        for b, r in enumerate(ranks):
            idx[b, :r] = torch.from_numpy(t.rows_of(b, p))
        y = lora_padded_bmm_rows(x, wa, wb, idx, torch.tensor([0.5, 1.0, 2.0]))
        assert torch.allclose(y, mbgmm_ref(x, wa, wb, t, p), atol=1e-5)


def test_captured_forward_records_no_autograd(setup):
    # the decode step captured up front (outside the engine's no-grad step) must not build an autograd
    # graph: with the model's parameters requiring grad it would keep every intermediate alive
    model, ads = setup
    eng = SLoRAEngine(model, "bmm", pool_slots=600, adapter_region=96, max_batch_size=6, policy="vllm",
                      decode_graphs=True, max_context=32, context_bucket=16, use_graphs=False)
    eng.add_adapters(ads)
    assert any(p.requires_grad for p in model.parameters())
    st = eng.graphs._step_for((8, 16, 8))
    out = eng.graphs._forward(st)
    assert out.grad_fn is None and not out.requires_grad
