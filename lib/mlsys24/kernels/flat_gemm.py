"""Flat GEMM and GEMV for decode-time linear layers (FlashDecoding++, section 4).

In decode the activations are "flat": ``x`` is [M, K] with M = batch (1..64) while the weight is a
large [K, N]. Library GEMMs tile M by 64 or 128 and pad the rest with zeros, wasting most of the
tensor-core work and, more importantly, shaping the tiles for compute rather than for streaming the
weights. The paper's flat GEMM pads M only to the tensor-core granularity (8 on A100's mma; 16 for
Triton's ``tl.dot``), picks the N tile B_N so that N/B_N blocks fill the GPU, and keeps the K loop
inside one block, double-buffered (``num_stages`` here). For M = 1..4 a GEMV on CUDA cores
(broadcast multiply, reduce once at the end) avoids the tensor cores altogether.

Split-K (``GemmConfig.split_k``). At decode sizes N/B_N tiles are too few to keep every SM streaming
(4096 / 16 = 256 tiles for 132 SMs, two waves with a ragged tail), so both kernels can also cut K
into ``split_k`` chunks: program (n, k) reduces its chunk in fp32 and stores the partial tile to a
workspace ``[split_k, M, N]``; a per-tile ticket (an atomic counter) elects the program that finishes
last, which sums the ``split_k`` partials in a fixed order (deterministic) and writes y. The counter is
reset by that program, so the workspace needs no clearing between calls (calls of the same shape are
ordered on one stream; two streams running the same shape concurrently would share it).

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
    split_k: int = 1           # K chunks reduced by separate programs (1 = one program per output tile);
                               # any integer (a run-time argument: no recompilation per value)

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "block_k": self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages, "split_k": self.split_k}


def default_flat_config(M: int, N: int, K: int) -> GemmConfig:
    bm = min(64, max(16, triton.next_power_of_2(M)))
    return GemmConfig(block_m=bm, block_n=32 if bm <= 32 else 64, block_k=128, num_warps=4, num_stages=4)


def default_gemv_config(M: int, N: int, K: int) -> GemmConfig:
    return GemmConfig(block_m=1, block_n=8, block_k=512, num_warps=4, num_stages=1)


@triton.jit
def _store_tile(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, tile_id, pid_k, n_split,
                SPLIT: tl.constexpr, CHUNK: tl.constexpr = 1):
    """Write the fp32 tile ``acc`` [BM, BN] of y, directly (not SPLIT) or through the split-K workspace
    (``n_split`` chunks): partial store, ticket, and the last program of the tile sums the partials,
    CHUNK of them per vector load (a power of two; one L2 round trip per CHUNK partials on the
    critical path instead of one per partial), in a fixed order: deterministic."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if not SPLIT:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]                             # [split_k, M, N]
        tl.store(ws + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()                                   # every thread's partial before the ticket
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if ticket == n_split - 1:
            tot = tl.zeros_like(acc)
            sc = tl.arange(0, CHUNK)
            for s0 in range(0, n_split, CHUNK):
                s = s0 + sc
                parts = tl.load(ws[None, :, :] + (s * M * N)[:, None, None],
                                mask=(s < n_split)[:, None, None] & mask[None, :, :], other=0.0,
                                cache_modifier=".cg")
                tot += tl.sum(parts, axis=0)
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile_id, 0)                   # ready for the next call


@triton.jit(do_not_specialize=["M"])
def _flat_gemm_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_chunk,
                      stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, DOT_IEEE: tl.constexpr, CHUNK: tl.constexpr = 1):
    """One program: a [BLOCK_M, BLOCK_N] tile of y over the K chunk ``[pid_k * k_chunk, + k_chunk)``
    (all of K without SPLIT), pipelined over BLOCK_K steps. Program id 0 runs over M tiles so that
    programs sharing a weight tile run together."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk       # [BM, BK]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn       # [BK, BN]
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = offs_k < k_hi
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        offs_k += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    _store_tile(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn,
                pid_m * tl.num_programs(1) + pid_n, pid_k, tl.num_programs(2), SPLIT, CHUNK)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_chunk,
                 stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                 CHUNK: tl.constexpr = 1):
    """GEMV on CUDA cores for M <= BLOCK_M (1, 2 or 4 rows): acc[m, n, k] += x[m, k] * w[k, n] across
    the K chunk of this program, one reduction over k at the end (no cross-thread reduction inside
    the loop); the weight tile is read as [BLOCK_N, BLOCK_K] rows, contiguous along K for
    ``weight.t()`` (wide vector loads)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk       # [BM, BK]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk       # [BN, BK]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for _k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = offs_k < k_hi
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        offs_k += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y = tl.sum(acc, axis=2)                                                           # [BM, BN]
    _store_tile(y, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_n, pid_k,
                tl.num_programs(1), SPLIT, CHUNK)


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


_WS: dict[tuple, torch.Tensor] = {}


def _splitk_plan(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(split_k, k_chunk): chunks a multiple of block_k, no empty chunk."""
    split_k = max(1, int(split_k))
    k_chunk = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return triton.cdiv(K, k_chunk), k_chunk


def _fixup_chunk(split_k: int, tile_elems: int, num_warps: int) -> int:
    """Partials summed per vector load in the split-K fix-up: all of them when they fit in ~32 fp32
    registers per thread, else the largest power of two that does."""
    fit = max(1, (32 * 32 * num_warps) // tile_elems)
    return max(1, min(triton.next_power_of_2(split_k), 1 << (fit.bit_length() - 1)))


def _splitk_buffers(device: torch.device, split_k: int, M: int, N: int, tiles: int):
    """fp32 partials [split_k * M * N] and zeroed int32 tile counters, cached per size (never freed,
    so a buffer captured in a CUDA graph stays valid)."""
    if split_k == 1:
        d = _WS.get(("dummy", device.type, device.index))
        if d is None:
            d = _WS[("dummy", device.type, device.index)] = torch.zeros(1, dtype=torch.int32, device=device)
        return d, d
    kw = (device.type, device.index)
    ws = _WS.get(("ws", *kw, split_k * M * N))
    if ws is None:
        ws = _WS[("ws", *kw, split_k * M * N)] = torch.empty(split_k * M * N, dtype=torch.float32, device=device)
    cnt = _WS.get(("cnt", *kw, tiles))
    if cnt is None:
        cnt = _WS[("cnt", *kw, tiles)] = torch.zeros(tiles, dtype=torch.int32, device=device)
    return ws, cnt


def flat_gemm(x: torch.Tensor, w: torch.Tensor, *, config: GemmConfig | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[M, K] @ w[K, N]`` with a small M tile on tensor cores; output in x's dtype."""
    M, N, K = _check(x, w)
    cfg = config or default_flat_config(M, N, K)
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.block_k < 16:
        raise ValueError(f"flat_gemm tiles must be >= 16 (tl.dot), got {cfg}")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    split_k, k_chunk = _splitk_plan(K, cfg.block_k, cfg.split_k)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split_k)
    ws, cnt = _splitk_buffers(x.device, split_k, M, N, grid[0] * grid[1])
    _flat_gemm_kernel[grid](x, w, y, ws, cnt, M, N, K, k_chunk, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                            y.stride(0), y.stride(1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_K=cfg.block_k, SPLIT=split_k > 1, DOT_IEEE=x.dtype == torch.float32,
                            CHUNK=_fixup_chunk(split_k, cfg.block_m * cfg.block_n, cfg.num_warps),
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
    if M == 0:
        return y
    split_k, k_chunk = _splitk_plan(K, cfg.block_k, cfg.split_k)
    grid = (triton.cdiv(N, cfg.block_n), split_k)
    ws, cnt = _splitk_buffers(x.device, split_k, M, N, grid[0])
    _gemv_kernel[grid](x, w, y, ws, cnt, M, N, K, k_chunk, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                       y.stride(0), y.stride(1), BLOCK_M=triton.next_power_of_2(M), BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k, SPLIT=split_k > 1,
                       CHUNK=_fixup_chunk(split_k, triton.next_power_of_2(M) * cfg.block_n, cfg.num_warps),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
