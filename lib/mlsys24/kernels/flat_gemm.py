"""Flat GEMM and GEMV for decode-time linear layers (FlashDecoding++, section 4).

In decode the activations are "flat": ``x`` is [M, K] with M = batch (1..64) while the weight is a
large [K, N]. Library GEMMs tile M by 64 or 128 and pad the rest with zeros, wasting most of the
tensor-core work and, more importantly, shaping the tiles for compute rather than for streaming the
weights. The paper's flat GEMM pads M only to the tensor-core granularity (8 on A100's mma; 16 for
Triton's ``tl.dot``), picks the N tile B_N so that N/B_N blocks fill the GPU, and keeps the K loop
inside one block, double-buffered (``num_stages`` here). For M = 1..4 a GEMV on CUDA cores
(broadcast multiply, reduce once at the end) avoids the tensor cores altogether.

    y[M, N] = x[M, K] @ w[K, N]          (w may be any strided view, e.g. ``linear.weight.t()``)

Compute/memory ratio of one block (paper, eq. for Fig. 7), with B_N the N tile::

    CMR = 2 M K / (K + M K / B_N + M)    and   parallelism = N / B_N blocks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["GemmConfig", "flat_gemm", "gemv", "flat_gemm_ref", "cmr", "default_flat_config",
           "default_gemv_config"]


def flat_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 ``x @ w``."""
    return x.float() @ w.float()


def cmr(M: int, K: int, block_n: int) -> float:
    """Compute-to-memory ratio (FLOP per element loaded) of one flat-GEMM block (FlashDecoding++ §4)."""
    return 2.0 * M * K / (K + M * K / block_n + M)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 16          # flat GEMM: M tile (>= 16 for tl.dot); GEMV: ignored (next pow2 of M)
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3        # software pipelining depth (2 = the paper's double buffering)

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "block_k": self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def default_flat_config(M: int, N: int, K: int) -> GemmConfig:
    bm = min(64, max(16, triton.next_power_of_2(M)))
    return GemmConfig(block_m=bm, block_n=32 if bm <= 32 else 64, block_k=128, num_warps=4, num_stages=4)


def default_gemv_config(M: int, N: int, K: int) -> GemmConfig:
    return GemmConfig(block_m=1, block_n=8, block_k=512, num_warps=4, num_stages=1)


@triton.jit
def _flat_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_IEEE: tl.constexpr):
    """One program: a [BLOCK_M, BLOCK_N] tile of y, looping over all of K (no split-K, no atomics).
    Program id 0 runs over M tiles so that programs sharing a weight tile run together."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk       # [BM, BK]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn       # [BK, BN]
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K,
                 stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMV on CUDA cores for M <= BLOCK_M (1, 2 or 4 rows): acc[m, n, k] += x[m, k] * w[k, n] across
    the K loop, one reduction over k at the end (no cross-thread reduction inside the loop)."""
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk       # [BM, BK]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk       # [BN, BK]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y = tl.sum(acc, axis=2)                                                           # [BM, BN]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _check(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected x [M, K] and w [K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    M, K = x.shape
    K2, N = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: x {tuple(x.shape)} @ w {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    return M, N, K


def flat_gemm(x: torch.Tensor, w: torch.Tensor, *, config: GemmConfig | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ w[K, N]`` with a small M tile on tensor cores; output in x's dtype."""
    M, N, K = _check(x, w)
    cfg = config or default_flat_config(M, N, K)
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.block_k < 16:
        raise ValueError(f"flat_gemm tiles must be >= 16 (tl.dot), got {cfg}")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    _flat_gemm_kernel[grid](x, w, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                            y.stride(0), y.stride(1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_K=cfg.block_k, DOT_IEEE=x.dtype == torch.float32,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, *, config: GemmConfig | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ w[K, N]`` for M <= 4 on CUDA cores (w ideally K-contiguous, e.g. ``weight.t()``)."""
    M, N, K = _check(x, w)
    if M > 4:
        raise ValueError(f"gemv handles M <= 4, got M={M}; use flat_gemm")
    cfg = config or default_gemv_config(M, N, K)
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n),)
    _gemv_kernel[grid](x, w, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                       y.stride(0), y.stride(1), BLOCK_M=triton.next_power_of_2(M), BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
