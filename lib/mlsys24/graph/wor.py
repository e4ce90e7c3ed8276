"""Sampling without replacement inside the rows of a sparse matrix, vectorised over all rows.

Randomness is *counter-based*: a uniform draw is a hash of (seed, stream, counter), so the sample a
row receives depends only on the row's global id, never on how rows are batched (bulk size k) or
partitioned over processes. That makes bulk and distributed sampling bit-identical to the
single-process, one-minibatch result for the same seed.

- :func:`uniform_offsets` — GraphSAGE: ``min(s, deg)`` distinct uniform offsets into each row,
  Floyd's algorithm (for ``j = deg-s .. deg-1``: draw ``t`` in ``[0, j]``; take ``j`` if ``t``
  was already taken, else ``t``), which gives every ``s``-subset probability ``1 / C(deg, s)`` in
  O(s^2) work per row and no probability matrix.
- :func:`es_select` — exact weighted sampling without replacement (successive sampling, the
  distribution of ``numpy.random.choice(replace=False, p=w)``): Efraimidis–Spirakis keys
  ``log(u) / w``, keep the ``s`` largest per row (one lexicographic sort, then rank in row).
- :func:`dart_select` — CAGNET's dart throwing: darts uniform in ``[0, row sum)`` hit nonzeros
  through prefix sums; hit nonzeros are taken; a row hit more often than it needs keeps the
  nonzeros with most hits first (ties random). Repeats on the untaken weight until each row has
  ``min(s, support)``. Approximates successive sampling; ES is the exact reference.
"""

from __future__ import annotations

import torch

from .sparse import segment_offsets

__all__ = ["mix32", "row_hash", "slot_hash", "hash_uniform", "uniform_offsets", "es_select", "dart_select",
           "rank_in_row", "topk_in_rows"]

_M32 = 0xFFFFFFFF
_GOLD = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (Wellons' 'lowbias32'), on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, stream: int) -> int:
    h = (int(seed) * 0x85EBCA6B + int(stream) * 0xC2B2AE35 + 0x27D4EB2F) & _M32
    return int(mix32(torch.tensor(h, dtype=torch.int64)))


def row_hash(seed: int, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash per element of a non-negative int64 ``counter`` (< 2**62), keyed by (seed, stream)."""
    k = _key(seed, stream)
    h = mix32((counter & _M32) ^ k)
    return mix32(h ^ ((counter >> 32) & _M32) ^ 0x5BD1E995)


def slot_hash(h: torch.Tensor, slot) -> torch.Tensor:
    """Derive the hash of slot ``slot`` (int or tensor) from a row hash."""
    return mix32(h ^ ((slot * _GOLD + 0x7F4A7C15) & _M32))


def hash_uniform(h: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1), float64, from a 32-bit hash."""
    return (h.double() + 0.5) * (1.0 / 4294967296.0)


def uniform_offsets(deg: torch.Tensor, s: int, h: torch.Tensor) -> torch.Tensor:
    """``[R, s]`` distinct offsets in ``[0, deg_r)`` per row, uniform over ``s``-subsets (Floyd);
    rows with ``deg <= s`` take all offsets; unused slots are ``-1``.

    deg: ``[R]`` int64 row lengths; h: ``[R]`` int64 32-bit row hashes (:func:`row_hash`).
    """
    R = deg.numel()
    ar = torch.arange(s, device=deg.device)
    hs = slot_hash(h.unsqueeze(1), ar.unsqueeze(0))                  # [R, s] one 32-bit draw per slot
    j = deg.unsqueeze(1) - s + ar.unsqueeze(0)                       # Floyd: slot i draws t in [0, j_i]
    t_all = (hs * (j + 1).clamp_min(1)) >> 32                        # multiply-shift range map
    out = torch.empty((R, s), dtype=torch.int64, device=deg.device)
    out[:, 0] = t_all[:, 0]
    for i in range(1, s):
        t = t_all[:, i]
        taken = (out[:, :i] == t.unsqueeze(1)).any(1)
        out[:, i] = torch.where(taken, j[:, i], t)
    take_all = (deg <= s).unsqueeze(1)
    return torch.where(take_all, torch.where(ar.unsqueeze(0) < deg.unsqueeze(1), ar.unsqueeze(0), -1), out)


def rank_in_row(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Position of each entry within its row, for ``rows`` sorted ascending."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.arange(rows.numel(), device=rows.device) - segment_offsets(counts)[rows]


def topk_in_rows(rows: torch.Tensor, score: torch.Tensor, s, n_rows: int) -> torch.Tensor:
    """Mask of the ``s`` highest finite scores of each row (``-inf`` is never kept).

    rows: ``[E]`` sorted ascending; s: int or ``[n_rows]`` tensor of per-row counts.
    One lexicographic sort (score descending, then row ascending, both stable) and a rank in row.
    """
    E = rows.numel()
    mask = torch.zeros(E, dtype=torch.bool, device=rows.device)
    if E == 0:
        return mask
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]            # rows ascending, scores descending
    rank = rank_in_row(rows[order], n_rows)
    limit = s[rows[order]] if torch.is_tensor(s) else s
    keep = (rank < limit) & torch.isfinite(score[order])
    mask[order[keep]] = True
    return mask


def es_select(rows: torch.Tensor, weights: torch.Tensor, s, u: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mask of the entries kept: per row the ``min(s, #positive weights)`` largest ES keys
    ``log(u) / w`` — exact weighted sampling without replacement.

    rows: ``[E]`` sorted ascending; weights: ``[E]`` >= 0; u: ``[E]`` uniforms in (0, 1);
    s: int or ``[n_rows]`` tensor of per-row sample sizes.
    """
    w = weights.double()
    key = torch.where(w > 0, torch.log(u) / w.clamp_min(1e-300), torch.full_like(w, -float("inf")))
    return topk_in_rows(rows, key, s, n_rows)


def dart_select(rows: torch.Tensor, weights: torch.Tensor, s: int, n_rows: int, *, seed: int, stream: int,
                oversample: float = 2.0, max_rounds: int = 200) -> torch.Tensor:
    """Dart throwing (CAGNET's ``sample``): mask of the kept entries, ``min(s, support)`` per row."""
    dev = rows.device
    E = rows.numel()
    sel = torch.zeros(E, dtype=torch.bool, device=dev)
    if E == 0:
        return sel
    w = weights.double()
    support = torch.zeros(n_rows, dtype=torch.int64, device=dev).index_add_(0, rows, (w > 0).long())
    need = torch.clamp(support, max=s)
    row_start = segment_offsets(torch.bincount(rows, minlength=n_rows))
    for rnd in range(max_rounds):
        have = torch.zeros(n_rows, dtype=torch.int64, device=dev).index_add_(0, rows, sel.long())
        remaining = need - have
        if not bool((remaining > 0).any()):
            return sel
        w_eff = torch.where(sel, torch.zeros_like(w), w)
        cum = torch.cumsum(w_eff, 0)                                  # inclusive prefix sums
        total = torch.zeros(n_rows, dtype=torch.float64, device=dev).index_add_(0, rows, w_eff)
        lo = torch.where(row_start[:-1] > 0, cum[(row_start[:-1] - 1).clamp_min(0)], torch.zeros_like(total))
        n_darts = torch.where(remaining > 0, torch.ceil(remaining * oversample).long(), torch.zeros_like(remaining))
        D = int(n_darts.sum())
        dart_row = torch.repeat_interleave(torch.arange(n_rows, device=dev), n_darts, output_size=D)
        h = row_hash(seed, stream * 1_000_003 + rnd, torch.arange(D, device=dev))
        pos = lo[dart_row] + hash_uniform(h) * total[dart_row]
        hit = torch.searchsorted(cum, pos, right=True)
        hit = torch.minimum(torch.maximum(hit, row_start[dart_row]), row_start[dart_row + 1] - 1)
        hits = torch.bincount(hit, minlength=E)
        new = (hits > 0) & ~sel & (w > 0)
        # rows hit more often than they need keep the most-hit nonzeros (ties broken at random)
        tie = hash_uniform(row_hash(seed, stream * 1_000_003 + rnd + 7919, torch.arange(E, device=dev)))
        score = torch.where(new, hits.double() + tie, torch.full_like(w, -float("inf")))
        keep = topk_in_rows(rows, score, remaining, n_rows)
        sel |= keep & new
    raise RuntimeError(f"dart_select: rows still short of samples after {max_rounds} rounds")
