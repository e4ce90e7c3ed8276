"""Atom's low-bit kernels in Triton: fused reorder(+RMSNorm)+quantize, the W4A4 group GEMM with an
INT8 outlier part, and decode attention over a 4-bit KV cache. Each has a ``*_ref`` beside it.

Layout (reordered channels: ``K4 = C - keeper`` normal ones, then ``keeper`` outliers; group size G,
``n_groups = ceil(K4 / G)``, ``Kp = n_groups G``; the ragged last group is masked and its padding
holds zero codes)::

    activations  qa  int8 [M, Kp/2]   two int4 codes per byte: low nibble channel 2j, high 2j+1
                 sa  fp32 [M, n_groups] per-token per-group step (dynamic: computed by the kernel)
                 qa8 int8 [M, keeper]   sa8 fp32 [M]         INT8 outliers, per token
    weights      qw  int8 [Kp/2, N]   (same nibble order along K)   sw  fp32 [n_groups, N]
                 qw8 int8 [keeper, N]   sw8 fp32 [N]

GEMM (Atom's Eq.): ``Y[m, n] = sum_g sa[m,g] sw[g,n] sum_{k in g} qa[m,k] qw[k,n]
+ sa8[m] sw8[n] sum_{k in outliers} qa8[m,k] qw8[k,n]``.

NVIDIA Hopper (H100/H200) has no INT4 tensor-core instruction (and Triton has no int4 ``tl.dot``):
the kernel keeps the operands 4-bit in memory, unpacks each byte to two int8 values in registers
(sign extension by shifts) and runs INT8 ``tl.dot`` -> int32 per group; since even channels pair with
even channels, one group is two dots over G/2 (low nibbles, high nibbles) without re-interleaving.
The per-group dequantization (an outer product of scales) is fp32 CUDA-core work.

Symmetric quantizer: ``delta = clip * max(max|x|, 1e-5) / 7``, ``q = clamp(rint(x / delta), -8, 7)``
(round half to even, as ``torch.round``); INT8 outliers: ``/127``, ``[-128, 127]``.
KV cache: asymmetric INT4 per token per head, ``x ~ (q - z) delta`` (:func:`mlsys24.quant.atom.quantize_kv_asym`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes on CPU)

from .atom import quantize_kv_asym, sym_group_quant

__all__ = [
    "pack_int4_pairs", "unpack_int4_pairs", "pack_weight_w4a4", "quantize_act_w4a4", "quantize_act_w4a4_ref",
    "w4a4_gemm", "w4a4_gemm_ref", "W4A4Config", "pack_kv4", "decode_attention_kv4", "decode_attention_kv4_ref",
]


# ----------------------------------------------------------------------------------------------
# packing
def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``q [R, K]`` (K even, values in [-8, 7]) -> int8 ``[R, K/2]``."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4_pairs needs an even last dim")
    qi = q.to(torch.int32)
    return ((qi[..., 0::2] & 0xF) | (qi[..., 1::2] << 4)).to(torch.int8)


def unpack_int4_pairs(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`: int8 ``[R, K/2]`` -> int8 ``[R, K]`` (sign-extended)."""
    p32 = p.to(torch.int32)
    lo, hi = (p32 << 28) >> 28, p32 >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1).to(torch.int8)


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
    return {"qw": pack_int4_pairs(qpad).t().contiguous(), "sw": d.t().contiguous().float(),
            "qw8": q8.to(torch.int8).t().contiguous(), "sw8": d8[:, 0].contiguous().float()}


# ----------------------------------------------------------------------------------------------
# fused reorder (+ RMSNorm) + dynamic quantization of activations
def quantize_act_w4a4_ref(x: torch.Tensor, group_size: int, keeper: int, *, index: torch.Tensor | None = None,
                          clip: float = 1.0, norm_weight: torch.Tensor | None = None, eps: float = 1e-5):
    """``(qa, sa, qa8, sa8)`` of ``x [M, C]``: optional RMSNorm (``norm_weight``, original order),
    gather ``x[:, index]``, symmetric INT4 groups over the first ``C - keeper`` channels, INT8 over the
    rest. Plain PyTorch, float32."""
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
    return pack_int4_pairs(qpad), sa.float(), q8.to(torch.int8), s8[:, 0].float()


@triton.jit
def _rint(v):
    r = tl.floor(v + 0.5)
    return tl.where(((r - v) == 0.5) & ((r % 2) != 0), r - 1.0, r)   # ties to even, as torch.round


@triton.jit
def _reorder_quant_kernel(x_ptr, idx_ptr, nw_ptr, qa_ptr, sa_ptr, qa8_ptr, sa8_ptr,
                          C, K4, stride_xm, stride_xc, clip, eps,
                          N_GROUPS, G: tl.constexpr, KEEP: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_C: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_NORM: tl.constexpr):
    row = tl.program_id(0)
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
    half = tl.arange(0, HG)
    n_packed = N_GROUPS * HG
    for g in range(N_GROUPS):
        oe = g * G + 2 * half          # even channels of the group (reordered positions)
        oo = oe + 1
        me, mo = oe < K4, oo < K4      # ragged last group: masked lanes read 0 and store code 0
        if HAS_INDEX:
            se = tl.load(idx_ptr + oe, mask=me, other=0)
            so = tl.load(idx_ptr + oo, mask=mo, other=0)
        else:
            se, so = oe, oo
        xe = tl.load(x_row + se * stride_xc, mask=me, other=0.0).to(tl.float32)
        xo = tl.load(x_row + so * stride_xc, mask=mo, other=0.0).to(tl.float32)
        if HAS_NORM:
            xe = tl.load(nw_ptr + se, mask=me, other=0.0).to(tl.float32) * (xe * inv)
            xo = tl.load(nw_ptr + so, mask=mo, other=0.0).to(tl.float32) * (xo * inv)
        amax = tl.maximum(tl.max(tl.abs(xe), 0), tl.max(tl.abs(xo), 0))
        d = tl.maximum(amax, 1e-5) / 7.0 * clip
        qe = tl.minimum(tl.maximum(_rint(xe / d), -8.0), 7.0).to(tl.int32)
        qo = tl.minimum(tl.maximum(_rint(xo / d), -8.0), 7.0).to(tl.int32)
        packed = ((qe & 0xF) | (qo << 4)).to(tl.int8)
        tl.store(qa_ptr + row.to(tl.int64) * n_packed + g * HG + half, packed)
        tl.store(sa_ptr + row.to(tl.int64) * N_GROUPS + g, d)
    if KEEP > 0:   # INT8 outliers (the last KEEP reordered channels), one step per token
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
        tl.store(qa8_ptr + row.to(tl.int64) * KEEP + tl.arange(0, BLOCK_O), q8, mask=tl.arange(0, BLOCK_O) < KEEP)
        tl.store(sa8_ptr + row, d8)


def quantize_act_w4a4(x: torch.Tensor, group_size: int, keeper: int, *, index: torch.Tensor | None = None,
                      clip: float = 1.0, norm_weight: torch.Tensor | None = None, eps: float = 1e-5):
    """Triton version of :func:`quantize_act_w4a4_ref` (one program per token; any strides)."""
    M, C = x.shape
    K4, G, ng = _split(C, group_size, keeper)
    dev = x.device
    qa = torch.empty(M, ng * G // 2, dtype=torch.int8, device=dev)
    sa = torch.empty(M, ng, dtype=torch.float32, device=dev)
    qa8 = torch.empty(M, keeper, dtype=torch.int8, device=dev)
    sa8 = torch.ones(M, dtype=torch.float32, device=dev)
    idx = index.to(device=dev, dtype=torch.int32).contiguous() if index is not None else qa
    nw = norm_weight.contiguous() if norm_weight is not None else sa
    _reorder_quant_kernel[(M,)](
        x, idx, nw, qa, sa, qa8, sa8, C, K4, x.stride(0), x.stride(1), float(clip), float(eps), ng,
        G=G, KEEP=keeper, BLOCK_O=max(16, triton.next_power_of_2(max(keeper, 1))),
        BLOCK_C=min(1024, triton.next_power_of_2(C)), HAS_INDEX=index is not None, HAS_NORM=norm_weight is not None)
    return qa, sa, qa8, sa8


# ----------------------------------------------------------------------------------------------
# W4A4 group GEMM with the INT8 outlier part
def w4a4_gemm_ref(qa, sa, qa8, sa8, qw, sw, qw8, sw8, group_size: int, out_dtype=torch.float32) -> torch.Tensor:
    """Integer reference: exact integer dot per group (float64 holds these sums exactly: |sum| <= 64 G
    << 2^53; CUDA has no int64 matmul), then the fp32 per-group scale outer product."""
    a = unpack_int4_pairs(qa).double()                   # [M, Kp]
    w = unpack_int4_pairs(qw.t()).double()               # [N, Kp]
    M, Kp = a.shape
    ng = sa.shape[1]
    G = Kp // ng
    y = torch.zeros(M, w.shape[0], dtype=torch.float32, device=qa.device)
    for g in range(ng):
        s = slice(g * G, (g + 1) * G)
        acc = (a[:, s] @ w[:, s].t()).float()
        y += acc * sa[:, g, None] * sw[None, g, :]
    if qa8.shape[1]:
        acc8 = (qa8.double() @ qw8.double()).float()
        y += acc8 * sa8[:, None] * sw8[None, :]
    return y.to(out_dtype)


@triton.jit
def _w4a4_gemm_kernel(qa_ptr, sa_ptr, qa8_ptr, sa8_ptr, qw_ptr, sw_ptr, qw8_ptr, sw8_ptr, y_ptr,
                      M, N, N_GROUPS, KEEP,
                      G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                      GROUP_M: tl.constexpr):
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
    mm, mn = rm < M, rn < N
    rk = tl.arange(0, HG)
    kp = N_GROUPS * HG
    a_ptrs = qa_ptr + rm.to(tl.int64)[:, None] * kp + rk[None, :]
    w_ptrs = qw_ptr + rk.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(N_GROUPS):
        a = tl.load(a_ptrs, mask=mm[:, None], other=0).to(tl.int32)      # [BM, G/2] packed bytes
        w = tl.load(w_ptrs, mask=mn[None, :], other=0).to(tl.int32)      # [G/2, BN]
        a_lo, a_hi = ((a << 28) >> 28).to(tl.int8), (a >> 4).to(tl.int8)
        w_lo, w_hi = ((w << 28) >> 28).to(tl.int8), (w >> 4).to(tl.int8)
        part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)
        part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
        s_a = tl.load(sa_ptr + rm.to(tl.int64) * N_GROUPS + g, mask=mm, other=0.0)
        s_w = tl.load(sw_ptr + g * N + rn, mask=mn, other=0.0)
        acc += part.to(tl.float32) * s_a[:, None] * s_w[None, :]
        a_ptrs += HG
        w_ptrs += HG * N
    if BLOCK_O > 0:
        ro = tl.arange(0, BLOCK_O)
        mo = ro < KEEP
        a8 = tl.load(qa8_ptr + rm.to(tl.int64)[:, None] * KEEP + ro[None, :], mask=mm[:, None] & mo[None, :], other=0)
        w8 = tl.load(qw8_ptr + ro.to(tl.int64)[:, None] * N + rn[None, :], mask=mo[:, None] & mn[None, :], other=0)
        p8 = tl.dot(a8, w8, out_dtype=tl.int32)
        s_a8 = tl.load(sa8_ptr + rm, mask=mm, other=0.0)
        s_w8 = tl.load(sw8_ptr + rn, mask=mn, other=0.0)
        acc += p8.to(tl.float32) * s_a8[:, None] * s_w8[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


class W4A4Config:
    """Tile shape of :func:`w4a4_gemm`."""

    def __init__(self, block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                 group_m: int = 8):
        self.block_m, self.block_n, self.num_warps, self.num_stages, self.group_m = (
            block_m, block_n, num_warps, num_stages, group_m)

    def as_dict(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages, group_m=self.group_m)


def w4a4_gemm(qa, sa, qa8, sa8, qw, sw, qw8, sw8, group_size: int, out_dtype=torch.float32,
              config: W4A4Config | None = None) -> torch.Tensor:
    """Triton W4A4 GEMM (see the module docstring); returns ``[M, N]`` in ``out_dtype``."""
    cfg = config or W4A4Config(block_m=16 if qa.shape[0] <= 16 else 32, block_n=32)
    M, N = qa.shape[0], qw.shape[1]
    ng = sa.shape[1]
    G = 2 * qa.shape[1] // ng
    keep = qa8.shape[1]
    y = torch.empty(M, N, dtype=out_dtype, device=qa.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _w4a4_gemm_kernel[grid](qa, sa, qa8 if keep else qa, sa8, qw, sw, qw8 if keep else qw, sw8, y, M, N, ng, keep,
                            G=G, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_O=max(32, triton.next_power_of_2(keep)) if keep else 0, GROUP_M=cfg.group_m,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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
                     H, KVH, sq_b, sq_h, sk_b, sk_s, sk_h, sm_b, sm_s, so_b, so_h, scale,
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
        meta = b.to(tl.int64) * sm_b + os_.to(tl.int64) * sm_s + kvh
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


def decode_attention_kv4(q, k4, kd, kz, v4, vd, vz, kv_lens, scale: float | None = None,
                         block_s: int = 32) -> torch.Tensor:
    """Triton version of :func:`decode_attention_kv4_ref` (one program per (row, head); dequantizes the
    4-bit K/V in registers; online softmax). ``kv_lens[b] >= 1``."""
    B, H, D = q.shape
    KV = k4.shape[2]
    if k4.stride() != v4.stride() or kd.stride() != vd.stride() or kd.stride() != kz.stride() or kd.stride(-1) != 1:
        raise ValueError("K and V caches must share one layout")
    out = torch.empty(B, H, D, dtype=torch.float32, device=q.device)
    _attn_kv4_kernel[(B, H)](q, k4, kd, kz, v4, vd, vz, kv_lens.to(torch.int32), out, H, KV,
                             q.stride(0), q.stride(1), k4.stride(0), k4.stride(1), k4.stride(2),
                             kd.stride(0), kd.stride(1), out.stride(0), out.stride(1),
                             float(scale or 1.0 / math.sqrt(D)), D2=D // 2, BLOCK_S=block_s)
    return out
