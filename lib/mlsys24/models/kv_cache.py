"""KV caches behind one attention interface: contiguous and paged (vLLM-style block tables).

Both caches hold *post-RoPE* keys and values, ``[.., n_kv_heads, head_dim]`` per token, for every
layer, and are driven the same way by the model's forward pass::

    cache.begin(input_lens)        # once per forward: where this step's tokens go (per sequence)
    for each layer:
        cache.update(layer, k, v)  # k, v: [B, T, n_kv_heads, head_dim], rows t >= input_lens[b] ignored
        K, V = cache.kv(layer)     # [B, S, n_kv_heads, head_dim], S = max(kv_lens); slot j of row b is
                                   # valid iff j < kv_lens[b]
    cache.end()                    # commit: lengths += input_lens

A batch is *ragged*: row ``b`` already holds ``q_offsets[b]`` tokens and appends ``input_lens[b]``
new ones (prefill rows and one-token decode rows can share a forward). Query ``i`` of row ``b`` sits
at slot ``q_offsets[b] + i`` and attends to slots ``j <= q_offsets[b] + i`` (causal by *insertion
order*, not by position id, so imported Prompt-Cache modules with arbitrary position ids work).

- :class:`ContiguousKVCache` — one ``[n_layers, batch, max_len, n_kv_heads, head_dim]`` buffer; row
  ``b`` of every forward is sequence ``b``.
- :class:`PagedKVCache` — one preallocated pool ``[n_layers, n_blocks, block_size, n_kv_heads,
  head_dim]`` per K and V; each sequence owns a list of blocks (its *block table*); a
  :class:`BlockAllocator` (free list + reference counts) hands blocks out. ``set_batch(seq_ids)``
  picks which sequences form the rows of the next forward. ``block_size=1`` gives token-granular
  slots (S-LoRA's unified pool). ``block_tables``, ``context_lens`` and ``slot_mapping`` are exposed
  for kernels that read the pool directly (see :mod:`mlsys24.models.attention`).

Both also import and export K/V of a sequence (``append_kv`` / ``export_kv``) for Prompt Cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVCache", "ContiguousKVCache", "PagedKVCache", "BlockAllocator", "OutOfBlocks"]


class KVCache:
    """Interface shared by the caches (see the module docstring for the protocol)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    #: [B] tokens already cached per row before the current forward (slot of the first new query)
    q_offsets: torch.Tensor
    #: [B] valid slots per row after the current forward's update
    kv_lens: torch.Tensor
    #: [B] new tokens per row in the current forward
    input_lens: torch.Tensor

    def begin(self, input_lens: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def end(self) -> None:  # pragma: no cover
        raise NotImplementedError

    # helpers shared by both layouts --------------------------------------------------------
    @staticmethod
    def _new_token_index(q_offsets: torch.Tensor, input_lens: torch.Tensor, T: int):
        """(row, t, slot-in-sequence) of every valid new token, row-major."""
        t = torch.arange(T, device=input_lens.device)
        valid = t[None, :] < input_lens[:, None]  # [B, T]
        rows, ts = valid.nonzero(as_tuple=True)
        return rows, ts, q_offsets[rows] + ts


# ------------------------------------------------------------------------------------------------
class ContiguousKVCache(KVCache):
    """A dense cache: K and V buffers ``[n_layers, batch, max_len, n_kv_heads, head_dim]``."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.n_layers, self.batch, self.max_len = n_layers, batch, max_len
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # committed tokens per row
        self.q_offsets = self.lengths.clone()
        self.kv_lens = self.lengths.clone()
        self.input_lens = torch.zeros_like(self.lengths)
        self._rows = self._slots = self._ts = None

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int | None = None, *, dtype=torch.float32, device="cpu"):
        return cls(cfg.n_layers, batch, max_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim_,
                   dtype=dtype, device=device)

    def begin(self, input_lens: torch.Tensor) -> None:
        input_lens = input_lens.to(self.lengths.device)
        if input_lens.shape != (self.batch,):
            raise ValueError(f"batch of {tuple(input_lens.shape)} rows, cache holds {self.batch}")
        self.q_offsets = self.lengths.clone()
        self.input_lens = input_lens
        self.kv_lens = self.lengths + input_lens
        if int(self.kv_lens.max()) > self.max_len:
            raise ValueError(f"cache overflow: {int(self.kv_lens.max())} > max_len {self.max_len}")
        T = int(input_lens.max()) if input_lens.numel() else 0
        self._rows, self._ts, self._slots = self._new_token_index(self.q_offsets, input_lens, T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [B, T, n_kv_heads, head_dim]
        self.k[layer, self._rows, self._slots] = k[self._rows, self._ts].to(self.k.dtype)
        self.v[layer, self._rows, self._slots] = v[self._rows, self._ts].to(self.v.dtype)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = int(self.kv_lens.max())
        return self.k[layer, :, :S], self.v[layer, :, :S]

    def end(self) -> None:
        self.lengths = self.kv_lens.clone()

    # sequence-level helpers (seq = row index) ----------------------------------------------
    def length(self, seq: int) -> int:
        return int(self.lengths[seq])

    def reset(self, seq: int | None = None) -> None:
        """Forget the tokens of one row (or all rows); buffers are reused."""
        if seq is None:
            self.lengths.zero_()
        else:
            self.lengths[seq] = 0

    def truncate(self, seq: int, length: int) -> None:
        self.lengths[seq] = min(int(self.lengths[seq]), length)

    def append_kv(self, seq: int, kvs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append precomputed post-RoPE K/V (one ``([S, n_kv_heads, head_dim], same)`` per layer)."""
        n = kvs[0][0].shape[0]
        start = int(self.lengths[seq])
        if start + n > self.max_len:
            raise ValueError("cache overflow")
        for layer, (k, v) in enumerate(kvs):
            self.k[layer, seq, start:start + n] = k.to(self.k.dtype)
            self.v[layer, seq, start:start + n] = v.to(self.v.dtype)
        self.lengths[seq] = start + n

    def export_kv(self, seq: int, start: int = 0, end: int | None = None):
        """Copies of the cached K/V of slots ``[start, end)`` of one row, one pair per layer."""
        end = int(self.lengths[seq]) if end is None else end
        return [(self.k[layer, seq, start:end].clone(), self.v[layer, seq, start:end].clone())
                for layer in range(self.n_layers)]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# ------------------------------------------------------------------------------------------------
class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


class BlockAllocator:
    """Free list of block ids with reference counts (shared read-only blocks have refcount > 1).

    Blocks are handed out lowest id first, so runs are deterministic.
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.refcount = [0] * n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() gives the lowest id

    @property
    def n_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free of {self.n_blocks}")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self.refcount[b] = 1
        return out

    def incref(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self.refcount[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)
        self._free.sort(reverse=True)


class PagedKVCache(KVCache):
    """Paged cache over one preallocated block pool per K and V.

    ``k_pool``/``v_pool``: ``[n_layers, n_blocks, block_size, n_kv_heads, head_dim]``. Sequence ``s``
    owns ``blocks[s]``; its token at slot ``j`` lives in block ``blocks[s][j // block_size]`` at
    offset ``j % block_size``. Per forward (after :meth:`set_batch` and ``begin``):

    - ``block_tables`` ``[B, max_blocks]`` int32 (padded with 0; only the first
      ``ceil(kv_lens[b] / block_size)`` entries of row b are meaningful),
    - ``context_lens`` = ``q_offsets`` ``[B]``, ``kv_lens`` ``[B]``,
    - ``slot_mapping`` ``[n_new]``: flat pool slot (``block * block_size + offset``) of each new token,
      in row-major order of the valid ``(b, t)``.
    """

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 allocator: BlockAllocator | None = None):
        self.n_layers, self.n_blocks, self.block_size = n_layers, n_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device = torch.device(device)
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = allocator or BlockAllocator(n_blocks)
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._next_id = 0
        self.batch_ids: list[int] = []
        z = torch.zeros(0, dtype=torch.long, device=device)
        self.q_offsets = self.kv_lens = self.input_lens = z
        self.block_tables = torch.zeros(0, 0, dtype=torch.int32, device=device)
        self.slot_mapping = z

    @classmethod
    def for_model(cls, cfg, n_blocks: int, block_size: int = 16, *, dtype=torch.float32, device="cpu"):
        return cls(cfg.n_layers, n_blocks, block_size, cfg.n_kv_heads, cfg.head_dim_, dtype=dtype,
                   device=device)

    # sequences --------------------------------------------------------------------------
    def add_sequence(self, seq_id: int | None = None) -> int:
        if seq_id is None:
            seq_id = self._next_id
        if seq_id in self.blocks:
            raise ValueError(f"sequence {seq_id} exists")
        self._next_id = max(self._next_id, seq_id + 1)
        self.blocks[seq_id] = []
        self.lengths[seq_id] = 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self.allocator.free(self.blocks.pop(seq_id))
        del self.lengths[seq_id]
        if seq_id in self.batch_ids:
            self.batch_ids = [s for s in self.batch_ids if s != seq_id]

    def new_batch(self, n: int) -> list[int]:
        """Add ``n`` empty sequences and make them the batch; returns their ids."""
        ids = [self.add_sequence() for _ in range(n)]
        self.set_batch(ids)
        return ids

    def set_batch(self, seq_ids: Sequence[int]) -> None:
        """Rows of the next forward, in order."""
        for s in seq_ids:
            if s not in self.blocks:
                raise KeyError(f"unknown sequence {s}")
        self.batch_ids = list(seq_ids)

    def length(self, seq_id: int) -> int:
        return self.lengths[seq_id]

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Make sure ``seq_id`` has blocks for ``n_tokens`` slots in total."""
        need = self.blocks_needed(n_tokens) - len(self.blocks[seq_id])
        if need > 0:
            self.blocks[seq_id].extend(self.allocator.alloc(need))

    def share_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        """Let empty sequence ``dst`` reference the first ``n_tokens`` of ``src`` (whole blocks only,
        read-only by convention; ``n_tokens`` must be a multiple of ``block_size``)."""
        if n_tokens % self.block_size or self.lengths[dst] or n_tokens > self.lengths[src]:
            raise ValueError("share_prefix needs whole blocks of src and an empty dst")
        shared = self.blocks[src][: n_tokens // self.block_size]
        self.allocator.incref(shared)
        self.blocks[dst] = list(shared)
        self.lengths[dst] = n_tokens

    # forward protocol -------------------------------------------------------------------
    def _flat(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        return pool[layer].view(self.n_blocks * self.block_size, self.n_kv_heads, self.head_dim)

    def begin(self, input_lens: torch.Tensor) -> None:
        if len(self.batch_ids) != input_lens.shape[0]:
            raise ValueError(f"batch of {input_lens.shape[0]} rows but set_batch has {len(self.batch_ids)}")
        lens = [int(x) for x in input_lens.tolist()]
        for s, n in zip(self.batch_ids, lens):
            self.reserve(s, self.lengths[s] + n)
        dev = self.device
        self.input_lens = torch.tensor(lens, dtype=torch.long, device=dev)
        self.q_offsets = torch.tensor([self.lengths[s] for s in self.batch_ids], dtype=torch.long, device=dev)
        self.kv_lens = self.q_offsets + self.input_lens
        nb = max((self.blocks_needed(int(x)) for x in self.kv_lens.tolist()), default=0)
        table = torch.zeros(len(self.batch_ids), max(nb, 1), dtype=torch.int32)
        for r, s in enumerate(self.batch_ids):
            bl = self.blocks[s][:nb]
            if bl:
                table[r, : len(bl)] = torch.tensor(bl, dtype=torch.int32)
        self.block_tables = table.to(dev)
        T = max(lens, default=0)
        rows, ts, pos = self._new_token_index(self.q_offsets, self.input_lens, T)
        self._rows, self._ts = rows, ts
        blk = self.block_tables[rows, pos // self.block_size].long()
        self.slot_mapping = blk * self.block_size + pos % self.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._flat(self.k_pool, layer)[self.slot_mapping] = k[self._rows, self._ts].to(self.k_pool.dtype)
        self._flat(self.v_pool, layer)[self.slot_mapping] = v[self._rows, self._ts].to(self.v_pool.dtype)

    def gather_slots(self, S: int | None = None) -> torch.Tensor:
        """[B, S] flat pool slot of every (row, slot j < S) (slots past kv_lens point at junk)."""
        S = int(self.kv_lens.max()) if S is None else S
        j = torch.arange(S, device=self.device)
        blk = self.block_tables[:, (j // self.block_size).clamp(max=self.block_tables.shape[1] - 1)].long()
        return blk * self.block_size + (j % self.block_size)[None, :]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.gather_slots()  # [B, S]
        return self._flat(self.k_pool, layer)[slots], self._flat(self.v_pool, layer)[slots]

    def end(self) -> None:
        for s, n in zip(self.batch_ids, self.kv_lens.tolist()):
            self.lengths[s] = int(n)

    @property
    def context_lens(self) -> torch.Tensor:
        return self.q_offsets

    # import / export --------------------------------------------------------------------
    def append_kv(self, seq_id: int, kvs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append precomputed post-RoPE K/V (one ``([S, n_kv_heads, head_dim], same)`` per layer)."""
        n = kvs[0][0].shape[0]
        start = self.lengths[seq_id]
        self.reserve(seq_id, start + n)
        pos = torch.arange(start, start + n, device=self.device)
        bl = torch.tensor(self.blocks[seq_id], dtype=torch.long, device=self.device)
        slots = bl[pos // self.block_size] * self.block_size + pos % self.block_size
        for layer, (k, v) in enumerate(kvs):
            self._flat(self.k_pool, layer)[slots] = k.to(self.k_pool.dtype)
            self._flat(self.v_pool, layer)[slots] = v.to(self.v_pool.dtype)
        self.lengths[seq_id] = start + n

    def export_kv(self, seq_id: int, start: int = 0, end: int | None = None):
        end = self.lengths[seq_id] if end is None else end
        pos = torch.arange(start, end, device=self.device)
        bl = torch.tensor(self.blocks[seq_id], dtype=torch.long, device=self.device)
        slots = bl[pos // self.block_size] * self.block_size + pos % self.block_size
        return [(self._flat(self.k_pool, layer)[slots].clone(), self._flat(self.v_pool, layer)[slots].clone())
                for layer in range(self.n_layers)]

    def nbytes(self) -> int:
        return self.k_pool.nbytes + self.v_pool.nbytes
