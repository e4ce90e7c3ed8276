"""Decode steps of the S-LoRA engine replayed from CUDA graphs, LoRA kernels included.

A decode step of a Python-driven engine is bound by the host: every layer launches its kernels one by
one and every blocking host-to-device copy waits for the device. Then a LoRA kernel that reads less
memory (MBGMV reads ``Σ_b 8·H·r_b`` adapter elements per layer) hardly changes the step time against
one that copies ``Σ_b 8·H·r_max`` (padded BMM): the device idles between launches either way.

:class:`LoRADecodeGraphs` captures one forward of a decode step — attention over the token-granular
pool, the base projections *and* the LoRA term of q, k, v, o — per bucket ``(batch B, context S,
largest rank R)`` and replays it. Everything a step varies lives in static device buffers filled by
two host-to-device copies per step (one int64, one int32 buffer, from pinned staging memory):

- the shared :class:`~mlsys24.serving.graph.StaticDecodeView` fields (token ids, positions, the slot
  each new K/V goes to, ``kv_lens``, the ``[B, S]`` block table; page = 1 token = 1 slot),
- MBGMV (``slora``, ``no_unify``): the kernel's int32 table ``start | len | a_start | rank | a_loc``
  with one ``4R``-entry slot list per row (rank 0 for padding rows: their programs exit) and fp32 scales,
- padded BMM (``bmm``): ``idx [4, B, R]`` slot ids padded with a slot that holds zeros,
- PEFT-style (``loop``; one adapter per batch): the same ``idx``, the batch's one adapter read once.

So the systems differ only in the LoRA kernels the graph holds. Padding rows (to reach a batch bucket)
write their K/V to the engine's scratch slot and attend only to it; their logits are dropped. On CPU
(``use_graphs=False``) the same static buffers run eagerly, so results do not depend on the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from ..bench import CUDAGraphed
from ..serving.graph import StaticDecodeView, _bucket
from .mbgmv import PoolTables

__all__ = ["LoRADecodeGraphs", "GRAPH_BATCH_BUCKETS"]

GRAPH_BATCH_BUCKETS = (8, 16, 32, 64, 128, 256)


class _StaticStep:
    """Device buffers of one ``(B, S, R)`` bucket and their pinned host staging copies."""

    def __init__(self, engine, B: int, S: int, R: int, compute: str, scratch: int, zero_row: int | None):
        dev = engine.device
        self.B, self.S, self.R, self.compute = B, S, R, compute
        self.scratch, self.zero_row = scratch, zero_row
        self.view = StaticDecodeView(engine.cache, B, S, scratch)
        n_idx = 4 * B * R if compute in ("bmm", "loop") else 0
        n_tab = 4 * B + 4 * B * R if compute == "mbgmv" else 0
        self.n64, self.n32 = 5 * B + n_idx, B * S + n_tab + B
        pin = dev.type == "cuda"
        self.h64 = torch.zeros(self.n64, dtype=torch.int64, pin_memory=pin)
        self.h32 = torch.zeros(self.n32, dtype=torch.int32, pin_memory=pin)
        self.d64 = torch.zeros(self.n64, dtype=torch.int64, device=dev)
        self.d32 = torch.zeros(self.n32, dtype=torch.int32, device=dev)
        a64, a32 = self.h64.numpy(), self.h32.numpy()
        # host views (numpy, written each step)
        self.ids_h, self.pos_h, self.slot_h, self.qoff_h, self.kvlen_h = (a64[i * B:(i + 1) * B] for i in range(5))
        self.table_h = a32[:B * S].reshape(B, S)
        o = B * S
        self.scale_h = a32[self.n32 - B:].view(np.float32)
        # device views (what the captured kernels read)
        v = self.view
        v.input_ids = self.d64[0:B].view(B, 1)
        v.position_ids = self.d64[B:2 * B].view(B, 1)
        v.slot_mapping = self.d64[2 * B:3 * B]
        v.q_offsets = self.d64[3 * B:4 * B]
        v.kv_lens = self.d64[4 * B:5 * B]
        v.block_tables = self.d32[:B * S].view(B, S)
        self.scale = self.d32[self.n32 - B:].view(torch.float32)
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)      # the LoRA context's per-token ids (size only)
        if compute == "mbgmv":
            tab_h = a32[o:o + n_tab]
            tab_h[:B] = np.arange(B)                 # segment start = row
            tab_h[B:2 * B] = 1                       # one token per row
            tab_h[2 * B:3 * B] = np.arange(B) * 4 * R   # each row's own 4R-entry slot list
            self.rank_h = tab_h[3 * B:4 * B]
            self.aloc_h = tab_h[4 * B:].reshape(B, 4 * R)
            self.tables = PoolTables(np.arange(B), np.ones(B, np.int64), np.arange(B) * 4 * R, np.full(B, R),
                                     np.ones(B, np.float32), np.zeros(4 * B * R, np.int64),
                                     self.d32[o:o + n_tab], self.scale, B)
        else:
            self.idx_h = a64[5 * B:].reshape(4, B, R)
            self.idx = self.d64[5 * B:].view(4, B, R)
        self.reset()

    def reset(self) -> None:
        """Safe contents: every row writes to and reads the scratch slot, no adapter rows."""
        self.ids_h[:] = 0
        self.pos_h[:] = 0
        self.slot_h[:] = self.scratch
        self.qoff_h[:] = 0
        self.kvlen_h[:] = 1
        self.table_h[:] = self.scratch
        self.scale_h[:] = 0.0
        if self.compute == "mbgmv":
            self.rank_h[:] = 0
            self.aloc_h[:] = 0
        else:
            self.idx_h[:] = self.zero_row
        self.upload()

    def upload(self) -> None:
        self.d64.copy_(self.h64, non_blocking=True)
        self.d32.copy_(self.h32, non_blocking=True)
        self.view.slots.copy_(self.view.block_tables)   # [B, S] slots for the gather attention path (CPU)


class LoRADecodeGraphs:
    """Decode-step runner of an :class:`~mlsys24.slora.engine.SLoRAEngine` (page size 1).

    ``run(rows) -> logits [n, vocab]`` or None when the step does not fit a bucket (the engine then
    takes its general path). ``capture_all(ranks)`` captures every bucket up front (outside any timed
    window). Counters: ``replays``, ``eager_calls``, ``captures``, ``lazy_captures``.
    """

    def __init__(self, engine, *, max_context: int, context_bucket: int = 512,
                 batch_buckets: tuple[int, ...] = GRAPH_BATCH_BUCKETS, use_graphs: bool | None = None):
        if engine.cache.block_size != 1:
            raise ValueError("LoRADecodeGraphs needs the token-granular pool (block_size 1)")
        self.engine = engine
        self.compute = engine.backend.compute
        self.use_graphs = engine.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        self.context_bucket = int(context_bucket)
        self.max_context = -(-int(max_context) // self.context_bucket) * self.context_bucket
        self.batch_buckets = tuple(b for b in batch_buckets if b <= max(engine.scheduler.config.max_batch_size, 1)) \
            or (batch_buckets[0],)
        if engine.scheduler.config.max_batch_size > self.batch_buckets[-1]:
            self.batch_buckets = self.batch_buckets + (engine.scheduler.config.max_batch_size,)
        self.scratch = engine.cache.allocator.n_blocks           # the slot past the allocator's
        self.zero_row = getattr(engine, "zero_row", None)
        if self.compute in ("bmm", "loop") and self.zero_row is None:
            raise ValueError(f"compute {self.compute!r} in a decode graph needs a zero pool row (separate region)")
        self._steps: dict[tuple[int, int, int], _StaticStep] = {}
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None
        self._rowslots: dict[int, tuple[list, np.ndarray, int]] = {}
        self.replays = self.eager_calls = self.captures = self.lazy_captures = 0
        self._calls = 0

    # buckets ------------------------------------------------------------------------------------
    def keys(self, ranks) -> list[tuple[int, int, int]]:
        ctx = range(self.context_bucket, self.max_context + 1, self.context_bucket)
        return [(B, S, int(R)) for B in self.batch_buckets for S in ctx for R in sorted(set(ranks))]

    def _step_for(self, key) -> _StaticStep:
        st = self._steps.get(key)
        if st is None:
            st = self._steps[key] = _StaticStep(self.engine, *key, self.compute, self.scratch, self.zero_row)
        return st

    # forward ------------------------------------------------------------------------------------
    @torch.no_grad()   # captures run outside the engine's step: no autograd record may keep activations alive
    def _forward(self, st: _StaticStep) -> torch.Tensor:
        eng = self.engine
        ctx, backend = eng.lora, eng.backend
        backend.static, ctx.ids, ctx.active = st, st.ids, True
        try:
            h = eng.model(st.view.input_ids, position_ids=st.view.position_ids, kv_cache=st.view, return_hidden=True)
            return eng.model.lm_head(h[:, 0])
        finally:
            backend.static, ctx.ids, ctx.active = None, None, False

    def capture(self, key) -> None:
        """Capture the graph of one bucket (its buffers reset to the scratch slot first)."""
        st = self._step_for(key)
        st.reset()
        if not self.use_graphs or key in self._graphs:
            return
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        cg = CUDAGraphed(lambda: self._forward(st), pool=self._mempool, sync=False)
        self._graphs[key] = (cg.graph, cg.out)
        self.captures += 1

    def capture_all(self, ranks) -> int:
        for key in self.keys(ranks):
            self.capture(key)
        if self.use_graphs:
            torch.cuda.synchronize()
        return len(self._graphs)

    # one step -----------------------------------------------------------------------------------
    def _slots_of(self, rid: int, blocks: list) -> np.ndarray:
        ent = self._rowslots.get(rid)
        if ent is None or ent[0] is not blocks:
            ent = (blocks, np.empty(self.max_context, np.int32), 0)
        lst, buf, n = ent
        if n < len(blocks):
            buf[n:len(blocks)] = blocks[n:]
            n = len(blocks)
        self._rowslots[rid] = (lst, buf, n)
        return buf

    def run(self, rows) -> torch.Tensor | None:
        eng = self.engine
        cache, pager = eng.cache, eng.pager
        seqs = [s for s, _ in rows]
        n = len(seqs)
        B = _bucket(n, self.batch_buckets)
        need = max(cache.lengths[s.rid] for s in seqs) + 1
        if B is None or need > self.max_context:
            return None
        S = -(-need // self.context_bucket) * self.context_bucket
        ads = [s.request.adapter_id for s in seqs]
        distinct = list(dict.fromkeys(a for a in ads if a >= 0))
        if not distinct or any(not pager.is_resident(a) for a in distinct):
            return None
        if self.compute == "loop" and len(distinct) > 1:
            return None
        host = pager.host
        rank = {a: host[a].rank for a in distinct}
        R = max(rank.values())
        key = (B, S, R)
        if self.use_graphs and key not in self._graphs:
            self.capture(key)
            self.lazy_captures += 1
        st = self._step_for(key)
        # host staging -----------------------------------------------------------------------
        st.table_h[:] = self.scratch
        st.slot_h[n:] = self.scratch
        st.kvlen_h[n:] = 1
        st.qoff_h[n:] = 0
        for r, s in enumerate(seqs):
            rid = s.rid
            length = cache.lengths[rid]
            cache.reserve(rid, length + 1)
            blocks = cache.blocks[rid]
            st.table_h[r, :length + 1] = self._slots_of(rid, blocks)[:length + 1]
            st.slot_h[r] = blocks[length]
            st.qoff_h[r] = length
            st.kvlen_h[r] = length + 1
            st.ids_h[r] = s.token(s.num_computed)
            st.pos_h[r] = s.position(s.num_computed)
        slots = {a: pager.slots(a) for a in distinct}            # also marks them recently used
        st.scale_h[:] = 0.0
        if self.compute == "mbgmv":
            st.rank_h[:] = 0
            for r, a in enumerate(ads):
                if a >= 0:
                    st.rank_h[r] = rank[a]
                    st.aloc_h[r, :4 * rank[a]] = slots[a]
                    st.scale_h[r] = host[a].scale
        else:
            st.idx_h[:] = self.zero_row
            for r, a in enumerate(ads):
                if a >= 0:
                    ra = rank[a]
                    st.idx_h[:, r, :ra] = slots[a].reshape(4, ra)
                    st.scale_h[r] = host[a].scale
        st.upload()
        pager.wait(distinct)
        st.view._rows = [s.rid for s in seqs]
        # counters: weight elements the kernels address (per layer, summed over layers)
        H, L = pager.wa.shape[-1], eng.backend.n_layers
        rsum = sum(rank[a] for a in ads if a >= 0)
        nr = sum(1 for a in ads if a >= 0)
        eng.backend.gathered += 8 * H * rsum * L
        eng.backend.gathered_bmm += 8 * H * R * nr * L
        if self.use_graphs:
            g, out = self._graphs[key]
            g.replay()
            self.replays += 1
            logits = out[:n]
        else:
            logits = self._forward(st)[:n]
            self.eager_calls += 1
        st.view.commit()
        self._calls += 1
        if self._calls % 512 == 0:   # forget finished sequences
            self._rowslots = {k: v for k, v in self._rowslots.items() if k in cache.blocks}
        return logits
