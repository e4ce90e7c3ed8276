"""Atom's low-bit kernels in Triton: fused reorder(+RMSNorm)+quantize, the W4A4 group GEMM with an
INT8 outlier part, and decode attention over a 4-bit KV cache. Each has a ``*_ref`` beside it.

Layout (reordered channels: ``K4 = C - keeper`` normal ones, then ``keeper`` outliers; group size G,
``n_groups = ceil(K4 / G)``, ``Kp = n_groups G``; the ragged last group is masked and its padding
holds zero codes). 4-bit codes are packed two per byte *by halves of a group*: byte ``j`` of group
``g`` holds channel ``g G + j`` in its low nibble and channel ``g G + G/2 + j`` in its high nibble
(:func:`pack_int4_halves`), so unpacking a group gives two contiguous runs of channels::

    activations  qa  int8 [M, Kp/2]   packed halves  (a_layout="packed")
                     int8 [M, Kp]     one code per byte (a_layout="int8"; same 4-bit values)
                 sa  fp32 [M, n_groups] per-token per-group step (dynamic: computed by the kernel)
                 qa8 int8 [M, keeper]   sa8 fp32 [M]         INT8 outliers, per token
    weights      qw  int8 [N, Kp/2]   packed halves, K contiguous      sw  fp32 [n_groups, N]
                 qw8 int8 [N, keeper]   sw8 fp32 [N]      (every code operand K-contiguous: Hopper's
                                                         8-bit MMA reads K-major operands only)

GEMM (Atom's Eq.): ``Y[m, n] = sum_g sa[m,g] sw[g,n] sum_{k in g} qa[m,k] qw[n,k]
+ sa8[m] sw8[n] sum_{k in outliers} qa8[m,k] qw8[n,k]``.

NVIDIA Hopper (H100/H200) has no INT4 tensor-core instruction (and Triton has no int4 ``tl.dot``):
the kernel keeps the weights 4-bit in memory and unpacks each byte in registers to two int8 values
*times 16* with one bit operation each (``b << 4`` and ``b & 0xF0``, four bytes per 32-bit op): the
factor 16 (256 when both operands are packed) is exact and leaves the int32 group sum far from
overflow, and is divided out once at the end. One group is two INT8 ``tl.dot``s over G/2 (low
halves, high halves). The per-group dequantization (an outer product of scales) is fp32 CUDA-core
work; the int32 -> fp32 conversion uses the exact magic-number trick (``bitcast(i + 0x4B400000) -
12582912`` for ``|i| < 2^22``: an integer add and a float add instead of a quarter-rate I2F).
Activations may stay packed (4 bits in memory) or use one byte per 4-bit code: at large M the GEMM
is compute-bound, the transient activation bytes matter little, and the int8 container goes to the
tensor cores without an unpack.

Symmetric quantizer: ``delta = clip * max(max|x|, 1e-5) / 7``, ``q = clamp(rint(x / delta), -8, 7)``
(round half to even, as ``torch.round``); INT8 outliers: ``/127``, ``[-128, 127]``.
KV cache: asymmetric INT4 per token per head, ``x ~ (q - z) delta`` (:func:`mlsys24.quant.atom.quantize_kv_asym`),
codes ``uint8 [B, S, KV, d/2]`` (low nibble: dim 2j), ``delta, z [B, S, KV]`` (fp32 or fp16; any strides,
head-major storage preferred). :func:`append_kv4` quantizes one new token per row into its slot;
:func:`decode_attention_kv4` is a split-KV (FlashDecoding) decode attention with the step and zero folded
out of the dot products, ``q.k = delta (q.c - z sum(q))`` and ``sum_s p_s v_s = sum_s (p_s delta_s) c_s -
sum_s p_s delta_s z_s``, so only the nibble unpack is per-element work; on a GPU both products run on fp16
tensor cores (query rows padded to 16) and the nibbles may become fp16 by the exponent trick
``bitcast(0x6400 | c) - 1024``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes on CPU)
from mlsys24.kernels.decode_attention import split_bounds

from .atom import quantize_kv_asym, sym_group_quant

__all__ = [
    "pack_int4_pairs", "unpack_int4_pairs", "pack_int4_halves", "unpack_int4_halves", "pack_weight_w4a4",
    "quantize_act_w4a4", "quantize_act_w4a4_ref", "w4a4_gemm", "w4a4_gemm_ref", "W4A4Config", "pack_kv4",
    "decode_attention_kv4", "decode_attention_kv4_ref", "append_kv4",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# packing
def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``q [R, K]`` (K even, values in [-8, 7]) -> int8 ``[R, K/2]``, low nibble
    channel 2j, high nibble 2j+1 (the KV cache's order)."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4_pairs needs an even last dim")
    qi = q.to(torch.int32)
    return ((qi[..., 0::2] & 0xF) | (qi[..., 1::2] << 4)).to(torch.int8)


def unpack_int4_pairs(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`: int8 ``[R, K/2]`` -> int8 ``[R, K]`` (sign-extended)."""
    p32 = p.to(torch.int32)
    lo, hi = (p32 << 28) >> 28, p32 >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1).to(torch.int8)


def pack_int4_halves(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Signed int4 codes ``q [R, Kp]`` (``Kp`` a multiple of the even ``group_size``) -> int8
    ``[R, Kp/2]``: byte j of group g = channel gG+j (low nibble) | channel gG+G/2+j (high nibble)."""
    R, Kp = q.shape
    G = group_size
    if G % 2 or Kp % G:
        raise ValueError(f"pack_int4_halves: {Kp} channels are not whole groups of an even {G}")
    qi = q.to(torch.int32).reshape(R, Kp // G, 2, G // 2)
    return ((qi[:, :, 0] & 0xF) | (qi[:, :, 1] << 4)).to(torch.int8).reshape(R, Kp // 2)


def unpack_int4_halves(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_halves`: int8 ``[R, Kp/2]`` -> int8 ``[R, Kp]`` (sign-extended)."""
    R, Kh = p.shape
    H = group_size // 2
    p32 = p.to(torch.int32).reshape(R, Kh // H, 1, H)
    lo, hi = (p32 << 28) >> 28, p32 >> 4
    return torch.cat([lo, hi], dim=2).reshape(R, 2 * Kh).to(torch.int8)


def _split(C: int, group_size: int, keeper: int) -> tuple[int, int, int]:
    K4 = C - keeper
    G = group_size if group_size > 0 else K4 + (K4 % 2)
    if G % 2 or K4 % 2:
        raise ValueError(f"normal channels ({K4}) and group size ({G}) must be even")
    ng = -(-K4 // G)
    return K4, G, ng


def pack_weight_w4a4(w: torch.Tensor, group_size: int, keeper: int, clip: float = 1.0) -> dict[str, torch.Tensor]:
    """RTN-quantize a reordered weight ``w [N, C]`` (outlier columns last) into the packed layout."""
    N, C = w.shape
    K4, G, ng = _split(C, group_size, keeper)
    q, d = sym_group_quant(w[:, :K4], 4, G, clip)                     # [N, K4], [N, ng]
    qpad = torch.zeros(N, ng * G, dtype=torch.int16, device=w.device)
    qpad[:, :K4] = q
    q8, d8 = sym_group_quant(w[:, K4:], 8, 0, 1.0) if keeper else (
        torch.zeros(N, 0, dtype=torch.int16, device=w.device), torch.ones(N, 1, device=w.device))
    return {"qw": pack_int4_halves(qpad, G).contiguous(), "sw": d.t().contiguous().float(),
            "qw8": q8.to(torch.int8).contiguous(), "sw8": d8[:, 0].contiguous().float()}


# ----------------------------------------------------------------------------------------------
# fused reorder (+ RMSNorm) + dynamic quantization of activations
def quantize_act_w4a4_ref(x: torch.Tensor, group_size: int, keeper: int, *, index: torch.Tensor | None = None,
                          clip: float = 1.0, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                          a_layout: str = "packed"):
    """``(qa, sa, qa8, sa8)`` of ``x [M, C]``: optional RMSNorm (``norm_weight``, original order),
    gather ``x[:, index]``, symmetric INT4 groups over the first ``C - keeper`` channels, INT8 over the
    rest. ``a_layout``: ``"packed"`` (two codes per byte, :func:`pack_int4_halves`) or ``"int8"``
    (one code per byte). Plain PyTorch, float32."""
    if a_layout not in ("packed", "int8"):
        raise ValueError(f"a_layout must be 'packed' or 'int8', got {a_layout!r}")
    xf = x.float()
    if norm_weight is not None:
        xf = norm_weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if index is not None:
        xf = xf.index_select(-1, index.to(xf.device))
    M, C = xf.shape
    K4, G, ng = _split(C, group_size, keeper)
    q, sa = sym_group_quant(xf[:, :K4], 4, G, clip)
    qpad = torch.zeros(M, ng * G, dtype=torch.int16, device=x.device)
    qpad[:, :K4] = q
    if keeper:
        q8, s8 = sym_group_quant(xf[:, K4:], 8, 0, 1.0)
    else:
        q8, s8 = torch.zeros(M, 0, dtype=torch.int16, device=x.device), torch.ones(M, 1, device=x.device)
    qa = pack_int4_halves(qpad, G) if a_layout == "packed" else qpad.to(torch.int8)
    return qa, sa.float(), q8.to(torch.int8), s8[:, 0].float()


@triton.jit
def _rint(v):
    r = tl.floor(v + 0.5)
    return tl.where(((r - v) == 0.5) & ((r % 2) != 0), r - 1.0, r)   # ties to even, as torch.round


@triton.jit
def _reorder_quant_kernel(x_ptr, idx_ptr, nw_ptr, qa_ptr, sa_ptr, qa8_ptr, sa8_ptr,
                          C, K4, N_GROUPS, stride_xm, stride_xc, stride_qm, stride_sm, stride_sg, clip, eps,
                          G: tl.constexpr, KEEP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                          GC: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_NORM: tl.constexpr,
                          A_PACKED: tl.constexpr):
    """Program (token row, block of GC groups): the GC groups are one [GC, G/2] x 2 tile (low and high
    halves of each group), so the gather, the per-group absmax and the stores are vectorised."""
    row = tl.program_id(0)
    gblk = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    inv = 1.0
    if HAS_NORM:   # RMSNorm statistics over the whole row (original order)
        ss = tl.zeros((BLOCK_C,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(x_row + oc * stride_xc, mask=oc < C, other=0.0).to(tl.float32)
            ss += v * v
        inv = 1.0 / tl.sqrt(tl.sum(ss, 0) / C + eps)
    HG: tl.constexpr = G // 2
    gi = gblk * GC + tl.arange(0, GC)                        # [GC] group ids
    j = tl.arange(0, HG)
    o_lo = gi[:, None] * G + j[None, :]                      # [GC, HG] reordered positions, first half
    o_hi = o_lo + HG
    m_lo, m_hi = o_lo < K4, o_hi < K4                        # ragged last group / padding: read 0, code 0
    if HAS_INDEX:
        s_lo = tl.load(idx_ptr + o_lo, mask=m_lo, other=0)
        s_hi = tl.load(idx_ptr + o_hi, mask=m_hi, other=0)
    else:
        s_lo, s_hi = o_lo, o_hi
    x_lo = tl.load(x_row + s_lo * stride_xc, mask=m_lo, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + s_hi * stride_xc, mask=m_hi, other=0.0).to(tl.float32)
    if HAS_NORM:
        x_lo = tl.load(nw_ptr + s_lo, mask=m_lo, other=0.0).to(tl.float32) * (x_lo * inv)
        x_hi = tl.load(nw_ptr + s_hi, mask=m_hi, other=0.0).to(tl.float32) * (x_hi * inv)
    amax = tl.maximum(tl.max(tl.abs(x_lo), 1), tl.max(tl.abs(x_hi), 1))       # [GC]
    d = tl.maximum(amax, 1e-5) / 7.0 * clip
    q_lo = tl.minimum(tl.maximum(_rint(x_lo / d[:, None]), -8.0), 7.0).to(tl.int32)
    q_hi = tl.minimum(tl.maximum(_rint(x_hi / d[:, None]), -8.0), 7.0).to(tl.int32)
    mg = gi < N_GROUPS
    q_row = qa_ptr + row.to(tl.int64) * stride_qm
    if A_PACKED:
        packed = ((q_lo & 0xF) | (q_hi << 4)).to(tl.int8)
        tl.store(q_row + gi[:, None] * HG + j[None, :], packed, mask=mg[:, None])
    else:
        tl.store(q_row + o_lo, q_lo.to(tl.int8), mask=mg[:, None])
        tl.store(q_row + o_hi, q_hi.to(tl.int8), mask=mg[:, None])
    tl.store(sa_ptr + row.to(tl.int64) * stride_sm + gi * stride_sg, d, mask=mg)
    if KEEP > 0:   # INT8 outliers (the last KEEP reordered channels), one step per token
        if gblk == 0:
            oo8 = K4 + tl.arange(0, BLOCK_O)
            m8 = oo8 < C
            if HAS_INDEX:
                s8 = tl.load(idx_ptr + oo8, mask=m8, other=0)
            else:
                s8 = oo8
            x8 = tl.load(x_row + s8 * stride_xc, mask=m8, other=0.0).to(tl.float32)
            if HAS_NORM:
                x8 = tl.load(nw_ptr + s8, mask=m8, other=0.0).to(tl.float32) * (x8 * inv)
            d8 = tl.maximum(tl.max(tl.abs(x8), 0), 1e-5) / 127.0
            q8 = tl.minimum(tl.maximum(_rint(x8 / d8), -128.0), 127.0).to(tl.int8)
            tl.store(qa8_ptr + row.to(tl.int64) * KEEP + tl.arange(0, BLOCK_O), q8,
                     mask=tl.arange(0, BLOCK_O) < KEEP)
            tl.store(sa8_ptr + row, d8)


def quantize_act_w4a4(x: torch.Tensor, group_size: int, keeper: int, *, index: torch.Tensor | None = None,
                      clip: float = 1.0, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                      a_layout: str = "packed"):
    """Triton version of :func:`quantize_act_w4a4_ref` (any strides). ``sa`` is returned as an
    ``[M, n_groups]`` view of a group-major buffer, so the GEMM reads one group's token scales
    contiguously."""
    if a_layout not in ("packed", "int8"):
        raise ValueError(f"a_layout must be 'packed' or 'int8', got {a_layout!r}")
    M, C = x.shape
    K4, G, ng = _split(C, group_size, keeper)
    dev = x.device
    packed = a_layout == "packed"
    qa = torch.empty(M, ng * G // 2 if packed else ng * G, dtype=torch.int8, device=dev)
    sa = torch.empty(ng, M, dtype=torch.float32, device=dev).t()          # [M, ng], strides (1, M)
    qa8 = torch.empty(M, keeper, dtype=torch.int8, device=dev)
    sa8 = torch.ones(M, dtype=torch.float32, device=dev)
    idx = index.to(device=dev, dtype=torch.int32).contiguous() if index is not None else qa
    nw = norm_weight.contiguous() if norm_weight is not None else sa8
    gc = min(triton.next_power_of_2(ng), max(1, 4096 // G))
    tile = gc * G
    _reorder_quant_kernel[(M, triton.cdiv(ng, gc))](
        x, idx, nw, qa, sa, qa8, sa8, C, K4, ng, x.stride(0), x.stride(1), qa.stride(0), sa.stride(0), sa.stride(1),
        float(clip), float(eps),
        G=G, KEEP=keeper, BLOCK_O=max(16, triton.next_power_of_2(max(keeper, 1))),
        BLOCK_C=min(1024, triton.next_power_of_2(C)), GC=gc, HAS_INDEX=index is not None,
        HAS_NORM=norm_weight is not None, A_PACKED=packed, num_warps=8 if tile >= 4096 else 4)
    return qa, sa, qa8, sa8


# ----------------------------------------------------------------------------------------------
# W4A4 group GEMM with the INT8 outlier part
def _a_is_packed(qa: torch.Tensor, n_groups: int, group_size: int) -> bool:
    if qa.shape[1] * 2 == n_groups * group_size:
        return True
    if qa.shape[1] == n_groups * group_size:
        return False
    raise ValueError(f"activation codes have {qa.shape[1]} columns: expected {n_groups * group_size // 2} "
                     f"(packed) or {n_groups * group_size} (int8) for {n_groups} groups of {group_size}")


def w4a4_gemm_ref(qa, sa, qa8, sa8, qw, sw, qw8, sw8, group_size: int, out_dtype=torch.float32) -> torch.Tensor:
    """Integer reference: exact integer dot per group (float64 holds these sums exactly: |sum| <= 64 G
    << 2^53; CUDA has no int64 matmul), then the fp32 per-group scale outer product."""
    ng = sa.shape[1]
    G = group_size
    a = (unpack_int4_halves(qa, G) if _a_is_packed(qa, ng, G) else qa).double()    # [M, Kp]
    w = unpack_int4_halves(qw, G).double()                                           # [N, Kp]
    y = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=qa.device)
    for g in range(ng):
        s = slice(g * G, (g + 1) * G)
        acc = (a[:, s] @ w[:, s].t()).float()
        y += acc * sa[:, g, None] * sw[None, g, :]
    if qa8.shape[1]:
        acc8 = (qa8.double() @ qw8.double().t()).float()
        y += acc8 * sa8[:, None] * sw8[None, :]
    return y.to(out_dtype)


@triton.jit
def _lo_nibble_x16(b, USE_ASM: tl.constexpr):
    """int8 bytes -> 16 x (signed low nibble), as int8 (exact: a shift into the high nibble)."""
    if USE_ASM:   # four bytes per 32-bit register: shl + and
        return tl.inline_asm_elementwise("shl.b32 $0, $1, 4; and.b32 $0, $0, 0xF0F0F0F0;",
                                         "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (b << 4).to(tl.int8)


@triton.jit
def _hi_nibble_x16(b, USE_ASM: tl.constexpr):
    """int8 bytes -> 16 x (signed high nibble), as int8 (exact: clear the low nibble)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [b], dtype=tl.int8,
                                         is_pure=True, pack=4)
    else:
        return (b & -16).to(tl.int8)


@triton.jit
def _w4a4_gemm_kernel(qa_ptr, sa_ptr, qa8_ptr, sa8_ptr, qw_ptr, sw_ptr, qw8_ptr, sw8_ptr, y_ptr,
                      M, N, N_GROUPS, KEEP, KH, stride_am, stride_sam, stride_sag, stride_a8m, stride_ym, inv,
                      G: tl.constexpr, A_PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr, USE_ASM: tl.constexpr,
                      FAST_CVT: tl.constexpr, SWAP_AB: tl.constexpr, NO_DEQUANT: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile; SWAP_AB computes its transpose (weights as the MMA's A
    operand: the unpacked weight tile may stay in registers; small M fills the MMA's 64-row side).
    NO_DEQUANT is a timing diagnostic only (wrong numbers): one int32 accumulator over all groups, no
    per-group scales, i.e. the unpack + INT8 MMA cost without the CUDA-core dequantization."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped ordering of the tiles (L2 reuse of the weight tiles)
    width = GROUP_M * n_n
    gid = pid // width
    first = gid * GROUP_M
    gsz = tl.minimum(n_m - first, GROUP_M)
    pid_m = first + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    HG: tl.constexpr = G // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = (rm % M).to(tl.int64)       # out-of-range rows/cols read a valid row (never stored): no load masks
    rn_c = (rn % N).to(tl.int64)
    rk = tl.arange(0, HG)
    sa_ptrs = sa_ptr + rm_c * stride_sam
    sw_ptrs = sw_ptr + rn_c
    if SWAP_AB:
        a_ptrs = qa_ptr + rm_c[None, :] * stride_am + rk[:, None]                 # [G/2, BM]
        w_ptrs = qw_ptr + rn_c[:, None] * KH + rk[None, :]                        # [BN, G/2]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
    else:
        a_ptrs = qa_ptr + rm_c[:, None] * stride_am + rk[None, :]                 # [BM, G/2]
        w_ptrs = qw_ptr + rn_c[None, :] * KH + rk[:, None]                        # [G/2, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for g in range(N_GROUPS):
        wb = tl.load(w_ptrs)
        w_lo = _lo_nibble_x16(wb, USE_ASM)
        w_hi = _hi_nibble_x16(wb, USE_ASM)
        if A_PACKED:
            ab = tl.load(a_ptrs)
            a_lo = _lo_nibble_x16(ab, USE_ASM)
            a_hi = _hi_nibble_x16(ab, USE_ASM)
            a_ptrs += HG
        else:
            a_lo = tl.load(a_ptrs)
            a_hi = tl.load(a_ptrs + HG)
            a_ptrs += G
        if NO_DEQUANT:
            if SWAP_AB:
                acc_i = tl.dot(w_lo, a_lo, acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(w_hi, a_hi, acc_i, out_dtype=tl.int32)
            else:
                acc_i = tl.dot(a_lo, w_lo, acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(a_hi, w_hi, acc_i, out_dtype=tl.int32)
        else:
            s_a = tl.load(sa_ptrs + g * stride_sag)
            s_w = tl.load(sw_ptrs + g * N)
            if SWAP_AB:
                part = tl.dot(w_lo, a_lo, out_dtype=tl.int32)
                part = tl.dot(w_hi, a_hi, part, out_dtype=tl.int32)        # 16x or 256x the group sum, < 2^22
                s = s_w[:, None] * s_a[None, :]
            else:
                part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)
                part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
                s = s_a[:, None] * s_w[None, :]
            if FAST_CVT:
                pf = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                pf = part.to(tl.float32)
            acc += pf * s
        w_ptrs += HG
    if NO_DEQUANT:
        acc = acc_i.to(tl.float32)
    acc = acc * inv                    # 1/16 or 1/256: exact
    s_a8 = tl.load(sa8_ptr + rm_c)
    s_w8 = tl.load(sw8_ptr + rn_c)
    if SWAP_AB:
        if BLOCK_O > 0:
            ro = tl.arange(0, BLOCK_O)
            mo = ro < KEEP
            w8 = tl.load(qw8_ptr + rn_c[:, None] * KEEP + ro[None, :], mask=mo[None, :], other=0)       # [BN, BO]
            a8 = tl.load(qa8_ptr + rm_c[None, :] * stride_a8m + ro[:, None], mask=mo[:, None], other=0)  # [BO, BM]
            p8 = tl.dot(w8, a8, out_dtype=tl.int32)
            acc += p8.to(tl.float32) * s_w8[:, None] * s_a8[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[None, :] & (rn < N)[:, None])
    else:
        if BLOCK_O > 0:
            ro = tl.arange(0, BLOCK_O)
            mo = ro < KEEP
            a8 = tl.load(qa8_ptr + rm_c[:, None] * stride_a8m + ro[None, :], mask=mo[None, :], other=0)  # [BM, BO]
            w8 = tl.load(qw8_ptr + rn_c[None, :] * KEEP + ro[:, None], mask=mo[:, None], other=0)       # [BO, BN]
            p8 = tl.dot(a8, w8, out_dtype=tl.int32)
            acc += p8.to(tl.float32) * s_a8[:, None] * s_w8[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


class W4A4Config:
    """Tile shape and code path of :func:`w4a4_gemm`. ``use_asm``: unpack four bytes per 32-bit
    register with inline PTX (GPU only; ``None``: on a GPU); ``fast_cvt``: magic-number int32 -> fp32;
    ``swap_ab``: compute the tile transposed (weights as the MMA's first operand)."""

    def __init__(self, block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                 group_m: int = 8, use_asm: bool | None = None, fast_cvt: bool = True, swap_ab: bool = False,
                 no_dequant: bool = False):
        self.block_m, self.block_n, self.num_warps, self.num_stages, self.group_m = (
            block_m, block_n, num_warps, num_stages, group_m)
        self.use_asm, self.fast_cvt, self.swap_ab = use_asm, fast_cvt, swap_ab
        self.no_dequant = no_dequant      # timing diagnostic only: skips the per-group scales (wrong numbers)

    def as_dict(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages, group_m=self.group_m, use_asm=self.use_asm, fast_cvt=self.fast_cvt,
                    swap_ab=self.swap_ab, no_dequant=self.no_dequant)


def default_w4a4_config(M: int) -> W4A4Config:
    """The tiles the GPU benchmark (``mlsys24.quant.atom_bench``, H200 run in data/results/atom/) measured
    fastest at Llama-7B shapes: 32x64 at M = 32 for all three shapes; 128x64 at M = 256 (down: tied
    with 32x64) and at M = 1024 (gate/up: 64x128, 2 % ahead); 4 warps, 4 stages, packed activations.
    The served decode run tunes its own tiles at its batch (recorded in the results)."""
    if M < 96:
        return W4A4Config(32, 64, 4, 4)
    return W4A4Config(128, 64, 4, 4)


def w4a4_gemm(qa, sa, qa8, sa8, qw, sw, qw8, sw8, group_size: int, out_dtype=torch.float32,
              config: W4A4Config | None = None) -> torch.Tensor:
    """Triton W4A4 GEMM (see the module docstring); returns ``[M, N]`` in ``out_dtype``. ``qa`` packed
    (``[M, Kp/2]``) or int8 codes (``[M, Kp]``), told apart by its width."""
    M, N = qa.shape[0], qw.shape[0]
    ng = sa.shape[1]
    G = group_size
    packed = _a_is_packed(qa, ng, G)
    keep = qa8.shape[1]
    if qa.stride(1) != 1 or qw.stride(1) != 1 or (keep and (qa8.stride(1) != 1 or not qw8.is_contiguous())):
        raise ValueError("w4a4_gemm: code tensors need a contiguous last dim")
    if _INTERPRET:
        cfg = config or W4A4Config(block_m=16 if M <= 16 else 32, block_n=32)
    else:
        cfg = config or default_w4a4_config(M)
    use_asm = (qa.is_cuda and not _INTERPRET) if cfg.use_asm is None else (cfg.use_asm and not _INTERPRET)
    y = torch.empty(M, N, dtype=out_dtype, device=qa.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _w4a4_gemm_kernel[grid](qa, sa, qa8 if keep else qa, sa8, qw, sw, qw8 if keep else qw, sw8, y, M, N, ng, keep,
                            qw.stride(0), qa.stride(0), sa.stride(0), sa.stride(1),
                            qa8.stride(0) if keep else 0, y.stride(0), 1.0 / 256 if packed else 1.0 / 16,
                            G=G, A_PACKED=packed, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_O=max(32, triton.next_power_of_2(keep)) if keep else 0, GROUP_M=cfg.group_m,
                            USE_ASM=use_asm, FAST_CVT=cfg.fast_cvt, SWAP_AB=cfg.swap_ab,
                            NO_DEQUANT=cfg.no_dequant, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)
    return y


# ----------------------------------------------------------------------------------------------
# decode attention over a 4-bit KV cache
def pack_kv4(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, S, KV, d]`` -> packed uint8 codes ``[B, S, KV, d/2]`` (low nibble: dim 2j), ``delta,
    zero [B, S, KV]`` (asymmetric INT4 per token per head)."""
    q, d, z = quantize_kv_asym(x, 4, clip)
    qi = q.to(torch.int32)
    return ((qi[..., 0::2]) | (qi[..., 1::2] << 4)).to(torch.uint8), d, z


def _unpack_kv4(p: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    pi = p.to(torch.int32)
    q = torch.stack([pi & 0xF, pi >> 4], -1).reshape(*p.shape[:-1], -1).float()
    return (q - z[..., None]) * d[..., None]


def decode_attention_kv4_ref(q, k4, kd, kz, v4, vd, vz, kv_lens, scale: float | None = None) -> torch.Tensor:
    """One query per row: ``q [B, H, d]`` over the dequantized 4-bit cache (``[B, S, KV, d/2]`` codes,
    ``[B, S, KV]`` steps/zeros), first ``kv_lens[b]`` slots; GQA by ``H // KV``. fp32 ``[B, H, d]``."""
    B, H, D = q.shape
    KV = k4.shape[2]
    k = _unpack_kv4(k4, kd, kz).repeat_interleave(H // KV, dim=2)    # [B, S, H, d]
    v = _unpack_kv4(v4, vd, vz).repeat_interleave(H // KV, dim=2)
    s = torch.einsum("bhd,bshd->bhs", q.float(), k) * (scale or 1.0 / math.sqrt(D))
    S = k.shape[1]
    valid = torch.arange(S, device=q.device)[None, :] < kv_lens[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", torch.softmax(s, -1), v)


@triton.jit
def _attn_kv4_kernel(q_ptr, k_ptr, kd_ptr, kz_ptr, v_ptr, vd_ptr, vz_ptr, lens_ptr, o_ptr,
                     H, KVH, sq_b, sq_h, sk_b, sk_s, sk_h, sm_b, sm_s, sm_h, so_b, so_h, scale,
                     D2: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (H // KVH)
    L = tl.load(lens_ptr + b)
    d2 = tl.arange(0, D2)
    qb = q_ptr + b * sq_b + h * sq_h
    qe = tl.load(qb + 2 * d2).to(tl.float32) * scale
    qo = tl.load(qb + 2 * d2 + 1).to(tl.float32) * scale
    l_i = tl.sum(tl.zeros((D2,), tl.float32), 0)          # 0-d fp32 tensors: loop-carried types stay fixed
    m_i = l_i - float("inf")
    acc_e = tl.zeros((D2,), tl.float32)
    acc_o = tl.zeros((D2,), tl.float32)
    for s0 in range(0, L, BLOCK_S):
        os_ = s0 + tl.arange(0, BLOCK_S)
        ms = os_ < L
        kv_off = b.to(tl.int64) * sk_b + os_[:, None].to(tl.int64) * sk_s + kvh * sk_h + d2[None, :]
        meta = b.to(tl.int64) * sm_b + os_.to(tl.int64) * sm_s + kvh * sm_h
        kp = tl.load(k_ptr + kv_off, mask=ms[:, None], other=0).to(tl.int32)
        kd = tl.load(kd_ptr + meta, mask=ms, other=0.0)
        kz = tl.load(kz_ptr + meta, mask=ms, other=0.0)
        ke = ((kp & 0xF).to(tl.float32) - kz[:, None]) * kd[:, None]
        ko = (((kp >> 4) & 0xF).to(tl.float32) - kz[:, None]) * kd[:, None]
        sc = tl.sum(ke * qe[None, :], 1) + tl.sum(ko * qo[None, :], 1)
        sc = tl.where(ms, sc, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        vp = tl.load(v_ptr + kv_off, mask=ms[:, None], other=0).to(tl.int32)
        vd = tl.load(vd_ptr + meta, mask=ms, other=0.0)
        vz = tl.load(vz_ptr + meta, mask=ms, other=0.0)
        ve = ((vp & 0xF).to(tl.float32) - vz[:, None]) * vd[:, None]
        vo = (((vp >> 4) & 0xF).to(tl.float32) - vz[:, None]) * vd[:, None]
        acc_e = acc_e * alpha + tl.sum(p[:, None] * ve, 0)
        acc_o = acc_o * alpha + tl.sum(p[:, None] * vo, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    ob = o_ptr + b * so_b + h * so_h
    tl.store(ob + 2 * d2, acc_e / l_i)
    tl.store(ob + 2 * d2 + 1, acc_o / l_i)


@triton.jit
def _u4_pair(b, F16: tl.constexpr, MAGIC: tl.constexpr):
    """uint8 bytes -> (low nibbles, high nibbles) as fp16 (F16) or fp32 values 0..15. MAGIC: fp16 via the
    exponent trick ``bitcast(0x6400 | c) - 1024`` (one logic op and one fp16 subtraction, no conversion)."""
    lo = b & 0xF
    hi = b >> 4
    if F16:
        if MAGIC:
            lo_f = (lo.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
            hi_f = (hi.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        else:
            lo_f = lo.to(tl.float16)
            hi_f = hi.to(tl.float16)
    else:
        lo_f = lo.to(tl.float32)
        hi_f = hi.to(tl.float32)
    return lo_f, hi_f


@triton.jit
def _attn_kv4_split_kernel(q_ptr, k_ptr, kd_ptr, kz_ptr, v_ptr, vd_ptr, vz_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr,
                           o_ptr, H, KVH, N_SPLITS, split_len, sq_b, sq_h, sk_b, sk_s, sk_h, sm_b, sm_s, sm_h,
                           so_b, so_h, qk_scale2,
                           GQ: tl.constexpr, BLOCK_G: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr,
                           USE_DOT: tl.constexpr, MAGIC: tl.constexpr, SINGLE: tl.constexpr):
    """Program (split, row b x KV head): the GQ query heads of one KV head attend to tokens
    [split * split_len, ...) of row b. Scale and zero are folded out of the dot products
    (``q.k = delta (q.c - z sum(q))``, ``sum p v = sum (p delta) c - sum (p delta z)``), so the only
    per-element work is unpacking the nibbles; USE_DOT runs both products on tensor cores (fp16,
    query rows padded to 16). Base-2 online softmax. SINGLE: one split, normalise and store ``o``."""
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh, L, start, end = split_bounds(lens_ptr, sid, bh, KVH, split_len)
    g = tl.arange(0, BLOCK_G)
    gm = g < GQ
    d2 = tl.arange(0, D2)
    q_rows = q_ptr + b.to(tl.int64) * sq_b + (kvh * GQ + g)[:, None] * sq_h
    qe = tl.load(q_rows + 2 * d2[None, :], mask=gm[:, None], other=0.0)        # [BG, D/2] even dims
    qo = tl.load(q_rows + 2 * d2[None, :] + 1, mask=gm[:, None], other=0.0)    # odd dims
    if USE_DOT:
        qe = qe.to(tl.float16)
        qo = qo.to(tl.float16)
    else:
        qe = qe.to(tl.float32)
        qo = qo.to(tl.float32)
    qsum = tl.sum(qe.to(tl.float32), 1) + tl.sum(qo.to(tl.float32), 1)        # [BG] (of the values dotted)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_e = tl.zeros([BLOCK_G, D2], tl.float32)
    acc_o = tl.zeros([BLOCK_G, D2], tl.float32)
    acc_z = tl.zeros([BLOCK_G], tl.float32)
    kv_base = b.to(tl.int64) * sk_b + kvh * sk_h
    m_base = b.to(tl.int64) * sm_b + kvh * sm_h
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        kv_off = kv_base + offs[:, None].to(tl.int64) * sk_s + d2[None, :]
        meta = m_base + offs.to(tl.int64) * sm_s
        kp = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0)
        kd = tl.load(kd_ptr + meta, mask=valid, other=0.0).to(tl.float32)
        kz = tl.load(kz_ptr + meta, mask=valid, other=0.0).to(tl.float32)
        k_lo, k_hi = _u4_pair(kp, USE_DOT, MAGIC)                                 # [BN, D/2]
        if USE_DOT:
            raw = tl.dot(qe, tl.trans(k_lo)) + tl.dot(qo, tl.trans(k_hi))       # [BG, BN] = q.c
        else:
            raw = tl.sum(qe[:, None, :] * k_lo[None, :, :], 2) + tl.sum(qo[:, None, :] * k_hi[None, :, :], 2)
        s = (raw - qsum[:, None] * kz[None, :]) * (kd * qk_scale2)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vp = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0)
        vd = tl.load(vd_ptr + meta, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(vz_ptr + meta, mask=valid, other=0.0).to(tl.float32)
        v_lo, v_hi = _u4_pair(vp, USE_DOT, MAGIC)
        pv = p * vd[None, :]                                                      # [BG, BN]
        if USE_DOT:
            pv16 = pv.to(tl.float16)           # the same rounded weights in the dot and in the zero term
            acc_e = acc_e * alpha[:, None] + tl.dot(pv16, v_lo)
            acc_o = acc_o * alpha[:, None] + tl.dot(pv16, v_hi)
            acc_z = acc_z * alpha + tl.sum(pv16.to(tl.float32) * vz[None, :], 1)
        else:
            acc_e = acc_e * alpha[:, None] + tl.sum(pv[:, :, None] * v_lo[None, :, :], 1)
            acc_o = acc_o * alpha[:, None] + tl.sum(pv[:, :, None] * v_hi[None, :, :], 1)
            acc_z = acc_z * alpha + tl.sum(pv * vz[None, :], 1)
        m_i = m_new
    acc_e = acc_e - acc_z[:, None]
    acc_o = acc_o - acc_z[:, None]
    h = kvh * GQ + g                                                              # [BG] query heads
    if SINGLE:
        inv = 1.0 / l_i
        ob = o_ptr + b.to(tl.int64) * so_b + h[:, None] * so_h
        tl.store(ob + 2 * d2[None, :], (acc_e * inv[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
        tl.store(ob + 2 * d2[None, :] + 1, (acc_o * inv[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        row = ((b * H + h) * N_SPLITS + sid).to(tl.int64)                        # [BG]
        pb = po_ptr + row[:, None] * (2 * D2)
        tl.store(pb + 2 * d2[None, :], acc_e, mask=gm[:, None])
        tl.store(pb + 2 * d2[None, :] + 1, acc_o, mask=gm[:, None])
        tl.store(pm_ptr + row, m_i, mask=gm)
        tl.store(pl_ptr + row, l_i, mask=gm)


@triton.jit
def _attn_combine_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, H, N_SPLITS, so_b, so_h,
                         D: tl.constexpr, BLOCK_S: tl.constexpr):
    """``o = sum_j 2^(m_j - m) o_j / sum_j 2^(m_j - m) l_j`` over the splits of one (row, head);
    empty splits carry ``m = -inf, l = 0, o = 0``."""
    r = tl.program_id(0)
    b = r // H
    h = r % H
    j = tl.arange(0, BLOCK_S)
    mj = j < N_SPLITS
    base = r.to(tl.int64) * N_SPLITS
    m = tl.load(pm_ptr + base + j, mask=mj, other=float("-inf"))
    lj = tl.load(pl_ptr + base + j, mask=mj, other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(mj, tl.exp2(m - mx), 0.0)
    d = tl.arange(0, D)
    oj = tl.load(po_ptr + (base + j)[:, None] * D + d[None, :], mask=mj[:, None], other=0.0)
    out = tl.sum(w[:, None] * oj, 0) / tl.sum(w * lj, 0)
    tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention_kv4(q, k4, kd, kz, v4, vd, vz, kv_lens, scale: float | None = None,
                         block_s: int = 32, num_warps: int = 4, *, impl: str = "split", num_splits: int | None = None,
                         use_dot: bool | None = None, magic: bool = False, num_stages: int = 2,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton version of :func:`decode_attention_kv4_ref`; ``kv_lens[b] >= 1`` (a device tensor: no
    host synchronisation, CUDA-graph safe). Any strides: a head-major cache (``[B, KV, S, .]`` storage
    seen through a ``[B, S, KV, .]`` view) gives contiguous per-head reads; scales/zeros fp32 or fp16.

    ``impl="split"`` (default): split-KV (FlashDecoding) kernel with the scale and zero folded out of
    the dot products; ``num_splits`` (None: about 4 programs per SM) x ``block_s`` tokens per loop step;
    ``use_dot`` (None: on a GPU) puts ``q.c`` and ``(p delta).c`` on fp16 tensor cores; ``magic``
    unpacks nibbles to fp16 with the exponent trick. ``impl="simple"``: one program per (row, head),
    element-wise dequantization (the first version, kept for comparison)."""
    B, H, D = q.shape
    S, KV = k4.shape[1], k4.shape[2]
    if k4.stride() != v4.stride() or kd.stride() != vd.stride() or kd.stride() != kz.stride() or k4.stride(-1) != 1:
        raise ValueError("K and V caches must share one layout (codes contiguous along head_dim)")
    if H % KV:
        raise ValueError(f"query heads {H} not a multiple of KV heads {KV}")
    sm_scale = float(scale or 1.0 / math.sqrt(D))
    lens = kv_lens if kv_lens.dtype == torch.int32 else kv_lens.to(torch.int32)
    out = torch.empty(B, H, D, dtype=out_dtype, device=q.device)
    if impl == "simple":
        o32 = out if out_dtype == torch.float32 else torch.empty(B, H, D, dtype=torch.float32, device=q.device)
        _attn_kv4_kernel[(B, H)](q, k4, kd, kz, v4, vd, vz, lens, o32, H, KV,
                                 q.stride(0), q.stride(1), k4.stride(0), k4.stride(1), k4.stride(2),
                                 kd.stride(0), kd.stride(1), kd.stride(2), o32.stride(0), o32.stride(1),
                                 sm_scale, D2=D // 2, BLOCK_S=block_s, num_warps=num_warps)
        if o32 is not out:
            out.copy_(o32)
        return out
    if impl != "split":
        raise ValueError(f"impl must be 'split' or 'simple', got {impl!r}")
    if use_dot is None:
        use_dot = q.is_cuda and not _INTERPRET
    GQ = H // KV
    BLOCK_G = max(16, triton.next_power_of_2(GQ)) if use_dot else triton.next_power_of_2(GQ)
    if use_dot and (block_s < 16 or D // 2 < 16):
        raise ValueError("use_dot needs block_s >= 16 and head_dim >= 32")
    if num_splits is None:
        num_splits = triton.cdiv(4 * _num_sms(q.device), B * KV)
    num_splits = max(1, min(int(num_splits), triton.cdiv(S, block_s)))
    split_len = triton.cdiv(triton.cdiv(S, num_splits), block_s) * block_s
    num_splits = triton.cdiv(S, split_len)
    single = num_splits == 1
    if single:
        po = pm = pl = out
    else:
        po = torch.empty(B * H * num_splits, D, dtype=torch.float32, device=q.device)
        pm = torch.empty(B * H * num_splits, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    _attn_kv4_split_kernel[(num_splits, B * KV)](
        q, k4, kd, kz, v4, vd, vz, lens, po, pm, pl, out, H, KV, num_splits, split_len,
        q.stride(0), q.stride(1), k4.stride(0), k4.stride(1), k4.stride(2), kd.stride(0), kd.stride(1), kd.stride(2),
        out.stride(0), out.stride(1), sm_scale * 1.4426950408889634,
        GQ=GQ, BLOCK_G=BLOCK_G, D2=D // 2, BLOCK_N=block_s, USE_DOT=bool(use_dot), MAGIC=bool(magic and use_dot),
        SINGLE=single, num_warps=num_warps, num_stages=num_stages)
    if not single:
        _attn_combine_kernel[(B * H,)](po, pm, pl, out, H, num_splits, out.stride(0), out.stride(1),
                                       D=D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


@triton.jit
def _kv4_quant_row(src_ptr, D2: tl.constexpr, clip):
    """One head vector (``2 D2`` values at ``src_ptr``) -> packed codes (low nibble: even dims), step, zero."""
    d2 = tl.arange(0, D2)
    xe = tl.load(src_ptr + 2 * d2).to(tl.float32)
    xd = tl.load(src_ptr + 2 * d2 + 1).to(tl.float32)
    mn = tl.minimum(tl.min(xe, 0), tl.min(xd, 0))
    mx = tl.maximum(tl.max(xe, 0), tl.max(xd, 0))
    delta = tl.maximum((mx - mn) * clip, 1e-5) / 15.0
    zero = _rint(-mn * clip / delta)
    ce = tl.minimum(tl.maximum(_rint(xe / delta) + zero, 0.0), 15.0).to(tl.int32)
    cd = tl.minimum(tl.maximum(_rint(xd / delta) + zero, 0.0), 15.0).to(tl.int32)
    return (ce | (cd << 4)).to(tl.uint8), delta, zero


@triton.jit
def _append_kv4_kernel(k_ptr, v_ptr, pos_ptr, k4_ptr, kd_ptr, kz_ptr, v4_ptr, vd_ptr, vz_ptr,
                       sx_b, sx_h, sc_b, sc_s, sc_h, sm_b, sm_s, sm_h, clip, D2: tl.constexpr):
    """Program (row b, KV head h): quantize the new token's K and V (asymmetric INT4 over head_dim, as
    :func:`mlsys24.quant.atom.quantize_kv_asym`) and write codes, step and zero at slot ``pos[b]``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.load(pos_ptr + b).to(tl.int64)
    d2 = tl.arange(0, D2)
    xo = b.to(tl.int64) * sx_b + h * sx_h
    co = b.to(tl.int64) * sc_b + p * sc_s + h * sc_h
    mo = b.to(tl.int64) * sm_b + p * sm_s + h * sm_h
    kc, kdel, kzer = _kv4_quant_row(k_ptr + xo, D2, clip)
    tl.store(k4_ptr + co + d2, kc)
    tl.store(kd_ptr + mo, kdel.to(kd_ptr.dtype.element_ty))
    tl.store(kz_ptr + mo, kzer.to(kz_ptr.dtype.element_ty))
    vc, vdel, vzer = _kv4_quant_row(v_ptr + xo, D2, clip)
    tl.store(v4_ptr + co + d2, vc)
    tl.store(vd_ptr + mo, vdel.to(vd_ptr.dtype.element_ty))
    tl.store(vz_ptr + mo, vzer.to(vz_ptr.dtype.element_ty))


def append_kv4(k, v, pos, k4, kd, kz, v4, vd, vz, clip: float = 1.0) -> None:
    """Write one new token per row into a 4-bit cache: ``k, v [B, KV, d]`` (any float dtype) at slot
    ``pos[b]`` (device int tensor) of ``k4/v4 [B, S, KV, d/2]`` (uint8) and ``kd/kz/vd/vz [B, S, KV]``
    (any strides, e.g. head-major storage). CUDA-graph safe."""
    B, KV, D = k.shape
    if k.stride() != v.stride() or k.stride(-1) != 1 or k4.stride() != v4.stride() or kd.stride() != vd.stride():
        raise ValueError("append_kv4: K and V (and their caches) must share one layout, head_dim contiguous")
    _append_kv4_kernel[(B, KV)](k, v, pos, k4, kd, kz, v4, vd, vz, k.stride(0), k.stride(1),
                                k4.stride(0), k4.stride(1), k4.stride(2), kd.stride(0), kd.stride(1), kd.stride(2),
                                float(clip), D2=D // 2, num_warps=1)
