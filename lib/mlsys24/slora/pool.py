"""S-LoRA's Unified Paging: one slot pool shared by KV-cache tokens and adapter weight rows.

S-LoRA (Sheng et al., MLSys 2024, §4.1) stores, per layer, one K buffer and one V buffer of
``num_slots × H`` elements (``H`` = hidden size = heads · head_dim). A slot is one *page* of ``H``
elements:

- KV cache: one token of one request takes 1 slot (its K in the K buffer, its V in the V buffer);
- an adapter of rank ``r`` with LoRA on q, k, v, o takes ``4r`` slots: the rows of ``A_q..A_o``
  (``A_p[:, j]``, length H) in the K buffer, the rows of ``B_q..B_o`` (``B_p[j, :]``) in the V buffer.

Slots are handed out without any contiguity requirement (first free ids), so adapters of different
ranks and sequences of different lengths never fragment each other: the only waste is the free list.

:class:`UnifiedAllocator` is a drop-in :class:`~mlsys24.models.kv_cache.BlockAllocator` (block size 1)
that also tags every slot with its owner (``kv`` or ``adapter``), so occupancy is exact at every step.
It keeps the free list in a heap (lowest id first, O(log S) per slot) instead of re-sorting it.

:func:`kv_capacity_trace` is the deterministic memory-accounting comparison of the paper's Fig. 3:
how many KV tokens fit beside the adapters a batch needs with (a) the unified pool, (b) a pool
partitioned into a fixed adapter region (sized for the largest rank × the most adapters a batch may
hold) plus a KV region, (c) KV reserved contiguously per request at its maximum length.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from ..models.kv_cache import BlockAllocator, OutOfBlocks

__all__ = ["UnifiedAllocator", "OutOfBlocks", "FREE", "KV", "ADAPTER", "OWNER_NAMES", "kv_capacity_trace",
           "adapter_slots"]

FREE, KV, ADAPTER = 0, 1, 2
OWNER_NAMES = {FREE: "free", KV: "kv", ADAPTER: "adapter"}


def adapter_slots(rank: int, n_proj: int = 4) -> int:
    """Slots (pages of H elements, per layer) of one adapter: ``n_proj · r`` in each of K and V buffers."""
    return n_proj * int(rank)


class UnifiedAllocator(BlockAllocator):
    """Slot allocator of the unified pool (a :class:`BlockAllocator` with owner tags).

    ``alloc(n, owner=KV)`` returns the ``n`` lowest free slot ids (non-contiguous in general);
    ``free(ids)`` returns them. Reference counts follow :class:`BlockAllocator` (shared KV prefixes
    keep working); ``owner[s]`` is ``FREE``, ``KV`` or ``ADAPTER``.
    """

    def __init__(self, n_slots: int):
        self.n_blocks = int(n_slots)
        self.refcount = [0] * self.n_blocks
        self.owner = np.zeros(self.n_blocks, dtype=np.int8)
        self._heap = list(range(self.n_blocks))  # already a valid min-heap
        self.n_used = {KV: 0, ADAPTER: 0}
        self.n_allocs = 0
        self.n_frees = 0

    @property
    def n_free(self) -> int:
        return len(self._heap)

    def alloc(self, n: int = 1, owner: int = KV) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > len(self._heap):
            raise OutOfBlocks(f"need {n} slots, {len(self._heap)} free of {self.n_blocks}")
        out = [heapq.heappop(self._heap) for _ in range(n)]
        for s in out:
            self.refcount[s] = 1
        self.owner[out] = owner
        self.n_used[owner] += n
        self.n_allocs += n
        return out

    def free(self, blocks: Sequence[int]) -> None:
        for s in blocks:
            if self.refcount[s] <= 0:
                raise ValueError(f"double free of slot {s}")
            self.refcount[s] -= 1
            if self.refcount[s] == 0:
                self.n_used[int(self.owner[s])] -= 1
                self.owner[s] = FREE
                heapq.heappush(self._heap, s)
                self.n_frees += 1

    # accounting -----------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        """Exact slot counts by owner (they always sum to ``n_blocks``)."""
        return {"kv": self.n_used[KV], "adapter": self.n_used[ADAPTER], "free": self.n_free}

    def check(self) -> None:
        """Raise AssertionError if the free heap, owner tags and refcounts disagree."""
        free = set(self._heap)
        assert len(free) == len(self._heap), "a slot is twice in the free list"
        for s in range(self.n_blocks):
            if s in free:
                assert self.refcount[s] == 0 and self.owner[s] == FREE, f"free slot {s} is owned"
            else:
                assert self.refcount[s] > 0 and self.owner[s] != FREE, f"slot {s} is neither free nor owned"
        assert self.n_used[KV] == int((self.owner == KV).sum())
        assert self.n_used[ADAPTER] == int((self.owner == ADAPTER).sum())
        assert self.n_used[KV] + self.n_used[ADAPTER] + self.n_free == self.n_blocks


def kv_capacity_trace(batches: Sequence[Sequence[tuple[int, int, int]]], n_slots: int, *, max_rank: int,
                      max_adapters: int, max_len: int, n_proj: int = 4) -> dict[str, np.ndarray]:
    """KV tokens each memory layout can hold at every step of a replayed trace (deterministic).

    batches[t]: the running batch at step t as ``(adapter_id, rank, context_len)`` per request.
    Returns per step: ``unified`` = ``n_slots − Σ_distinct adapters 4r`` (KV may use every slot the
    adapters do not), ``partitioned`` = ``n_slots − max_adapters · 4 · max_rank`` (the adapter region
    is reserved up front), ``contiguous`` = the unified budget but handed out in whole
    ``max_len`` reservations (``floor(budget / max_len) · max_len`` tokens usable by at most that many
    requests) and ``used`` = the tokens the batch actually holds.
    """
    part = n_slots - max_adapters * n_proj * max_rank
    out = {k: np.zeros(len(batches), dtype=np.int64) for k in ("unified", "partitioned", "contiguous", "used",
                                                                 "adapter_slots")}
    for t, batch in enumerate(batches):
        ranks = {a: r for a, r, _ in batch}
        ad = sum(adapter_slots(r, n_proj) for r in ranks.values())
        out["adapter_slots"][t] = ad
        out["unified"][t] = n_slots - ad
        out["partitioned"][t] = max(part, 0)
        out["contiguous"][t] = ((n_slots - ad) // max_len) * max_len
        out["used"][t] = sum(c for _, _, c in batch)
    return out
