"""Iteration-level scheduling policies, shared by the real engine and the Vidur simulator.

One implementation decides every step, whatever executes it: :class:`Scheduler` looks at the
queues and at the KV memory through a :class:`KVLedger` (free blocks, blocks held per sequence)
and returns a :class:`StepPlan` (which sequences run how many tokens, who was admitted, who was
preempted and how). It also performs the queue transitions, so the engine (real K/V in a paged
pool) and the simulator (a counting ledger and predicted step times) cannot drift apart.

Policies (``SchedulerConfig``; presets in :data:`PRESETS`):

- ``orca``  — iteration-level batching, prefills and decodes mixed in a step, whole prompts.
- ``vllm``  — prefill-first: a step runs either newly admitted prompts or all decodes (vLLM v0).
- ``sarathi`` — decodes first, then chunked prefills filling a per-step token budget (Sarathi-Serve).
- ``static`` — FasterTransformer-style static batching: admit a batch only when the last one has
  finished; run it to completion.

Knobs: ``max_batch_size`` (rows per step), ``token_budget`` (tokens per step), ``max_new_per_step``
(admit at most k requests per step), ``chunk_size`` (prefill chunk), ``preemption`` (``recompute``
drops the victim's K/V and re-prefills it later; ``swap`` moves it to host memory),
``watermark_blocks`` (blocks kept free at admission).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from .request import SeqStatus, Sequence

__all__ = ["SchedulerConfig", "PRESETS", "Scheduler", "StepPlan", "KVLedger", "CountingLedger",
           "CannotSchedule"]


class CannotSchedule(RuntimeError):
    """A request can never run (e.g. it needs more KV blocks than the whole pool)."""


class KVLedger(Protocol):
    """What the scheduler needs to know of KV memory (the engine's pool or a simulator's count)."""

    block_size: int

    def n_free(self) -> int: ...

    def n_total(self) -> int: ...

    def held(self, seq: Sequence) -> int: ...


@dataclass
class CountingLedger:
    """A KV ledger that only counts blocks (the simulator's; also handy in tests)."""

    total_blocks: int
    block_size: int = 16
    holdings: dict[int, int] = field(default_factory=dict)
    swapped: dict[int, int] = field(default_factory=dict)

    def n_free(self) -> int:
        return self.total_blocks - sum(self.holdings.values())

    def n_total(self) -> int:
        return self.total_blocks

    def held(self, seq: Sequence) -> int:
        return self.holdings.get(seq.rid, 0)

    def grow(self, seq: Sequence, n_tokens_total: int) -> None:
        need = math.ceil(n_tokens_total / self.block_size)
        if need > self.holdings.get(seq.rid, 0):
            if need - self.holdings.get(seq.rid, 0) > self.n_free():
                raise RuntimeError("CountingLedger: out of blocks (the scheduler over-committed)")
            self.holdings[seq.rid] = need

    def release(self, seq: Sequence) -> int:
        return self.holdings.pop(seq.rid, 0)


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "orca"                 # orca | vllm | sarathi | static
    max_batch_size: int = 64
    token_budget: int | None = None      # tokens per step (None: unbounded)
    max_new_per_step: int | None = None  # admissions per step (None: unbounded)
    chunk_size: int | None = None        # prefill chunk (None: whole prompt)
    preemption: str = "recompute"        # recompute | swap
    watermark_blocks: int = 0

    def __post_init__(self):
        if self.policy not in ("orca", "vllm", "sarathi", "static"):
            raise ValueError(f"policy must be orca, vllm, sarathi or static, got {self.policy!r}")
        if self.preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption must be 'recompute' or 'swap', got {self.preemption!r}")
        for name in ("max_batch_size", "token_budget", "max_new_per_step", "chunk_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.policy == "sarathi" and self.chunk_size is None and self.token_budget is None:
            raise ValueError("sarathi needs chunk_size or token_budget")


PRESETS: dict[str, SchedulerConfig] = {
    "orca": SchedulerConfig("orca"),
    "vllm": SchedulerConfig("vllm"),
    "sarathi": SchedulerConfig("sarathi", chunk_size=256, token_budget=256),
    "static": SchedulerConfig("static"),
}


@dataclass
class StepPlan:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens this step)
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[tuple[Sequence, str]] = field(default_factory=list)  # (victim, "recompute"|"swap")
    swapped_in: list[Sequence] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.rows)

    @property
    def n_prefill_tokens(self) -> int:
        return sum(n for s, n in self.rows if s.pending > 1 or s.num_computed < s.prompt_len)

    @property
    def n_decode_rows(self) -> int:
        return sum(1 for s, n in self.rows if n == 1 and s.pending == 1 and s.num_computed >= s.prompt_len)


class Scheduler:
    """Queues + policy. ``add(seq)`` enqueues; ``schedule(ledger)`` plans one step."""

    def __init__(self, config: SchedulerConfig | str = "orca", **overrides):
        cfg = PRESETS[config] if isinstance(config, str) else config
        self.config = replace(cfg, **overrides) if overrides else cfg
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self._admit_counter = 0

    # queues ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.WAITING:
            raise ValueError(f"request {seq.rid} is {seq.status.value}, not waiting")
        self.waiting.append(seq)

    def add_all(self, seqs: Iterable[Sequence]) -> None:
        for s in seqs:
            self.add(s)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, seq: Sequence) -> None:
        """Called by the executor when a running sequence produced its last token."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED

    # planning ---------------------------------------------------------------------------
    def _need(self, ledger: KVLedger, seq: Sequence, n: int, restored: dict[int, int] | None = None) -> int:
        held = ledger.held(seq) + (restored or {}).get(seq.rid, 0)
        return max(0, math.ceil((seq.num_computed + n) / ledger.block_size) - held)

    def _chunk(self, seq: Sequence) -> int:
        c = self.config.chunk_size
        return seq.pending if c is None else min(seq.pending, c)

    def _preempt_one(self, plan: StepPlan, ledger: KVLedger, protect: set[int],
                     restored: dict[int, int] | None = None) -> int | None:
        """Preempt the most recently admitted running sequence not in ``protect``.

        Returns the blocks it frees, or None when there is no candidate."""
        victims = [s for s in self.running if s.rid not in protect]
        if not victims:
            return None
        victim = max(victims, key=lambda s: s.admit_order)
        freed = ledger.held(victim) + (restored or {}).pop(victim.rid, 0)
        self.running.remove(victim)
        victim.n_preemptions += 1
        if self.config.preemption == "swap":
            victim.status = SeqStatus.SWAPPED
            self.swapped.append(victim)
        else:
            victim.status = SeqStatus.WAITING
            victim.num_computed = 0
            self.waiting.appendleft(victim)
        plan.preempted.append((victim, self.config.preemption))
        return freed

    def _admit(self, seq: Sequence, plan: StepPlan) -> None:
        seq.status = SeqStatus.RUNNING
        seq.admit_order = self._admit_counter
        self._admit_counter += 1
        self.running.append(seq)
        plan.admitted.append(seq)

    def _check_fits_pool(self, ledger: KVLedger, seq: Sequence) -> None:
        total = math.ceil((seq.prompt_len + seq.request.max_new_tokens) / ledger.block_size)
        if total > ledger.n_total():
            raise CannotSchedule(f"request {seq.rid} needs {total} KV blocks, the pool has {ledger.n_total()}")

    @contextlib.contextmanager
    def only_visible(self, visible: int):
        """Within the block, only the first ``visible`` waiting sequences are in the queue; the rest
        rejoin it, in order, afterwards. For policies that gate admission (one adapter per batch,
        only requests whose adapter is resident): ``with self.only_visible(n): plan =
        super().schedule(ledger)``."""
        hidden: deque = deque()
        while len(self.waiting) > max(visible, 0):
            hidden.appendleft(self.waiting.pop())
        try:
            yield
        finally:
            self.waiting.extend(hidden)

    def schedule(self, ledger: KVLedger) -> StepPlan:
        """Plan one step and apply its queue transitions (admit, preempt, swap in)."""
        cfg = self.config
        plan = StepPlan()
        free = ledger.n_free()
        budget = cfg.token_budget if cfg.token_budget is not None else math.inf
        scheduled: set[int] = set()

        # Swapped sequences come back first (they were admitted before anyone waiting). The
        # executor restores their blocks; until then ``restored`` counts them as held.
        restored: dict[int, int] = {}
        while self.swapped and len(self.running) < cfg.max_batch_size:
            seq = self.swapped[0]
            if math.ceil((seq.num_computed + 1) / ledger.block_size) + cfg.watermark_blocks > free:
                break
            self.swapped.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.swapped_in.append(seq)
            restored[seq.rid] = math.ceil(seq.num_computed / ledger.block_size)
            free -= restored[seq.rid]

        # vLLM v0: a step runs either newly admitted prompts (if the head of the queue fits) or decodes.
        prefill_only = False
        if cfg.policy == "vllm" and self.waiting and not self.swapped and not plan.swapped_in:
            head = self.waiting[0]
            self._check_fits_pool(ledger, head)
            prefill_only = (len(self.running) < cfg.max_batch_size and head.pending <= budget
                            and self._need(ledger, head, head.pending) + cfg.watermark_blocks <= free)

        # 1) Running sequences: oldest admission first; Sarathi puts decodes before ongoing prefills.
        if not prefill_only:
            order = sorted(self.running, key=lambda s: ((s.pending > 1) if cfg.policy == "sarathi" else False,
                                                         s.admit_order))
            for seq in order:
                if seq not in self.running or budget <= 0 or len(plan.rows) >= cfg.max_batch_size:
                    continue
                n = int(min(self._chunk(seq), budget))
                need = self._need(ledger, seq, n, restored)
                while need > free:
                    victim_free = self._preempt_one(plan, ledger, protect=scheduled | {seq.rid}, restored=restored)
                    if victim_free is None:
                        break
                    free += victim_free
                if need > free:  # nobody newer left to preempt: this sequence yields its own blocks
                    free += self._preempt_one(plan, ledger, protect=scheduled, restored=restored) or 0
                    continue
                plan.rows.append((seq, n))
                scheduled.add(seq.rid)
                free -= need
                budget -= n

        # 2) Admissions (not under memory pressure, not while anyone is swapped out).
        admit_open = not plan.preempted and not self.swapped
        if cfg.policy == "static" and self.running:
            admit_open = False  # static batching: the next batch forms when this one has finished
        if cfg.policy == "vllm" and not prefill_only:
            admit_open = False
        n_admitted = 0
        while (admit_open and self.waiting and len(plan.rows) < cfg.max_batch_size
               and len(self.running) < cfg.max_batch_size and budget > 0
               and (cfg.max_new_per_step is None or n_admitted < cfg.max_new_per_step)):
            seq = self.waiting[0]
            self._check_fits_pool(ledger, seq)
            n = int(min(self._chunk(seq), budget))
            if cfg.chunk_size is None and n < seq.pending:
                break  # whole prompts only, and this one does not fit the budget
            need = self._need(ledger, seq, n)
            if need + cfg.watermark_blocks > free:
                break
            self.waiting.popleft()
            self._admit(seq, plan)
            plan.rows.append((seq, n))
            scheduled.add(seq.rid)
            free -= need
            budget -= n
            n_admitted += 1
        if not plan.rows and self.running and not plan.preempted and not plan.swapped_in:
            raise CannotSchedule("no running sequence could be scheduled (token_budget smaller than 1?)")
        return plan
