"""Fused decode step of the compacted cache (Triton, interpreter on CPU) vs float32 PyTorch: attention that
writes the logits, score update + eviction in one sweep, the slot write."""

from __future__ import annotations

import math

import pytest
import torch

from mlsys24.kvcache.fused_score import (
    FusedConfig,
    attn_logits,
    attn_logits_ref,
    score_evict,
    score_evict_ref,
    write_slot,
)

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SMALL = FusedConfig(block_n=16, programs_per_sm=2, score_block=32, score_warps=4)  # several splits / blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,KV,G,C,W,D", [(1, 1, 1, 7, 7, 16), (2, 2, 2, 83, 70, 32), (1, 3, 1, 130, 127, 24),
                                          (3, 1, 4, 40, 1, 8)])
def test_attn_logits_matches_reference(dtype, B, KV, G, C, W, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, KV * G, D, generator=g).to(dtype)
    k = torch.randn(B, KV, C, D, generator=g).to(dtype)
    v = torch.randn(B, KV, C, D, generator=g).to(dtype)
    out, x, lse = attn_logits(q, k, v, W, D ** -0.5, cfg=SMALL)
    ro, rx, rlse = attn_logits_ref(q, k, v, W, D ** -0.5)
    tol = TOL[dtype]
    assert out.dtype == dtype and x.shape == (B, KV * G, W)
    assert (x - rx).abs().max() < 1e-4          # logits from the same (rounded) inputs, fp32 products
    assert (lse - rlse).abs().max() < 1e-4
    assert (out.float() - ro).abs().max() < tol * 5


def test_attn_logits_dynamic_length_and_non_contiguous_query():
    """w_dev: the launch covers W slots, only the first w_dev are attended (a growing Full cache)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 16, generator=g)[:, ::2]  # [2, 4, 16], stride 2 over heads
    k = torch.randn(2, 2, 50, 16, generator=g)
    v = torch.randn(2, 2, 50, 16, generator=g)
    n = torch.tensor(33)
    out, x, _ = attn_logits(q, k, v, 50, 0.25, w_dev=n, write_logits=False, cfg=SMALL)
    ro, _, _ = attn_logits_ref(q, k, v, 33, 0.25)
    assert x is None and (out - ro).abs().max() < 1e-4


def _state(B, KV, C, W, seed):
    g = torch.Generator().manual_seed(seed)
    # every slot < W valid, holding a permutation of positions 0..W-1 (the newest, W - 1, anywhere)
    pos = torch.full((B, KV, C), -1, dtype=torch.long)
    pos[..., :W] = torch.stack([torch.randperm(W, generator=g) for _ in range(B * KV)]).view(B, KV, W)
    score = torch.zeros(B, KV, C)
    score[..., :W] = torch.rand(B, KV, W, generator=g) * 3
    return pos, score, g


@pytest.mark.parametrize("mode", ["oldest", "h2o", "keyformer"])
@pytest.mark.parametrize("B,KV,G,C,W,w,sink", [(2, 2, 2, 70, 65, 10, 0), (1, 3, 1, 9, 9, 2, 1), (3, 1, 4, 130, 127, 30, 4)])
def test_score_evict_matches_reference(mode, B, KV, G, C, W, w, sink):
    pos, score, g = _state(B, KV, C, W, 3)
    x = torch.randn(B, KV * G, W, generator=g) * 2
    noise = -torch.log(-torch.log(torch.rand(B, KV * G, W, generator=g).clamp(1e-7, 1 - 1e-7)))
    step, tau_init, dtau = 5, 1.0, 0.25
    tau = tau_init + (step + 1) * dtau
    cur = W - 1
    lse2 = torch.logsumexp(x, -1) / math.log(2)
    rs, rp, re = score_evict_ref(score if mode != "oldest" else None, pos, cur, W, mode=mode, w_recent=w,
                                 n_sink=sink, x=x, tau=tau if mode == "keyformer" else 1.0,
                                 noise=noise if mode == "keyformer" else None)
    free = torch.zeros(B, KV, dtype=torch.long)
    s2, p2 = score.clone(), pos.clone()
    score_evict(s2 if mode != "oldest" else None, p2, free, torch.tensor(cur), W, mode=mode, w_recent=w, n_sink=sink,
                x=x, lse2=lse2, step=torch.tensor(float(step)), tau_init=tau_init, dtau=dtau,
                noise=noise if mode == "keyformer" else "none", cfg=SMALL)
    assert torch.equal(free, re)
    assert torch.equal(p2[..., :W], rp) and bool((p2[..., W:] == -1).all())
    if mode != "oldest":
        assert (s2[..., :W] - rs).abs().max() < 1e-4
    # the evicted token is the oldest unprotected (oldest) / never a protected one
    ev_pos = pos.gather(-1, free[..., None])[..., 0]
    assert bool((ev_pos <= cur - w).all() and (ev_pos >= sink).all())
    if mode == "oldest":
        assert bool((ev_pos == sink).all())


def test_score_evict_philox_gumbel_adds_unit_mass_and_varies_by_step():
    """In-kernel Gumbel noise: each query row adds a probability distribution (mass 1 per row), the noise
    differs between steps (positions) and repeats for the same step. Only position 0 is unprotected and
    its logit is -1e4, so the evicted slot is known and its (lost) share of the mass is ~0."""
    B, KV, G, C, W = 2, 2, 2, 70, 65
    pos, score, g = _state(B, KV, C, W, 4)
    x = torch.randn(B, KV * G, W, generator=g)
    slot0 = (pos[..., :W] == 0).float().argmax(-1)  # [B, KV]
    x.view(B, KV, G, W).scatter_(-1, slot0[:, :, None, None].expand(-1, -1, G, 1), -1e4)
    outs = []
    for cur in (W - 1, W - 1, W):
        s2, p2, free = score.clone(), pos.clone(), torch.zeros(B, KV, dtype=torch.long)
        score_evict(s2, p2, free, torch.tensor(cur), W, mode="keyformer", w_recent=cur, x=x, step=torch.tensor(0.0),
                    tau_init=1.0, dtau=0.0, noise="philox", seed=7, cfg=SMALL)
        assert torch.equal(free, slot0)
        mass = (s2 - score)[..., :W].sum(-1) + score.gather(-1, free[..., None])[..., 0]
        assert torch.allclose(mass, torch.full_like(mass, float(G)), atol=1e-4)
        assert bool(((p2[..., :W] >= 0).sum(-1) == W - 1).all())
        outs.append(s2)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_write_slot():
    B, KV, C, D = 2, 3, 11, 8
    kc, vc = torch.zeros(B, KV, C, D, dtype=torch.float16), torch.zeros(B, KV, C, D, dtype=torch.float16)
    pos = torch.full((B, KV, C), 5, dtype=torch.long)
    score = torch.ones(B, KV, C)
    free = torch.tensor([[0, 4, 10], [7, 7, 1]])
    k_new = torch.randn(B, 2 * KV, D)[:, ::2]  # non-contiguous heads
    v_new = torch.randn(B, KV, D)
    write_slot(k_new, v_new, kc, vc, pos, score, free, torch.tensor(42))
    for b in range(B):
        for h in range(KV):
            s = int(free[b, h])
            assert torch.equal(kc[b, h, s], k_new[b, h].half()) and torch.equal(vc[b, h, s], v_new[b, h].half())
            assert pos[b, h, s] == 42 and score[b, h, s] == 0
    assert int((pos == 42).sum()) == B * KV and int((kc != 0).any(-1).sum()) == B * KV
