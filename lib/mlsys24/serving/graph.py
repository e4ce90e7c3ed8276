"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is bound by launch overhead in eager PyTorch (hundreds of small
kernels per token for a 32-layer model). :class:`DecodeGraphs` captures one forward of a decode
step per (batch bucket, context bucket) over a :class:`StaticDecodeView` of the engine's paged pool,
and replays it after copying the step's inputs (token ids, positions, the slot each new K/V goes to,
the pool slots each row attends to) into the view's static buffers. Shapes that were not captured
run eagerly through the same view, so results do not depend on whether a graph was used.

Padding rows (to reach a bucket) write their K/V into a scratch slot past the allocator's blocks
and attend only to it; their logits are discarded.
"""

from __future__ import annotations

import torch

from ..bench import CUDAGraphed
from ..models.kv_cache import KVCache, PagedKVCache

__all__ = ["StaticDecodeView", "DecodeGraphs", "BATCH_BUCKETS"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class StaticDecodeView(KVCache):
    """A fixed-shape view of a :class:`PagedKVCache` for decode steps (one new token per row).

    Static buffers (filled by :meth:`fill` before each forward): ``slot_mapping [B]`` (pool slot of
    each row's new token), ``slots [B, S]`` (pool slots each row attends to, padded with the
    scratch slot), ``q_offsets [B]``, ``kv_lens [B]``, and ``block_tables [B, ceil(S / block_size)]``
    (int32, the pool blocks of each row, the scratch block for padding rows) with ``k_pool``/``v_pool``
    for kernels that read the paged pool in place (a paged decode attention backend).
    """

    def __init__(self, pool: PagedKVCache, batch: int, max_context: int, scratch_slot: int):
        self.pool = pool
        self.n_layers, self.n_kv_heads, self.head_dim = pool.n_layers, pool.n_kv_heads, pool.head_dim
        self.batch, self.max_context, self.scratch_slot = batch, max_context, scratch_slot
        dev = pool.device
        self.slot_mapping = torch.full((batch,), scratch_slot, dtype=torch.long, device=dev)
        self.slots = torch.full((batch, max_context), scratch_slot, dtype=torch.long, device=dev)
        self.q_offsets = torch.zeros(batch, dtype=torch.long, device=dev)
        self.kv_lens = torch.ones(batch, dtype=torch.long, device=dev)
        self.input_lens = torch.ones(batch, dtype=torch.long, device=dev)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        if scratch_slot % pool.block_size:
            raise ValueError(f"scratch_slot {scratch_slot} must start a block (block_size {pool.block_size})")
        self.scratch_block = scratch_slot // pool.block_size
        self.block_tables = torch.full((batch, -(-max_context // pool.block_size)), self.scratch_block,
                                       dtype=torch.int32, device=dev)

    @property
    def k_pool(self) -> torch.Tensor:
        return self.pool.k_pool

    @property
    def v_pool(self) -> torch.Tensor:
        return self.pool.v_pool

    def _flat(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        return pool[layer].view(-1, self.n_kv_heads, self.head_dim)

    def fill(self, seq_ids: list[int], tokens: list[int], positions: list[int]) -> None:
        """Point the view at the rows of this step (host work; then one copy per buffer)."""
        p, bs, B, S = self.pool, self.pool.block_size, self.batch, self.max_context
        n = len(seq_ids)
        if n > B:
            raise ValueError(f"{n} rows for a view of batch {B}")
        slots = torch.full((B, S), self.scratch_slot, dtype=torch.long)
        slot_map = torch.full((B,), self.scratch_slot, dtype=torch.long)
        q_off = torch.zeros(B, dtype=torch.long)
        kv_lens = torch.ones(B, dtype=torch.long)
        table = torch.full(tuple(self.block_tables.shape), self.scratch_block, dtype=torch.int32)
        for r, s in enumerate(seq_ids):
            length = p.lengths[s]  # tokens already cached; the new one goes to slot `length`
            p.reserve(s, length + 1)
            if length + 1 > S:
                raise ValueError(f"sequence {s} has {length + 1} tokens, view holds {S}")
            blocks = torch.tensor(p.blocks[s], dtype=torch.long)
            j = torch.arange(length + 1)
            slots[r, : length + 1] = blocks[j // bs] * bs + j % bs
            slot_map[r] = slots[r, length]
            q_off[r], kv_lens[r] = length, length + 1
            nb = -(-(length + 1) // bs)
            table[r, :nb] = blocks[:nb].to(torch.int32)
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.zeros(B, 1, dtype=torch.long)
        ids[:n, 0] = torch.tensor(tokens, dtype=torch.long)
        pos[:n, 0] = torch.tensor(positions, dtype=torch.long)
        for dst, src in ((self.slots, slots), (self.slot_mapping, slot_map), (self.q_offsets, q_off),
                         (self.kv_lens, kv_lens), (self.input_ids, ids), (self.position_ids, pos),
                         (self.block_tables, table)):
            dst.copy_(src, non_blocking=True)
        self._rows = list(seq_ids)

    def commit(self) -> None:
        for s in self._rows:
            self.pool.lengths[s] += 1

    # KVCache protocol (shapes are static: nothing here reads a tensor on the host) ---------
    def begin(self, input_lens: torch.Tensor) -> None:
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._flat(self.pool.k_pool, layer)[self.slot_mapping] = k[:, 0].to(self.pool.k_pool.dtype)
        self._flat(self.pool.v_pool, layer)[self.slot_mapping] = v[:, 0].to(self.pool.v_pool.dtype)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._flat(self.pool.k_pool, layer)[self.slots], self._flat(self.pool.v_pool, layer)[self.slots]

    def end(self) -> None:
        pass


def _bucket(x: int, buckets) -> int | None:
    for b in buckets:
        if x <= b:
            return b
    return None


class DecodeGraphs:
    """Decode-step runner over a paged pool: CUDA graphs on GPU, the same static view eagerly on CPU.

    ``run(seq_ids, tokens, positions) -> logits [n, vocab]`` for n decode rows.
    """

    def __init__(self, model, pool: PagedKVCache, scratch_slot: int, *, context_bucket: int = 256,
                 use_graphs: bool | None = None, max_batch: int = 256, compile: bool = False):
        self.model, self.pool, self.scratch_slot = model, pool, scratch_slot
        self.context_bucket = context_bucket
        self.use_graphs = pool.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_batch = max_batch
        self._views: dict[tuple[int, int], StaticDecodeView] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None
        self.replays = 0
        self.calls = 0
        # torch.compile fuses the step's small element-wise kernels (norms, RoPE, masks, SwiGLU);
        # the compiled function is then captured in the same CUDA graph.
        self._step = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _view(self, B: int, S: int) -> StaticDecodeView:
        key = (B, S)
        if key not in self._views:
            self._views[key] = StaticDecodeView(self.pool, B, S, self.scratch_slot)
        return self._views[key]

    def _forward(self, view: StaticDecodeView) -> torch.Tensor:
        h = self.model(view.input_ids, position_ids=view.position_ids, kv_cache=view, return_hidden=True)
        return self.model.lm_head(h[:, 0])

    def _capture(self, view: StaticDecodeView, key) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        cg = CUDAGraphed(lambda: self._step(view), pool=self._mempool, sync=False)
        return cg.graph, cg.out

    @torch.no_grad()
    def run(self, seq_ids: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        self.calls += 1
        n = len(seq_ids)
        need_ctx = max(self.pool.lengths[s] for s in seq_ids) + 1
        S = -(-need_ctx // self.context_bucket) * self.context_bucket
        B = _bucket(n, [b for b in BATCH_BUCKETS if b <= self.max_batch]) or n
        view = self._view(B, S)
        # The warm-up forwards of a capture write K/V into the current rows' next slots; filling
        # first and committing once afterwards keeps that harmless (same values rewritten).
        view.fill(seq_ids, tokens, positions)
        if self.use_graphs:
            key = (B, S)
            if key not in self._graphs:
                self._graphs[key] = self._capture(view, key)
            g, out = self._graphs[key]
            g.replay()
            self.replays += 1
            logits = out[:n]
        else:
            logits = self._step(view)[:n]
        view.commit()
        return logits
