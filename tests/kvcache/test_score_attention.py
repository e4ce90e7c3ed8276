"""Two-pass decode attention that writes the logits (Triton, interpreter on CPU) vs float32 PyTorch."""

from __future__ import annotations

import pytest
import torch

from mlsys24.kvcache.score_attention import score_attention, score_attention_ref

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}  # fp16: inputs rounded to 11 bits, accumulation in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,KV,G,C,W,D", [(1, 1, 1, 7, 7, 16), (2, 2, 2, 83, 70, 32), (1, 3, 1, 130, 127, 24)])
def test_score_attention_matches_reference(dtype, B, KV, G, C, W, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, KV * G, D, generator=g).to(dtype)
    k = torch.randn(B, KV, C, D, generator=g).to(dtype)
    v = torch.randn(B, KV, C, D, generator=g).to(dtype)
    out, x, p = score_attention(q, k, v, W, D ** -0.5)
    ro, rx, rp = score_attention_ref(q, k, v, W, D ** -0.5)
    tol = TOL[dtype]
    assert (x - rx).abs().max() < tol * 10
    assert (p - rp).abs().max() < tol
    assert (out.float() - ro).abs().max() < tol * 5


def test_score_attention_non_contiguous_query():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 16, generator=g)[:, ::2]  # [2, 4, 16], stride 2 over heads
    k = torch.randn(2, 2, 33, 16, generator=g)
    v = torch.randn(2, 2, 33, 16, generator=g)
    out, _, _ = score_attention(q, k, v, 33, 0.25)
    ro, _, _ = score_attention_ref(q, k, v, 33, 0.25)
    assert (out - ro).abs().max() < 1e-4


@pytest.mark.parametrize("name,attn", [("full", "triton"), ("window", "triton"), ("sink", "triton"), ("h2o", "triton"),
                                       ("keyformer", "triton"), ("keyformer", "twopass")])
def test_policy_cache_triton_path_matches_torch_path(name, attn, monkeypatch):
    """The compacted cache's Triton decode paths (fused: attention writing the logits + one score/evict
    kernel + the slot-write kernel; twopass: card 11's kernel / two passes + PyTorch bookkeeping) give the
    logits and kept sets of the PyTorch path (noise drawn per slot identically in both)."""
    from mlsys24.kvcache import KVPolicyConfig, teacher_forced
    from mlsys24.models import Llama, LlamaConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              init_std=0.2)).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    pol = KVPolicyConfig(name, kv_budget=0.5)
    lt, ct = teacher_forced(model, ids[:, :16], ids[:, 16:], pol, return_cache=True, attn=attn,
                            noise_by_position=False)
    lp, cp = teacher_forced(model, ids[:, :16], ids[:, 16:], pol, return_cache=True, attn="torch",
                            noise_by_position=False)
    assert (lt - lp).abs().max() < 1e-4
    for i in range(2):
        assert torch.equal(ct.kept_positions(i), cp.kept_positions(i))
    ct.check_invariants()


def test_policy_cache_philox_noise_keeps_invariants(monkeypatch):
    """Keyformer with the Gumbel noise drawn inside the score kernel: budgets and protected sets hold at
    every step, the noise changes the kept set vs noise-free scoring, and a rerun repeats it exactly."""
    from mlsys24.kvcache import KVPolicyConfig, PolicyKVCache, policy_backend
    from mlsys24.models import Llama, LlamaConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              init_std=0.2)).eval()
    ids = torch.randint(0, 64, (2, 22), generator=torch.Generator().manual_seed(3))
    kept = {}
    for noise in ("gumbel", "gumbel", "none"):
        pol = KVPolicyConfig("keyformer", kv_budget=0.5, noise=noise, seed=5)
        c = PolicyKVCache.for_model(model, 2, 16, 4, pol, attn="triton", rng="philox")
        torch.manual_seed(11)  # the prompt phase's noise comes from the global generator
        with policy_backend(model), torch.no_grad():
            model(ids[:, :16], kv_cache=c)
            for t in range(4):
                model(ids[:, 16 + t:17 + t], kv_cache=c)
                c.check_invariants()
        assert c.n_valid == c.k_budget == 8
        kept.setdefault(noise, []).append(torch.stack([c.kept_positions(i) for i in range(2)]))
    assert torch.equal(kept["gumbel"][0], kept["gumbel"][1])
    assert not torch.equal(kept["gumbel"][0], kept["none"][0])
