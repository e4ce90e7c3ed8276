"""SGMV and BGMV: the multi-LoRA operators of Punica (Chen et al., MLSys 2024), in Triton.

A batch of ``N`` token rows ``x [N, h1]`` where row ``i`` wants adapter ``a(i)`` (or none, -1).
With the adapters' low-rank pairs stacked in a slot pool, ``A [n_slots, h1, r]`` and
``B [n_slots, r, h2]``, LoRA adds ::

    y[i] += s_a(i) * (x[i] @ A[a(i)]) @ B[a(i)]                                   (1)

Punica computes (1) as two SGMV calls over *segments*, runs of rows that share an adapter:

- **shrink** ``v = x @ A[slot]`` (h1 -> r): the output is narrow and K = h1 is large, so the
  K dimension is split across programs (``split_k``), which spreads even a single adapter's read
  over the GPU. The splits' partial sums are combined without any program waiting for another (so
  uneven segments cannot stall a reduction): kept in an fp32 workspace and summed by the expand
  (``reduce="workspace"``), summed by the last split of each tile to arrive (``"serial"``, a
  per-tile arrival counter), or added with fp32 atomics into a zeroed ``v`` (``"atomic"``, what
  :func:`sgmv_shrink` does);
- **expand** ``y += s * v @ B[slot]`` (r -> h2): K = r is tiny, N = h2 is large, so the grid is
  one program per (segment tile, N tile), or per (segment tile, run of N tiles) when programs walk
  several tiles (``expand_per_sm``); tiles of one row (decode, distinct adapters) may instead take a
  row-by-row matrix-vector kernel on CUDA cores (``expand_rows``), whose programs hold one weight
  tile rather than a 16-row tensor-core tile. With programmatic dependent launch (Hopper) the
  expand starts while the shrink runs: its ``B`` tile and ``y`` are read before it waits for ``v``.

:class:`SGMVConfig` holds these choices; :func:`sgmv_config` returns the one measured best for a
shape and tile count by the GPU benchmark (installed with :func:`set_sgmv_configs`), else a default.

``v`` is stored in fp32 between the two (an fp16 intermediate loses accuracy: vllm-project/vllm PR
#1804). With fp16/bf16 weights the expand multiplies on TF32 tensor cores: the weights convert
exactly (TF32 keeps 10 mantissa bits), ``v`` keeps fp32's range and 11 significant bits — as many
as the fp16 output has; an fp32 model multiplies in full fp32 ("ieee"). Segments are described by a :class:`Segments` tile table: each tile is up to ``block_m``
consecutive rows of one segment; rows may be addressed through an index (``rows``), so a batch need
not be physically sorted by adapter, and padding rows or rows without an adapter simply belong to
no tile. Weights are *gathered by slot index* inside the kernel: nothing is copied per batch.

**BGMV** is the special case with one row per segment (a slot index per row, no tile table):
a matrix-vector product per row, without tensor cores.

Baselines (same semantics, used by the benchmarks and the CPU notebook):

- :func:`lora_loop` — Punica's "Loop": a pair of matmuls per segment;
- :func:`lora_gather_bmm` — "Gather-BMM": copy ``A[a(i)]``, ``B[a(i)]`` for every row, then
  ``torch.bmm`` (the gather moves ``N * (h1 + h2) * r`` elements);
- :func:`lora_segmented_torch` — one padded ``torch.bmm`` over segments (weights gathered once
  per segment): the CPU stand-in for SGMV's cost shape;
- :func:`sgmv_ref`, :func:`bgmv_ref`, :func:`lora_ref` — float32 plain-PyTorch references.

Shapes: ``x [N, h1]``; ``A [n_slots, h1, r]``; ``B [n_slots, r, h2]``; ``scale [n_slots]``;
``v [N, r]`` fp32; ``y [N, h2]``. Ranks below 16 are padded to 16 inside the kernels (``tl.dot``
needs tiles of at least 16).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_*: programmatic dependent launch)

from mlsys24.kernels import no_overflow_checks as _launch  # also: the CPU interpreter fixes (no-op on GPU)
from mlsys24.kernels import pdl_supported

__all__ = [
    "Segments", "SGMVConfig", "sgmv_config", "sgmv_configs", "set_sgmv_configs", "segments_from_slots", "segments_from_indptr",
    "sgmv_shrink", "sgmv_expand", "sgmv", "lora_sgmv",
    "bgmv_shrink", "bgmv_expand", "lora_bgmv",
    "lora_loop", "lora_gather_bmm", "lora_segmented_torch",
    "sgmv_ref", "bgmv_ref", "lora_ref", "dense_ref",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# segment tile tables
# ------------------------------------------------------------------------------------------------
@dataclass
class Segments:
    """Rows grouped into adapter segments, cut into tiles of at most ``block_m`` rows.

    ``table`` is one int32 device tensor ``[n_rows + 3 * capacity]``: ``rows`` (position -> row of
    ``x``), then per tile ``start``, ``end`` (positions, end exclusive) and ``slot``. Tiles past
    ``n_tiles`` are empty (start = end) so a fixed ``capacity`` gives a fixed launch grid (CUDA graphs).
    Host copies: ``seg_indptr`` (positions), ``seg_slot`` and ``order`` (the rows in position order).
    """

    table: torch.Tensor
    n_rows: int               # rows of x (and y, v)
    capacity: int             # tiles in the table (launch grid)
    n_tiles: int              # non-empty tiles
    block_m: int
    has_rows: bool            # False: position == row (rows already contiguous per segment)
    seg_indptr: np.ndarray    # [S + 1] positions
    seg_slot: np.ndarray      # [S]
    order: np.ndarray         # [n_valid] row of x at each position

    @property
    def rows(self) -> torch.Tensor:
        return self.table[: self.n_rows]

    @property
    def tile_start(self) -> torch.Tensor:
        return self.table[self.n_rows: self.n_rows + self.capacity]

    @property
    def tile_end(self) -> torch.Tensor:
        return self.table[self.n_rows + self.capacity: self.n_rows + 2 * self.capacity]

    @property
    def tile_slot(self) -> torch.Tensor:
        return self.table[self.n_rows + 2 * self.capacity:]

    @property
    def n_segments(self) -> int:
        return len(self.seg_slot)

    @property
    def max_tile_rows(self) -> int:
        """Rows of the fullest tile (0: no tiles)."""
        lens = np.diff(self.seg_indptr)
        return int(min(self.block_m, lens.max())) if len(lens) else 0

    def slot_per_row(self) -> np.ndarray:
        """Slot of each row of x (-1: no adapter)."""
        out = np.full(self.n_rows, -1, dtype=np.int64)
        for i, slot in enumerate(self.seg_slot):
            out[self.order[self.seg_indptr[i]:self.seg_indptr[i + 1]]] = slot
        return out

    def refill_(self, slot_per_row) -> Segments:
        """Rebuild in place from new per-row slots (same n_rows, capacity, block_m): the device
        tensor keeps its address, so a captured CUDA graph sees the new tiles."""
        new = segments_from_slots(slot_per_row, block_m=self.block_m, capacity=self.capacity,
                                  device=self.table.device, force_rows=True, host_only=True)
        self.table.copy_(new.table, non_blocking=True)
        self.n_tiles, self.seg_indptr, self.seg_slot, self.order = new.n_tiles, new.seg_indptr, new.seg_slot, new.order
        return self


def _tiles(seg_indptr: np.ndarray, seg_slot: np.ndarray, block_m: int):
    starts, ends, slots = [], [], []
    for i, slot in enumerate(seg_slot):
        s, e = int(seg_indptr[i]), int(seg_indptr[i + 1])
        if slot < 0 or e <= s:
            continue
        for t in range(s, e, block_m):
            starts.append(t)
            ends.append(min(t + block_m, e))
            slots.append(int(slot))
    return starts, ends, slots


def _pack(n_rows: int, rows: np.ndarray, starts, ends, slots, capacity: int | None, device, host_only: bool):
    n_tiles = len(starts)
    cap = max(1, n_tiles) if capacity is None else capacity
    if n_tiles > cap:
        raise ValueError(f"{n_tiles} tiles do not fit a table of capacity {cap}")
    buf = np.zeros(n_rows + 3 * cap, dtype=np.int32)
    buf[: len(rows)] = rows
    buf[n_rows: n_rows + n_tiles] = starts
    buf[n_rows + cap: n_rows + cap + n_tiles] = ends
    buf[n_rows + 2 * cap: n_rows + 2 * cap + n_tiles] = slots
    t = torch.from_numpy(buf)
    if not host_only:
        t = t.to(device)
    return t, cap, n_tiles


def segments_from_slots(slot_per_row, *, block_m: int = 16, capacity: int | None = None, device=None,
                        force_rows: bool = False, host_only: bool = False) -> Segments:
    """Segments of rows by slot (``slot_per_row [N]``, -1 = no adapter; any order).

    Rows are stably sorted by slot; a run of equal slots is a segment. When the rows are already
    grouped in order (the scheduler sorts the batch by adapter), no row index is needed.
    """
    if isinstance(slot_per_row, torch.Tensor):
        device = slot_per_row.device if device is None else device
        slot_per_row = slot_per_row.detach().cpu().numpy()
    s = np.asarray(slot_per_row, dtype=np.int64).reshape(-1)
    n = len(s)
    valid = np.nonzero(s >= 0)[0]
    order = valid[np.argsort(s[valid], kind="stable")]
    sorted_slots = s[order]
    if len(order):
        cut = np.nonzero(np.diff(sorted_slots))[0] + 1
        indptr = np.concatenate([[0], cut, [len(order)]]).astype(np.int64)
        seg_slot = sorted_slots[indptr[:-1]]
    else:
        indptr, seg_slot = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    identity = len(order) == n and bool(np.all(order == np.arange(n)))
    has_rows = force_rows or not identity
    starts, ends, slots = _tiles(indptr, seg_slot, block_m)
    table, cap, n_tiles = _pack(n, order if has_rows else np.zeros(0, np.int64), starts, ends, slots, capacity,
                                device if device is not None else "cpu", host_only)
    return Segments(table, n, cap, n_tiles, block_m, has_rows, indptr, seg_slot, order)


def segments_from_indptr(seg_indptr: Sequence[int], seg_slot: Sequence[int], *, block_m: int = 16,
                         capacity: int | None = None, device=None) -> Segments:
    """Punica's form: segment ``i`` is rows ``seg_indptr[i]:seg_indptr[i+1]`` of x, adapter slot
    ``seg_slot[i]`` (-1: no adapter; empty segments allowed)."""
    indptr = np.asarray(list(seg_indptr), dtype=np.int64)
    slots = np.asarray(list(seg_slot), dtype=np.int64)
    if len(indptr) != len(slots) + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError("seg_indptr must start at 0, be non-decreasing and have len(seg_slot) + 1 entries")
    n = int(indptr[-1])
    starts, ends, tslots = _tiles(indptr, slots, block_m)
    table, cap, n_tiles = _pack(n, np.zeros(0, np.int64), starts, ends, tslots, capacity,
                                device if device is not None else "cpu", False)
    keep = [i for i in range(len(slots)) if slots[i] >= 0 and indptr[i + 1] > indptr[i]]
    order = np.concatenate([np.arange(indptr[i], indptr[i + 1]) for i in keep]) if keep else np.zeros(0, np.int64)
    lens = [indptr[i + 1] - indptr[i] for i in keep]
    pos_indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Segments(table, n, cap, n_tiles, block_m, False, pos_indptr, slots[keep].astype(np.int64), order)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
# Batch-dependent integers are not specialized on (one compilation serves every batch size).
@triton.jit
def _tile_entry(table_ptr, n_rows, capacity, tile):
    """(first row, end row, adapter slot) of segment tile ``tile`` in the packed table
    (``rows | starts | ends | slots``): three independent loads, one memory round trip."""
    start = tl.load(table_ptr + n_rows + tile)
    end = tl.load(table_ptr + n_rows + capacity + tile)
    slot = tl.load(table_ptr + n_rows + 2 * capacity + tile).to(tl.int64)
    return start, end, slot


@triton.jit(do_not_specialize=["n_rows", "capacity", "k_per_split"])
def _sgmv_shrink_kernel(x_ptr, w_ptr, v_ptr, table_ptr, count_ptr, n_rows, capacity, K, R, k_per_split,
                        stride_xm, stride_xk, stride_ws, stride_wk, stride_wr, stride_vs, stride_vm, stride_vr,
                        HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, OUT_MODE: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                        PRECISION: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """Partial product of one split of K: ``x[rows of tile, k-chunk] @ w[slot, k-chunk, :]``.

    OUT_MODE 0: stored into the fp32 workspace ``v[split, row, :]`` (two-stage reduction: the expand
    kernel sums the splits; no zero-fill, no atomics); 1: added into ``v[row, :]`` with fp32 atomics;
    2: ``v[row, :] += partial`` (a single split); 3: stored into the workspace, then the *last* split
    of the tile to finish (a per-tile arrival counter, reset by that program) sums every split into
    ``v[0, row, :]`` — nobody waits, so uneven segments cannot deadlock (punica-ai/punica PR #35)."""
    if LAUNCH_DEPENDENTS:  # let the expand kernel's programs start (and prefetch B) while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    tile = tl.program_id(0)
    split = tl.program_id(1)
    start, end, slot = _tile_entry(table_ptr, n_rows, capacity, tile)
    if end > start:
        pos = start + tl.arange(0, BLOCK_M)
        m_mask = pos < end
        if HAS_ROWS:
            rows = tl.load(table_ptr + pos, mask=m_mask, other=0).to(tl.int64)
        else:
            rows = pos.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        k0 = split * k_per_split
        for kk in range(0, k_per_split, BLOCK_K):
            offs_k = k0 + kk + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)            # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_ptr + slot * stride_ws + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)            # [BLOCK_K, BLOCK_R]
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        mask = m_mask[:, None] & r_mask[None, :]
        if OUT_MODE == 0:
            tl.store(v_ptr + split * stride_vs + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr, acc,
                     mask=mask)
        elif OUT_MODE == 3:
            vrow = v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr
            tl.store(vrow + split * stride_vs, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the (releasing) arrival
            n_splits = tl.num_programs(1)
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == n_splits - 1:
                offs_s = tl.arange(0, SPLIT_CHUNK)
                total = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                for s0 in range(0, n_splits, SPLIT_CHUNK):
                    sp = s0 + offs_s
                    part = tl.load(vrow[None, :, :] + sp[:, None, None] * stride_vs,
                                   mask=mask[None, :, :] & (sp < n_splits)[:, None, None], other=0.0,
                                   cache_modifier=".cg")                     # L2, not a stale L1 line
                    total += tl.sum(part, axis=0)
                tl.store(vrow, total, mask=mask)
                tl.store(count_ptr + tile, 0)
        elif OUT_MODE == 1:
            tl.atomic_add(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr, acc, mask=mask)
        else:
            out = v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr
            tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit(do_not_specialize=["n_rows", "capacity", "n_splits", "n_per_prog"])
def _sgmv_expand_kernel(v_ptr, w_ptr, y_ptr, scale_ptr, table_ptr, n_rows, capacity, N, R, n_splits, n_per_prog,
                        stride_vs, stride_vm, stride_vr, stride_ws, stride_wr, stride_wn, stride_ym, stride_yn,
                        HAS_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                        PRECISION: tl.constexpr, WAIT_PRIOR: tl.constexpr, N_LOOP: tl.constexpr):
    """y[rows of tile, n-range] += scale[slot] * (sum_s v[s, rows, :]) @ w[slot, :, n-range]   (fp32 accumulation).

    ``v`` is ``n_splits`` fp32 partial products (the shrink's workspace; 1 split = a plain ``v``).
    The weight tile and ``y`` do not depend on the shrink, so they are loaded first; with WAIT_PRIOR
    (programmatic dependent launch) only the read of ``v`` waits for the shrink kernel to finish.

    N_LOOP False: the program's n-range is one ``BLOCK_N`` tile. N_LOOP True: it is ``n_per_prog``
    columns, walked ``BLOCK_N`` at a time with the next tile's ``w`` and ``y`` loads issued before
    the current tile's product (a register double buffer). Fewer, longer programs: the table load,
    the wait and the ``v`` sum are paid once per program instead of once per tile, and small tiles
    keep registers low, so many programs stay resident and keep weight reads in flight."""
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    start, end, slot = _tile_entry(table_ptr, n_rows, capacity, tile)
    if end > start:
        pos = start + tl.arange(0, BLOCK_M)
        m_mask = pos < end
        if HAS_ROWS:
            rows = tl.load(table_ptr + pos, mask=m_mask, other=0).to(tl.int64)
        else:
            rows = pos.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        if N_LOOP:
            n_lo = nb * n_per_prog
            n_hi = tl.minimum(n_lo + n_per_prog, N)
        else:
            n_lo = nb * BLOCK_N
            n_hi = N
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        w_base = w_ptr + slot * stride_ws + offs_r[:, None] * stride_wr
        y_base = y_ptr + rows[:, None] * stride_ym
        wt = tl.load(w_base + offs_n[None, :] * stride_wn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        yv = tl.load(y_base + offs_n[None, :] * stride_yn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_SCALE:
            s = tl.load(scale_ptr + slot)
        if WAIT_PRIOR:
            tl.extra.cuda.gdc_wait()
        # sum the split partials, SPLIT_CHUNK of them per (3-D) load
        offs_s = tl.arange(0, SPLIT_CHUNK)
        vmask = m_mask[None, :, None] & r_mask[None, None, :]
        vptr = v_ptr + rows[None, :, None] * stride_vm + offs_r[None, None, :] * stride_vr
        vt = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s0 in range(0, n_splits, SPLIT_CHUNK):
            sp = s0 + offs_s
            part = tl.load(vptr + sp[:, None, None] * stride_vs, mask=vmask & (sp < n_splits)[:, None, None],
                           other=0.0)                                                   # [CHUNK, BLOCK_M, BLOCK_R]
            vt += tl.sum(part, axis=0)
        if N_LOOP:
            for n0 in range(n_lo, n_hi, BLOCK_N):
                offs_c = n0 + tl.arange(0, BLOCK_N)
                offs_x = offs_c + BLOCK_N                                               # the next tile
                x_mask = offs_x < n_hi
                wt_x = tl.load(w_base + offs_x[None, :] * stride_wn, mask=r_mask[:, None] & x_mask[None, :],
                               other=0.0)
                yv_x = tl.load(y_base + offs_x[None, :] * stride_yn, mask=m_mask[:, None] & x_mask[None, :],
                               other=0.0)
                acc = tl.dot(vt, wt.to(tl.float32), input_precision=PRECISION)        # [BLOCK_M, BLOCK_N]
                if HAS_SCALE:
                    acc = acc * s
                tl.store(y_base + offs_c[None, :] * stride_yn, (yv.to(tl.float32) + acc).to(yv.dtype),
                         mask=m_mask[:, None] & (offs_c < n_hi)[None, :])
                wt = wt_x
                yv = yv_x
        else:
            acc = tl.dot(vt, wt.to(tl.float32), input_precision=PRECISION)
            if HAS_SCALE:
                acc = acc * s
            tl.store(y_base + offs_n[None, :] * stride_yn, (yv.to(tl.float32) + acc).to(yv.dtype),
                     mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["n_rows", "capacity", "n_splits"])
def _sgmv_expand_rows_kernel(v_ptr, w_ptr, y_ptr, scale_ptr, table_ptr, n_rows, capacity, N, R, n_splits,
                             stride_vs, stride_vm, stride_vr, stride_ws, stride_wr, stride_wn, stride_ym, stride_yn,
                             HAS_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_N: tl.constexpr, SPLIT_CHUNK: tl.constexpr, WAIT_PRIOR: tl.constexpr):
    """The expand as matrix-vector products, one row of the tile at a time (CUDA cores, fp32):
    ``y[row, n-tile] += scale[slot] * sum_r v[row, r] * w[slot, r, n-tile]``.

    For decode batches of distinct adapters (tiles of one row) the tensor-core tile of
    :func:`_sgmv_expand_kernel` is 16 rows of which one is live, and its registers cap how many
    programs an SM holds; here a program holds only the ``[BLOCK_R, BLOCK_N]`` weight tile (loaded
    before the wait for the shrink) and one row, so many more weight reads stay in flight. The next
    row's ``y`` and ``v`` are loaded before the current row's product."""
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    start, end, slot = _tile_entry(table_ptr, n_rows, capacity, tile)
    if end > start:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        wt = tl.load(w_ptr + slot * stride_ws + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
        if HAS_ROWS:
            row = tl.load(table_ptr + start).to(tl.int64)
        else:
            row = start.to(tl.int64)
        yv = tl.load(y_ptr + row * stride_ym + offs_n * stride_yn, mask=n_mask, other=0.0)
        if HAS_SCALE:
            s = tl.load(scale_ptr + slot)
        if WAIT_PRIOR:
            tl.extra.cuda.gdc_wait()
        offs_s = tl.arange(0, SPLIT_CHUNK)
        vrow = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s0 in range(0, n_splits, SPLIT_CHUNK):
            sp = s0 + offs_s
            part = tl.load(v_ptr + row * stride_vm + sp[:, None] * stride_vs + offs_r[None, :] * stride_vr,
                           mask=(sp < n_splits)[:, None] & r_mask[None, :], other=0.0)   # [CHUNK, BLOCK_R]
            vrow += tl.sum(part, axis=0)
        for i in range(start, end):
            # the next row's y and v (a row past the tile is masked off)
            more = i + 1 < end
            if HAS_ROWS:
                row_x = tl.load(table_ptr + i + 1, mask=more, other=0).to(tl.int64)
            else:
                row_x = row + 1
            yv_x = tl.load(y_ptr + row_x * stride_ym + offs_n * stride_yn, mask=n_mask & more, other=0.0)
            vrow_x = tl.zeros([BLOCK_R], dtype=tl.float32)
            for s0 in range(0, n_splits, SPLIT_CHUNK):
                sp = s0 + offs_s
                part = tl.load(v_ptr + row_x * stride_vm + sp[:, None] * stride_vs + offs_r[None, :] * stride_vr,
                               mask=(sp < n_splits)[:, None] & r_mask[None, :] & more, other=0.0)
                vrow_x += tl.sum(part, axis=0)
            acc = tl.sum(vrow[:, None] * wt, axis=0)                                    # [BLOCK_N]
            if HAS_SCALE:
                acc = acc * s
            tl.store(y_ptr + row * stride_ym + offs_n * stride_yn, (yv.to(tl.float32) + acc).to(yv.dtype), mask=n_mask)
            row = row_x
            yv = yv_x
            vrow = vrow_x


@triton.jit(do_not_specialize=["k_per_split"])
def _bgmv_shrink_kernel(x_ptr, w_ptr, v_ptr, idx_ptr, K, R, k_per_split,
                        stride_xm, stride_xk, stride_ws, stride_wk, stride_wr, stride_vm, stride_vr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr):
    """v[row] += x[row, k-chunk] @ w[idx[row], k-chunk, :]   (matrix-vector, CUDA cores)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        k0 = split * k_per_split
        for kk in range(0, k_per_split, BLOCK_K):
            offs_k = k0 + kk + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xk = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + slot * stride_ws + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xk[:, None] * wt, axis=0)
        out = v_ptr + row * stride_vm + offs_r * stride_vr
        if not ATOMIC:
            tl.store(out, tl.load(out, mask=r_mask, other=0.0) + acc, mask=r_mask)
        else:
            tl.atomic_add(out, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(v_ptr, w_ptr, y_ptr, scale_ptr, idx_ptr, N, R,
                        stride_vm, stride_vr, stride_ws, stride_wr, stride_wn, stride_ym, stride_yn,
                        HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[row, n-tile] += scale * v[row, :] @ w[idx[row], :, n-tile]."""
    row = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        vr = tl.load(v_ptr + row * stride_vm + offs_r * stride_vr, mask=r_mask, other=0.0)
        wt = tl.load(w_ptr + slot * stride_ws + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.sum(vr[:, None] * wt, axis=0)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot)
        out = y_ptr + row * stride_ym + offs_n * stride_yn
        yv = tl.load(out, mask=n_mask, other=0.0)
        tl.store(out, (yv.to(tl.float32) + acc).to(yv.dtype), mask=n_mask)


# ------------------------------------------------------------------------------------------------
# launch parameters
# ------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # CPU interpreter: every program runs in Python, so one program per tile


def _split_k(K: int, block_k: int, n_programs: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(split_k, k_per_split) with k_per_split a multiple of block_k covering K."""
    k_blocks = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = max(1, min(k_blocks, triton.cdiv(_target_programs(device), max(1, n_programs))))
    split_k = max(1, min(int(split_k), k_blocks))
    per = triton.cdiv(k_blocks, split_k) * block_k
    return triton.cdiv(K, per), per


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_pool(w: torch.Tensor, name: str) -> None:
    if w.dim() != 3:
        raise ValueError(f"{name} must be a stacked pool [n_slots, d_in, d_out], got shape {tuple(w.shape)}")


# ------------------------------------------------------------------------------------------------
# SGMV
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SGMVConfig:
    """Launch configuration of the LoRA SGMV pair (shrink, then expand).

    The shrink's split-K count follows from ``programs_per_sm``: K is split until
    ``tiles x splits ~ programs_per_sm x SMs`` (at most ``max_split``, at least one ``block_k`` per
    split), so a batch of 1 still spreads its adapter read over the GPU and a batch of 64 distinct
    adapters gets fewer, longer splits."""

    programs_per_sm: float = 4.0  # shrink: target tiles x splits per SM
    block_k: int = 64             # shrink: K step per loop iteration
    block_n: int = 128            # expand: output columns per program
    reduce: str = "workspace"     # splits of K: "workspace" (stored, summed by the expand), "serial" (the last split
    #                               of a tile sums them), "atomic" (fp32 atomics into a zeroed v)
    pdl: bool = False             # programmatic dependent launch of the expand (Hopper+): its B / y loads overlap the shrink
    num_warps: int = 4
    max_split: int = 64
    expand_per_sm: float = 0.0    # expand: 0 = one program per (tile, block_n columns); > 0 = each program walks a run
    #                               of block_n tiles, ~expand_per_sm x SMs programs in all (at least one tile each)
    expand_rows: int = 0          # expand: when no tile has more rows than this, the row-by-row kernel (0: never;
    #                               decided on the host from the tile table at launch; correct for any tiles)
    rows_block_n: int = 256       # expand, row-by-row kernel: output columns per program

    def as_dict(self) -> dict:
        return dict(vars(self))


# (K, N, R) -> [(tile-table capacity, config)] measured by the benchmark (``set_sgmv_configs``);
# ``sgmv_config`` picks the entry of the nearest capacity (log scale), else a heuristic default.
_SGMV_CONFIGS: dict[tuple[int, int, int], list[tuple[int, SGMVConfig]]] = {}


def set_sgmv_configs(table: dict | None) -> None:
    """Install tuned launch configs ``{(K, N, R): [(capacity, SGMVConfig | dict), ...]}`` (None: clear)."""
    _SGMV_CONFIGS.clear()
    for key, entries in (table or {}).items():
        _SGMV_CONFIGS[tuple(int(k) for k in key)] = sorted(
            (int(c), cfg if isinstance(cfg, SGMVConfig) else SGMVConfig(**cfg)) for c, cfg in entries)


def sgmv_configs() -> dict:
    """A copy of the installed table ``{(K, N, R): [(capacity, SGMVConfig), ...]}``."""
    return {k: list(v) for k, v in _SGMV_CONFIGS.items()}


def _default_sgmv_config(R: int) -> SGMVConfig:
    if INTERPRET:  # every program runs in Python: few, large programs
        return SGMVConfig(programs_per_sm=1, block_k=256, block_n=256)
    return SGMVConfig(block_k=64 if R <= 32 else 32, block_n=128)


def sgmv_config(K: int, N: int, R: int, capacity: int) -> SGMVConfig:
    """The launch config for a LoRA pair ``[K -> R -> N]`` over a tile table of ``capacity`` tiles."""
    entries = _SGMV_CONFIGS.get((K, N, R))
    if not entries:  # another projection of the same rank: the nearest tuned shape
        near = [k for k in _SGMV_CONFIGS if k[2] == R]
        if not near:
            return _default_sgmv_config(R)
        entries = _SGMV_CONFIGS[min(near, key=lambda k: abs(math.log2(k[0] * k[1]) - math.log2(max(1, K * N))))]
    return min(entries, key=lambda e: abs(math.log2(max(1, e[0])) - math.log2(max(1, capacity))))[1]


def _n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split_chunk(block_m: int, block_r: int, n_splits: int) -> int:
    """Split partials summed per load in the expand: a [chunk, BLOCK_M, BLOCK_R] fp32 tile of <= 4096
    elements (1 for a plain v; otherwise fixed per tile shape, so the split count is not compiled in)."""
    return 1 if n_splits == 1 else max(1, 4096 // (block_m * block_r))


def _shrink_split(K: int, R: int, block_m: int, capacity: int, device, cfg: SGMVConfig,
                  split_k: int | None) -> tuple[int, int, int]:
    """(block_k, n_splits, k_per_split) for the shrink of one launch."""
    block_k = min(_pow2(K, 16), cfg.block_k)
    k_blocks = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = math.ceil(cfg.programs_per_sm * _n_sms(device) / max(1, capacity))
        split_k = min(split_k, cfg.max_split)
        if cfg.reduce != "atomic":  # partials are summed in at most 4 chunks
            split_k = min(split_k, 4 * _split_chunk(block_m, _pow2(R, 16), 2))
    split_k = max(1, min(int(split_k), k_blocks))
    per = triton.cdiv(k_blocks, split_k) * block_k
    return block_k, triton.cdiv(K, per), per


def _check_shrink(v_shape, x: torch.Tensor, w: torch.Tensor, seg: Segments, name="sgmv_shrink") -> None:
    _check_pool(w, "w")
    N, K = x.shape
    R = w.shape[2]
    if w.shape[1] != K or tuple(v_shape) != (N, R) or seg.n_rows != N:
        raise ValueError(f"{name}: x {tuple(x.shape)}, w {tuple(w.shape)}, v {tuple(v_shape)}, "
                         f"segments of {seg.n_rows} rows do not agree")
    if w.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the weights are {w.dtype}")
    if R > 128:
        raise ValueError(f"shrink output width {R} > 128: use sgmv_expand-style tiling")


_COUNTERS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 per-tile arrival counters (kept zero by the kernel that uses them), or None when
    a larger buffer would have to be allocated during CUDA-graph capture."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _launch_shrink(v, x, w, seg, block_k, n_splits, per, out_mode, launch_dependents=False, num_warps=4,
                   counters=None):
    K, R = w.shape[1], w.shape[2]
    stride_vs = v.stride(0) if v.dim() == 3 else 0
    vm, vr = (v.stride(1), v.stride(2)) if v.dim() == 3 else (v.stride(0), v.stride(1))
    kw = {"num_warps": num_warps} if not INTERPRET else {}
    with _launch():
        _sgmv_shrink_kernel[(seg.capacity, n_splits)](
            x, w, v, seg.table, counters if counters is not None else seg.table, seg.n_rows, seg.capacity, K, R, per,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), stride_vs, vm, vr,
            HAS_ROWS=seg.has_rows, BLOCK_M=seg.block_m, BLOCK_K=block_k, BLOCK_R=_pow2(R, 16),
            OUT_MODE=out_mode, SPLIT_CHUNK=_split_chunk(seg.block_m, _pow2(R, 16), n_splits),
            PRECISION=_precision(x.dtype), LAUNCH_DEPENDENTS=launch_dependents, **kw)


def _expand_split(H: int, block_n: int, capacity: int, device, expand_per_sm: float) -> tuple[int, int]:
    """(programs along N, columns per program) of the expand: one ``block_n`` tile per program when
    ``expand_per_sm`` is 0, else runs of tiles so that ``capacity x programs ~ expand_per_sm x SMs``."""
    n_tiles = triton.cdiv(H, block_n)
    if expand_per_sm <= 0:
        return n_tiles, block_n
    chunks = max(1, min(n_tiles, math.ceil(expand_per_sm * _n_sms(device) / max(1, capacity))))
    per = triton.cdiv(n_tiles, chunks) * block_n
    return triton.cdiv(H, per), per


def _launch_expand(y, v, w, seg, scale, block_n, wait_prior=False, num_warps=4, expand_per_sm=0.0, expand_rows=0,
                   rows_block_n=256):
    R, H = w.shape[1], w.shape[2]
    n_splits = v.shape[0] if v.dim() == 3 else 1
    stride_vs = v.stride(0) if v.dim() == 3 else 0
    vm, vr = (v.stride(1), v.stride(2)) if v.dim() == 3 else (v.stride(0), v.stride(1))
    block_n = min(_pow2(H, 16), block_n)
    block_r = _pow2(R, 16)
    has_scale = scale is not None
    kw = {"num_warps": num_warps} if not INTERPRET else {}
    if wait_prior:
        kw["launch_pdl"] = True
    if 0 < seg.max_tile_rows <= expand_rows:
        block_n = min(_pow2(H, 16), rows_block_n)
        with _launch():
            _sgmv_expand_rows_kernel[(seg.capacity, triton.cdiv(H, block_n))](
                v, w, y, scale if has_scale else v, seg.table, seg.n_rows, seg.capacity, H, R, n_splits,
                stride_vs, vm, vr, w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
                HAS_ROWS=seg.has_rows, HAS_SCALE=has_scale, BLOCK_R=block_r, BLOCK_N=block_n,
                SPLIT_CHUNK=_split_chunk(1, block_r, n_splits), WAIT_PRIOR=wait_prior, **kw)
        return
    grid_n, n_per = _expand_split(H, block_n, seg.capacity, y.device, expand_per_sm)
    with _launch():
        _sgmv_expand_kernel[(seg.capacity, grid_n)](
            v, w, y, scale if has_scale else v, seg.table, seg.n_rows, seg.capacity, H, R, n_splits, n_per,
            stride_vs, vm, vr, w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
            HAS_ROWS=seg.has_rows, HAS_SCALE=has_scale, BLOCK_M=seg.block_m, BLOCK_R=block_r, BLOCK_N=block_n,
            SPLIT_CHUNK=_split_chunk(seg.block_m, block_r, n_splits), PRECISION=_precision(y.dtype),
            WAIT_PRIOR=wait_prior, N_LOOP=expand_per_sm > 0, **kw)


def sgmv_shrink(v: torch.Tensor, x: torch.Tensor, w: torch.Tensor, seg: Segments, *, split_k: int | None = None,
                block_k: int | None = None) -> torch.Tensor:
    """``v[seg rows] += x[seg rows] @ w[slot]``: v ``[N, R]`` fp32, x ``[N, K]``, w ``[n_slots, K, R]`` (R <= 128).

    Splits of K are added into ``v`` with fp32 atomics (every program adds exactly once, so uneven
    segments cannot stall a reduction). :func:`lora_sgmv` instead keeps the splits apart and lets
    the expand kernel sum them."""
    _check_shrink(v.shape, x, w, seg)
    if v.dtype != torch.float32:
        raise ValueError("sgmv_shrink accumulates into an fp32 v")
    if seg.capacity == 0:
        return v
    cfg = _default_sgmv_config(w.shape[2])
    if block_k is not None:
        cfg = SGMVConfig(**{**cfg.as_dict(), "block_k": block_k})
    bk, n_splits, per = _shrink_split(x.shape[1], w.shape[2], seg.block_m, seg.capacity, x.device, cfg, split_k)
    _launch_shrink(v, x, w, seg, bk, n_splits, per, out_mode=1 if n_splits > 1 else 2)
    return v


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, seg: Segments, scale: torch.Tensor | None = None,
                *, block_n: int | None = None, expand_per_sm: float = 0.0, expand_rows: int = 0) -> torch.Tensor:
    """``y[seg rows] += scale[slot] * v[seg rows] @ w[slot]``: y ``[N, H]``, v ``[N, R]`` fp32, w ``[n_slots, R, H]``.

    ``v`` may also be ``[splits, N, R]`` fp32 partial sums (added up by the kernel). ``expand_per_sm``
    > 0: each program walks a run of ``block_n`` tiles; ``expand_rows``: tiles of at most that many rows
    take the row-by-row kernel (see :class:`SGMVConfig`)."""
    _check_pool(w, "w")
    N, R = v.shape[-2:]
    H = w.shape[2]
    if w.shape[1] != R or y.shape != (N, H) or seg.n_rows != N or v.dim() not in (2, 3):
        raise ValueError(f"sgmv_expand: v {tuple(v.shape)}, w {tuple(w.shape)}, y {tuple(y.shape)}, "
                         f"segments of {seg.n_rows} rows do not agree")
    if v.dtype != torch.float32:
        raise ValueError("sgmv_expand reads an fp32 v")
    if R > 128:
        raise ValueError(f"expand input width {R} > 128 is not supported")
    if seg.capacity == 0:
        return y
    bn = block_n or _default_sgmv_config(R).block_n
    _launch_expand(y, v, w, seg, scale, bn, expand_per_sm=expand_per_sm, expand_rows=expand_rows, rows_block_n=bn)
    return y


def sgmv(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, seg: Segments, scale: torch.Tensor | None = None,
         **kw) -> torch.Tensor:
    """Punica's op ``y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ w[slot_i]`` for every segment i.

    Narrow outputs (``w [.., K, R]`` with R <= 128 and K > R, fp32 ``y``) take the split-K shrink
    kernel; wide outputs take the N-tiled expand kernel (which needs an fp32 ``x``)."""
    if w.shape[2] <= 128 and w.shape[1] > w.shape[2] and y.dtype == torch.float32 and scale is None:
        return sgmv_shrink(y, x, w, seg, **kw)
    return sgmv_expand(y, x.float(), w, seg, scale, **kw)


def lora_sgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None, seg: Segments,
              y: torch.Tensor | None = None, *, split_k: int | None = None, block_n: int | None = None,
              config: SGMVConfig | None = None) -> torch.Tensor:
    """``y += scale * (x @ A[slot]) @ B[slot]`` per segment (y: zeros of x's dtype when None).

    Two launches: the split-K shrink writes each split's fp32 partial ``x @ A[slot]`` to a
    workspace ``[splits, N, r]`` (no zero-fill, no atomics), the expand sums the splits and adds
    ``scale * v @ B[slot]`` to ``y``. ``config`` (default: :func:`sgmv_config`, the benchmark's
    tuned table when installed) sets split-K, tiles, the reduction and programmatic dependent launch;
    ``split_k`` / ``block_n`` override it."""
    _check_shrink((x.shape[0], A.shape[2]), x, A, seg, name="lora_sgmv")
    N, K = x.shape
    R, H = A.shape[2], B.shape[2]
    if y is None:
        y = torch.zeros(N, H, dtype=x.dtype, device=x.device)
    if seg.capacity == 0:
        return y
    cfg = config or sgmv_config(K, H, R, seg.capacity)
    bk, n_splits, per = _shrink_split(K, R, seg.block_m, seg.capacity, x.device, cfg, split_k)
    pdl = cfg.pdl and pdl_supported(x.device)
    counters = _arrival_counters(x.device, seg.capacity) if cfg.reduce == "serial" and n_splits > 1 else None
    if cfg.reduce == "atomic" and n_splits > 1:
        v = torch.zeros(N, R, dtype=torch.float32, device=x.device)
        _launch_shrink(v, x, A, seg, bk, n_splits, per, out_mode=1, launch_dependents=pdl, num_warps=cfg.num_warps)
    elif counters is not None:
        ws = torch.empty(n_splits, N, R, dtype=torch.float32, device=x.device)
        _launch_shrink(ws, x, A, seg, bk, n_splits, per, out_mode=3, launch_dependents=pdl, num_warps=cfg.num_warps,
                       counters=counters)
        v = ws[0]
    else:
        v = torch.empty(n_splits, N, R, dtype=torch.float32, device=x.device)
        _launch_shrink(v, x, A, seg, bk, n_splits, per, out_mode=0, launch_dependents=pdl, num_warps=cfg.num_warps)
    _launch_expand(y, v, B, seg, scale, block_n or cfg.block_n, wait_prior=pdl, num_warps=cfg.num_warps,
                   expand_per_sm=cfg.expand_per_sm, expand_rows=cfg.expand_rows, rows_block_n=cfg.rows_block_n)
    return y


# ------------------------------------------------------------------------------------------------
# BGMV
# ------------------------------------------------------------------------------------------------
def _as_idx(idx, device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int32)
    return idx.to(device=device, dtype=torch.int32)


def bgmv_shrink(v: torch.Tensor, x: torch.Tensor, w: torch.Tensor, idx, *, split_k: int | None = None,
                block_k: int | None = None) -> torch.Tensor:
    """``v[i] += x[i] @ w[idx[i]]`` for every row with ``idx[i] >= 0``."""
    _check_pool(w, "w")
    N, K = x.shape
    R = w.shape[2]
    if w.shape[1] != K or v.shape != (N, R):
        raise ValueError(f"bgmv_shrink: x {tuple(x.shape)}, w {tuple(w.shape)}, v {tuple(v.shape)} do not agree")
    if N == 0:
        return v
    idx = _as_idx(idx, x.device)
    if idx.numel() != N:
        raise ValueError(f"bgmv_shrink: {idx.numel()} indices for {N} rows")
    block_k = block_k or (256 if INTERPRET else 128 if R <= 16 else 64 if R <= 32 else 32)
    block_k = min(_pow2(K, 16), block_k)
    split, per = _split_k(K, block_k, N, x.device, split_k)
    with _launch():
        _bgmv_shrink_kernel[(N, split)](x, w, v, idx, K, R, per, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                        w.stride(2), v.stride(0), v.stride(1), BLOCK_K=block_k, BLOCK_R=_pow2(R, 16),
                                        ATOMIC=split > 1)
    return v


def bgmv_expand(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, idx, scale: torch.Tensor | None = None, *,
                block_n: int | None = None) -> torch.Tensor:
    """``y[i] += scale[idx[i]] * v[i] @ w[idx[i]]`` for every row with ``idx[i] >= 0``."""
    _check_pool(w, "w")
    N, R = v.shape
    H = w.shape[2]
    if w.shape[1] != R or y.shape != (N, H):
        raise ValueError(f"bgmv_expand: v {tuple(v.shape)}, w {tuple(w.shape)}, y {tuple(y.shape)} do not agree")
    if N == 0:
        return y
    idx = _as_idx(idx, v.device)
    block_n = block_n or (256 if INTERPRET else 256 if R <= 16 else 128 if R <= 32 else 64)
    block_n = min(_pow2(H, 16), block_n)
    has_scale = scale is not None
    with _launch():
        _bgmv_expand_kernel[(N, triton.cdiv(H, block_n))](
            v, w, y, scale if has_scale else v, idx, H, R, v.stride(0), v.stride(1), w.stride(0), w.stride(1),
            w.stride(2), y.stride(0), y.stride(1), HAS_SCALE=has_scale, BLOCK_R=_pow2(R, 16), BLOCK_N=block_n)
    return y


def lora_bgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None, idx,
              y: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """``y[i] += scale * (x[i] @ A[idx[i]]) @ B[idx[i]]`` (y: zeros of x's dtype when None)."""
    idx = _as_idx(idx, x.device)
    v = torch.zeros(x.shape[0], A.shape[2], dtype=torch.float32, device=x.device)
    bgmv_shrink(v, x, A, idx, split_k=split_k)
    if y is None:
        y = torch.zeros(x.shape[0], B.shape[2], dtype=x.dtype, device=x.device)
    return bgmv_expand(y, v, B, idx, scale)


# ------------------------------------------------------------------------------------------------
# baselines in PyTorch
# ------------------------------------------------------------------------------------------------
def _scale_of(scale, slot: int) -> float:
    return 1.0 if scale is None else float(scale[slot])


def lora_loop(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, seg: Segments,
              y: torch.Tensor | None = None) -> torch.Tensor:
    """Punica's "Loop": for each segment, ``y[rows] += s * (x[rows] @ A[slot]) @ B[slot]`` (two matmuls)."""
    if y is None:
        y = torch.zeros(x.shape[0], B.shape[2], dtype=x.dtype, device=x.device)
    host_scale = scale.tolist() if isinstance(scale, torch.Tensor) else scale
    contiguous = not seg.has_rows
    order = None if contiguous else torch.as_tensor(seg.order, device=x.device)
    for i, slot in enumerate(seg.seg_slot.tolist()):
        s, e = int(seg.seg_indptr[i]), int(seg.seg_indptr[i + 1])
        if e <= s:
            continue
        if contiguous:
            r0, r1 = int(seg.order[s]), int(seg.order[e - 1]) + 1
            y[r0:r1] += ((x[r0:r1] @ A[slot]) @ B[slot]) * _scale_of(host_scale, slot)
        else:
            rows = order[s:e]
            y.index_add_(0, rows, ((x[rows] @ A[slot]) @ B[slot]) * _scale_of(host_scale, slot))
    return y


def lora_gather_bmm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, idx,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """"Gather-BMM": per-row copies of the adapters, then two batched matmuls.

    ``idx [N]`` slot per row (-1: none). Moves ``N * r * (h1 + h2)`` elements in the gather."""
    idx = _as_idx(idx, x.device).long()
    has = idx >= 0
    safe = idx.clamp(min=0)
    Ag = A.index_select(0, safe)                                  # [N, h1, r]
    Bg = B.index_select(0, safe)                                  # [N, r, h2]
    out = torch.bmm(torch.bmm(x.unsqueeze(1), Ag), Bg).squeeze(1)  # [N, h2]
    s = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if scale is None else \
        scale.to(device=x.device, dtype=x.dtype).index_select(0, safe)
    out = out * (s * has.to(x.dtype))[:, None]
    return out if y is None else y.add_(out)


def lora_segmented_torch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, seg: Segments,
                         y: torch.Tensor | None = None) -> torch.Tensor:
    """Segments padded to the longest one, weights gathered once per *segment*, two ``torch.bmm``.

    The gather moves ``S * r * (h1 + h2)`` elements for S segments (not N rows): SGMV's cost shape."""
    N = x.shape[0]
    if y is None:
        y = torch.zeros(N, B.shape[2], dtype=x.dtype, device=x.device)
    S = seg.n_segments
    if S == 0:
        return y
    lens = np.diff(seg.seg_indptr)
    L = int(lens.max())
    pos = torch.as_tensor(seg.seg_indptr[:-1], device=x.device)[:, None] + torch.arange(L, device=x.device)[None]
    valid = torch.arange(L, device=x.device)[None] < torch.as_tensor(lens, device=x.device)[:, None]  # [S, L]
    order = torch.as_tensor(seg.order, device=x.device)
    rows = order[pos.clamp(max=len(seg.order) - 1)]                                  # [S, L]
    xs = x[rows] * valid[..., None].to(x.dtype)                                       # [S, L, h1]
    slots = torch.as_tensor(seg.seg_slot, device=x.device)
    out = torch.bmm(torch.bmm(xs, A.index_select(0, slots)), B.index_select(0, slots))  # [S, L, h2]
    if scale is not None:
        out = out * scale.to(device=x.device, dtype=x.dtype).index_select(0, slots)[:, None, None]
    y.index_add_(0, rows[valid], out[valid])
    return y


# ------------------------------------------------------------------------------------------------
# references (float32)
# ------------------------------------------------------------------------------------------------
def sgmv_ref(x: torch.Tensor, w: torch.Tensor, seg_indptr: Sequence[int], seg_slot: Sequence[int]) -> torch.Tensor:
    """``y[s_i:s_{i+1}] = x[s_i:s_{i+1}] @ w[slot_i]`` in float32 (rows of no segment / slot -1: 0)."""
    y = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float32, device=x.device)
    for i, slot in enumerate(list(seg_slot)):
        s, e = int(seg_indptr[i]), int(seg_indptr[i + 1])
        if slot >= 0 and e > s:
            y[s:e] = x[s:e].float() @ w[slot].float()
    return y


def bgmv_ref(x: torch.Tensor, w: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """``y[i] = x[i] @ w[idx[i]]`` in float32 (idx -1: 0)."""
    y = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float32, device=x.device)
    for i, slot in enumerate(list(idx)):
        if int(slot) >= 0:
            y[i] = x[i].float() @ w[int(slot)].float()
    return y


def lora_ref(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, idx: Sequence[int]) -> torch.Tensor:
    """Equation (1) row by row in float32."""
    y = torch.zeros(x.shape[0], B.shape[2], dtype=torch.float32, device=x.device)
    for i, slot in enumerate(list(idx)):
        slot = int(slot)
        if slot >= 0:
            y[i] = (x[i].float() @ A[slot].float()) @ B[slot].float() * _scale_of(scale, slot)
    return y


def dense_ref(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The backbone ``X @ W`` (``W [h1, h2]``), the cost LoRA is compared with."""
    return x @ W
