"""L-GreCo inside training: reference gradients, the per-layer error/size table, periodic re-tuning
kept consistent across workers, and the step-time model used for the speedup-vs-bandwidth curve.

Markov et al., "L-GreCo", MLSys 2024 (arXiv 2210.17357), Algorithm 1:

1. Warm-up: ``warmup_iters`` iterations of uncompressed all-reduce.
2. Re-tune points t_k = warmup_iters + k·adjust_freq (k = 0, 1, ...). In the ``acc_iters`` iterations
   before t_k, rank 0 accumulates the reference gradient of each compressible layer,
   G_l = mean of the last acc_iters tensors the compressor sees (gradient + error-feedback residual;
   the authors scale it by δ = 1e-2, which cancels in the budget, so it is left out here).
3. At t_k rank 0 builds the table e_l(c) = ‖C_c(G_l) − G_l‖_F and s_l(c) for every candidate c,
   sets E_max = α · Σ_l e_l(c0), solves the DP (:mod:`mlsys24.compress.dp`) and broadcasts the
   per-layer choices with ``broadcast_object_list``; every rank applies them before its next
   all-reduce, so P/Q shapes always match.

One difference from the authors' schedule (stated): the first re-tune is at the end of warm-up
(k = 0, reference = the last uncompressed gradients), not one period later, so a short run spends
most of its compressed steps on the tuned setting.

Step-time model (for the speedup plot): t(B) = t_compute + t_codec + Σ_collectives (λ + wire_bytes / B),
with ring all-reduce wire bytes 2(W−1)/W · msg and all-gather (W−1) · msg per worker; λ and B are
fitted from measured all-reduce times (:class:`LinkModel`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from . import dp
from .compressors import Compressor, LayerSlot, mat_q, mat_t_p, orthogonalize

__all__ = ["ErrorTable", "error_table", "plan", "RetuneEvent", "LGreCoTuner", "LinkModel",
           "predict_step_s", "codec_fn"]


# ----------------------------------------------------------------------------------------------
# Error/size table and one planning step
# ----------------------------------------------------------------------------------------------

@dataclass
class ErrorTable:
    names: list[str]
    shapes: list[tuple[int, int]]
    candidates: list[list]           # [L][C_l] parameter values
    errors: np.ndarray               # [L, C] (padded with inf)
    sizes: np.ndarray                # [L, C] words (padded with inf)
    uniform: list[int]               # [L] index of c0 in each layer's candidates

    @property
    def uniform_error(self) -> float:
        return float(self.errors[np.arange(len(self.uniform)), self.uniform].sum())

    @property
    def uniform_size(self) -> float:
        return float(self.sizes[np.arange(len(self.uniform)), self.uniform].sum())


def uniform_value(compressor: Compressor, shape: tuple[int, int], c0):
    if compressor.family == "powersgd":
        return min(int(c0), *shape)
    return type(c0)(c0) if not isinstance(c0, bool) else c0


def error_table(compressor: Compressor, refs: Sequence[torch.Tensor], c0, names: Sequence[str] | None = None
                ) -> ErrorTable:
    """e_l(c) and s_l(c) for every compressible layer's reference gradient ``refs[l]`` [n_l, m_l]."""
    shapes = [tuple(r.shape) for r in refs]
    cands = [compressor.candidates(s, c0) for s in shapes]
    C = max(len(c) for c in cands) if cands else 1
    L = len(refs)
    errors = np.full((L, C), np.inf)
    sizes = np.full((L, C), np.inf)
    uniform = []
    for i, (ref, shp, cs) in enumerate(zip(refs, shapes, cands)):
        errors[i, : len(cs)] = compressor.errors(ref, cs)
        sizes[i, : len(cs)] = [compressor.size(shp, c) for c in cs]
        u = uniform_value(compressor, shp, c0)
        uniform.append(cs.index(u) if u in cs else int(np.argmin(np.abs(np.asarray(cs, dtype=float) - float(u)))))
    return ErrorTable(list(names) if names is not None else [f"layer{i}" for i in range(L)], shapes, cands,
                      errors, sizes, uniform)


@dataclass
class RetuneEvent:
    """One re-tune: what rank 0 measured and chose (broadcast to every rank)."""

    iteration: int
    choices: list                    # [L] chosen parameter values
    uniform_choices: list            # [L] c0 per layer
    budget: float                    # E_max = α Σ e_l(c0)
    uniform_error: float             # Σ e_l(c0)
    chosen_error: float              # Σ e_l(c_l), real errors
    uniform_size: float              # words per step (compressed layers)
    chosen_size: float
    solve_ms: float
    table_ms: float
    fell_back: bool
    observed_iters: int
    table: dict = field(default_factory=dict)   # names, shapes, candidates, errors, sizes (lists)

    def as_dict(self) -> dict:
        return asdict(self)


def plan(table: ErrorTable, alpha: float = 1.0, buckets: int = 10_000, fallback: bool = True
         ) -> tuple[dp.DPSolution, list]:
    """Solve the DP for one table. Returns (solution, chosen parameter values per layer)."""
    budget = alpha * table.uniform_error
    sol = dp.solve(table.errors, table.sizes, budget, buckets, fallback=table.uniform if fallback else None)
    if not sol.feasible:          # nothing fits (possible only for alpha < 1): keep the uniform setting
        sol = dp.DPSolution(list(table.uniform), table.uniform_size, table.uniform_error, budget, 0, buckets,
                            feasible=False, fell_back=True)
    values = [table.candidates[i][c] for i, c in enumerate(sol.choice)]
    return sol, values


# ----------------------------------------------------------------------------------------------
# The tuner used by the hook
# ----------------------------------------------------------------------------------------------

class LGreCoTuner:
    """Periodic re-tuning of per-layer compression parameters (plug into ``CompressionState.tuner``).

    Every rank calls :meth:`retune` at the same iteration (the hook does so at the start of an
    iteration); rank 0 measures and solves, ``broadcast_object_list`` hands the result to all.
    """

    def __init__(self, alpha: float = 1.0, buckets: int = 10_000, adjust_freq: int = 40, acc_iters: int = 10,
                 keep_reference: bool = False, fallback: bool = True):
        if adjust_freq < 1 or acc_iters < 1:
            raise ValueError("adjust_freq and acc_iters must be >= 1")
        self.alpha, self.buckets = float(alpha), int(buckets)
        self.adjust_freq, self.acc_iters = int(adjust_freq), int(acc_iters)
        self.keep_reference, self.fallback = keep_reference, fallback
        self.events: list[RetuneEvent] = []
        self.reference: dict[str, torch.Tensor] = {}          # last reference gradients (rank 0, CPU)
        self._acc: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}

    def next_point(self, it: int, warmup: int) -> int:
        """The first re-tune point at or after iteration ``it``."""
        if it <= warmup:
            return warmup
        k = math.ceil((it - warmup) / self.adjust_freq)
        return warmup + k * self.adjust_freq

    def due(self, it: int, warmup: int) -> bool:
        return it >= warmup and (it - warmup) % self.adjust_freq == 0

    def observing(self, it: int, warmup: int) -> bool:
        nxt = self.next_point(it + 1, warmup)
        return 0 < nxt - it <= self.acc_iters

    def observe(self, slot: LayerSlot, mat: torch.Tensor) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        m = mat.detach().float()
        if slot.index in self._acc:
            self._acc[slot.index].add_(m)
            self._count[slot.index] += 1
        else:
            self._acc[slot.index] = m.clone()
            self._count[slot.index] = 1

    def retune(self, state) -> RetuneEvent | None:
        slots = state.compressed_layers
        payload: list = [None]
        if state.rank == 0:
            payload = [self._plan(state, slots)]
        if dist.is_initialized() and state.world_size > 1:
            src = dist.get_global_rank(state.group, 0) if state.process_group is not None else 0
            dist.broadcast_object_list(payload, src=src, group=state.process_group)
        self._acc.clear()
        self._count.clear()
        evt = payload[0]
        if evt is not None:
            state.set_choices(evt.choices)
            self.events.append(evt)
        return evt

    def _plan(self, state, slots: list[LayerSlot]) -> RetuneEvent | None:
        if not slots or any(s.index not in self._acc for s in slots):
            return None
        refs = [self._acc[s.index] / self._count[s.index] for s in slots]
        t0 = time.perf_counter()
        table = error_table(state.compressor, refs, state.c0, [s.name for s in slots])
        t1 = time.perf_counter()
        sol, values = plan(table, self.alpha, self.buckets, self.fallback)
        t2 = time.perf_counter()
        if self.keep_reference:
            self.reference = {s.name: r.cpu() for s, r in zip(slots, refs)}
        uni_vals = [table.candidates[i][u] for i, u in enumerate(table.uniform)]
        return RetuneEvent(
            iteration=state.iteration, choices=values, uniform_choices=uni_vals, budget=sol.budget,
            uniform_error=table.uniform_error, chosen_error=sol.total_error, uniform_size=table.uniform_size,
            chosen_size=sol.total_size, solve_ms=(t2 - t1) * 1e3, table_ms=(t1 - t0) * 1e3,
            fell_back=sol.fell_back, observed_iters=min(self._count.values()),
            table=dict(names=table.names, shapes=table.shapes, candidates=table.candidates,
                       errors=table.errors.tolist(), sizes=table.sizes.tolist(), uniform=table.uniform))


# ----------------------------------------------------------------------------------------------
# Step-time model
# ----------------------------------------------------------------------------------------------

@dataclass
class LinkModel:
    """α-β model of one collective hop: t = latency_s + wire_bytes / bandwidth_Bps."""

    latency_s: float
    bandwidth_Bps: float

    @classmethod
    def fit_allreduce(cls, msg_bytes: Sequence[float], seconds: Sequence[float], world: int) -> LinkModel:
        """Least-squares fit of measured ring all-reduce times t(msg) = λ + 2(W−1)/W · msg / B."""
        x = np.asarray(msg_bytes, dtype=float) * 2 * (world - 1) / world
        y = np.asarray(seconds, dtype=float)
        A = np.stack([np.ones_like(x), x], 1)
        (lat, inv_bw), *_ = np.linalg.lstsq(A, y, rcond=None)
        return cls(max(float(lat), 0.0), 1.0 / max(float(inv_bw), 1e-15))

    def allreduce_s(self, msg_bytes: float, world: int) -> float:
        return self.latency_s + 2 * (world - 1) / world * msg_bytes / self.bandwidth_Bps

    def allgather_s(self, msg_bytes: float, world: int) -> float:
        return self.latency_s + (world - 1) * msg_bytes / self.bandwidth_Bps

    def with_bandwidth(self, bandwidth_Bps: float) -> LinkModel:
        return LinkModel(self.latency_s, bandwidth_Bps)


def predict_step_s(compute_s: float, codec_s: float, allreduce_bytes: float, allgather_bytes: float,
                   collectives: float, link: LinkModel, world: int) -> float:
    """Step time = compute + codec + communication (no overlap assumed: an upper bound)."""
    wire = (2 * (world - 1) / world) * allreduce_bytes + (world - 1) * allgather_bytes
    return compute_s + codec_s + collectives * link.latency_s + wire / link.bandwidth_Bps


def codec_fn(compressor: Compressor | None, shapes: Sequence[tuple[int, int]], choices: Sequence,
             device="cpu", dtype=torch.float32, seed: int = 0):
    """A closure running one step's local compression work for layers ``shapes`` at ``choices``
    (no communication), to be timed with :func:`mlsys24.bench.measure`."""
    if compressor is None or not shapes:
        return lambda: None
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    if compressor.family == "powersgd":
        qs = [torch.randn(s[1], min(int(c), *s), generator=g).to(device=device, dtype=dtype)
              for s, c in zip(shapes, choices)]

        def run():
            for m, q in zip(mats, qs):
                orthogonalize(q)
                p = orthogonalize(mat_q(m, q))
                q2 = mat_t_p(m, p)
                _ = m - p @ q2.t()
        return run

    def run_other():
        for m, c in zip(mats, choices):
            _ = m - compressor.roundtrip(m, c)
    return run_other
