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
tile). Measured on an H200 (``data/results/awq``), this kernel is slower than cuBLAS fp16 at Llama-7B
shapes for every M measured; decode-sized M goes to ``w4a16_gemv`` below instead.

``w4a16_gemv`` (M = 1..8, decode) runs on the K-major layouts of :func:`mlsys24.quant.pack.gemv_repack`
(row-major, or group-major: a tile of channels of one group is one contiguous block, and its steps and
zeros one coalesced row) with split-K combined inside the launch; see the comment block above it.
Measured on an H200 (the same sweep, ``data/results/awq``): the group-major layout and the 4-word fp16x2
loop took the 70B-sized layer from 51 % to 77 % of copy bandwidth (register prefetch won on two of
the six shapes).

``w4a16_ref`` is the float32 dequantize-then-matmul reference.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_*: programmatic dependent launch)

from mlsys24.kernels import pdl_supported  # (under TRITON_INTERPRET=1 also the interpreter fixes)
from mlsys24.kernels.stream import l2_prefetch, l2_prefetch_supported

from .pack import dequantize_awq

__all__ = ["W4A16Config", "w4a16_gemm", "w4a16_ref", "default_config", "weight_bytes", "GemvConfig",
           "default_gemv_config", "GEMV_TABLE_M1", "w4a16_gemv", "w4a16_gemv_ref"]


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


# ------------------------------------------------------------------------------------------------
# Small-M GEMV on the K-major layout of :func:`mlsys24.quant.pack.gemv_repack`
#
#   y[m, n] = sum_g s[n,g] * sum_{c<W} sum_i (q_i - z[n,g]) x_i,   W = G/8 words per group,
#   q_i = nibble i of word (n, g*W + c),  x_i = x[m, g*G + (i % 4)*2W + 2c + i // 4].
#
# Two inner loops, both without int -> float conversion instructions:
# - half2 (fp16 activations on a GPU): one LOP3 ``(w & 0x000F000F) | 0x64006400`` turns nibbles 0
#   and 4 into the fp16 pair (1024 + q_0, 1024 + q_4); one HSUB2 with (1024 + z, 1024 + z) gives
#   q - z exactly; their products with the matching x pair (adjacent channels, one 32-bit load) are
#   summed in fp16x2 over the word's 8 weights (4 HFMA2) and once in fp32; the group's scale is
#   applied per word: ~2.8 instructions per weight in the compiled main loop (offline SASS, sm_90;
#   PTX inline assembly, so GPU only; ``GemvConfig.half2``). The fp16 products and their partial sum
#   over 8 weights round to 2^-11 relative; the sum over words is fp32.
# - fp32 (otherwise: bf16/fp32 activations, the Triton interpreter, half2 off): moving nibble i to
#   bits 19..22 and OR-ing
#   in the exponent of 1.0 gives the float f_i = 1 + q_i/16 exactly, so
#   sum_i q_i x_i = 16 * (sum_i f_i x_i - sum_i x_i): per weight a shift, two logic ops and an FMA.
#
# Around the inner loop (``GemvConfig``; offline SASS of the sm_90 main loop, 64 x 2-group step, 4 warps):
# - ``quad``: the fp16x2 sums of the 4 words a thread holds (same channel and group) stay in one fp16x2
#   register, converted, scaled and accumulated once: 364 -> 324 instructions per step;
# - full tiles and whole steps per split (``EVEN``, chosen at launch) drop every mask: -> 286;
# - ``prefetch``: the next step's words, steps and zeros are loaded before this step is computed
#   (a register software pipeline): each program keeps a step of bytes in flight while it computes,
#   which is what a latency-bound stream needs (Little's law: ~copy rate x DRAM latency in flight per SM).

_HALF2_WORD = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, sh, acc, r16;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 r16, 0x2C002C00;
lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 sh, $1, 8;
lop3.b32 t2, sh, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, sh, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 t0, t0, $2;
fma.rn.f16x2 t1, t1, r16, $3;
sub.f16x2 t2, t2, $2;
fma.rn.f16x2 t3, t3, r16, $3;
mul.rn.f16x2 acc, t0, $4;
fma.rn.f16x2 acc, t1, $5, acc;
fma.rn.f16x2 acc, t2, $6, acc;
fma.rn.f16x2 acc, t3, $7, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")
# $1: the word; $2: fp16 pair (1024 + z); $3: fp16 pair -(64 + z); $4..$7: x pairs of nibbles (p, p + 4).
# Nibbles 1, 5 (3, 7 after the shift by 8) land 4 bits up: the LOP3 gives 1024 + 16 q, and
# (1024 + 16 q) / 16 - (64 + z) = q - z exactly (one HFMA2, no second shift).


def _half2_quad_asm() -> str:
    """The fp16x2 loop over 4 words of one thread (same channel, same group; ``pack=4``): the 32
    products are summed in one fp16x2 register, converted once, scaled and added to the fp32
    accumulator of the first word (the other three pass through). Per word ~12 instructions instead
    of ~17 for :data:`_HALF2_WORD` (one conversion, add and FMA per 4 words instead of per word).
    Operands (pack=4, 4 registers per argument): $0..$3 the accumulators out; $4..$7 the words;
    $8.. (1024 + z) pairs; $12.. -(64 + z) pairs; $16, $20, $24, $28 + i: x pairs of word i;
    $32..$35 the accumulators in; $36.. the step s."""
    lines = ["{", ".reg .b32 t0, t1, t2, t3, sh, acc, r16;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi, sm;",
             "mov.b32 r16, 0x2C002C00;"]
    for i in range(4):
        w = f"${4 + i}"
        lines += [f"lop3.b32 t0, {w}, 0x000F000F, 0x64006400, 0xEA;",
                  f"lop3.b32 t1, {w}, 0x00F000F0, 0x64006400, 0xEA;",
                  f"shr.u32 sh, {w}, 8;",
                  "lop3.b32 t2, sh, 0x000F000F, 0x64006400, 0xEA;",
                  "lop3.b32 t3, sh, 0x00F000F0, 0x64006400, 0xEA;",
                  "sub.f16x2 t0, t0, $8;", "fma.rn.f16x2 t1, t1, r16, $12;",
                  "sub.f16x2 t2, t2, $8;", "fma.rn.f16x2 t3, t3, r16, $12;",
                  (f"mul.rn.f16x2 acc, t0, ${16 + i};" if i == 0 else f"fma.rn.f16x2 acc, t0, ${16 + i}, acc;"),
                  f"fma.rn.f16x2 acc, t1, ${20 + i}, acc;",
                  f"fma.rn.f16x2 acc, t2, ${24 + i}, acc;",
                  f"fma.rn.f16x2 acc, t3, ${28 + i}, acc;"]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 sm, flo, fhi;",
              "fma.rn.f32 $0, sm, $36, $32;", "mov.b32 $1, $33;", "mov.b32 $2, $34;", "mov.b32 $3, $35;", "}"]
    return "\n".join(lines)


_HALF2_QUAD = tl.constexpr(_half2_quad_asm())


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 64       # output channels (rows of qweight_t) per program
    unroll: int = 2         # groups per loop step (their loads are issued together)
    split_k: int = 0        # programs sharing one row tile's K range (0: choose from the SM count)
    num_warps: int = 4
    num_stages: int = 1
    half2: bool = False     # fp16 x on a GPU: the fp16x2 inline-assembly inner loop (else the fp32 one);
    #                         off by default until a GPU run of ``mlsys24.bench awq`` has validated and timed it
    prefetch: bool = False  # half2, unroll 1 or 2: load the next step's weights before computing this one
    quad: bool = False      # half2: sum 4 words (32 products) in fp16x2 before converting (G >= 32); the
    #                         partial sums must stay below fp16's 65504: |x| * 15 * 16 < 65504, |x| < 270
    pdl: bool = False       # programmatic dependent launch (Hopper+): the launch may start while the previous
    #                         kernel finishes; it reads its (static) weights first and waits for that kernel
    #                         before reading x or touching y and the split-K workspace
    l2_prefetch: bool = False  # Hopper+, group-major layout: each program first asks the copy engine to bring
    #                            all its weight tiles (and steps / zeros) into L2, one instruction per group,
    #                            so its whole share of the weights is in flight from the start (before the
    #                            PDL wait too); its loads then find them in L2 or on the way. An ablation:
    #                            slower in every measured case (H100 gate/up 17.7 vs 15.4 us single call)

    def as_dict(self) -> dict:
        return asdict(self)


# The M = 1 winners of the H200 sweep (data/results/awq/h200.json, 2026-11-26 12:42 UTC, G = 128): every
# shape chose the group-major layout and the fp16x2 4-word loop;
# (N, K) -> (block_n, unroll, split_k, num_warps, prefetch)
GEMV_TABLE_M1 = {
    (11008, 4096): (64, 2, 6, 4, False),      # Llama-2-7B gate / up
    (4096, 11008): (32, 2, 12, 4, False),     # down
    (4096, 4096): (128, 2, 12, 8, True),      # q / k / v / o
    (12288, 4096): (64, 2, 6, 4, False),      # [q; k; v] concatenated
    (22016, 4096): (128, 1, 3, 8, True),      # [gate; up] concatenated
    (28672, 8192): (64, 4, 6, 4, False),      # Llama-2-70B gate / up
}


def default_gemv_config(M: int, N: int, K: int, group_size: int, *, sms: int = 132) -> GemvConfig:
    """The sweep's choice for a measured M = 1 shape at G = 128 (``GEMV_TABLE_M1``); otherwise the
    configuration family with the best geometric mean over those shapes in the same run (within 1 %
    of each shape's best on average): 64-channel tiles, 4 warps, 2 groups per step, the fp16x2 4-word
    loop, and split-K raised until ~7.5 programs per SM (the splits that family chose: ~1000 programs
    on 132 SMs), keeping >= 4 groups per split. Best with the group-major layout
    (``gemv_repack(..., layout="group")``), which every shape chose."""
    if M == 1 and group_size == 128 and (N, K) in GEMV_TABLE_M1:
        bn, u, split, w, pf = GEMV_TABLE_M1[(N, K)]
        return GemvConfig(block_n=bn, unroll=u, split_k=split, num_warps=w, num_stages=1, half2=True, quad=True,
                          prefetch=pf)
    bn = 64
    n_groups = -(-K // group_size)
    tiles = -(-N // bn)
    split = max(1, min(-(-int(7.5 * sms) // tiles), n_groups // 4))
    return GemvConfig(block_n=bn, unroll=2, split_k=split, num_warps=4, num_stages=1, half2=True, quad=True)


@triton.jit
def _gemv_load(qw_ptr, s_ptr, z_ptr, g, g_end, offs_n, n_mask, offs_c, stride_qn, stride_qg, stride_sn, stride_sg,
               stride_zn, stride_zg, EVEN: tl.constexpr):
    # group g of BLOCK_N rows: qw [BN, W] int32 words; s [BN] fp32 steps; z [BN] int32 zero points
    # EVEN: every tile full (N % BLOCK_N == 0) and every split a whole number of UNROLL steps: no masks
    qw_ptrs = qw_ptr + offs_n[:, None] * stride_qn + (g * stride_qg + offs_c)[None, :]
    if EVEN:
        qw = tl.load(qw_ptrs)
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg).to(tl.int32)
    else:
        live = g < g_end
        qw = tl.load(qw_ptrs, mask=n_mask[:, None] & live, other=0)
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask & live, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask & live, other=0).to(tl.int32)
    return qw, s, z


@triton.jit
def _gemv_group(acc, qw, s, z, x_ptr, g, g_end, offs_c, offs_m, m_mask, K, stride_xm, G: tl.constexpr,
                W: tl.constexpr, MB: tl.constexpr,
                BLOCK_N: tl.constexpr, HALF2: tl.constexpr, EVEN_K: tl.constexpr, EVEN: tl.constexpr = False):
    # One group g of BLOCK_N rows (loaded by _gemv_load): qw [BN, W]; s, z [BN]; x slices [W] (MB == 1)
    # or [MB, W] loaded here.
    live = g < g_end
    if HALF2:
        # x as fp16 pairs (int32): pair p*W + c of the group = channels p*2W + 2c, p*2W + 2c + 1
        xi_ptr = x_ptr.to(tl.pointer_type(tl.int32))
        kp = g * (G // 2) + offs_c                                                 # [W] pair index
        if EVEN:
            x0 = tl.load(xi_ptr + kp)
            x1 = tl.load(xi_ptr + kp + W)
            x2 = tl.load(xi_ptr + kp + 2 * W)
            x3 = tl.load(xi_ptr + kp + 3 * W)
        elif EVEN_K:   # K a multiple of G: only whole groups, vector loads
            x0 = tl.load(xi_ptr + kp, mask=live, other=0)
            x1 = tl.load(xi_ptr + kp + W, mask=live, other=0)
            x2 = tl.load(xi_ptr + kp + 2 * W, mask=live, other=0)
            x3 = tl.load(xi_ptr + kp + 3 * W, mask=live, other=0)
        else:
            x0 = tl.load(xi_ptr + kp, mask=(2 * kp < K) & live, other=0)
            x1 = tl.load(xi_ptr + kp + W, mask=(2 * (kp + W) < K) & live, other=0)
            x2 = tl.load(xi_ptr + kp + 2 * W, mask=(2 * (kp + 2 * W) < K) & live, other=0)
            x3 = tl.load(xi_ptr + kp + 3 * W, mask=(2 * (kp + 3 * W) < K) & live, other=0)
        zz = z | 0x6400                                                            # fp16 bits of 1024 + z
        zz = zz | (zz << 16)
        zn = (z << 4) + 0xD400                                                     # fp16 bits of -(64 + z)
        zn = zn | (zn << 16)
        if HALF2 == 4:   # 4 words per asm instance, accumulated inside it (s applied there)
            acc = tl.inline_asm_elementwise(_HALF2_QUAD, "=f,=f,=f,=f," + "r," * 28 + "f," * 7 + "f",
                                            [qw, zz[:, None], zn[:, None], x0[None, :], x1[None, :], x2[None, :],
                                             x3[None, :], acc, s[:, None]],
                                            dtype=tl.float32, is_pure=True, pack=4)
        else:
            p = tl.inline_asm_elementwise(_HALF2_WORD, "=f,r,r,r,r,r,r,r",
                                          [qw, zz[:, None], zn[:, None], x0[None, :], x1[None, :], x2[None, :],
                                           x3[None, :]],
                                          dtype=tl.float32, is_pure=True, pack=1)      # [BN, W] sum (q - z) x
            acc += s[:, None] * p
    else:
        s16 = 16.0 * s
        zsm = -(z.to(tl.float32) + 16.0) * s                                      # -z s - 16 s
        if MB == 1:
            p = tl.zeros((BLOCK_N, W), dtype=tl.float32)
            xc = tl.zeros((W,), dtype=tl.float32)
        else:
            p = tl.zeros((MB, BLOCK_N, W), dtype=tl.float32)
            xc = tl.zeros((MB, W), dtype=tl.float32)
        h = tl.arange(0, 2)
        for pp in tl.static_range(4):
            k = g * G + pp * 2 * W + 2 * offs_c[:, None] + h[None, :]               # [W, 2] channels
            if MB == 1:
                xe, xo = tl.split(tl.load(x_ptr + k, mask=(k < K) & live, other=0.0).to(tl.float32))
            else:
                k3 = k[None, :, :]
                xe, xo = tl.split(tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k3,
                                          mask=m_mask[:, None, None] & (k3 < K) & live, other=0.0).to(tl.float32))
            for hh in tl.static_range(2):
                i = pp + 4 * hh                                                    # nibble i
                if 4 * i < 19:
                    t = qw << (19 - 4 * i)
                else:
                    t = qw >> (4 * i - 19)
                f = ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)      # 1 + q_i / 16
                xi = xe if hh == 0 else xo
                if MB == 1:
                    p += f * xi[None, :]
                else:
                    p += f[None, :, :] * xi[:, None, :]
                xc += xi
        # sum_i (q_i - z) s x_i = 16 s (p - xc) - z s xc = s16 p + (-z s - 16 s) xc
        if MB == 1:
            acc += s16[:, None] * p + zsm[:, None] * xc[None, :]
        else:
            acc += s16[None, :, None] * p + zsm[None, :, None] * xc[:, None, :]
    return acc


@triton.jit(do_not_specialize=["M", "n_groups", "groups_per_split", "SPLIT"])
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, n_groups, groups_per_split,
                       SPLIT, stride_xm, stride_ym, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, MB: tl.constexpr,
                       USE_SPLIT: tl.constexpr, HALF2: tl.constexpr, EVEN_K: tl.constexpr, M_FAST: tl.constexpr,
                       EVEN: tl.constexpr = False, PREFETCH: tl.constexpr = False, SPLIT_P2: tl.constexpr = 1,
                       PDL: tl.constexpr = False, L2PF: tl.constexpr = 0):
    # grid (row tiles, splits, row blocks), or with M_FAST (rows, row tiles, splits): the programs of
    # one weight tile for the M rows then run together and share it through L2
    W: tl.constexpr = G // 8
    if M_FAST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        n_tiles_n = tl.num_programs(1)
    else:
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        n_tiles_n = tl.num_programs(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = tl.arange(0, W)
    offs_m = pid_m * MB + tl.arange(0, MB)
    m_mask = offs_m < M
    x_row = x_ptr + pid_m * MB * stride_xm            # MB == 1: this program's row
    if MB == 1:
        acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    else:
        acc = tl.zeros((MB, BLOCK_N, W), dtype=tl.float32)
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, n_groups)
    if PDL:
        # the next kernel in the stream may launch once every program of this one has started
        tl.extra.cuda.gdc_launch_dependents()
    if L2PF != 0:
        # group-major tiles: BLOCK_N consecutive rows of one group are one contiguous block of words
        # (L2PF 2: the tile's steps and zero points are contiguous and 16-byte aligned too)
        n0 = pid_n * BLOCK_N
        rows = tl.minimum(N - n0, BLOCK_N)
        for g in range(g0, g1):
            l2_prefetch(qw_ptr + n0 * stride_qn + g * stride_qg, rows * (W * 4))
            if L2PF == 2:
                nb_s = (rows * 2) // 16 * 16
                if nb_s > 0:
                    l2_prefetch(s_ptr + n0 + g * stride_sg, nb_s)
                nb_z = rows // 16 * 16
                if nb_z > 0:
                    l2_prefetch(z_ptr + n0 + g * stride_zg, nb_z)
    if PREFETCH:
        # software pipeline in registers: the weights of step i + 1 are requested before step i is
        # computed, so every program keeps a step's bytes in flight while it computes (past the
        # last step the last group is loaded again: in bounds, no masks, never used)
        qa, sa, za = _gemv_load(qw_ptr, s_ptr, z_ptr, g0, g1, offs_n, n_mask, offs_c, stride_qn, stride_qg,
                                stride_sn, stride_sg, stride_zn, stride_zg, EVEN)
        if UNROLL == 2:
            qb, sb, zb = _gemv_load(qw_ptr, s_ptr, z_ptr, tl.minimum(g0 + 1, g1 - 1), g1, offs_n, n_mask, offs_c,
                                    stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg, EVEN)
        if PDL:
            # the first step's weights are in flight; x (the previous kernel's output) only after it ends
            tl.extra.cuda.gdc_wait()
        for g in range(g0, g1, UNROLL):
            gn = tl.minimum(g + UNROLL, g1 - 1)
            qa2, sa2, za2 = _gemv_load(qw_ptr, s_ptr, z_ptr, gn, g1, offs_n, n_mask, offs_c, stride_qn, stride_qg,
                                       stride_sn, stride_sg, stride_zn, stride_zg, EVEN)
            if UNROLL == 2:
                qb2, sb2, zb2 = _gemv_load(qw_ptr, s_ptr, z_ptr, tl.minimum(gn + 1, g1 - 1), g1, offs_n, n_mask,
                                           offs_c, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg,
                                           EVEN)
            acc = _gemv_group(acc, qa, sa, za, x_row, g, g1, offs_c, offs_m - pid_m * MB, m_mask, K, stride_xm,
                              G, W, MB, BLOCK_N, HALF2, EVEN_K, EVEN)
            if UNROLL == 2:
                acc = _gemv_group(acc, qb, sb, zb, x_row, g + 1, g1, offs_c, offs_m - pid_m * MB, m_mask, K,
                                  stride_xm, G, W, MB, BLOCK_N, HALF2, EVEN_K, EVEN)
                qb, sb, zb = qb2, sb2, zb2
            qa, sa, za = qa2, sa2, za2
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        for g in range(g0, g1, UNROLL):
            for u in tl.static_range(UNROLL):
                qw, s, z = _gemv_load(qw_ptr, s_ptr, z_ptr, g + u, g1, offs_n, n_mask, offs_c, stride_qn, stride_qg,
                                      stride_sn, stride_sg, stride_zn, stride_zg, EVEN)
                acc = _gemv_group(acc, qw, s, z, x_row, g + u, g1, offs_c, offs_m - pid_m * MB, m_mask, K,
                                  stride_xm, G, W, MB, BLOCK_N, HALF2, EVEN_K, EVEN)
    if MB == 1:
        y = tl.sum(acc, axis=1)                                                   # [BN]
        y_ptrs = y_ptr + pid_m * stride_ym + offs_n
        y_mask = n_mask
        p_offs = tl.arange(0, BLOCK_N)
    else:
        y = tl.sum(acc, axis=2)                                                   # [MB, BN]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        p_offs = tl.arange(0, MB)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if not USE_SPLIT:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # split-K fix-up in the same launch: every program writes its fp32 partial sums, the last
        # of the SPLIT programs of this tile (atomic ticket) adds them and resets the ticket to 0
        tile = pid_m * n_tiles_n + pid_n
        tl.store(part_ptr + (tile * SPLIT + pid_k) * (MB * BLOCK_N) + p_offs, y)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT - 1:
            # all SPLIT partial tiles in one vector load (one L2 round trip on the critical path,
            # not one per split), summed in a fixed tree order: deterministic
            tl.debug_barrier()
            sp = tl.arange(0, SPLIT_P2)
            if MB == 1:
                parts = tl.load(part_ptr + (tile * SPLIT + sp[:, None]) * BLOCK_N + p_offs[None, :],
                                mask=(sp < SPLIT)[:, None], other=0.0, cache_modifier=".cg")
            else:
                parts = tl.load(part_ptr + (tile * SPLIT + sp[:, None, None]) * (MB * BLOCK_N) + p_offs[None, :, :],
                                mask=(sp < SPLIT)[:, None, None], other=0.0, cache_modifier=".cg")
            tot = tl.sum(parts, axis=0)
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


_GEMV_WORKSPACE: dict = {}
_GEMV_RETIRED: list = []   # outgrown buffers stay alive: a captured CUDA graph may still point at them


def _gemv_workspace(device, n_tiles: int, part_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device tickets (int32, zero between launches) and fp32 partial sums, grown on demand.
    Launches on one stream run one after the other, so they can share it (not launches on
    concurrent streams)."""
    key = (device.type, device.index)
    cnt, part = _GEMV_WORKSPACE.get(key, (None, None))
    if cnt is None or cnt.numel() < n_tiles:
        _GEMV_RETIRED.append(cnt)
        cnt = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
    if part is None or part.numel() < part_elems:
        _GEMV_RETIRED.append(part)
        part = torch.empty(max(part_elems, 1 << 20), dtype=torch.float32, device=device)
    _GEMV_WORKSPACE[key] = (cnt, part)
    return cnt, part


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def w4a16_gemv(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, *,
               bias: torch.Tensor | None = None, config: GemvConfig | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]`` for few rows (decode), W in a GEMV layout of
    :func:`mlsys24.quant.pack.gemv_repack`: ``qweight_t [N, Kp/8]`` (row-major: one channel's words
    contiguous) or ``[N, Kp/G, G/8]`` (any strides with the last one 1, e.g. the group-major view, where
    one group of consecutive channels is contiguous); ``scales_t``/``zeros_t [N, Kp/G]`` with any strides.

    Rows of x are processed up to 8 at a time by one program (each weight tile is read once for
    them); split-K partial sums are combined inside the launch (no zero-fill, no extra kernel). The
    fp16x2 inner loop (``config.half2``) runs for one fp16 row of even K on a GPU; otherwise fp32.
    """
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    n_groups = scales_t.shape[1]
    N = qweight_t.shape[0]
    KW = qweight_t.shape[1] * (qweight_t.shape[2] if qweight_t.dim() == 3 else 1)
    Kp = KW * 8
    if (qweight_t.dim() not in (2, 3) or Kp % n_groups or scales_t.shape != (N, n_groups)
            or zeros_t.shape != (N, n_groups) or (qweight_t.dim() == 3 and qweight_t.shape[1] != n_groups)):
        raise ValueError(f"shapes do not match: qweight_t {tuple(qweight_t.shape)}, scales_t "
                         f"{tuple(scales_t.shape)}, zeros_t {tuple(zeros_t.shape)}")
    G = Kp // n_groups
    if G % 8 or (G // 8) & (G // 8 - 1):
        raise ValueError(f"group size {G}: G/8 must be a power of two")
    if qweight_t.stride(-1) != 1 and qweight_t.shape[-1] > 1:
        raise ValueError("qweight_t must be contiguous along its last dimension")
    # word c of group g of channel n sits at n * stride_qn + g * stride_qg + c
    stride_qg = qweight_t.stride(1) if qweight_t.dim() == 3 else G // 8
    lead = x.shape[:-1]
    K = x.shape[-1]
    if K > Kp:
        raise ValueError(f"x has K={K} > packed {Kp}")
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = config or default_gemv_config(M, N, K, G)
    split = cfg.split_k or default_gemv_config(M, N, K, G).split_k
    per = -(-n_groups // max(1, min(split, n_groups)))
    per = -(-per // cfg.unroll) * cfg.unroll
    split = -(-n_groups // per)
    half2 = (cfg.half2 and M <= 8 and x.dtype == torch.float16 and x.is_cuda and not _interpreting()
             and K % 2 == 0 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0)
    # quad needs each thread's 4 consecutive words to be one channel's (16-byte vector loads): strides in
    # words that Triton knows to be multiples of 16 (it specialises such integer arguments) and W >= 4
    quad = cfg.quad and G // 8 >= 4 and qweight_t.stride(0) % 16 == 0 and stride_qg % 16 == 0
    h2_mode = (4 if quad else 1) if half2 else 0
    # fp32 loop: up to 8 rows per program (weights unpacked once for them); half2 loop: one row per
    # program, the rows of one tile launched next to each other
    MB = 1 if (M == 1 or half2) else min(8, 1 << (M - 1).bit_length())
    y = out.reshape(M, N) if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    tiles_n, blocks_m = triton.cdiv(N, cfg.block_n), triton.cdiv(M, MB)
    grid = (blocks_m, tiles_n, split) if half2 else (tiles_n, split, blocks_m)
    n_tiles = tiles_n * blocks_m
    if split > 1:
        cnt, part = _gemv_workspace(x.device, n_tiles, n_tiles * split * MB * cfg.block_n)
    else:
        cnt = part = y   # unused
    pdl = cfg.pdl and pdl_supported(x.device)
    launch = {"launch_pdl": True} if pdl else {}
    l2pf = 0
    if cfg.l2_prefetch:
        if not l2_prefetch_supported(x.device):
            raise ValueError("GemvConfig.l2_prefetch needs a CUDA GPU of compute capability >= 9.0")
        if qweight_t.dim() != 3 or qweight_t.stride(0) != G // 8 or qweight_t.data_ptr() % 16:
            raise ValueError("GemvConfig.l2_prefetch needs the group-major layout (gemv_repack(..., layout='group'))")
        if (G // 8) % 4:
            raise ValueError(f"GemvConfig.l2_prefetch needs group size >= 32 (16-byte rows), got {G}")
        # steps (2-byte) and zeros (1-byte) of a tile contiguous, every tile's start 16-byte aligned
        l2pf = 2 if (scales_t.stride(0) == 1 and zeros_t.stride(0) == 1 and scales_t.element_size() == 2
                     and zeros_t.element_size() == 1 and scales_t.stride(1) % 8 == 0 and zeros_t.stride(1) % 16 == 0
                     and cfg.block_n % 16 == 0 and scales_t.data_ptr() % 16 == 0
                     and zeros_t.data_ptr() % 16 == 0) else 1
    _w4a16_gemv_kernel[grid](
        x2, qweight_t, scales_t, zeros_t, y, part, cnt, M, N, K, n_groups, per, split,
        x2.stride(0), y.stride(0), qweight_t.stride(0), stride_qg, scales_t.stride(0), scales_t.stride(1),
        zeros_t.stride(0), zeros_t.stride(1),
        G=G, BLOCK_N=cfg.block_n, UNROLL=cfg.unroll, MB=MB, USE_SPLIT=split > 1, HALF2=h2_mode,
        EVEN_K=K % G == 0, M_FAST=half2,
        EVEN=K % G == 0 and N % cfg.block_n == 0 and split * per == n_groups,
        PREFETCH=cfg.prefetch and cfg.unroll <= 2,
        # one row: a fixed 32-slot fix-up load (masked), so split counts up to 32 share one compiled kernel
        SPLIT_P2=max(32, triton.next_power_of_2(split)) if MB == 1 else triton.next_power_of_2(split),
        PDL=pdl, L2PF=l2pf, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch,
    )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)


def w4a16_gemv_ref(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor
                   ) -> torch.Tensor:
    """float32 reference for the GEMV layout: dequantize (``w = (q - z) * s``), then ``x @ W^T``."""
    from .pack import dequantize_gemv

    w = dequantize_gemv(qweight_t, scales_t, zeros_t, x.shape[-1])
    return x.float() @ w.t().to(x.device)


# ------------------------------------------------------------------------------------------------
# Decode-step kernels of :class:`mlsys24.quant.qlinear.FusedDecoder` (one launch each per layer)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, H, HKV, stride_ct, stride_ch,
                    HALF: tl.constexpr):
    # qkv [H*D + 2*HKV*D]; program i < H: rotate query head i into q [H, D]; else rotate key head
    # j = i - H into k_cache[pos, j] and copy value head j into v_cache[pos, j] (rotate-half RoPE)
    i = tl.program_id(0)
    D: tl.constexpr = 2 * HALF
    offs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr)
    c = tl.load(cos_ptr + pos * HALF + offs)
    s = tl.load(sin_ptr + pos * HALF + offs)
    x1 = tl.load(qkv_ptr + i * D + offs).to(tl.float32)
    x2 = tl.load(qkv_ptr + i * D + HALF + offs).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if i < H:
        tl.store(q_ptr + i * D + offs, y1.to(q_ptr.dtype.element_ty))
        tl.store(q_ptr + i * D + HALF + offs, y2.to(q_ptr.dtype.element_ty))
    else:
        j = i - H
        dst = pos * stride_ct + j * stride_ch
        tl.store(k_ptr + dst + offs, y1.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + dst + HALF + offs, y2.to(k_ptr.dtype.element_ty))
        v_src = qkv_ptr + (H + HKV) * D + j * D
        tl.store(v_ptr + dst + offs, tl.load(v_src + offs))
        tl.store(v_ptr + dst + HALF + offs, tl.load(v_src + HALF + offs))


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F, BLOCK: tl.constexpr):
    # gu [2F] = [gate; up] -> out [F] = silu(gate) * up (silu rounded to the dtype first, as F.silu)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gu_ptr + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + F + offs, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    sg = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (sg * u).to(out_ptr.dtype.element_ty), mask=mask)
