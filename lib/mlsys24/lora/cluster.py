"""Punica's cluster scheduler in a discrete-event simulator of a GPU cluster.

Each simulated GPU runs Punica's serving loop: back-to-back steps over all requests placed on it
(new requests' prefill batched with the others' decode), a step taking ``StepModel(rows,
prefill_tokens)`` seconds, a model fitted on *measured* engine steps (:meth:`StepModel.fit`). KV
memory is counted in blocks of 16 tokens.

Placement policies (a request is placed when it arrives, or when it was evicted and re-queued):

- ``punica`` — the scheduler of the first author's ``punica-server-experimental``
  (``rust/src/scheduler/scheduler.rs``): among GPUs with fewer than ``max_batch`` requests and
  ``free_blocks >= ceil(p / 16) + (n_requests + 1)`` (one block of decode headroom per request),
  pick the largest ``(n_requests, -free_blocks)`` — the *busiest* GPU that fits, so load
  consolidates and idle GPUs can be released;
- ``round_robin`` — the next GPU in cyclic order that fits;
- ``least_loaded`` — the GPU with the fewest requests (then most free blocks) that fits.

Queue: FIFO by arrival time, head-of-line (placement stops at the first request that fits
nowhere). After every step of a GPU, while ``free_blocks < n_requests`` a request is evicted
(``evict="newest"`` or ``"oldest"`` by arrival: the Rust code's comment says newest, its loop pops
the oldest); it releases its KV, keeps its arrival time and generated tokens, and is re-queued;
re-placement re-prefills prompt + generated tokens ("migration" without KV transfer).

Invariants (checked as the simulation runs, and by the tests): every request finishes exactly once
with exactly its output length; a GPU never holds more than ``max_batch`` requests or more KV blocks
than it has.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["StepModel", "GPUSpec", "SimRequest", "SimResult", "ClusterSim", "POLICIES", "simulate"]

POLICIES = ("punica", "round_robin", "least_loaded")


@dataclass(frozen=True)
class StepModel:
    """Step latency ``base_s + per_row_s * rows + per_prefill_token_s * prefill_tokens`` (seconds)."""

    base_s: float
    per_row_s: float
    per_prefill_token_s: float
    r2: float | None = None

    def __call__(self, rows: int, prefill_tokens: int = 0) -> float:
        return self.base_s + self.per_row_s * rows + self.per_prefill_token_s * prefill_tokens

    @classmethod
    def fit(cls, records: Iterable) -> StepModel:
        """Least squares with non-negative coefficients on step records (``StepRecord`` objects or
        dicts with ``rows``, ``prefill_tokens``, ``duration_s``)."""
        rows, pre, dur = [], [], []
        for r in records:
            g = r if isinstance(r, dict) else r.__dict__
            if g.get("rows", 0) <= 0:
                continue
            rows.append(g["rows"])
            pre.append(g["prefill_tokens"])
            dur.append(g["duration_s"])
        if len(dur) < 3:
            raise ValueError(f"StepModel.fit needs at least 3 steps with rows, got {len(dur)}")
        X = np.column_stack([np.ones(len(dur)), rows, pre]).astype(float)
        y = np.asarray(dur, dtype=float)
        active = [0, 1, 2]
        while True:  # drop coefficients that come out negative, refit the rest
            coef = np.zeros(3)
            sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
            coef[active] = sol
            neg = [i for i in active if coef[i] < 0]
            if not neg:
                break
            active = [i for i in active if i != min(neg, key=lambda i: coef[i])]
            if not active:
                coef = np.zeros(3)
                break
        pred = X @ coef
        ss = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else None
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), r2)


@dataclass(frozen=True)
class GPUSpec:
    n_blocks: int                 # KV blocks of block_size tokens
    block_size: int = 16
    max_batch: int = 32

    @classmethod
    def for_model(cls, *, gpu_mem_bytes: float, n_params: float, kv_bytes_per_token: float, block_size: int = 16,
                  max_batch: int = 32) -> GPUSpec:
        """Punica's pool: (0.8 * GPU memory - 2 bytes * params) / bytes of a block."""
        free = 0.8 * gpu_mem_bytes - 2 * n_params
        return cls(max(1, int(free // (block_size * kv_bytes_per_token))), block_size, max_batch)


@dataclass(frozen=True)
class SimRequest:
    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass
class _Req:
    req: SimRequest
    generated: int = 0
    cache: int = 0              # tokens whose KV this request holds (or has reserved for its prefill)
    needs_prefill: bool = True
    gpu: int | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    migrations: int = 0
    placements: int = 0

    @property
    def key(self):
        return (self.req.arrival_s, self.req.rid)


@dataclass
class _GPU:
    idx: int
    reqs: list = field(default_factory=list)
    step: list | None = None      # requests of the step in flight
    busy_s: float = 0.0           # time holding >= 1 request
    steps: int = 0


@dataclass
class SimResult:
    policy: str
    n_gpus: int
    finished: list            # dicts per request
    timeline_t: np.ndarray    # event times
    timeline_busy: np.ndarray  # GPUs holding >= 1 request after each event
    timeline_batch: np.ndarray  # [events, n_gpus] requests per GPU
    timeline_queue: np.ndarray
    max_batch_seen: int
    max_blocks_seen: int
    steps: int
    migrations: int

    @property
    def span_s(self) -> float:
        return max(f["finish_s"] for f in self.finished) - min(f["arrival_s"] for f in self.finished)

    @property
    def throughput_tok_s(self) -> float:
        return sum(f["output_len"] for f in self.finished) / self.span_s

    def avg_busy_gpus(self, t0: float | None = None, t1: float | None = None) -> float:
        """Time-averaged number of GPUs holding at least one request over ``[t0, t1]``."""
        t, b = self.timeline_t, self.timeline_busy
        t0 = t[0] if t0 is None else t0
        t1 = t[-1] if t1 is None else t1
        if t1 <= t0:
            return float(b[0])
        edges = np.clip(np.append(t, t1), t0, t1)
        return float((np.diff(edges) * b).sum() / (t1 - t0))

    def latency(self, q: float = 99) -> float:
        return float(np.percentile([f["finish_s"] - f["arrival_s"] for f in self.finished], q))

    def per_token_latency(self, q: float = 99) -> float:
        return float(np.percentile([(f["finish_s"] - f["arrival_s"]) / f["output_len"] for f in self.finished], q))

    def summary(self) -> dict:
        return {"policy": self.policy, "n_requests": len(self.finished), "throughput_tok_s": self.throughput_tok_s,
                "avg_busy_gpus": self.avg_busy_gpus(), "latency_p50_s": self.latency(50),
                "latency_p99_s": self.latency(99), "per_token_p99_s": self.per_token_latency(99),
                "migrations": self.migrations, "steps": self.steps}


class ClusterSim:
    """``ClusterSim(n_gpus, gpu, step_model, policy).run(requests) -> SimResult``."""

    def __init__(self, n_gpus: int, gpu: GPUSpec, step_model: StepModel, policy: str = "punica", *,
                 evict: str = "newest"):
        if n_gpus < 1:
            raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if evict not in ("newest", "oldest"):
            raise ValueError(f"evict must be 'newest' or 'oldest', got {evict!r}")
        self.n_gpus, self.gpu, self.model, self.policy, self.evict = n_gpus, gpu, step_model, policy, evict

    # memory ------------------------------------------------------------------------------------
    def _blocks(self, g: _GPU) -> int:
        bs = self.gpu.block_size
        return sum(math.ceil(r.cache / bs) for r in g.reqs)

    def _free(self, g: _GPU) -> int:
        return self.gpu.n_blocks - self._blocks(g)

    def _fits(self, g: _GPU, r: _Req) -> bool:
        p = r.req.prompt_len + r.generated
        return (len(g.reqs) < self.gpu.max_batch
                and self._free(g) >= math.ceil(p / self.gpu.block_size) + len(g.reqs) + 1)

    def _choose(self, cands: list[_GPU]) -> _GPU:
        if self.policy == "punica":
            return max(cands, key=lambda g: (len(g.reqs), -self._free(g), -g.idx))
        if self.policy == "least_loaded":
            return min(cands, key=lambda g: (len(g.reqs), -self._free(g), g.idx))
        # round robin: first candidate at or after the pointer
        idx = {g.idx for g in cands}
        for k in range(self.n_gpus):
            i = (self._rr + k) % self.n_gpus
            if i in idx:
                self._rr = (i + 1) % self.n_gpus
                return next(g for g in cands if g.idx == i)
        raise AssertionError("unreachable")

    # simulation --------------------------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest], *, max_events: int = 50_000_000) -> SimResult:
        bs = self.gpu.block_size
        for r in requests:
            if r.output_len < 1 or r.prompt_len < 1:
                raise ValueError(f"request {r.rid}: prompt and output lengths must be >= 1")
            if math.ceil((r.prompt_len + r.output_len) / bs) + 1 > self.gpu.n_blocks:
                raise ValueError(f"request {r.rid} can never fit a GPU of {self.gpu.n_blocks} blocks")
        if len({r.rid for r in requests}) != len(requests):
            raise ValueError("duplicate request ids")
        self._rr = 0
        gpus = [_GPU(i) for i in range(self.n_gpus)]
        state = {r.rid: _Req(r) for r in requests}
        queue: list[_Req] = []   # sorted by (arrival, rid)
        events: list = []
        seq = 0
        for r in sorted(requests, key=lambda r: (r.arrival_s, r.rid)):
            heapq.heappush(events, (r.arrival_s, seq, "arrive", r.rid))
            seq += 1
        finished: list[dict] = []
        tl_t, tl_busy, tl_batch, tl_q = [], [], [], []
        max_batch = max_blocks = steps = migrations = 0
        now = 0.0

        def start_steps():
            nonlocal seq, steps
            for g in gpus:
                if g.step is None and g.reqs:
                    g.step = list(g.reqs)
                    pre = sum(r.req.prompt_len + r.generated for r in g.step if r.needs_prefill)
                    dur = self.model(len(g.step), pre)
                    heapq.heappush(events, (now + max(dur, 1e-9), seq, "step", g.idx))
                    seq += 1
                    steps += 1
                    g.steps += 1

        def dispatch():
            while queue:
                r = queue[0]
                cands = [g for g in gpus if self._fits(g, r)]
                if not cands:
                    return
                g = self._choose(cands)
                queue.pop(0)
                r.gpu = g.idx
                r.cache = r.req.prompt_len + r.generated   # reserved for the (re-)prefill
                r.needs_prefill = True
                r.placements += 1
                g.reqs.append(r)

        n_events = 0
        while events:
            now, _, kind, payload = heapq.heappop(events)
            n_events += 1
            if n_events > max_events:
                raise RuntimeError("simulation did not finish within max_events")
            if kind == "arrive":
                bisect.insort(queue, state[payload], key=lambda x: x.key)
            else:
                g = gpus[payload]
                for r in g.step:
                    if r.needs_prefill:
                        r.needs_prefill = False       # cache already counts the prefilled tokens
                    else:
                        r.cache += 1                  # the fed token's K/V
                    r.generated += 1
                    if r.first_token_s is None:
                        r.first_token_s = now
                    if r.generated == r.req.output_len:
                        r.finish_s = now
                        g.reqs.remove(r)
                        finished.append({"rid": r.req.rid, "arrival_s": r.req.arrival_s, "first_token_s": r.first_token_s,
                                         "finish_s": now, "output_len": r.generated, "prompt_len": r.req.prompt_len,
                                         "migrations": r.migrations, "gpu": g.idx})
                g.step = None
                used = self._blocks(g)
                if used > self.gpu.n_blocks:
                    raise AssertionError(f"GPU {g.idx} holds {used} blocks of {self.gpu.n_blocks}")
                while g.reqs and self._free(g) < len(g.reqs):
                    pick = max if self.evict == "newest" else min
                    victim = pick(g.reqs, key=lambda x: x.key)
                    g.reqs.remove(victim)
                    victim.gpu, victim.cache, victim.needs_prefill = None, 0, True
                    victim.migrations += 1
                    migrations += 1
                    bisect.insort(queue, victim, key=lambda x: x.key)
            dispatch()
            start_steps()
            for g in gpus:
                if len(g.reqs) > self.gpu.max_batch:
                    raise AssertionError(f"GPU {g.idx} holds {len(g.reqs)} > {self.gpu.max_batch} requests")
                max_batch = max(max_batch, len(g.reqs))
                max_blocks = max(max_blocks, self._blocks(g))
            if max_blocks > self.gpu.n_blocks:
                raise AssertionError(f"a GPU holds {max_blocks} blocks of {self.gpu.n_blocks}")
            tl_t.append(now)
            tl_batch.append([len(g.reqs) for g in gpus])
            tl_busy.append(sum(1 for g in gpus if g.reqs))
            tl_q.append(len(queue))
        if queue or any(g.reqs for g in gpus):
            raise AssertionError("simulation ended with requests left")
        if sorted(f["rid"] for f in finished) != sorted(r.rid for r in requests):
            raise AssertionError("requests lost or finished twice")
        finished.sort(key=lambda f: f["rid"])
        return SimResult(self.policy, self.n_gpus, finished, np.asarray(tl_t), np.asarray(tl_busy),
                         np.asarray(tl_batch, dtype=np.int32).reshape(len(tl_t), self.n_gpus), np.asarray(tl_q),
                         max_batch, max_blocks, steps, migrations)


def simulate(requests: Sequence[SimRequest], *, n_gpus: int, gpu: GPUSpec, step_model: StepModel,
             policies: Iterable[str] = POLICIES, evict: str = "newest") -> dict[str, SimResult]:
    """Run the same requests under each policy."""
    return {p: ClusterSim(n_gpus, gpu, step_model, p, evict=evict).run(requests) for p in policies}
