"""S-LoRA's heterogeneous-rank LoRA kernels over the unified pool: MBGMM (prefill) and MBGMV (decode).

Punica's SGMV/BGMV (:mod:`mlsys24.lora.sgmv`) read adapter ``a`` as a dense ``[h1, r]`` block of a
stacked ``[n_slots, h1, r]`` tensor, one rank for all. In S-LoRA (Sheng et al., MLSys 2024, §5.1)
adapter weights live in the *unified pool* (:mod:`.pool`): per layer a K buffer ``wa [S, H]`` holds
the rows ``A_p[:, j]`` and a V buffer ``wb [S, H]`` the rows ``B_p[j, :]`` of every resident adapter,
scattered over arbitrary slots. For a request of adapter ``a`` with rank ``r_a``, projection
``p ∈ {q=0, k=1, v=2, o=3}`` and row ``j < r_a`` the slot is ``a_loc[a_start + r_a·p + j]``, so ::

    v[t, j] = Σ_k x[t, k] · wa[a_loc[a_start + r·p + j], k]          (shrink,  j < r)
    y[t, n] += s_a · Σ_j v[t, j] · wb[a_loc[a_start + r·p + j], n]   (expand)

for every token ``t`` of the request. Both kernels gather the weight rows by slot id inside the
kernel (no copy into contiguous tensors) and mask ``j >= r`` per request, so a batch mixes ranks
freely; ``BLOCK_R`` is the batch's largest rank rounded up to a power of two (≥ 16 for ``tl.dot``:
ranks below 16 compute on zero-padded lanes but *load* only their ``r`` rows).

- **MBGMM** (:func:`lora_mbgmm`): one program per (request segment, tile of ``BLOCK_M`` tokens) for
  the shrink, plus an output-column tile for the expand; ``tl.dot`` on tensor cores.
- **MBGMV** (:func:`lora_mbgmv`): one token per request (decode); one program per (request, block of
  rank rows, K slice) for the shrink — a block past the request's rank exits at once (the paper's grid
  is (max rank, batch)); the K slices (split-K, :func:`mbgmv_split`) keep enough programs in flight at
  small batches, each storing its own fp32 plane of partial sums (no zero fill, no atomics) — and one
  per (request, column tile) for the expand, which adds the planes and walks the request's rank in
  chunks of rows (only its own ``r`` rows are loaded, one chunk in registers at a time), storing ``y``
  directly when every row is one request's; no tensor cores.

Tables (:class:`PoolTables`, built once per forward, shared by every layer): per segment the first
token row ``seg_start``, ``seg_len``, ``seg_astart`` (offset into ``a_loc``), ``seg_rank``,
``seg_scale``; ``a_loc`` the slot ids. Shapes: ``x [N, H_in]``, ``wa/wb [S, H]`` with ``H_in = H_out = H``,
``v [N, BLOCK_R]`` fp32, ``y [N, H]``.

Beside them: :func:`lora_pool_torch` (the same gather, in PyTorch, grouped by rank: what the CPU
serving runs use), :func:`lora_padded_bmm` (the S-LoRA-bmm baseline: copy every request's adapter
into contiguous tensors padded to the largest rank, then ``torch.bmm``), :func:`mbgmm_ref` (float32,
one dense ``x A B`` per request) and :func:`gathered_elements` (weight elements each method reads,
counted from the index tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from mlsys24.kernels import no_overflow_checks as _launch  # also: the CPU interpreter fixes (no-op on GPU)

__all__ = ["PoolTables", "make_tables", "lora_mbgmm", "lora_mbgmv", "mbgmm_shrink", "mbgmm_expand",
           "mbgmv_shrink", "mbgmv_expand", "mbgmv_split", "lora_pool_torch", "lora_padded_bmm", "lora_padded_bmm_rows",
           "mbgmm_ref", "gathered_elements"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
@dataclass
class PoolTables:
    """Per-forward index tensors (host numpy + one device int32 table + fp32 scales)."""

    seg_start: np.ndarray   # [S] first token row of each request segment
    seg_len: np.ndarray     # [S]
    seg_astart: np.ndarray  # [S] offset of the adapter's slot list in a_loc
    seg_rank: np.ndarray    # [S]
    seg_scale: np.ndarray   # [S] float
    a_loc: np.ndarray       # [total] slot ids
    table: torch.Tensor     # int32 [4*S + total]: start | len | astart | rank | a_loc
    scale: torch.Tensor     # fp32 [S]
    n_rows: int             # tokens of x

    @property
    def n_seg(self) -> int:
        return len(self.seg_start)

    @property
    def max_rank(self) -> int:
        return int(self.seg_rank.max()) if self.n_seg else 0

    @property
    def max_len(self) -> int:
        return int(self.seg_len.max()) if self.n_seg else 0

    def rows_once(self) -> bool:
        """Every token row is exactly one single-token segment (segment ``i`` = row ``i``): a decode
        batch in which every request has an adapter (the MBGMV expand may then store instead of add)."""
        c = self.__dict__.get("_rows_once")
        if c is None:
            c = bool(self.n_seg == self.n_rows and (self.seg_len == 1).all()
                     and (self.seg_start == np.arange(self.n_seg)).all())
            self.__dict__["_rows_once"] = c
        return c

    def rows_of(self, s: int, proj: int) -> np.ndarray:
        """Slot ids of segment ``s``'s adapter rows for projection ``proj``."""
        r = int(self.seg_rank[s])
        a0 = int(self.seg_astart[s]) + r * proj
        return self.a_loc[a0:a0 + r]


def make_tables(seg_start, seg_len, seg_astart, seg_rank, seg_scale, a_loc, n_rows: int, device) -> PoolTables:
    st, ln, ast, rk = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (seg_start, seg_len, seg_astart, seg_rank))
    loc = np.asarray(a_loc, dtype=np.int64).reshape(-1)
    sc = np.asarray(seg_scale, dtype=np.float32).reshape(-1)
    if not (len(st) == len(ln) == len(ast) == len(rk) == len(sc)):
        raise ValueError("segment arrays differ in length")
    if len(st) and ((st < 0).any() or (st + ln > n_rows).any() or (ln < 1).any()):
        raise ValueError("a segment lies outside the rows of x")
    if len(st) and ((ast + 4 * rk > len(loc)).any() or (rk < 1).any()):
        raise ValueError("a segment's slot list runs past a_loc (need 4·rank entries from a_start)")
    host = np.concatenate([st, ln, ast, rk, loc]).astype(np.int32)
    table = torch.from_numpy(host).to(device, non_blocking=True)
    scale = torch.from_numpy(sc).to(device, non_blocking=True)
    return PoolTables(st, ln, ast, rk, sc, loc, table, scale, int(n_rows))


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _segment_tile(table_ptr, n_seg, seg, start, length, mt, proj, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row tile ``mt`` of segment ``seg`` (tokens ``start .. start + length``) and the pool slots of its
    adapter's rows for projection ``proj``: (token rows int64, row mask, rank offsets, rank mask, slots int64)."""
    astart = tl.load(table_ptr + 2 * n_seg + seg)
    rank = tl.load(table_ptr + 3 * n_seg + seg)
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    slots = tl.load(table_ptr + 4 * n_seg + astart + rank * proj + offs_r, mask=r_mask, other=0).to(tl.int64)
    return rows, m_mask, offs_r, r_mask, slots


@triton.jit(do_not_specialize=["n_seg", "K", "proj"])
def _mbgmm_shrink_kernel(x_ptr, wa_ptr, v_ptr, table_ptr, n_seg, K, proj,
                         stride_xm, stride_xk, stride_ws, stride_wk, stride_vm, stride_vr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr):
    """v[tokens of (segment, m-tile), :r] = x[tokens] @ wa[rows of the segment's adapter]^T."""
    seg = tl.program_id(0)
    mt = tl.program_id(1)
    start = tl.load(table_ptr + seg)
    length = tl.load(table_ptr + n_seg + seg)
    if mt * BLOCK_M < length:
        rows, m_mask, offs_r, r_mask, slots = _segment_tile(table_ptr, n_seg, seg, start, length, mt, proj,
                                                            BLOCK_M, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)                # [BLOCK_M, BLOCK_K]
            wt = tl.load(wa_ptr + slots[None, :] * stride_ws + offs_k[:, None] * stride_wk,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)                # [BLOCK_K, BLOCK_R]
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        tl.store(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr, acc, mask=m_mask[:, None])


@triton.jit(do_not_specialize=["n_seg", "N", "proj"])
def _mbgmm_expand_kernel(v_ptr, wb_ptr, y_ptr, table_ptr, scale_ptr, n_seg, N, proj,
                         stride_vm, stride_vr, stride_ws, stride_wn, stride_ym, stride_yn,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    """y[tokens, n-tile] += scale · v[tokens, :r] @ wb[rows of the segment's adapter, n-tile]."""
    seg = tl.program_id(0)
    mt = tl.program_id(1)
    nb = tl.program_id(2)
    start = tl.load(table_ptr + seg)
    length = tl.load(table_ptr + n_seg + seg)
    if mt * BLOCK_M < length:
        rows, m_mask, offs_r, r_mask, slots = _segment_tile(table_ptr, n_seg, seg, start, length, mt, proj,
                                                            BLOCK_M, BLOCK_R)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        vt = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)                    # [BLOCK_M, BLOCK_R] fp32
        wt = tl.load(wb_ptr + slots[:, None] * stride_ws + offs_n[None, :] * stride_wn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)    # [BLOCK_R, BLOCK_N]
        acc = tl.dot(vt, wt, input_precision=PRECISION) * tl.load(scale_ptr + seg)
        out = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = m_mask[:, None] & n_mask[None, :]
        yv = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask)


@triton.jit(do_not_specialize=["n_seg", "K", "proj0", "k_per_split", "n_split"])
def _mbgmv_shrink_kernel(x_ptr, wa_ptr, v_ptr, table_ptr, n_seg, K, proj0, k_per_split, n_split,
                         stride_xm, stride_xk, stride_ws, stride_wk, stride_vp, stride_vs, stride_vm, stride_vr,
                         BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """v[p, split, token, j-block] = wa[rows j-block of projection proj0 + p, K-slice] @ x[token, K-slice]
    (one token per request; a block at or past the request's rank exits). program_id(2) = p·n_split +
    split: several projections of the same x (q, k, v) share one launch. Split-K: each split takes
    ``k_per_split`` columns of K and stores its partial sums in its own plane of ``v`` (no zero fill, no
    atomics); the expand adds the planes. Rows ``j >= rank`` of ``v`` are never written nor read."""
    seg = tl.program_id(0)
    jb = tl.program_id(1)
    pk = tl.program_id(2) % n_split
    pi = tl.program_id(2) // n_split
    proj = proj0 + pi
    k_lo = pk * k_per_split
    rank = tl.load(table_ptr + 3 * n_seg + seg)
    if jb * BLOCK_J < rank:
        row = tl.load(table_ptr + seg).to(tl.int64)
        astart = tl.load(table_ptr + 2 * n_seg + seg)
        offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        j_mask = offs_j < rank
        slots = tl.load(table_ptr + 4 * n_seg + astart + rank * proj + offs_j, mask=j_mask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xk = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            wt = tl.load(wa_ptr + slots[:, None] * stride_ws + offs_k[None, :] * stride_wk,
                         mask=j_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_J, BLOCK_K]
            acc += tl.sum(wt * xk[None, :], axis=1)
        tl.store(v_ptr + pi * stride_vp + pk * stride_vs + row * stride_vm + offs_j * stride_vr, acc, mask=j_mask)


@triton.jit(do_not_specialize=["n_seg", "N", "proj0", "n_split"])
def _mbgmv_expand_kernel(v_ptr, wb_ptr, y_ptr, table_ptr, scale_ptr, n_seg, N, proj0, n_split,
                         stride_vp, stride_vs, stride_vm, stride_vr, stride_ws, stride_wn, stride_yp, stride_ym,
                         stride_yn, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ACCUM: tl.constexpr):
    """y[p, token, n-tile] (+)= scale · (Σ_split v[p, split, token, :r]) @ wb[rows of projection
    proj0 + p, n-tile] (p = program_id(2)), the rank walked in chunks of ``BLOCK_R`` rows (a request
    loads only its own ``r`` rows and holds one chunk in registers, whatever the batch's largest rank).
    ``ACCUM``: add to ``y``; else store (every row of ``y`` is one segment's token)."""
    seg = tl.program_id(0)
    nb = tl.program_id(1)
    pi = tl.program_id(2)
    proj = proj0 + pi
    v_ptr += pi * stride_vp
    y_ptr += pi * stride_yp
    row = tl.load(table_ptr + seg).to(tl.int64)
    astart = tl.load(table_ptr + 2 * n_seg + seg)
    rank = tl.load(table_ptr + 3 * n_seg + seg)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        slots = tl.load(table_ptr + 4 * n_seg + astart + rank * proj + offs_r, mask=r_mask, other=0).to(tl.int64)
        vr = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sp in range(n_split):
            vr += tl.load(v_ptr + sp * stride_vs + row * stride_vm + offs_r * stride_vr, mask=r_mask, other=0.0)
        wt = tl.load(wb_ptr + slots[:, None] * stride_ws + offs_n[None, :] * stride_wn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(vr[:, None] * wt, axis=0)
    acc = acc * tl.load(scale_ptr + seg)
    out = y_ptr + row * stride_ym + offs_n * stride_yn
    if ACCUM:
        acc += tl.load(out, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def _check(x: torch.Tensor, w: torch.Tensor, t: PoolTables) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and pool buffer {tuple(w.shape)} must be [N, H] and [S, H]")
    if x.shape[0] != t.n_rows:
        raise ValueError(f"x has {x.shape[0]} rows, the tables were built for {t.n_rows}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but the pool is {w.dtype}")


def mbgmm_shrink(x: torch.Tensor, wa: torch.Tensor, t: PoolTables, proj: int, *, block_m: int = 16,
                 block_k: int | None = None) -> torch.Tensor:
    """``v [N, BLOCK_R]`` fp32 with ``v[t, :r] = x[t] @ A`` for tokens of each segment (others 0)."""
    _check(x, wa, t)
    R = _pow2(t.max_rank)
    v = torch.zeros(x.shape[0], R, dtype=torch.float32, device=x.device)
    if t.n_seg == 0:
        return v
    K = x.shape[1]
    block_k = min(_pow2(K), block_k or (128 if INTERPRET else 64))
    grid = (t.n_seg, triton.cdiv(t.max_len, block_m))
    with _launch():
        _mbgmm_shrink_kernel[grid](x, wa, v, t.table, t.n_seg, K, proj, x.stride(0), x.stride(1),
                                   wa.stride(0), wa.stride(1), v.stride(0), v.stride(1), BLOCK_M=block_m,
                                   BLOCK_K=block_k, BLOCK_R=R,
                                   PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return v


def mbgmm_expand(y: torch.Tensor, v: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int, *,
                 block_m: int = 16, block_n: int | None = None) -> torch.Tensor:
    """``y[t] += scale · v[t, :r] @ B`` for tokens of each segment; ``y`` updated in place."""
    if t.n_seg == 0:
        return y
    N = wb.shape[1]
    block_n = min(_pow2(N), block_n or (128 if INTERPRET else 64))
    grid = (t.n_seg, triton.cdiv(t.max_len, block_m), triton.cdiv(N, block_n))
    with _launch():
        _mbgmm_expand_kernel[grid](v, wb, y, t.table, t.scale, t.n_seg, N, proj, v.stride(0), v.stride(1),
                                   wb.stride(0), wb.stride(1), y.stride(0), y.stride(1), BLOCK_M=block_m,
                                   BLOCK_R=v.shape[1], BLOCK_N=block_n,
                                   PRECISION="ieee" if y.dtype == torch.float32 else "tf32")
    return y


# MBGMV shrink split-K: programs per SM aimed at (0: no split). The GPU bench measures the choices and
# sets this before its serving runs (the value it used is recorded in its results).
MBGMV_PROGRAMS_PER_SM = 4
_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def mbgmv_split(n_seg: int, block_rows: int, k_tiles: int, device, programs_per_sm: int | None = None) -> int:
    """K splits of the MBGMV shrink: enough (request, rank-block) programs to reach ``programs_per_sm``
    per SM, at most one BLOCK_K tile each. Depends only on the batch size and the largest rank (not on
    each request's rank), so it is fixed inside a captured decode graph."""
    pps = MBGMV_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    if pps < 0:
        raise ValueError(f"programs_per_sm must be >= 0, got {pps}")
    if pps == 0 or n_seg == 0:
        return 1
    want = pps * _num_sms(device)
    return max(1, min(k_tiles, -(-want // (n_seg * block_rows))))


# MBGMV tile shapes (the GPU bench times candidates on a decode step and sets the fastest before its
# serving runs; the values it used are recorded in its results). Shrink: rank rows per program, K
# columns per loop step, warps. Expand: rank rows per loop step, output columns per program, warps.
# Defaults: the choice of the committed run on an NVIDIA H200 (data/results/slora/h200.json: 128 requests,
# ranks 8-64, H = 4096; the candidates within ~2 % of each other are listed in its sweep records).
MBGMV_SHRINK = {"block_j": 8, "block_k": 1024, "num_warps": 4}
MBGMV_EXPAND = {"block_r": 16, "block_n": 1024, "num_warps": 4}


def mbgmv_shrink(x: torch.Tensor, wa: torch.Tensor, t: PoolTables, proj: int, *, n_proj: int = 1,
                 block_j: int | None = None, block_k: int | None = None, split_k: int | None = None,
                 num_warps: int | None = None) -> torch.Tensor:
    """Split-K partial sums ``v [split, N, R]`` fp32 (``R`` = largest rank as a power of two): summed
    over ``split``, ``v[:, t, :r] = x[t] @ A`` for each request's token (entries ``j >= r`` undefined).
    ``n_proj > 1``: projections ``proj .. proj + n_proj - 1`` of the same ``x`` in one launch,
    ``v [n_proj, split, N, R]``."""
    _check(x, wa, t)
    if t.n_seg and t.max_len != 1:
        raise ValueError("MBGMV takes one token per request (use MBGMM for prefill)")
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if n_proj < 1 or not 0 <= proj <= 4 - n_proj:
        raise ValueError(f"projections {proj}..{proj + n_proj - 1} outside 0..3")
    R = _pow2(t.max_rank)
    if t.n_seg == 0:
        v = torch.zeros(n_proj, 1, x.shape[0], R, dtype=torch.float32, device=x.device)
        return v if n_proj > 1 else v[0]
    block_j = block_j or MBGMV_SHRINK["block_j"]
    K = x.shape[1]
    block_k = min(_pow2(K), block_k or (128 if INTERPRET else MBGMV_SHRINK["block_k"]))
    k_tiles = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = mbgmv_split(t.n_seg * n_proj, triton.cdiv(R, block_j), k_tiles, x.device)
    split_k = min(split_k, k_tiles)
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    v = torch.empty(n_proj, split_k, x.shape[0], R, dtype=torch.float32, device=x.device)
    grid = (t.n_seg, triton.cdiv(R, block_j), split_k * n_proj)
    with _launch():
        _mbgmv_shrink_kernel[grid](x, wa, v, t.table, t.n_seg, K, proj, k_per_split, split_k, x.stride(0),
                                   x.stride(1), wa.stride(0), wa.stride(1), v.stride(0), v.stride(1), v.stride(2),
                                   v.stride(3), BLOCK_J=block_j, BLOCK_K=block_k,
                                   num_warps=num_warps or MBGMV_SHRINK["num_warps"])
    return v if n_proj > 1 else v[0]


def mbgmv_expand(y: torch.Tensor | None, v: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int, *,
                 block_n: int | None = None, block_r: int | None = None, num_warps: int | None = None
                 ) -> torch.Tensor:
    """``y[t] += scale · v[t, :r] @ B`` (``v [N, R]`` or the shrink's split planes ``[split, N, R]``,
    summed here). ``y=None``: a new ``y`` that holds only the LoRA term (stored, no zero fill, when every
    token row is one request's; else zero-filled first). Several projections (``v [n_proj, split, N,
    R]`` from ``mbgmv_shrink(..., n_proj=n)``): ``y [n_proj, N, H]``, projections ``proj ..``."""
    if v.dim() == 2:
        v = v.unsqueeze(0)
    multi = v.dim() == 4
    v4 = v if multi else v.unsqueeze(0)
    n_proj = v4.shape[0]
    accum = y is not None
    shape = (n_proj, t.n_rows, wb.shape[1]) if multi else (t.n_rows, wb.shape[1])
    if y is None:
        alloc = torch.empty if t.rows_once() else torch.zeros
        y = alloc(shape, dtype=wb.dtype, device=wb.device)
    elif tuple(y.shape) != shape:
        raise ValueError(f"y is {tuple(y.shape)}, expected {shape}")
    if t.n_seg == 0:
        return y
    y3 = y if multi else y.unsqueeze(0)
    N = wb.shape[1]
    block_n = min(_pow2(N), block_n or (128 if INTERPRET else MBGMV_EXPAND["block_n"]))
    block_r = block_r or MBGMV_EXPAND["block_r"]
    grid = (t.n_seg, triton.cdiv(N, block_n), n_proj)
    with _launch():
        _mbgmv_expand_kernel[grid](v4, wb, y3, t.table, t.scale, t.n_seg, N, proj, v4.shape[1],
                                   v4.stride(0), v4.stride(1), v4.stride(2), v4.stride(3), wb.stride(0),
                                   wb.stride(1), y3.stride(0), y3.stride(1), y3.stride(2), BLOCK_R=block_r,
                                   BLOCK_N=block_n, ACCUM=accum, num_warps=num_warps or MBGMV_EXPAND["num_warps"])
    return y


def lora_mbgmm(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """MBGMM: ``y += s·(x A) B`` per request segment, A/B rows gathered from the pool by slot id."""
    v = mbgmm_shrink(x, wa, t, proj)
    y = torch.zeros(x.shape[0], wb.shape[1], dtype=x.dtype, device=x.device) if y is None else y
    return mbgmm_expand(y, v, wb, t, proj)


def lora_mbgmv(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int,
               y: torch.Tensor | None = None, *, n_proj: int = 1) -> torch.Tensor:
    """MBGMV: the decode case (one token per request). Two launches: the split-K shrink into per-split
    planes, the expand (which adds them) storing ``y`` or, when given, adding into it. ``n_proj > 1``:
    projections ``proj .. proj + n_proj - 1`` of the same ``x`` (q, k, v) in the same two launches,
    ``y [n_proj, N, H]``."""
    return mbgmv_expand(y, mbgmv_shrink(x, wa, t, proj, n_proj=n_proj), wb, t, proj)


# ------------------------------------------------------------------------------------------------
# PyTorch paths and the reference
# ------------------------------------------------------------------------------------------------
def lora_pool_torch(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """The MBGMM/MBGMV computation in PyTorch: requests grouped by rank, each group's rows gathered
    by slot id (exactly ``r_b`` rows per request, no padding), then two batched matmuls per group."""
    y = torch.zeros(x.shape[0], wb.shape[1], dtype=x.dtype, device=x.device) if y is None else y
    if t.n_seg == 0:
        return y
    T = t.max_len
    for r in np.unique(t.seg_rank).tolist():
        segs = np.nonzero(t.seg_rank == r)[0]
        slots = t.a_loc[(t.seg_astart[segs] + r * proj)[:, None] + np.arange(r)[None, :]]      # [G, r]
        sl = torch.from_numpy(slots).to(x.device)
        A = wa[sl]                                                                          # [G, r, H]
        B = wb[sl]                                                                          # [G, r, H]
        valid = np.arange(T)[None, :] < t.seg_len[segs][:, None]                            # [G, T]
        tok_np = np.where(valid, t.seg_start[segs][:, None] + np.arange(T)[None, :], 0)
        tok = torch.from_numpy(tok_np).to(x.device)
        yg = torch.bmm(torch.bmm(x[tok], A.transpose(1, 2)), B)                            # [G, T, H]
        yg = yg * torch.from_numpy(t.seg_scale[segs]).to(x.device, x.dtype)[:, None, None]
        vm = torch.from_numpy(valid).to(x.device)
        y.index_add_(0, tok[vm], yg[vm])
    return y


def _bmm_index(t: PoolTables, device) -> tuple:
    """Device index tensors of the padded-BMM baseline for all four projections, built once per forward
    (one host-to-device copy, cached on the tables): slots ``[4, S, R]``, rank mask ``[S, R, 1]``, the
    token row of each (segment, position) ``[S, T]`` (T = longest segment; padding points at row 0),
    its validity ``[S, T]``, scales."""
    c = getattr(t, "_bmm_dev", None)
    if c is not None and c[0].device == torch.device(device):
        return c
    S, R, T = t.n_seg, t.max_rank, t.max_len
    j = np.arange(R)[None, :]
    valid = j < t.seg_rank[:, None]                                                           # [S, R]
    idx = np.stack([np.where(valid, t.a_loc[np.minimum(t.seg_astart[:, None] + t.seg_rank[:, None] * p + j,
                                                       len(t.a_loc) - 1)], 0) for p in range(4)])
    pos = np.arange(T)[None, :]
    tvalid = pos < t.seg_len[:, None]                                                         # [S, T]
    tok = np.where(tvalid, t.seg_start[:, None] + pos, 0)
    flat = np.concatenate([idx.ravel(), valid.ravel(), tok.ravel(), tvalid.ravel()]).astype(np.int64)
    d = torch.from_numpy(flat).to(device, non_blocking=True)
    n1, n2, n3 = 4 * S * R, 5 * S * R, 5 * S * R + S * T
    c = (d[:n1].view(4, S, R), d[n1:n2].view(S, R, 1).bool(), d[n2:n3].view(S, T), d[n3:].view(S, T).bool(),
         torch.from_numpy(t.seg_scale).to(device, non_blocking=True))
    t._bmm_dev = c
    return c


def lora_padded_bmm(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """S-LoRA-bmm baseline: copy each request's A and B into contiguous ``[S, r_max, H]`` tensors
    (zero-padded past its rank), then ``torch.bmm`` over the batch with each request's tokens padded to
    the longest (``[S, T, H]``; decode: ``T = 1``)."""
    y = torch.zeros(x.shape[0], wb.shape[1], dtype=x.dtype, device=x.device) if y is None else y
    if t.n_seg == 0:
        return y
    sl_all, m, tok, tvalid, sc = _bmm_index(t, x.device)
    sl = sl_all[proj]
    A = wa[sl] * m                                                                            # [S, R, H] padded copy
    B = wb[sl] * m
    v = torch.bmm(x[tok], A.transpose(1, 2))                                                  # [S, T, R]
    out = torch.bmm(v, B) * sc.to(x.dtype)[:, None, None]                                     # [S, T, H]
    y.index_add_(0, tok[tvalid], out[tvalid])
    return y


def lora_padded_bmm_rows(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor,
                         y: torch.Tensor | None = None) -> torch.Tensor:
    """S-LoRA-bmm for a decode batch from device index tensors only (no host work: CUDA-graph safe).

    ``x [B, H]`` one token per row; ``idx [B, R]`` (int64) the pool slots of each row's adapter rows for
    this projection, padded to the batch's largest rank ``R`` with a slot that holds zeros; ``scale [B]``.
    The rows are copied into contiguous padded tensors ``[B, R, H]`` (``Σ 2·H·R`` elements per
    projection, whatever each row's rank), then two ``torch.bmm``. ``idx [P, B, R]``: ``P`` projections
    of the same ``x`` (q, k, v) in one gather and one pair of ``bmm`` over ``P·B``; returns ``[P, B, H]``."""
    multi = idx.dim() == 3
    idx3 = idx if multi else idx.unsqueeze(0)
    P, B, R = idx3.shape
    A = wa[idx3.reshape(P * B, R)]                                                # [P·B, R, H] padded copy
    Bw = wb[idx3.reshape(P * B, R)]                                               # [P·B, R, H]
    xs = x.unsqueeze(0).expand(P, B, x.shape[1]).reshape(P * B, 1, x.shape[1])
    v = torch.bmm(xs, A.transpose(1, 2))                                          # [P·B, 1, R]
    out = (torch.bmm(v, Bw).view(P, B, -1) * scale.to(x.dtype)[None, :, None])    # [P, B, H]
    out = out if multi else out[0]
    return out if y is None else y.add_(out)


def mbgmm_ref(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, t: PoolTables, proj: int) -> torch.Tensor:
    """float32 reference: for each request, ``s · x A B`` with A, B rebuilt densely from the pool."""
    y = torch.zeros(x.shape[0], wb.shape[1], dtype=torch.float32)
    xf, waf, wbf = x.float().cpu(), wa.float().cpu(), wb.float().cpu()
    for s in range(t.n_seg):
        rows = torch.from_numpy(t.rows_of(s, proj))
        A = waf[rows].T                        # [H, r]
        B = wbf[rows]                          # [r, H]
        a, n = int(t.seg_start[s]), int(t.seg_len[s])
        y[a:a + n] += float(t.seg_scale[s]) * (xf[a:a + n] @ A) @ B
    return y


def gathered_elements(t: PoolTables, H: int, method: str, n_proj: int = 4) -> int:
    """Adapter weight elements read per layer for this batch, counted from the index tensors.

    ``mbgmv``/``mbgmm``/``torch``: the rows actually addressed, ``Σ_requests 2·n_proj·H·r_b``
    (A and B of each projection); ``bmm``: the padded copies, ``Σ_requests 2·n_proj·H·r_max``."""
    if t.n_seg == 0:
        return 0
    if method == "bmm":
        per = np.full(t.n_seg, t.max_rank)
    else:
        per = t.seg_rank
    return int(2 * n_proj * H * per.sum())
