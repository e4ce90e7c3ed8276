"""W4A16 matmul in Triton: int4 weights (AWQ layout), fp16/bf16 activations, fp32 accumulation.

    y[M, N] = x[M, K] @ W^T,    W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]

with ``qweight int32 [Kp, Np/8]``, ``qzeros int32 [Kp/G, Np/8]``, ``scales [Kp/G, Np]`` as packed
by :func:`mlsys24.quant.pack.awq_pack` (Kp, Np: K and N padded to multiples of G and 8).

Single-batch decoding is memory-bound: every token streams all weights once, so 4-bit weights cut
the bytes ~3.9x (with a G=128 fp16 scale and a 4-bit zero per group: 4.156 bits/weight) and the
kernel can at best be that much faster than an fp16 GEMV. The weights are never materialised in
fp16 in memory: each program loads a tile of packed int32 ``[BLOCK_K, BLOCK_N/8]`` and, for each
of the 8 nibble positions j, dequantizes in registers the ``BLOCK_N/8`` output columns
``8c + AWQ_ORDER[j]`` that nibble j holds. So no in-register interleave/reshape is needed: the
8 partial results live in 8 accumulators whose columns are written back with stride 8.

Two inner products:

- ``use_dot=True``: ``tl.dot`` on tensor cores, ``BLOCK_M >= 16`` (rows beyond M masked). Good from
  M = 1 up (the wasted MMA work is free while the kernel is memory-bound).
- ``use_dot=False`` (GEMV, M handled one row per program): multiply-accumulate on CUDA cores into a
  ``[BLOCK_K, BLOCK_N/8]`` fp32 tile per nibble, reduced over K once at the end.

Split-K: ``split_k`` programs share the K loop of one output tile and add their partial sums with
atomics, in an fp32 buffer that is then cast (default), or directly in the output dtype
(``atomic_out``: one kernel after the zero-fill, at the price of rounding each partial sum): it
multiplies the programs in flight when N/BLOCK_N x M/BLOCK_M alone would leave SMs idle, as at M = 1.

Dequantization (``dequant``): 0 = int -> float convert instructions (quarter rate on the GPU);
2 = the "magic number" trick: the 16-bit pattern ``0x6400 | q`` *is* the fp16 number ``1024 + q``,
so ``w = (h(q) - h(z)) * s`` needs only integer logic and two half-precision ops (for bf16/fp32:
``0x4B000000 | q`` = ``2^23 + q`` in fp32). Offline SASS of the tensor-core loop (sm_90): ~4.4
instructions per weight for a 16x256x64 tile with 4 warps and dequant 2; ~22 for a 16x128x64 tile with
4 warps and dequant 0 (int->float conversions, and the 4 warps repeat each other's work on a 128-wide
tile). Measured on an H200 (``data/results/awq``), this kernel is still slower than cuBLAS fp16 at
Llama-7B shapes: see the notebook 07_awq for the numbers and the suspected causes.

``w4a16_ref`` is the float32 dequantize-then-matmul reference.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .pack import dequantize_awq

if os.environ.get("TRITON_INTERPRET") == "1":
    import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes: bf16 tl.dot, numpy>=2.4 indices)

import triton
import triton.language as tl

__all__ = ["W4A16Config", "w4a16_gemm", "w4a16_ref", "default_config", "weight_bytes"]


def w4a16_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              out_features: int | None = None) -> torch.Tensor:
    """float32 reference: dequantize the whole weight, then ``x @ W^T``. ``x [..., K]`` -> ``[..., N]``."""
    K = x.shape[-1]
    w = dequantize_awq(qweight, qzeros, scales, out_features, K)  # [N, K] float32
    return x.float() @ w.t().to(x.device)


def weight_bytes(N: int, K: int, group_size: int, *, bits: int = 4, scale_bytes: int = 2) -> int:
    """Bytes a W4A16 matmul must read for the weight: packed ints + scales + packed zeros."""
    groups = -(-K // group_size)
    return N * K * bits // 8 + groups * N * scale_bytes + groups * N * bits // 8


@dataclass(frozen=True)
class W4A16Config:
    block_m: int = 16       # rows of x per program (>= 16 with use_dot; 1 for the GEMV path)
    block_n: int = 128      # output columns per program (multiple of 8; >= 128 with use_dot)
    block_k: int = 64       # K per loop step (divides the group size)
    split_k: int = 1        # programs sharing the K loop of one output tile (atomics when > 1)
    atomic_out: bool = False  # split-K: add partial sums atomically in the output dtype (no fp32 buffer/cast)
    use_dot: bool = True    # tensor cores (tl.dot) or CUDA-core GEMV
    dequant: int = 2        # int4 -> float: 0 convert instruction, 1 via fp32, 2 "magic number" bit trick
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


def default_config(M: int, N: int, K: int, group_size: int, *, sms: int = 132) -> W4A16Config:
    """A configuration without tuning, following the H200 tuning run (``data/results/awq``).

    M = 1 and a layer up to 64M weights: the CUDA-core GEMV (256 columns x 32 rows per step);
    otherwise 16 x 256 tiles on tensor cores with 4 warps (each warp owns 64 output columns, so no
    warp repeats another's dequantization). Split-K doubles until ~2 programs per SM (at most 16,
    keeping >= 4 K steps per program)."""
    if M == 1 and N * K <= (64 << 20):
        bm, bn, bk, dot, warps, stages = 1, 256, min(32, group_size), False, 4, 2
    else:
        bm, bn, bk, dot, warps, stages = 16, 256, min(64 if M <= 32 else 128, group_size), True, 4, 3
    tiles = -(-N // bn) * -(-M // bm)
    k_tiles = -(-K // bk)
    split = 1
    while tiles * split < 2 * sms and split < 16 and split * 2 <= max(1, k_tiles // 4):
        split *= 2
    return W4A16Config(block_m=bm, block_n=bn, block_k=bk, split_k=split, use_dot=dot, dequant=2,
                       num_warps=warps, num_stages=stages)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _nibble_weights(qw, qz, s_ptr, s_off, p_mask, J: tl.constexpr, DTYPE: tl.constexpr, DEQ: tl.constexpr):
    # Dequantize nibble J of the packed tile: columns 8c + AWQ_ORDER[J] of the output.
    # qw [BK, BP] int32, qz [BP] int32 -> w [BK, BP] in DTYPE
    ORDER_J: tl.constexpr = (J % 4) * 2 + J // 4
    s = tl.load(s_ptr + s_off * 8 + ORDER_J, mask=p_mask, other=0.0).to(DTYPE)   # [BP]
    q = (qw >> (4 * J)) & 0xF
    z = (qz >> (4 * J)) & 0xF
    if DEQ == 2:
        # "magic number": the 16-bit pattern MAGIC | q is the float (BASE + q) exactly (fp16: 0x6400 =
        # 1024, bf16: 0x4300 = 128), so no int -> float conversion instruction is needed
        # (fp16: 0x6400 = 1024; otherwise in fp32: 0x4B000000 = 2^23, then rounded once to DTYPE)
        if DTYPE == tl.float16:
            h = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            hz = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            w = (h - hz[None, :]) * s[None, :]
        else:
            h = (q | 0x4B000000).to(tl.float32, bitcast=True)
            hz = (z | 0x4B000000).to(tl.float32, bitcast=True)
            w = ((h - hz[None, :]) * s[None, :].to(tl.float32)).to(DTYPE)
    elif DEQ == 1:
        # int -> fp32 -> DTYPE (exact for |q - z| <= 15)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :].to(tl.float32)).to(DTYPE)
    elif DTYPE == tl.bfloat16:   # (Triton's interpreter mis-converts int -> bf16: go through fp32)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :].to(tl.float32)).to(DTYPE)
    else:
        w = (q - z[None, :]).to(DTYPE) * s[None, :]
    return w


@triton.jit
def _accumulate(acc, x, qw, qz, s_ptr, s_off, p_mask, J: tl.constexpr, USE_DOT: tl.constexpr,
                DTYPE: tl.constexpr, PRECISION: tl.constexpr, DEQ: tl.constexpr):
    w = _nibble_weights(qw, qz, s_ptr, s_off, p_mask, J, DTYPE, DEQ)
    if USE_DOT:
        if PRECISION == "ieee":                                   # fp32 inputs: exact fp32 products
            acc = tl.dot(x, w, acc, input_precision="ieee")       # [BM, BK] @ [BK, BP]
        else:
            acc = tl.dot(x, w, acc)
    else:
        acc = acc + x[:, None].to(tl.float32) * w                 # [BK, BP] fp32, reduced after the loop
    return acc


@triton.jit
def _store(y_ptr, acc, offs_m, offs_p, M, N, stride_ym, stride_yn, J: tl.constexpr, USE_DOT: tl.constexpr,
           ATOMIC: tl.constexpr):
    ORDER_J: tl.constexpr = (J % 4) * 2 + J // 4
    cols = offs_p * 8 + ORDER_J                                          # [BP]
    if USE_DOT:
        ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :] * stride_yn
        mask = (offs_m[:, None] < M) & (cols[None, :] < N)
        val = acc
    else:
        ptrs = y_ptr + offs_m * stride_ym + cols * stride_yn              # offs_m: this row, broadcast
        mask = (offs_m < M) & (cols < N)
        val = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(ptrs, val.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, val.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "k_tiles_per_split"])
def _w4a16_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, NP, k_tiles_per_split,
                  stride_xm, stride_xk, stride_qk, stride_zg, stride_sg, stride_ym, stride_yn,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  ACC_ROWS: tl.constexpr, USE_DOT: tl.constexpr, ATOMIC: tl.constexpr, W_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr, DEQ: tl.constexpr):
    # W_DTYPE: dtype of the dequantized weights (the activation dtype for tl.dot, fp32 for the GEMV)
    # ACC_ROWS: BLOCK_M (tl.dot) or BLOCK_K (GEMV: per-k partial products, summed over k at the end)
    BP: tl.constexpr = BLOCK_N // 8                 # packed int32 columns per tile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_p = pid_n * BP + tl.arange(0, BP)          # packed column c: output columns 8c .. 8c+7
    p_mask = offs_p < NP
    if USE_DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m                              # one row per program
    acc0 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc1 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc2 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc3 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc4 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc5 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc6 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    acc7 = tl.zeros((ACC_ROWS, BP), dtype=tl.float32)
    kt0 = pid_k * k_tiles_per_split
    kt1 = tl.minimum(kt0 + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    for kt in range(kt0, kt1):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)           # [BM, BK]
        else:
            x = tl.load(x_ptr + offs_m * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)  # [BK]
        # packed weights: rows k < Kp always exist (Kp is a multiple of GROUP, GROUP of BLOCK_K)
        qw = tl.load(qw_ptr + offs_k[:, None] * stride_qk + offs_p[None, :], mask=p_mask[None, :], other=0)
        g = (kt * BLOCK_K) // GROUP                 # the whole K tile lies in one group
        qz = tl.load(qz_ptr + g * stride_zg + offs_p, mask=p_mask, other=0)               # [BP]
        s_row = s_ptr + g * stride_sg
        acc0 = _accumulate(acc0, x, qw, qz, s_row, offs_p, p_mask, 0, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc1 = _accumulate(acc1, x, qw, qz, s_row, offs_p, p_mask, 1, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc2 = _accumulate(acc2, x, qw, qz, s_row, offs_p, p_mask, 2, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc3 = _accumulate(acc3, x, qw, qz, s_row, offs_p, p_mask, 3, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc4 = _accumulate(acc4, x, qw, qz, s_row, offs_p, p_mask, 4, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc5 = _accumulate(acc5, x, qw, qz, s_row, offs_p, p_mask, 5, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc6 = _accumulate(acc6, x, qw, qz, s_row, offs_p, p_mask, 6, USE_DOT, W_DTYPE, PRECISION, DEQ)
        acc7 = _accumulate(acc7, x, qw, qz, s_row, offs_p, p_mask, 7, USE_DOT, W_DTYPE, PRECISION, DEQ)
    _store(y_ptr, acc0, offs_m, offs_p, M, N, stride_ym, stride_yn, 0, USE_DOT, ATOMIC)
    _store(y_ptr, acc1, offs_m, offs_p, M, N, stride_ym, stride_yn, 1, USE_DOT, ATOMIC)
    _store(y_ptr, acc2, offs_m, offs_p, M, N, stride_ym, stride_yn, 2, USE_DOT, ATOMIC)
    _store(y_ptr, acc3, offs_m, offs_p, M, N, stride_ym, stride_yn, 3, USE_DOT, ATOMIC)
    _store(y_ptr, acc4, offs_m, offs_p, M, N, stride_ym, stride_yn, 4, USE_DOT, ATOMIC)
    _store(y_ptr, acc5, offs_m, offs_p, M, N, stride_ym, stride_yn, 5, USE_DOT, ATOMIC)
    _store(y_ptr, acc6, offs_m, offs_p, M, N, stride_ym, stride_yn, 6, USE_DOT, ATOMIC)
    _store(y_ptr, acc7, offs_m, offs_p, M, N, stride_ym, stride_yn, 7, USE_DOT, ATOMIC)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               out_features: int | None = None, *, bias: torch.Tensor | None = None,
               config: W4A16Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]`` in ``x.dtype`` (fp16, bf16 or fp32), W from the AWQ layout.

    ``out_features`` (N) defaults to the packed width ``8 * qweight.shape[1]``. ``x`` may be any
    strided view. ``config``: tiles and split-K (default :func:`default_config`).
    """
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qweight.stride(1) != 1 or qzeros.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight, qzeros and scales must be contiguous along their last dimension")
    Kp, NP = qweight.shape
    n_groups = qzeros.shape[0]
    if Kp % n_groups:
        raise ValueError(f"qweight rows {Kp} not a multiple of the {n_groups} groups of qzeros")
    G = Kp // n_groups
    N = out_features or NP * 8
    lead = x.shape[:-1]
    K = x.shape[-1]
    if K > Kp or N > NP * 8 or scales.shape != (n_groups, NP * 8):
        raise ValueError(f"shapes do not match: x [..., {K}], qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, N={N}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = config or default_config(M, N, K, G)
    bk = min(cfg.block_k, G)
    if G % bk or cfg.block_n % 8:
        raise ValueError(f"block_k={bk} must divide group size {G}; block_n={cfg.block_n} a multiple of 8")
    if cfg.use_dot and (cfg.block_m < 16 or cfg.block_n < 128 or bk < 16):
        raise ValueError("use_dot needs block_m >= 16, block_n >= 128 (16 packed columns), block_k >= 16")
    k_tiles = -(-K // bk)
    split = max(1, min(cfg.split_k, k_tiles))
    per_split = -(-k_tiles // split)
    split = -(-k_tiles // per_split)
    atomic = split > 1
    # (bf16 partial sums always go through fp32: Triton's interpreter has no bf16 atomics)
    if atomic and not (cfg.atomic_out and out is None and x.dtype != torch.bfloat16):
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)      # fp32 partial sums, cast below
    elif atomic:
        y = torch.zeros(M, N, device=x.device, dtype=x.dtype)            # partial sums added in x.dtype
    else:
        y = out.reshape(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm = cfg.block_m if cfg.use_dot else 1
    grid = (triton.cdiv(NP, cfg.block_n // 8), triton.cdiv(M, bm), split)
    precision = "ieee" if x.dtype == torch.float32 else "default"
    w_dtype = _TL_DTYPES[x.dtype] if cfg.use_dot else tl.float32
    _w4a16_kernel[grid](
        x2, qweight, qzeros, scales, y, M, N, K, NP, per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0), y.stride(1),
        GROUP=G, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk, ACC_ROWS=bm if cfg.use_dot else bk,
        USE_DOT=cfg.use_dot, ATOMIC=atomic, W_DTYPE=w_dtype, PRECISION=precision, DEQ=cfg.dequant,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if y.dtype != x.dtype:
        y = y.to(x.dtype) if out is None else out.reshape(M, N).copy_(y)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
