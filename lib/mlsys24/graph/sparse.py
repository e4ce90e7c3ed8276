"""Sparse matrices for matrix-based graph sampling, in plain PyTorch (CPU or CUDA).

Two layouts, both with int64 indices:

- :class:`CSR` — ``indptr [n_rows + 1]``, ``indices [nnz]`` (column ids, sorted within each row),
  ``values [nnz]`` (or ``None`` for an unweighted 0/1 matrix).
- :class:`COO` — ``rows [nnz]``, ``cols [nnz]``, ``values [nnz]``; *coalesced* means sorted by
  (row, col) with no duplicate pair.

:func:`esc_spgemm` computes ``P = Q @ A`` (Q in COO, A in CSR) by *expand–sort–compress*: every
nonzero ``(r, u, q)`` of Q emits row ``u`` of A tagged with row ``r`` and scaled by ``q``
(expand), the products are sorted by ``(r, col)`` (sort) and equal keys summed (compress).
For a Q with one nonzero per row — the GraphSAGE frontier matrix — this is a row gather of A.
:func:`spgemm_ref` is the same product through ``torch.sparse.mm`` (the reference).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = ["CSR", "COO", "csr_from_edges", "coalesce", "esc_spgemm", "spgemm_ref", "expand_rows",
           "segment_offsets"]


@dataclass
class CSR:
    """Compressed sparse rows. ``values is None`` means every stored entry is 1."""

    indptr: torch.Tensor          # [n_rows + 1] int64
    indices: torch.Tensor         # [nnz] int64 column ids, sorted within each row
    n_cols: int
    values: torch.Tensor | None = None  # [nnz] float, or None (all ones)

    @property
    def n_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def degrees(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def row_ids(self) -> torch.Tensor:
        """Row index of every stored entry, ``[nnz]``."""
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.device), self.degrees(),
                                       output_size=self.nnz)

    def vals(self, dtype=torch.float32) -> torch.Tensor:
        if self.values is None:
            return torch.ones(self.nnz, dtype=dtype, device=self.device)
        return self.values.to(dtype)

    def to_coo(self) -> COO:
        return COO(self.row_ids(), self.indices,
                   self.vals(torch.float32 if self.values is None else self.values.dtype), self.shape)

    def to_torch(self) -> torch.Tensor:
        """As a coalesced ``torch.sparse_coo_tensor`` (float32 for 0/1 matrices)."""
        return self.to_coo().to_torch()

    def to(self, device) -> CSR:
        return CSR(self.indptr.to(device), self.indices.to(device), self.n_cols,
                   None if self.values is None else self.values.to(device))

    def row_block(self, start: int, stop: int) -> CSR:
        """Rows ``[start, stop)`` as a CSR of ``stop - start`` rows (same column space)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return CSR(self.indptr[start:stop + 1] - lo, self.indices[lo:hi], self.n_cols,
                   None if self.values is None else self.values[lo:hi])

    def nbytes(self) -> int:
        """Bytes of the stored arrays (int64 indices, values if any)."""
        b = self.indptr.numel() * self.indptr.element_size() + self.indices.numel() * self.indices.element_size()
        if self.values is not None:
            b += self.values.numel() * self.values.element_size()
        return b


@dataclass
class COO:
    """Coordinate list; ``shape = (n_rows, n_cols)``."""

    rows: torch.Tensor            # [nnz] int64
    cols: torch.Tensor            # [nnz] int64
    values: torch.Tensor          # [nnz] float
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def to_torch(self) -> torch.Tensor:
        idx = torch.stack([self.rows, self.cols])
        return torch.sparse_coo_tensor(idx, self.values, self.shape, check_invariants=True).coalesce()

    def to_csr(self) -> CSR:
        """CSR of a *coalesced* COO (rows sorted, columns sorted within rows)."""
        counts = torch.bincount(self.rows, minlength=self.shape[0])
        indptr = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.rows.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        return CSR(indptr, self.cols, self.shape[1], self.values)


def segment_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum: ``[0, c0, c0 + c1, ...]`` of length ``len(counts) + 1``."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def expand_rows(a: CSR, rows: torch.Tensor, total: int | None = None):
    """Concatenate rows ``rows`` of ``a``: returns ``(owner, pos)`` where ``pos`` indexes ``a.indices``
    and ``owner[e]`` is the position in ``rows`` whose row produced entry ``e``. ``[sum deg]`` each."""
    start = a.indptr[rows]
    deg = a.indptr[rows + 1] - start
    if total is None:
        total = int(deg.sum())
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), deg, output_size=total)
    off = segment_offsets(deg)
    pos = torch.arange(total, device=rows.device) - off[owner] + start[owner]
    return owner, pos


def coalesce(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> COO:
    """Sort by (row, col) and sum duplicates."""
    if rows.numel() == 0:
        return COO(rows, cols, values, shape)
    key = rows * shape[1] + cols
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=values.dtype, device=values.device).index_add_(0, inv, values)
    return COO(torch.div(uniq, shape[1], rounding_mode="floor"), uniq % shape[1], summed, shape)


def esc_spgemm(q: COO, a: CSR, *, value_dtype=None, col_offset: int = 0) -> COO:
    """``P = Q @ A`` by expand-sort-compress; returns a coalesced COO of shape ``(Q.rows, A.cols)``.

    ``col_offset``: Q's column ids are shifted by this before indexing A's rows (for a block row
    ``A_t`` whose first global row is ``col_offset``).
    """
    dtype = value_dtype or q.values.dtype
    u = q.cols - col_offset
    owner, pos = expand_rows(a, u)
    rows = q.rows[owner]
    vals = q.values.to(dtype)[owner] * a.vals(dtype)[pos]
    return coalesce(rows, a.indices[pos], vals, (q.shape[0], a.n_cols))


def spgemm_ref(q: COO, a: CSR) -> COO:
    """Reference ``Q @ A`` with ``torch.sparse.mm`` (float64), returned coalesced."""
    ac = a.to_coo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # torch.sparse's beta-state notices
        qt = torch.sparse_coo_tensor(torch.stack([q.rows, q.cols]), q.values.double(), q.shape,
                                     check_invariants=True).coalesce()
        at = torch.sparse_coo_tensor(torch.stack([ac.rows, ac.cols]), ac.values.double(), a.shape,
                                     check_invariants=True).coalesce()
        p = torch.sparse.mm(qt, at).coalesce()
    idx = p.indices()
    return COO(idx[0], idx[1], p.values(), (q.shape[0], a.n_cols))


def csr_from_edges(src: torch.Tensor, dst: torch.Tensor, n: int, *, symmetric: bool = True,
                   drop_self_loops: bool = True) -> CSR:
    """Unweighted CSR of an edge list: symmetrised (both directions), self-loops and duplicates
    removed, columns sorted within each row."""
    if symmetric:
        src, dst = torch.cat([src, dst]), torch.cat([dst, src])
    if drop_self_loops:
        keep = src != dst
        src, dst = src[keep], dst[keep]
    key = torch.unique(src * n + dst, sorted=True)
    rows = torch.div(key, n, rounding_mode="floor")
    cols = key - rows * n
    counts = torch.bincount(rows, minlength=n)
    return CSR(segment_offsets(counts), cols, n, None)
