"""Decode attention that materialises the logits (for H2O / Keyformer scoring), in two Triton passes.

The fused split-KV kernel of :mod:`mlsys24.kernels.decode_attention` never writes the logits
``x = q . k * scale``, but an accumulated-attention policy needs them every step. Reading K a second
time to recompute them would cost half of the KV traffic again, so this variant splits attention in
two memory-bound passes that each read the cache once:

1. ``_qk_logits_kernel``: ``x[b, h, j] = scale * q[b, h] . k[b, h_kv, j]`` for ``j < W`` (reads K),
2. softmax over ``W`` in PyTorch (``[B, H, W]`` float32, small next to the cache),
3. ``_pv_kernel``: per split of the slots, ``sum_j p[b, h, j] v[b, h_kv, j]`` (reads V), partial sums
   added in PyTorch.

Cache layout ``[B, KV, C, D]`` (one layer of :class:`~mlsys24.kvcache.compact.PolicyKVCache`), every
slot ``< W`` valid (a compacted cache has no holes); ``q [B, H, D]`` with ``H = KV * G``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes on CPU)

__all__ = ["qk_logits", "pv_product", "score_attention", "score_attention_ref"]


@triton.jit
def _qk_logits_kernel(q_ptr, k_ptr, x_ptr, W, scale,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_xb, stride_xh,
                      KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)          # b * KV + kv head
    b = pid_bh // KV
    hk = pid_bh % KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < W
    d_ok = offs_d < D
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kc + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)          # [BLOCK_N, BLOCK_D]
    for g in range(G):
        h = hk * G + g
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        x = tl.sum(k * q[None, :], axis=1) * scale                                        # [BLOCK_N]
        tl.store(x_ptr + b * stride_xb + h * stride_xh + offs_n, x, mask=n_ok)


@triton.jit
def _pv_kernel(p_ptr, v_ptr, o_ptr, W, split_len,
               stride_pb, stride_ph, stride_vb, stride_vh, stride_vc, stride_os, stride_ob, stride_oh,
               KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // KV
    hk = pid_bh % KV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = pid_s * split_len
    for g in range(G):
        h = hk * G + g
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(start, start + split_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < W
            p = tl.load(p_ptr + b * stride_pb + h * stride_ph + offs_n, mask=n_ok, other=0.0)   # [BLOCK_N] f32
            v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vc + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(p[:, None] * v, axis=0)
        tl.store(o_ptr + pid_s * stride_os + b * stride_ob + h * stride_oh + offs_d, acc, mask=d_ok)


def qk_logits(q: torch.Tensor, k_cache: torch.Tensor, W: int, scale: float, *, block_n: int = 64) -> torch.Tensor:
    """``x [B, H, W]`` float32 = ``scale * q . k`` over the first ``W`` slots of ``k_cache [B, KV, C, D]``."""
    B, H, D = q.shape
    KV = k_cache.shape[1]
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1
    x = torch.empty(B, H, W, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(W, block_n), B * KV)
    _qk_logits_kernel[grid](q, k_cache, x, W, float(scale), q.stride(0), q.stride(1), k_cache.stride(0),
                            k_cache.stride(1), k_cache.stride(2), x.stride(0), x.stride(1),
                            KV=KV, G=H // KV, D=D, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D))
    return x


def pv_product(p: torch.Tensor, v_cache: torch.Tensor, W: int, *, block_n: int = 64,
               n_splits: int | None = None) -> torch.Tensor:
    """``out [B, H, D]`` float32 = ``sum_j p[b, h, j] v[b, h_kv, j]`` over ``j < W``."""
    B, H, _ = p.shape
    KV, D = v_cache.shape[1], v_cache.shape[3]
    assert v_cache.stride(-1) == 1 and p.stride(-1) == 1
    if n_splits is None:
        n_splits = max(1, min(triton.cdiv(W, 4 * block_n), triton.cdiv(512, B * KV)))
    split_len = triton.cdiv(triton.cdiv(W, n_splits), block_n) * block_n
    n_splits = triton.cdiv(W, split_len)
    part = torch.empty(n_splits, B, H, D, dtype=torch.float32, device=p.device)
    _pv_kernel[(n_splits, B * KV)](p, v_cache, part, W, split_len, p.stride(0), p.stride(1), v_cache.stride(0),
                                   v_cache.stride(1), v_cache.stride(2), part.stride(0), part.stride(1),
                                   part.stride(2), KV=KV, G=H // KV, D=D, BLOCK_N=block_n,
                                   BLOCK_D=triton.next_power_of_2(D))
    return part.sum(0)


def score_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, W: int, scale: float,
                    valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out ``[B, H, D]`` in q's dtype, logits ``[B, H, W]`` f32, probabilities ``[B, H, W]`` f32).

    valid: optional ``[B, KV, W]`` bool (slots to attend; the compacted steady state has all valid)."""
    x = qk_logits(q, k_cache, W, scale)
    xm = x
    if valid is not None:
        H, KV = q.shape[1], k_cache.shape[1]
        xm = x.masked_fill(~valid.repeat_interleave(H // KV, dim=1), float("-inf"))
    p = torch.softmax(xm, dim=-1)
    out = pv_product(p, v_cache, W).to(q.dtype)
    return out, x, p


def score_attention_ref(q, k_cache, v_cache, W: int, scale: float):
    """float32 PyTorch reference of :func:`score_attention` (all W slots valid)."""
    H, KV = q.shape[1], k_cache.shape[1]
    k = k_cache[:, :, :W].float().repeat_interleave(H // KV, dim=1)
    v = v_cache[:, :, :W].float().repeat_interleave(H // KV, dim=1)
    x = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    p = torch.softmax(x, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", p, v), x, p
