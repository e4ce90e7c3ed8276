"""FlashDecoding++ decode path in the shared Llama: paged decode backend and dispatched linears
give the same logits as the SDPA model (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from mlsys24.kernels.dispatch import GemmDispatcher
from mlsys24.models import LlamaConfig, random_llama
from mlsys24.models.fast_decode import DispatchedLinear, PagedDecodeAttention, calibrate_model_phi, use_fdpp

CFG = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)


def _decode_logits(model, prompts, steps, block_size=4):
    """Prefill ``prompts`` (ragged) into a paged cache, then greedy-decode ``steps`` tokens; logits per step."""
    cache = model.new_cache("paged", batch=len(prompts), max_len=48, block_size=block_size)
    cache.new_batch(len(prompts))
    T = max(len(p) for p in prompts)
    x = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    out = model(x, kv_cache=cache, input_lens=lens)
    nxt = out[torch.arange(len(prompts)), lens - 1].argmax(-1)
    logits = []
    for _ in range(steps):
        out = model(nxt[:, None], kv_cache=cache, input_lens=torch.ones(len(prompts), dtype=torch.long))
        logits.append(out[:, 0].float())
        nxt = out[:, 0].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_paged_decode_backend_matches_sdpa(mode):
    torch.manual_seed(0)
    model = random_llama(CFG, "cpu", torch.float32, seed=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 13]
    want = _decode_logits(model, prompts, steps=3)
    phi = calibrate_model_phi(model, torch.randint(0, CFG.vocab_size, (2, 16))).phi if mode == "async" else None
    backend = use_fdpp(model, mode=mode, phi=phi)
    got = _decode_logits(model, prompts, steps=3)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    assert backend.calls["kernel"] == 3 * CFG.n_layers      # every decode step ran the kernel
    assert backend.calls["sdpa"] == CFG.n_layers             # the prefill did not


def test_dispatched_linears_match_and_cover_lm_head():
    model = random_llama(CFG, "cpu", torch.float32, seed=2)
    x = torch.randint(0, CFG.vocab_size, (2, 5))
    want = model(x)
    use_fdpp(model, mode="sync", dispatcher=GemmDispatcher())
    assert isinstance(model.lm_head, DispatchedLinear)
    n = sum(isinstance(m, DispatchedLinear) for m in model.modules())
    assert n == 7 * CFG.n_layers + 1
    torch.testing.assert_close(model(x), want)


def test_async_needs_phi_and_mode_is_checked():
    with pytest.raises(ValueError, match="phi"):
        PagedDecodeAttention("async")
    with pytest.raises(ValueError, match="mode"):
        PagedDecodeAttention("fast")


def test_calibrated_phi_puts_row_maxima_in_band():
    model = random_llama(CFG, "cpu", torch.float32, seed=3)
    cal = calibrate_model_phi(model, torch.randint(0, CFG.vocab_size, (2, 24)))
    lo, hi = cal.band
    r_lo, r_hi = cal.rowmax_range
    assert lo < r_lo - cal.phi and r_hi - cal.phi < hi
    assert cal.recompute_rate < 0.01


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_generates_the_same_tokens_with_the_paged_kernel(graphs):
    """Through the serving engine, eagerly and through the static decode view that CUDA graphs
    capture (run eagerly on CPU): same greedy tokens as SDPA, and the kernel really ran."""
    from mlsys24.serving.engine import Engine
    from mlsys24.serving.request import Request

    def serve(model):
        g = torch.Generator().manual_seed(5)
        reqs = [Request(i, torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist(), 4)
                for i, n in enumerate((5, 11, 3))]
        eng = Engine(model, "orca", n_blocks=24, block_size=4, decode_graphs=graphs, context_bucket=32)
        done = eng.run(reqs, progress=False)
        eng.check_invariants()
        return {s.rid: list(s.output) for s in done}

    model = random_llama(CFG, "cpu", torch.float32, seed=4)
    want = serve(model)
    backend = use_fdpp(model, mode="sync")
    assert serve(model) == want
    assert backend.calls["kernel"] >= 3 * CFG.n_layers
