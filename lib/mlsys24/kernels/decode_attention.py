"""Split-KV decode attention, synchronized (FlashDecoding) and asynchronous unified-max (FlashDecoding++).

FlashDecoding++ (Hong et al., MLSys 2024, arXiv 2311.01282), section 3. One query token per sequence
attends to its whole KV cache. The cache is cut into ``S`` splits processed by independent programs.

Synchronized softmax (FlashDecoding). Split ``j`` keeps its own running max ``m_j`` (and rescales its
accumulators whenever the max grows) and returns ``(m_j, l_j, o_j)``; a second kernel combines::

    m = max_j m_j,   l = sum_j e^{m_j - m} l_j,   o = sum_j e^{m_j - m} o_j / l

Asynchronous softmax with a unified max ``phi``. For ANY constant ``phi``,
``softmax(x)_i = e^{x_i - phi} / sum_k e^{x_k - phi}``. Each split computes, with no max at all,
``l_j = sum_i e^{x_i - phi}`` and ``o_j = sum_i e^{x_i - phi} v_i`` and adds them into fp32 accumulators
with atomics; the program that finishes last for a row divides ``o / l``. No rescaling, no
synchronization between splits, one kernel. ``phi`` comes from offline statistics of the softmax
inputs (:func:`calibrate_phi`). A row whose largest logit leaves the safe band
``lo < max_i x_i - phi < hi`` (overflow above, underflow/precision loss below) is flagged and
recomputed with the synchronized method by that last program, so the output is always exact.

Shapes (``x = q.k * scale`` are the natural-log logits fed to softmax)::

    q            [B, H, D]                one decode token per sequence, H = H_kv * G (GQA groups)
    k/v cache    contiguous  [B, H_kv, L_max, D]   (layout="bhld", the shared model's cache)
                 contiguous  [B, L_max, H_kv, D]   (layout="blhd")
                 paged       [num_pages, page_size, H_kv, D] with block_table [B, max_pages] (int32);
                 a contiguous "blhd" cache is the paged one with the trivial block table
                 (:func:`as_paged`).
    seq_lens     [B] int32, 1 <= seq_lens[b] <= capacity
    out          [B, H, D] in q's dtype; accumulation in fp32.

Inside the kernels exponentials are base 2: ``s = x * log2(e)`` and ``phi_2 = phi * log2(e)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = [
    "DecodeConfig", "PhiCalibration", "decode_attention", "decode_attention_sync", "decode_attention_async",
    "decode_attention_ref", "attention_logits_ref", "unified_softmax_ref", "calibrate_phi", "safe_band",
    "as_paged", "trivial_block_table", "default_config",
]

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Reference (float32 PyTorch)
# --------------------------------------------------------------------------------------------------

def _gather_kv(cache: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor | None, layout: str,
               n: int) -> torch.Tensor:
    """The first ``n`` cached tokens of every sequence as float32 ``[B, H_kv, n, D]``."""
    if block_table is not None:                                  # [num_pages, P, H_kv, D]
        page = cache.shape[1]
        t = torch.arange(n, device=cache.device)
        pages = block_table[:, t // page].long()                 # [B, n]
        x = cache[pages, (t % page)[None, :].expand_as(pages)]   # [B, n, H_kv, D]
        return x.permute(0, 2, 1, 3).float()
    if layout == "bhld":
        return cache[:, :, :n].float()
    if layout == "blhd":
        return cache[:, :n].permute(0, 2, 1, 3).float()
    raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")


def attention_logits_ref(q: torch.Tensor, k_cache: torch.Tensor, seq_lens, *, block_table=None, scale=None,
                         layout: str = "bhld") -> torch.Tensor:
    """Softmax inputs ``x = q.k * scale`` as float32 ``[B, H, L]`` (-inf past each sequence's length)."""
    B, H, D = q.shape
    lens = _lens_tensor(seq_lens, B, q.device)
    n = int(lens.max())
    k = _gather_kv(k_cache, lens, block_table, layout, n)        # [B, H_kv, n, D]
    g = H // k.shape[1]
    k = k.repeat_interleave(g, dim=1)                            # [B, H, n, D]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    x = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    valid = torch.arange(n, device=q.device)[None, None, :] < lens[:, None, None]
    return x.masked_fill(~valid, float("-inf"))


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens, *,
                         block_table=None, scale=None, layout: str = "bhld") -> torch.Tensor:
    """Plain float32 attention of one query token per sequence over its cache: ``[B, H, D]`` float32."""
    B, H, D = q.shape
    lens = _lens_tensor(seq_lens, B, q.device)
    x = attention_logits_ref(q, k_cache, lens, block_table=block_table, scale=scale, layout=layout)
    v = _gather_kv(v_cache, lens, block_table, layout, x.shape[-1])
    v = v.repeat_interleave(H // v.shape[1], dim=1)              # [B, H, n, D]
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(x, dim=-1), v)


def unified_softmax_ref(x: torch.Tensor, phi: float, *, p_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax with a fixed max: ``e^{x - phi}`` rounded to ``p_dtype`` (as the kernel rounds P before
    the P.V product), summed in float32. Overflows to inf/NaN, or loses everything to underflow, when
    ``phi`` is far from the row's maximum: that is what the safe band guards against."""
    p = torch.exp(x.float() - phi).to(p_dtype).float()
    return p / p.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# Unified max: safe band and calibration
# --------------------------------------------------------------------------------------------------

def safe_band(p_dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)`` in natural-log units: a row is computed with the unified max only while
    ``lo < max_i x_i - phi < hi``.

    - P rounded to fp16 (the tensor-core path with fp16 inputs): e^hi must stay below 65504
      (e^11.09), so hi = 10; the row's largest P must stay a normal fp16 number (>= e^-9.7), so lo = -9.
    - P in fp32 or bf16 (the CUDA-core path, bf16 inputs): the only limits are fp32's range
      (e^88 for the sum of up to 2^20 terms of e^hi; e^-87 for the largest term), so +-60.
    """
    if p_dtype == torch.float16:
        return (-9.0, 10.0)
    return (-60.0, 60.0)


@dataclass(frozen=True)
class PhiCalibration:
    """The unified max chosen from sampled softmax inputs, and what the sample says about it."""

    phi: float                       # natural-log units, the value fed to the kernel
    band: tuple[float, float]        # (lo, hi) the kernel checks max_i x_i - phi against
    x_range: tuple[float, float]     # [a, b]: central `quantile` mass of all logits
    rowmax_range: tuple[float, float]  # the same quantiles of the per-row maxima
    recompute_rate: float            # fraction of sampled rows that fall outside the band
    n_logits: int
    n_rows: int


def calibrate_phi(logits: torch.Tensor, *, quantile: float = 0.9999, band: tuple[float, float] | None = None,
                  p_dtype: torch.dtype = torch.float16) -> PhiCalibration:
    """Choose ``phi`` from sampled softmax inputs ``logits`` ``[..., L]`` (rows along the last dim;
    ``-inf`` or a fill below -1e30, e.g. ``finfo.min``, marks masked positions).

    The kernel's constraint is on each row's maximum (``lo < rowmax - phi < hi``), so phi centres the
    ``quantile`` range of the row maxima inside the band. If that range is wider than the band the
    ends are trimmed symmetrically and the excess rows are recomputed (``recompute_rate`` on this
    sample). ``x_range`` is the paper's Fig. 5 statistic ([a, b] holding ``quantile`` of all logits).
    """
    if not 0.5 < quantile < 1.0:
        raise ValueError(f"calibrate_phi: quantile must be in (0.5, 1), got {quantile}")
    lo, hi = band if band is not None else safe_band(p_dtype)
    if not lo < hi:
        raise ValueError(f"calibrate_phi: band must have lo < hi, got {(lo, hi)}")
    x = logits.detach().float().cpu().reshape(-1, logits.shape[-1])
    # masked positions: -inf, or a very negative fill such as torch.finfo(dtype).min
    x = x.masked_fill(x < -1e30, float("-inf"))
    rowmax = x.max(dim=-1).values
    rowmax = rowmax[torch.isfinite(rowmax)].double()
    flat = x[torch.isfinite(x)].double()
    if rowmax.numel() == 0:
        raise ValueError("calibrate_phi: no finite logits in the sample")
    flat = _subsample(flat, 1 << 20)
    qs = torch.tensor([1.0 - quantile, quantile], dtype=torch.float64)
    a, b = torch.quantile(flat, qs).tolist()
    r_lo, r_hi = torch.quantile(rowmax, qs).tolist() if rowmax.numel() > 1 else (float(rowmax[0]),) * 2
    # centre the row-max range in the band: rowmax - phi spans [r_lo - phi, r_hi - phi]
    phi = 0.5 * (r_lo + r_hi) - 0.5 * (lo + hi)
    d = rowmax - phi
    rate = float(((d > hi) | (d < lo)).double().mean())
    return PhiCalibration(phi=float(phi), band=(float(lo), float(hi)), x_range=(a, b), rowmax_range=(r_lo, r_hi),
                          recompute_rate=rate, n_logits=int(flat.numel()), n_rows=int(rowmax.numel()))


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.numel() <= n:
        return x
    g = torch.Generator().manual_seed(0)
    return x[torch.randperm(x.numel(), generator=g)[:n].to(x.device)]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attend_range(q, k_ptr, v_ptr, bt_row_ptr, k_seq_off, v_seq_off, start, end,
                  stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
                  qk_scale2, phi2,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                  PAGE: tl.constexpr, PAGED: tl.constexpr, UNIFIED: tl.constexpr, USE_DOT: tl.constexpr,
                  DOT_IEEE: tl.constexpr):
    """Attend the query rows ``q`` [BLOCK_G, BLOCK_D] (scaled by scale*log2(e) unless USE_DOT) to tokens
    [start, end) of one sequence / KV head. Returns (m, l, acc): m is the running max of the base-2
    logits seen (the true maximum in both modes), l and acc the softmax denominator and numerator,
    relative to m (synchronized) or to phi2 (UNIFIED)."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    mx = tl.full([BLOCK_G, BLOCK_N], float("-inf"), tl.float32)   # UNIFIED: element-wise max, reduced once
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        if PAGED:
            page = tl.load(bt_row_ptr + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
            k_row = page * stride_kp + (offs_n % PAGE).to(tl.int64) * stride_kt
            v_row = page * stride_vp + (offs_n % PAGE).to(tl.int64) * stride_vt
        else:
            k_row = k_seq_off + offs_n.to(tl.int64) * stride_kt
            v_row = v_seq_off + offs_n.to(tl.int64) * stride_vt
        lmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + k_row[:, None] + offs_d[None, :] * stride_kd, mask=lmask, other=0.0)
        v = tl.load(v_ptr + v_row[:, None] + offs_d[None, :] * stride_vd, mask=lmask, other=0.0)
        if USE_DOT:
            if DOT_IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale2
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale2
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(valid[None, :], s, float("-inf"))            # [BLOCK_G, BLOCK_N]
        if UNIFIED:
            # no max and no rescale in the loop: e^{x - phi} goes straight into the sums; the band
            # check only needs each row's maximum at the end, so keep an element-wise max (one
            # max per element, no cross-thread reduction per tile)
            mx = tl.maximum(mx, s)
            p = tl.exp2(s - phi2)
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha
            acc = acc * alpha[:, None]
            m = m_new
        if USE_DOT:
            p_lp = p.to(v.dtype)
            l += tl.sum(p_lp.to(tl.float32), axis=1)
            if DOT_IEEE:
                acc += tl.dot(p_lp, v, input_precision="ieee")
            else:
                acc += tl.dot(p_lp, v)
        else:
            l += tl.sum(p, axis=1)
            acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    if UNIFIED:
        m = tl.max(mx, axis=1)
    return m, l, acc


@triton.jit
def _load_q(q_ptr, b, hk, stride_qb, stride_qh, stride_qd, qk_scale2,
            G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
            USE_DOT: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    qmask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    q_ptrs = q_ptr + b * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=qmask, other=0.0)
    if not USE_DOT:
        # CUDA-core path: fold scale * log2(e) into q once, in fp32. The tensor-core path keeps q in its
        # dtype (rounding a scaled q would perturb the logits) and scales the fp32 scores instead.
        q = q.to(tl.float32) * qk_scale2
    return q


@triton.jit
def split_bounds(lens_ptr, pid_s, pid_bh, n_kv_heads, split_len):
    """Split ``pid_s`` of program row ``pid_bh = b * n_kv_heads + kv head``: (b, kv head, the row's
    length, first token, end token) — the tokens ``[start, end)`` of row b this program attends to."""
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    seqlen = tl.load(lens_ptr + b)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seqlen)
    return b, hk, seqlen, start, end


@triton.jit
def _split_kv_sync_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, po_ptr, pm_ptr, pl_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, split_len, qk_scale2,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    """Pass 1 of FlashDecoding: split j of (b, kv head) writes (m_j, l_j, o_j) for its G query heads."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b, hk, seqlen, start, end = split_bounds(lens_ptr, pid_s, pid_bh, H_KV, split_len)
    q = _load_q(q_ptr, b, hk, stride_qb, stride_qh, stride_qd, qk_scale2, G, BLOCK_G, BLOCK_D, D, USE_DOT)
    k_head = k_ptr + hk.to(tl.int64) * stride_kh
    v_head = v_ptr + hk.to(tl.int64) * stride_vh
    m, l, acc = _attend_range(q, k_head, v_head, bt_ptr + b * stride_btb, b.to(tl.int64) * stride_kb,
                              b.to(tl.int64) * stride_vb, start, end,
                              stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, qk_scale2, 0.0,
                              BLOCK_G, BLOCK_N, BLOCK_D, D, PAGE, PAGED, False, USE_DOT, DOT_IEEE)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b * (H_KV * G) + hk * G + offs_g).to(tl.int64) * n_splits + pid_s   # [BLOCK_G]
    gmask = offs_g < G
    tl.store(pm_ptr + row, m, mask=gmask)
    tl.store(pl_ptr + row, l, mask=gmask)
    tl.store(po_ptr + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _split_kv_combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, n_splits,
                             stride_ob, stride_oh, stride_od,
                             H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_S: tl.constexpr, MAX_S: tl.constexpr):
    """Pass 2 of FlashDecoding: m = max m_j, l = sum e^{m_j-m} l_j, o = sum e^{m_j-m} o_j / l."""
    pid = tl.program_id(0)                                    # one (b, h) row
    b = pid // H
    h = pid % H
    base = pid.to(tl.int64) * n_splits
    offs_all = tl.arange(0, MAX_S)
    mall = tl.load(pm_ptr + base + offs_all, mask=offs_all < n_splits, other=float("-inf"))
    m = tl.max(mall, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    offs_d = tl.arange(0, BLOCK_D)
    l = tl.zeros([1], tl.float32)
    o = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < n_splits
        mj = tl.load(pm_ptr + base + offs_s, mask=smask, other=float("-inf"))
        lj = tl.load(pl_ptr + base + offs_s, mask=smask, other=0.0)
        w = tl.where(mj > float("-inf"), tl.exp2(mj - m_safe), 0.0)
        oj = tl.load(po_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                     mask=smask[:, None] & (offs_d < D)[None, :], other=0.0)
        l += tl.sum(w * lj, axis=0)
        o += tl.sum(w[:, None] * oj, axis=0)
    out = tl.where(l > 0, o / l, 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


@triton.jit
def _split_kv_async_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, bt_ptr, out_ptr, flag_ptr,
    ws_acc_ptr, ws_l_ptr, ws_max_ptr, ws_cnt_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_ob, stride_oh, stride_od,
    split_len, qk_scale2, phi2, lo2, hi2,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr, FALLBACK: tl.constexpr,
):
    """FlashDecoding++: every split adds e^{x-phi}-weighted partial sums into fp32 accumulators (no
    max, no rescale); the last split to finish for (b, kv head) normalizes, checks each row's true max
    against the band and recomputes flagged rows with the synchronized method. The workspace is left
    zeroed (and the max at -inf) for the next call."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b, hk, seqlen, start, end = split_bounds(lens_ptr, pid_s, pid_bh, H_KV, split_len)
    q = _load_q(q_ptr, b, hk, stride_qb, stride_qh, stride_qd, qk_scale2, G, BLOCK_G, BLOCK_D, D, USE_DOT)
    k_head = k_ptr + hk.to(tl.int64) * stride_kh
    v_head = v_ptr + hk.to(tl.int64) * stride_vh
    bt_row = bt_ptr + b * stride_btb
    k_seq = b.to(tl.int64) * stride_kb
    v_seq = b.to(tl.int64) * stride_vb
    m, l, acc = _attend_range(q, k_head, v_head, bt_row, k_seq, v_seq, start, end,
                              stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, qk_scale2, phi2,
                              BLOCK_G, BLOCK_N, BLOCK_D, D, PAGE, PAGED, True, USE_DOT, DOT_IEEE)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    row = pid_bh * G + offs_g                                  # = b*H + hk*G + g
    amask = gmask[:, None] & dmask[None, :]
    acc_ptrs = ws_acc_ptr + row[:, None].to(tl.int64) * D + offs_d[None, :]
    live = gmask & (start < end)
    tl.atomic_add(acc_ptrs, acc, mask=amask & (start < end), sem="relaxed")
    tl.atomic_add(ws_l_ptr + row, l, mask=live, sem="relaxed")
    tl.atomic_max(ws_max_ptr + row, m, mask=live, sem="relaxed")
    tl.debug_barrier()
    ticket = tl.atomic_add(ws_cnt_ptr + pid_bh, 1, sem="acq_rel")
    if ticket == n_splits - 1:
        # last split of this (b, kv head): take the sums and reset them in one atomic exchange each
        # (they live in L2), so the workspace is clean for the next call
        # (on the fp32 bit patterns: 0 is 0.0f, -8388608 is 0xFF800000 = -inf)
        i32 = tl.pointer_type(tl.int32)
        o_sum = tl.atomic_xchg(acc_ptrs.to(i32), tl.zeros([BLOCK_G, BLOCK_D], tl.int32), mask=amask,
                               sem="acquire").to(tl.float32, bitcast=True)
        l_sum = tl.atomic_xchg((ws_l_ptr + row).to(i32), tl.zeros([BLOCK_G], tl.int32), mask=gmask,
                               sem="acquire").to(tl.float32, bitcast=True)
        m_all = tl.atomic_xchg((ws_max_ptr + row).to(i32), tl.full([BLOCK_G], -8388608, tl.int32), mask=gmask,
                               sem="acquire").to(tl.float32, bitcast=True)
        tl.store(ws_cnt_ptr + pid_bh, 0)
        d = m_all - phi2
        flagged = ((d > hi2) | (d < lo2) | (l_sum != l_sum)) & gmask      # NaN sum counts as overflow
        out = o_sum / l_sum[:, None]
        if FALLBACK:
            if tl.sum(flagged.to(tl.int32), axis=0) > 0:
                m2, l2, acc2 = _attend_range(q, k_head, v_head, bt_row, k_seq, v_seq, 0, seqlen,
                                             stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
                                             qk_scale2, 0.0, BLOCK_G, BLOCK_N, BLOCK_D, D, PAGE, PAGED, False, USE_DOT,
                                             DOT_IEEE)
                out = tl.where(flagged[:, None], acc2 / l2[:, None], out)
        head = hk * G + offs_g
        o_ptrs = out_ptr + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=amask)
        tl.store(flag_ptr + row, flagged.to(tl.int8), mask=gmask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeConfig:
    """Tiling shared by both flavours (so that they differ only in the softmax).

    The defaults are the tiling that was best or within ~3 % of the best for both flavours over
    batch 1-64 and KV 1K-32K on an H100 (data/results/flashdecoding_pp): tensor cores even for one
    query row per KV head (rows padded to 16), 64-token tiles, 3 pipeline stages."""

    block_n: int = 64                 # tokens per loop step
    num_splits: int | None = None     # splits per sequence; None: about 4 programs per SM (in the H200
                                      # sweep ~2 per SM was better: 512 programs of these tiles took
                                      # ~15 % longer than 256, a partial second wave)
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool | None = None       # tensor cores for q.K^T and P.V; None: fp16/bf16 inputs or GQA


def default_config(device: torch.device | None = None) -> DecodeConfig:
    return DecodeConfig()


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _choose_splits(B: int, H_kv: int, capacity: int, block_n: int, num_splits: int | None,
                   device: torch.device) -> tuple[int, int]:
    """(num_splits, split_len): split_len a multiple of block_n, num_splits * split_len >= capacity."""
    max_splits = max(1, triton.cdiv(capacity, block_n))
    if num_splits is None:
        # about 4 programs per SM (rounded down)
        num_splits = (4 * _num_sms(device)) // (B * H_kv)
    num_splits = max(1, min(int(num_splits), max_splits))
    split_len = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    return triton.cdiv(capacity, split_len), split_len


def _lens_tensor(seq_lens, B: int, device) -> torch.Tensor:
    if isinstance(seq_lens, int):
        return torch.full((B,), seq_lens, dtype=torch.int32, device=device)
    t = torch.as_tensor(seq_lens, device=device)
    if t.shape != (B,):
        raise ValueError(f"seq_lens must have shape [{B}], got {tuple(t.shape)}")
    return t.to(torch.int32)


def trivial_block_table(batch: int, capacity: int, page_size: int, device=None) -> torch.Tensor:
    """Block table of a contiguous [B, L_max, H_kv, D] cache viewed as pages: sequence b owns pages
    b*L_max/P ... (b+1)*L_max/P - 1, in order."""
    if capacity % page_size:
        raise ValueError(f"capacity {capacity} is not a multiple of page_size {page_size}")
    per = capacity // page_size
    return torch.arange(batch * per, dtype=torch.int32, device=device).reshape(batch, per)


def as_paged(cache_blhd: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """View a contiguous ``[B, L_max, H_kv, D]`` cache as ``[B*L_max/P, P, H_kv, D]`` pages (no copy) and
    return it with its trivial block table."""
    B, L, Hkv, D = cache_blhd.shape
    pages = cache_blhd.view(B * L // page_size, page_size, Hkv, D)
    return pages, trivial_block_table(B, L, page_size, cache_blhd.device)


_DUMMY_TABLES: dict[tuple, torch.Tensor] = {}


def _dummy_table(device: torch.device) -> torch.Tensor:
    """A one-entry block table for contiguous caches (never read), allocated once per device so that a
    call launches nothing but the attention kernels (e.g. inside a CUDA graph)."""
    key = (device.type, device.index)
    if key not in _DUMMY_TABLES:
        _DUMMY_TABLES[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMY_TABLES[key]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _Prepared:
    """Shapes, strides and launch parameters common to both flavours."""

    def __init__(self, q, k_cache, v_cache, seq_lens, block_table, scale, layout, config, max_seq_len):
        if q.dim() != 3:
            raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
        B, H, D = q.shape
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise TypeError(f"q, k_cache, v_cache must share a dtype ({q.dtype}, {k_cache.dtype}, {v_cache.dtype})")
        self.paged = block_table is not None
        if self.paged:
            _, page, Hkv, Dk = k_cache.shape
            if block_table.dim() != 2 or block_table.shape[0] != B:
                raise ValueError(f"block_table must be [B={B}, max_pages], got {tuple(block_table.shape)}")
            capacity = block_table.shape[1] * page
            self.bt = block_table.to(torch.int32)
            sk = (0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3))
            sv = (0, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3))
            self.page = page
        else:
            if layout == "bhld":
                _, Hkv, capacity, Dk = k_cache.shape
                sk = (k_cache.stride(0), 0, k_cache.stride(2), k_cache.stride(1), k_cache.stride(3))
                sv = (v_cache.stride(0), 0, v_cache.stride(2), v_cache.stride(1), v_cache.stride(3))
            elif layout == "blhd":
                _, capacity, Hkv, Dk = k_cache.shape
                sk = (k_cache.stride(0), 0, k_cache.stride(1), k_cache.stride(2), k_cache.stride(3))
                sv = (v_cache.stride(0), 0, v_cache.stride(1), v_cache.stride(2), v_cache.stride(3))
            else:
                raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
            if k_cache.shape[0] != B:
                raise ValueError(f"cache batch {k_cache.shape[0]} != q batch {B}")
            self.bt = _dummy_table(q.device)
            self.page = 1
        if Dk != D:
            raise ValueError(f"head_dim of q ({D}) and cache ({Dk}) differ")
        if H % Hkv:
            raise ValueError(f"query heads {H} not a multiple of KV heads {Hkv}")
        cfg = config or default_config(q.device)
        self.G = H // Hkv
        use_dot = cfg.use_dot if cfg.use_dot is not None else (
            self.G > 1 or q.dtype in (torch.float16, torch.bfloat16))
        self.cfg = replace(cfg, use_dot=use_dot)
        self.BLOCK_G = max(16, _next_pow2(self.G)) if use_dot else _next_pow2(self.G)
        if use_dot and (cfg.block_n < 16):
            raise ValueError("use_dot needs block_n >= 16")
        self.B, self.H, self.D, self.Hkv = B, H, D, Hkv
        self.BLOCK_D = max(16, _next_pow2(D))
        self.lens = _lens_tensor(seq_lens, B, q.device)
        cap = min(capacity, max_seq_len) if max_seq_len is not None else capacity
        self.n_splits, self.split_len = _choose_splits(B, Hkv, cap, cfg.block_n, cfg.num_splits, q.device)
        self.sk, self.sv = sk, sv
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.qk_scale2 = scale * LOG2E
        self.dot_ieee = q.dtype == torch.float32
        self.p_dtype = (q.dtype if use_dot else torch.float32)


def decode_attention_sync(q, k_cache, v_cache, seq_lens, *, block_table=None, scale=None, layout="bhld",
                          config: DecodeConfig | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """Synchronized split-KV decode attention (FlashDecoding): split kernel + combine kernel."""
    p = _Prepared(q, k_cache, v_cache, seq_lens, block_table, scale, layout, config, max_seq_len)
    B, H, D, S = p.B, p.H, p.D, p.n_splits
    po = torch.empty(B * H * S, D, dtype=torch.float32, device=q.device)
    pm = torch.empty(B * H * S, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _split_kv_sync_kernel[(S, B * p.Hkv)](
        q, k_cache, v_cache, p.lens, p.bt, po, pm, pl,
        q.stride(0), q.stride(1), q.stride(2), *p.sk, *p.sv, p.bt.stride(0), p.split_len, p.qk_scale2,
        H_KV=p.Hkv, G=p.G, BLOCK_G=p.BLOCK_G, D=D, BLOCK_D=p.BLOCK_D, BLOCK_N=p.cfg.block_n, PAGE=p.page,
        PAGED=p.paged, USE_DOT=p.cfg.use_dot, DOT_IEEE=p.dot_ieee,
        num_warps=p.cfg.num_warps, num_stages=p.cfg.num_stages)
    _split_kv_combine_kernel[(B * H,)](
        po, pm, pl, out, S, out.stride(0), out.stride(1), out.stride(2),
        H=H, D=D, BLOCK_D=p.BLOCK_D, BLOCK_S=min(16, _next_pow2(S)), MAX_S=_next_pow2(S), num_warps=4)
    return out


_WORKSPACES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _workspace(device: torch.device, B: int, H: int, Hkv: int, D: int) -> tuple[torch.Tensor, ...]:
    """Zeroed fp32 accumulators for the asynchronous kernel, cached per shape. The kernel's last
    program of each row resets its entries, so the buffers are clean again after every call (no
    memset launch). Concurrent calls of the same shape on different streams would share them."""
    key = (device.type, device.index, B, H, Hkv, D)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = (torch.zeros(B * H * D, dtype=torch.float32, device=device),
              torch.zeros(B * H, dtype=torch.float32, device=device),
              torch.full((B * H,), float("-inf"), dtype=torch.float32, device=device),
              torch.zeros(B * Hkv, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


def decode_attention_async(q, k_cache, v_cache, seq_lens, *, phi: float, block_table=None, scale=None,
                           layout="bhld", band: tuple[float, float] | None = None, fallback: bool = True,
                           return_flags: bool = False, config: DecodeConfig | None = None,
                           max_seq_len: int | None = None):
    """Asynchronous unified-max split-KV decode attention (FlashDecoding++), one kernel.

    phi: the unified max in natural-log units of ``x = q.k * scale`` (see :func:`calibrate_phi`).
    band: (lo, hi); a row is flagged when ``max_i x_i - phi`` leaves it. Default :func:`safe_band` of
    the precision P is rounded to (fp16 inputs on the tensor-core path: fp16; otherwise fp32).
    fallback: recompute flagged rows with the synchronized method (inside the same kernel).
    return_flags: also return ``flags`` [B, H] int8, 1 where the row was flagged.
    """
    if phi is None or not math.isfinite(float(phi)):
        raise ValueError("decode_attention_async needs a finite phi (natural-log units); "
                         "get one from calibrate_phi(logits) on calibration data")
    p = _Prepared(q, k_cache, v_cache, seq_lens, block_table, scale, layout, config, max_seq_len)
    B, H, D, S = p.B, p.H, p.D, p.n_splits
    lo, hi = band if band is not None else safe_band(p.p_dtype)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    flags = torch.empty(B, H, dtype=torch.int8, device=q.device)
    ws_acc, ws_l, ws_max, ws_cnt = _workspace(q.device, B, H, p.Hkv, D)
    _split_kv_async_kernel[(S, B * p.Hkv)](
        q, k_cache, v_cache, p.lens, p.bt, out, flags, ws_acc, ws_l, ws_max, ws_cnt,
        q.stride(0), q.stride(1), q.stride(2), *p.sk, *p.sv, p.bt.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        p.split_len, p.qk_scale2, float(phi) * LOG2E, float(lo) * LOG2E, float(hi) * LOG2E,
        H_KV=p.Hkv, G=p.G, BLOCK_G=p.BLOCK_G, D=D, BLOCK_D=p.BLOCK_D, BLOCK_N=p.cfg.block_n, PAGE=p.page,
        PAGED=p.paged, USE_DOT=p.cfg.use_dot, DOT_IEEE=p.dot_ieee, FALLBACK=bool(fallback),
        num_warps=p.cfg.num_warps, num_stages=p.cfg.num_stages)
    return (out, flags) if return_flags else out


def decode_attention(q, k_cache, v_cache, seq_lens, *, mode: str = "async", phi: float | None = None, **kw):
    """Decode attention; ``mode="async"`` (FlashDecoding++, needs ``phi``) or ``"sync"`` (FlashDecoding)."""
    if mode == "async":
        return decode_attention_async(q, k_cache, v_cache, seq_lens, phi=phi, **kw)
    if mode == "sync":
        return decode_attention_sync(q, k_cache, v_cache, seq_lens, **kw)
    raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
