"""Vidur's event-driven simulator (§4.4): replicas, a global scheduler, KV memory and predicted
step times, driving the SAME :class:`mlsys24.serving.Scheduler` that the real engine runs.

Events live in one min-heap keyed by ``(time, priority, counter)``: ``arrival`` (a request reaches
the global scheduler, which routes it: round-robin, least-outstanding-requests or random) →
``replica_schedule`` (an idle replica with work asks its scheduler for a plan against a
:class:`~mlsys24.serving.CountingLedger`) → ``step_end`` (after the cost model's predicted step
time: tokens are emitted, finished requests retire and free their blocks, the replica schedules
again). The per-step bookkeeping mirrors :meth:`mlsys24.serving.Engine.step` line for line
(preemption frees blocks, swap-in restores them, admitted sequences get their first-schedule time,
rows that reach their last pending token sample at the step's end), so both produce the same
batches from the same arrivals when their step times agree.

Requests are :class:`~mlsys24.serving.Request`; per-request metrics use
:func:`mlsys24.serving.request_metrics` (TTFT, TPOT, E2E) plus the scheduling delay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from ..serving.metrics import request_metrics, summarize
from ..serving.request import Request, SeqStatus, Sequence
from ..serving.scheduler import CountingLedger, Scheduler, SchedulerConfig
from .predictor import StepShape

__all__ = ["ReplicaConfig", "Simulator", "SimResult", "run_engine", "EngineRun", "RecordingScheduler",
           "plan_rows", "kv_blocks_for", "latency_summary"]

ARRIVAL, SCHEDULE, STEP_END = 0, 2, 1  # priorities at equal times: arrivals, step ends, then schedules


def plan_rows(plan) -> list[tuple[Sequence, int]]:
    """The rows a plan actually executes (the engine's filter in :meth:`Engine.step`)."""
    rows = [(s, min(n, s.pending)) for s, n in plan.rows if s.status is SeqStatus.RUNNING]
    return [(s, n) for s, n in rows if n > 0]


def kv_blocks_for(cfg, gpu_mem_bytes: float, tp: int = 1, block_size: int = 16, dtype_bytes: int = 2,
                  margin: float = 0.1) -> int:
    """Vidur's memory planner: blocks of ``block_size`` tokens that fit in one TP group after the
    weights, keeping ``margin`` of memory free. ``cfg``: a LlamaConfig (full model)."""
    usable = gpu_mem_bytes * (1 - margin) - dtype_bytes * cfg.n_params() / tp
    per_block = cfg.kv_bytes_per_token(dtype_bytes) / tp * block_size
    return max(0, int(usable // per_block))


@dataclass(frozen=True)
class ReplicaConfig:
    scheduler: SchedulerConfig
    n_blocks: int
    block_size: int = 16
    tp: int = 1


@dataclass
class _Replica:
    idx: int
    scheduler: Scheduler
    ledger: CountingLedger
    cost: object
    busy: bool = False
    outstanding: int = 0
    inflight: list = field(default_factory=list)


@dataclass
class SimResult:
    finished: list[Sequence]
    steps: list[dict]             # per step: replica, start_s, duration_s, shape, rows [(rid, n)]
    sim_wall_s: float = 0.0

    def summary(self) -> dict:
        return latency_summary(self.finished)

    def plans(self, replica: int = 0) -> list[list[tuple[int, int]]]:
        return [s["rows"] for s in self.steps if s["replica"] == replica]


def latency_summary(seqs: list[Sequence]) -> dict:
    """:func:`mlsys24.serving.summarize` plus scheduling delay, E2E/TTFT/TPOT P50/P90/P95/P99, TBT P99."""
    out = summarize(seqs)
    ms = [request_metrics(s) for s in seqs]
    delay = [s.first_scheduled_s - s.request.arrival_s for s in seqs]
    tbt = [b - a for s in seqs for a, b in zip(s.token_times_s, s.token_times_s[1:])]
    for name, xs in (("e2e", [m.e2e_s for m in ms]), ("ttft", [m.ttft_s for m in ms]),
                     ("tpot", [m.tpot_s for m in ms if m.tpot_s is not None]), ("sched_delay", delay), ("tbt", tbt)):
        for q in (50, 90, 95, 99):
            out[f"{name}_p{q}_s"] = float(np.percentile(xs, q)) if xs else float("nan")
    return out


class Simulator:
    """``Simulator(replica_config, n_replicas, cost).run(requests) -> SimResult``.

    cost: an object with ``step_time(StepShape) -> seconds`` (one per replica, or shared).
    global_policy: ``round_robin`` | ``lor`` (least outstanding requests) | ``random``.
    """

    def __init__(self, config: ReplicaConfig, n_replicas: int = 1, cost=None, *, global_policy: str = "round_robin",
                 seed: int = 0):
        if n_replicas < 1:
            raise ValueError(f"n_replicas must be >= 1, got {n_replicas}")
        if global_policy not in ("round_robin", "lor", "random"):
            raise ValueError(f"global_policy must be round_robin, lor or random, got {global_policy!r}")
        if cost is None:
            raise ValueError("Simulator needs a cost model (step_time(shape) -> seconds)")
        self.config, self.n_replicas, self.cost = config, n_replicas, cost
        self.global_policy, self.seed = global_policy, seed

    def _route(self, reps: list[_Replica], k: int, rng) -> _Replica:
        if self.global_policy == "round_robin":
            return reps[k % len(reps)]
        if self.global_policy == "random":
            return reps[int(rng.integers(len(reps)))]
        return min(reps, key=lambda r: (r.outstanding, r.idx))

    def run(self, requests: list[Request], *, max_steps: int | None = None) -> SimResult:
        import time

        wall0 = time.perf_counter()
        cfg = self.config
        costs = self.cost if isinstance(self.cost, list | tuple) else [self.cost] * self.n_replicas
        reps = [_Replica(i, Scheduler(cfg.scheduler), CountingLedger(cfg.n_blocks, cfg.block_size), costs[i])
                for i in range(self.n_replicas)]
        rng = np.random.default_rng(self.seed)
        heap: list = []
        counter = 0

        def push(t, prio, kind, payload):
            nonlocal counter
            heapq.heappush(heap, (t, prio, counter, kind, payload))
            counter += 1

        for r in sorted(requests, key=lambda r: (r.arrival_s, r.rid)):
            push(r.arrival_s, ARRIVAL, "arrival", r)
        finished: list[Sequence] = []
        steps: list[dict] = []
        n_arrived = 0
        while heap:
            t, _, _, kind, payload = heapq.heappop(heap)
            if kind == "arrival":
                rep = self._route(reps, n_arrived, rng)
                n_arrived += 1
                seq = Sequence(payload)
                rep.scheduler.add(seq)
                rep.outstanding += 1
                if not rep.busy:
                    rep.busy = True
                    push(t, SCHEDULE, "schedule", rep)
            elif kind == "schedule":
                rep = payload
                if not rep.scheduler.has_work():
                    rep.busy = False
                    continue
                dt = self._start_step(rep, t, steps)
                push(t + dt, STEP_END, "step_end", rep)
                if max_steps is not None and len(steps) >= max_steps:
                    break
            else:  # step_end
                rep = payload
                self._end_step(rep, t, finished)
                push(t, SCHEDULE, "schedule", rep)
        return SimResult(finished, steps, time.perf_counter() - wall0)

    # the replica's step: the engine's Engine.step with a counting ledger ---------------------
    def _start_step(self, rep: _Replica, t: float, steps: list[dict]) -> float:
        led = rep.ledger
        plan = rep.scheduler.schedule(led)
        pending_swap_in = {s.rid for s in plan.swapped_in}
        for victim, _how in plan.preempted:
            if victim.rid in pending_swap_in:
                pending_swap_in.discard(victim.rid)
                continue
            led.release(victim)
        for seq in plan.swapped_in:
            if seq.rid in pending_swap_in:
                led.grow(seq, seq.num_computed)
        for seq in plan.admitted:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = t
        rows = plan_rows(plan)
        shape = StepShape.from_rows(rows)
        dt = rep.cost.step_time(shape)
        for s, n in rows:
            led.grow(s, s.num_computed + n)
            s.num_computed += n
        rep.inflight = [s for s, _ in rows if s.pending == 0]
        steps.append({"replica": rep.idx, "start_s": t, "duration_s": dt, "shape": shape,
                      "rows": [(s.rid, n) for s, n in rows], "kv_blocks_used": led.total_blocks - led.n_free(),
                      "preempted": len(plan.preempted)})
        return dt

    def _end_step(self, rep: _Replica, t: float, finished: list[Sequence]) -> None:
        for s in rep.inflight:
            s.output.append(0)
            s.token_times_s.append(t)
            if s.finished:
                rep.ledger.release(s)
                rep.scheduler.finish(s)
                s.finish_s = t
                rep.outstanding -= 1
                finished.append(s)
        rep.inflight = []


# --------------------------------------------------------------------------- the real engine, logged
class RecordingScheduler(Scheduler):
    """A :class:`Scheduler` that logs each plan's executed rows and step shape (nothing else changes)."""

    def __init__(self, config, **overrides):
        super().__init__(config, **overrides)
        self.log: list[tuple[StepShape, list[tuple[int, int]]]] = []

    def schedule(self, ledger):
        plan = super().schedule(ledger)
        rows = plan_rows(plan)
        self.log.append((StepShape.from_rows(rows), [(s.rid, n) for s, n in rows]))
        return plan


@dataclass
class EngineRun:
    finished: list[Sequence]
    shapes: list[StepShape]
    plans: list[list[tuple[int, int]]]
    durations_s: list[float]
    starts_s: list[float]
    engine: object = None

    def summary(self) -> dict:
        return latency_summary(self.finished)

    def step_intervals(self) -> list[float]:
        """Start-to-next-start of each step (the last one: its duration). Replayed through the
        simulator these reproduce the engine's clock at every scheduling decision, idle periods
        included (after an idle gap the engine's next step starts at the next arrival)."""
        return [b - a for a, b in zip(self.starts_s, self.starts_s[1:])] + self.durations_s[-1:]


def run_engine(model, requests: list[Request], scheduler: SchedulerConfig, *, n_blocks: int, block_size: int = 16,
               engine=None, **engine_kw) -> EngineRun:
    """Serve ``requests`` on the real :class:`~mlsys24.serving.Engine` with a recording scheduler.

    ``engine``: reuse a warm engine (its scheduler must be a drained RecordingScheduler)."""
    from ..serving.engine import Engine

    if engine is None:
        engine = Engine(model, RecordingScheduler(scheduler), n_blocks=n_blocks, block_size=block_size, **engine_kw)
    sch = engine.scheduler
    n0, s0 = len(sch.log), len(engine.steps)
    done = engine.run(requests, progress=False)
    engine.check_invariants()
    steps = engine.steps[s0:]
    log = sch.log[n0:]
    return EngineRun(done, [sh for sh, _ in log], [p for _, p in log], [r.duration_s for r in steps],
                     [r.start_s for r in steps], engine)
