"""The serving engine: continuous batching over a paged KV cache on the shared Llama.

Each :meth:`Engine.step` asks the :class:`~.scheduler.Scheduler` for a plan (the same policy code
the Vidur simulator runs), applies its preemptions (free blocks, or swap K/V to host memory) and
swap-ins, runs ONE forward over a ragged batch (prefill chunks and decode tokens side by side, each
row with its own adapter id, positions and block table), samples the rows that reached their last
pending token, and retires finished requests, freeing their blocks. :meth:`Engine.run` feeds
requests in at their arrival times (idle gaps are skipped on the clock, not slept) and returns the
finished sequences; ``engine.steps`` holds one :class:`~.metrics.StepRecord` per step.

Invariants (tested): every request finishes exactly once; the KV blocks held by live sequences
plus the free list always equal the pool; all blocks are free when the engine drains.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from ..models.kv_cache import BlockAllocator, PagedKVCache
from .kv_policy import KVPolicy
from .lora import LoRAContext
from .metrics import StepRecord
from .request import Request, SeqStatus, Sequence
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["Engine", "PoolLedger"]


class PoolLedger:
    """The scheduler's view of the engine's block pool."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.block_size = cache.block_size

    def n_free(self) -> int:
        return self.cache.allocator.n_free

    def n_total(self) -> int:
        return self.cache.allocator.n_blocks

    def held(self, seq: Sequence) -> int:
        return len(self.cache.blocks.get(seq.rid, ()))


class Engine:
    """Continuous-batching engine.

    model: a :class:`~mlsys24.models.Llama` (any module with ``cfg``, ``forward(..., kv_cache,
    input_lens, return_hidden)``, ``lm_head``). n_blocks/block_size: the KV pool. lora: the context
    returned by :func:`~.lora.attach_lora` (None: no adapters). kv_policy: eviction / reuse hooks.
    record_logits: keep each sampled token's logits on the sequence (tests, accuracy studies).
    decode_graphs: run pure-decode steps through :class:`~.graph.DecodeGraphs` (CUDA graphs on GPU,
    the same static view eagerly on CPU); steps with prefill tokens, adapters or a KV policy that
    needs attention scores always take the general path.
    """

    def __init__(self, model, scheduler: Scheduler | SchedulerConfig | str = "orca", *, n_blocks: int,
                 block_size: int = 16, lora: LoRAContext | None = None, kv_policy: KVPolicy | None = None,
                 record_logits: bool = False, max_model_len: int | None = None, kv_dtype: torch.dtype | None = None,
                 decode_graphs: bool = False, context_bucket: int = 256, compile_decode: bool = False):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"n_blocks and block_size must be >= 1 (got {n_blocks}, {block_size})")
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.cfg
        # One block past the allocator's is the scratch block that padding rows of a decode graph write to.
        self.cache = PagedKVCache(cfg.n_layers, n_blocks + 1, block_size, cfg.n_kv_heads, cfg.head_dim_,
                                  dtype=kv_dtype or p.dtype, device=p.device, allocator=BlockAllocator(n_blocks))
        self.decode_graphs = None
        if decode_graphs:
            from .graph import DecodeGraphs

            self.decode_graphs = DecodeGraphs(model, self.cache, scratch_slot=n_blocks * block_size,
                                              context_bucket=context_bucket, compile=compile_decode)
        self.ledger = PoolLedger(self.cache)
        self.scheduler = scheduler if isinstance(scheduler, Scheduler) else Scheduler(scheduler)
        self.lora = lora
        self.kv_policy = kv_policy or KVPolicy()
        self.record_logits = record_logits
        self.max_model_len = max_model_len
        self.kv_bytes_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim_ * self.cache.k_pool.element_size()
        self.swap_store: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.swap_bytes = 0
        self.steps: list[StepRecord] = []
        self.finished: list[Sequence] = []
        self.sequences: dict[int, Sequence] = {}
        self._t0 = time.perf_counter()
        self._offset = 0.0

    # clock -----------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the engine started, with idle gaps skipped."""
        return time.perf_counter() - self._t0 + self._offset

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # requests --------------------------------------------------------------------------
    def add_request(self, req: Request) -> Sequence:
        if req.rid in self.sequences:
            raise ValueError(f"duplicate request id {req.rid}")
        if self.max_model_len is not None and len(req.prompt) + req.max_new_tokens > self.max_model_len:
            raise ValueError(f"request {req.rid}: prompt {len(req.prompt)} + max_new_tokens {req.max_new_tokens} "
                             f"exceeds max_model_len {self.max_model_len}")
        if req.adapter_id >= 0 and (self.lora is None or req.adapter_id not in self.lora.backend.adapters):
            raise KeyError(f"request {req.rid}: adapter {req.adapter_id} is not loaded")
        seq = Sequence(req)
        self.sequences[req.rid] = seq
        self.scheduler.add(seq)
        return seq

    # one iteration ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepRecord | None:
        if not self.scheduler.has_work():
            return None
        t_start = self.now()
        plan = self.scheduler.schedule(self.ledger)
        pending_swap_in = {s.rid for s in plan.swapped_in}
        for victim, how in plan.preempted:
            if victim.rid in pending_swap_in:  # swapped in and out within one plan: stays on host
                pending_swap_in.discard(victim.rid)
                continue
            if victim.rid not in self.cache.blocks:
                continue
            if how == "swap":
                kv = self.cache.export_kv(victim.rid, 0, victim.num_computed)
                self.swap_store[victim.rid] = [(k.to("cpu"), v.to("cpu")) for k, v in kv]
                self.swap_bytes += victim.num_computed * self.kv_bytes_per_token
            self.cache.free_sequence(victim.rid)
        for seq in plan.swapped_in:
            if seq.rid in pending_swap_in:
                kv = self.swap_store.pop(seq.rid)
                self.cache.add_sequence(seq.rid)
                self.cache.append_kv(seq.rid, [(k.to(self.device), v.to(self.device)) for k, v in kv])
                self.swap_bytes += seq.num_computed * self.kv_bytes_per_token
        for seq in plan.admitted:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = t_start
            self.cache.add_sequence(seq.rid)
            self.kv_policy.on_admit(self, seq)

        rows = [(s, min(n, s.pending)) for s, n in plan.rows if s.status is SeqStatus.RUNNING]
        rows = [(s, n) for s, n in rows if n > 0]
        if rows:
            self._forward(rows)
        t_end = self.now()
        used = self.cache.allocator.n_blocks - self.cache.allocator.n_free
        rec = StepRecord(
            step=len(self.steps), start_s=t_start, duration_s=t_end - t_start, rows=len(rows),
            prefill_tokens=sum(n for s, n in rows if n > 1 or s.num_computed <= s.prompt_len),
            decode_rows=sum(1 for s, n in rows if n == 1 and s.num_computed > s.prompt_len),
            tokens=sum(n for _, n in rows), kv_blocks_used=used,
            kv_bytes_used=used * self.cache.block_size * self.kv_bytes_per_token,
            admitted=len(plan.admitted), preempted=len(plan.preempted),
            context_tokens=sum(s.num_computed for s, _ in rows))
        self.steps.append(rec)
        return rec

    def _fast_decode_ok(self, rows) -> bool:
        return (self.decode_graphs is not None and (self.lora is None or not self.lora.active_for(rows))
                and type(self.kv_policy) is KVPolicy and all(n == 1 and s.pending == 1 for s, n in rows))

    def _forward(self, rows: list[tuple[Sequence, int]]) -> None:
        dev = self.device
        if self._fast_decode_ok(rows):
            logits = self.decode_graphs.run([s.rid for s, _ in rows], [s.token(s.num_computed) for s, _ in rows],
                                            [s.position(s.num_computed) for s, _ in rows]).float()
            for s, n in rows:
                s.num_computed += n
            self._emit(rows, list(range(len(rows))), logits)
            return
        B, T = len(rows), max(n for _, n in rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        adapters = torch.full((B, T), -1, dtype=torch.long)
        for b, (s, n) in enumerate(rows):
            start = s.num_computed
            ids[b, :n] = torch.tensor([s.token(i) for i in range(start, start + n)])
            pos[b, :n] = torch.tensor([s.position(i) for i in range(start, start + n)])
            adapters[b, :n] = s.request.adapter_id
        lens = torch.tensor([n for _, n in rows], dtype=torch.long)
        if self.lora is not None:
            self.lora.set_adapter_ids(adapters.to(dev))
        self.cache.set_batch([s.rid for s, _ in rows])
        hidden = self.model(ids.to(dev), position_ids=pos.to(dev), kv_cache=self.cache, input_lens=lens.to(dev),
                            return_hidden=True)  # [B, T, d]
        for s, n in rows:
            s.num_computed += n
        sample_rows = [b for b, (s, _) in enumerate(rows) if s.pending == 0]
        if sample_rows:
            idx = torch.tensor(sample_rows, device=dev)
            last = (lens.to(dev)[idx] - 1)
            logits = self.model.lm_head(hidden[idx, last]).float()  # [R, V]
            self._emit(rows, sample_rows, logits)
        self.kv_policy.after_step(self, rows)

    def _emit(self, rows, sample_rows: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each row in ``sample_rows`` (logits ``[len(sample_rows), V]``)."""
        tokens = self._sample(logits, [rows[b][0] for b in sample_rows])
        self._sync()
        t = self.now()
        for j, b in enumerate(sample_rows):
            s = rows[b][0]
            s.output.append(tokens[j])
            s.token_times_s.append(t)
            if self.record_logits:
                s.logits.append(logits[j].cpu())
            if s.finished:
                self._retire(s, t)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        out = logits.argmax(dim=-1).tolist()
        for j, s in enumerate(seqs):
            r = s.request
            if r.temperature > 0:
                row = logits[j].cpu() / r.temperature
                if r.top_k is not None:
                    kth = torch.topk(row, min(r.top_k, row.numel())).values[-1]
                    row = row.masked_fill(row < kth, float("-inf"))
                g = torch.Generator().manual_seed(r.seed * 1_000_003 + len(s.output))
                out[j] = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
        return out

    def _retire(self, seq: Sequence, t: float) -> None:
        self.kv_policy.on_finish(self, seq)
        self.cache.free_sequence(seq.rid)
        self.scheduler.finish(seq)
        seq.finish_s = t
        self.finished.append(seq)

    # driving ---------------------------------------------------------------------------
    def run(self, requests: Iterable[Request], *, max_steps: int | None = None, progress: bool | None = None) -> list[Sequence]:
        """Serve ``requests`` (each joins at its ``arrival_s``) until all have finished."""
        from ..progress import progress_bar

        todo = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
        n_total = len(todo)
        self._t0, self._offset = time.perf_counter(), 0.0
        i = 0
        bar = progress_bar(n_total, desc="requests", enabled=progress)
        done_before = len(self.finished)
        n_steps = 0
        while True:
            while i < len(todo) and todo[i].arrival_s <= self.now():
                self.add_request(todo[i])
                i += 1
            if not self.scheduler.has_work():
                if i >= len(todo):
                    break
                self._offset += todo[i].arrival_s - self.now()  # skip idle time
                continue
            before = len(self.finished)
            self.step()
            bar.update(len(self.finished) - before)
            n_steps += 1
            if max_steps is not None and n_steps >= max_steps:
                break
        bar.close()
        return self.finished[done_before:]

    # checks ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if any request is lost/duplicated or a KV block leaked."""
        sch = self.scheduler
        where: dict[int, str] = {}
        for name, group in (("waiting", sch.waiting), ("running", sch.running), ("swapped", sch.swapped),
                            ("finished", self.finished)):
            for s in group:
                assert s.rid not in where, f"request {s.rid} is both {where[s.rid]} and {name}"
                where[s.rid] = name
        assert set(where) == set(self.sequences), f"lost requests: {set(self.sequences) - set(where)}"
        alloc = self.cache.allocator
        refs = [0] * alloc.n_blocks
        for blocks in self.cache.blocks.values():
            for b in blocks:
                refs[b] += 1
        assert refs == alloc.refcount, "block refcounts disagree with the block tables"
        assert alloc.n_free == sum(1 for r in refs if r == 0), "free list disagrees with block tables"
        for s in sch.running:
            assert s.rid in self.cache.blocks, f"running request {s.rid} holds no cache entry"
        for s in self.finished:
            assert s.rid not in self.cache.blocks, f"finished request {s.rid} still holds blocks"
            assert len(s.output) == s.request.max_new_tokens or s.request.eos_token is not None
