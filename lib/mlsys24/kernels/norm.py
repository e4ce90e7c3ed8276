"""Row kernels of the Llama forward on a GPU: RMSNorm (optionally after a residual add, in place) and
rotate-half RoPE, one launch each instead of the seven to nine elementwise kernels of their PyTorch
forms (:class:`mlsys24.models.RMSNorm`, :func:`mlsys24.models.apply_rope`), with the same rounding:
statistics and rotation in float32, RMSNorm's normalised row rounded to the activation dtype before the
weight multiplies it. The model takes them on CUDA tensors when no gradient is recorded; the AWQ fused
decoder launches :func:`add_rmsnorm_kernel` directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import mlsys24.kernels  # noqa: F401  (the CPU interpreter fixes)

__all__ = ["add_rmsnorm_kernel", "rmsnorm", "rope", "rope_kernel"]


@triton.jit
def add_rmsnorm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, D, eps, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    # h [D] (updated in place: h += d), out [D] = w * rmsnorm(h), one program per row
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + row * D + offs, mask=mask, other=0.0)
    if HAS_ADD:
        h = (h.to(tl.float32) + tl.load(d_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * D + offs, h, mask=mask)
    xf = h.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * r).to(h.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dimension (``x`` and ``weight`` of one dtype)."""
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match x [..., {x.shape[-1]}] {x.dtype}")
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0]:
        add_rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight.contiguous(), out, D, float(eps), HAS_ADD=False,
                                           BLOCK=triton.next_power_of_2(D), num_warps=8 if D >= 2048 else 4)
    return out.view(x.shape)


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, sxb, sxt, sxh, scb, sct, ssb, sst,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program per (b, t): every head of x [B, T, H, 2*HALF] rotated by cos, sin [B, T, HALF] (float32)
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    offs_h = tl.arange(0, BLOCK_H)
    hm = offs_h < H
    offs = tl.arange(0, HALF)
    c = tl.load(cos_ptr + b * scb + t * sct + offs).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + b * ssb + t * sst + offs).to(tl.float32)[None, :]
    src = x_ptr + b * sxb + t * sxt + offs_h[:, None] * sxh + offs[None, :]
    x1 = tl.load(src, mask=hm[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=hm[:, None], other=0.0).to(tl.float32)
    dst = y_ptr + (pid * H + offs_h[:, None]) * (2 * HALF) + offs[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=hm[:, None])
    tl.store(dst + HALF, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=hm[:, None])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, T, heads, d]`` (any strides, the last one 1) by ``cos, sin [B, T,
    d/2]``; returns a new contiguous tensor of ``x``'s dtype. ``d/2`` must be a power of two."""
    B, T, H, D = x.shape
    half = D // 2
    if D % 2 or half & (half - 1):
        raise ValueError(f"head dim {D}: d/2 must be a power of two")
    if cos.shape != (B, T, half) and cos.shape[-1] != half:
        raise ValueError(f"cos {tuple(cos.shape)} does not match x {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, T, half), sin.expand(B, T, half)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    if B * T:
        rope_kernel[(B * T,)](x, cos, sin, y, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                              cos.stride(1), sin.stride(0), sin.stride(1), HALF=half,
                              BLOCK_H=triton.next_power_of_2(H), num_warps=4)
    return y
