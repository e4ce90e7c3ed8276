"""Vidur-Search (§5): for each deployment configuration, the capacity (highest QPS whose P99
scheduling delay stays within an SLO, by bisection over the arrival rate of a fixed trace), then
QPS per dollar, the latency SLO filter (TTFT P90, TBT P99 at capacity) and the Pareto frontier.

A configuration: TP degree, scheduler (vLLM / Sarathi with a chunk size), batch cap; the cluster
has ``n_gpus`` GPUs, so ``n_gpus // tp`` replicas behind a round-robin global scheduler. The step
cost of each TP degree comes from ``costs[tp]`` (operator models of that shard shape).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from ..serving.scheduler import SchedulerConfig
from .simulator import ReplicaConfig, Simulator, latency_summary
from .traces import scale_arrivals

__all__ = ["SearchConfig", "scheduler_config", "capacity", "search", "pareto"]


def scheduler_config(name: str, batch_cap: int, chunk: int | None = None, watermark_blocks: int = 0) -> SchedulerConfig:
    """``vllm`` (at most 4096 prompt tokens per step, vLLM's max_num_batched_tokens) or ``sarathi``
    (chunk = per-step token budget) with a batch cap."""
    if name == "vllm":
        return SchedulerConfig("vllm", max_batch_size=batch_cap, token_budget=4096, watermark_blocks=watermark_blocks)
    if name == "sarathi":
        c = chunk or 512
        return SchedulerConfig("sarathi", max_batch_size=batch_cap, chunk_size=c, token_budget=c,
                               watermark_blocks=watermark_blocks)
    if name in ("orca", "static"):
        return SchedulerConfig(name, max_batch_size=batch_cap, watermark_blocks=watermark_blocks)
    raise ValueError(f"unknown scheduler {name!r}")


@dataclass(frozen=True)
class SearchConfig:
    tp: int
    scheduler: str
    batch_cap: int
    chunk: int | None = None

    @property
    def label(self) -> str:
        s = f"sarathi-{self.chunk}" if self.scheduler == "sarathi" else self.scheduler
        return f"TP{self.tp} {s} cap{self.batch_cap}"


def _simulate(requests, qps, replica, n_replicas, cost):
    reqs = scale_arrivals(requests, 1.0 / qps)  # requests carry unit-rate arrivals
    res = Simulator(replica, n_replicas, cost).run(reqs)
    return latency_summary(res.finished), res


def saturation_qps(requests, replica: ReplicaConfig, n_replicas: int, cost) -> float:
    """Requests per second the deployment completes when every request is there at t = 0 (its
    throughput ceiling: above it the queue grows without bound on a long trace)."""
    reqs = scale_arrivals(requests, 0.0)
    res = Simulator(replica, n_replicas, cost).run(reqs)
    return len(res.finished) / max(s.finish_s for s in res.finished)


def capacity(requests, replica: ReplicaConfig, n_replicas: int, cost, *, slo_delay_s: float = 5.0,
             steps: int = 8) -> dict:
    """Bisection for the largest QPS with P99 scheduling delay <= ``slo_delay_s``, searched below the
    saturation throughput (a finite trace shorter than the SLO would otherwise pass at any rate).

    ``requests`` must have unit-rate arrivals (``make_trace(..., qps=1.0)``). Returns the capacity,
    the summary there, the saturation throughput and the number of simulations run."""
    ok = lambda s: s["sched_delay_p99_s"] <= slo_delay_s  # noqa: E731
    sat = saturation_qps(requests, replica, n_replicas, cost)
    n_sims = 1
    lo, hi, best = 0.0, sat, None
    s, _ = _simulate(requests, sat, replica, n_replicas, cost)
    n_sims += 1
    if ok(s):
        return {"capacity_qps": sat, "summary": s, "saturation_qps": sat, "n_sims": n_sims}
    for _ in range(steps):
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        s, _ = _simulate(requests, mid, replica, n_replicas, cost)
        n_sims += 1
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid
    if best is None:  # nothing below the SLO on the grid: report the lowest rate tried
        s, _ = _simulate(requests, hi, replica, n_replicas, cost)
        lo, best = hi, s
    return {"capacity_qps": lo, "summary": best, "saturation_qps": sat, "n_sims": n_sims}


def search(requests, configs: list[SearchConfig], costs: dict, *, n_gpus: int, blocks_for_tp: dict,
           gpu_price_per_hour: float = 1.0, slo_delay_s: float = 5.0, ttft_p90_slo_s: float = 2.0,
           tbt_p99_slo_s: float = 0.2, steps: int = 8, progress: bool | None = None) -> list[dict]:
    """Capacity and cost of every configuration (see module doc). Returns one dict per config."""
    from ..progress import progress_bar

    out = []
    bar = progress_bar(len(configs), desc="search", enabled=progress)
    for c in configs:
        t0 = time.perf_counter()
        rep = ReplicaConfig(scheduler_config(c.scheduler, c.batch_cap, c.chunk), blocks_for_tp[c.tp], tp=c.tp)
        n_rep = n_gpus // c.tp
        cap = capacity(requests, rep, n_rep, costs[c.tp], slo_delay_s=slo_delay_s, steps=steps)
        s = cap["summary"] or {}
        qps = cap["capacity_qps"]
        out.append({"label": c.label, "tp": c.tp, "scheduler": c.scheduler, "chunk": c.chunk, "batch_cap": c.batch_cap,
                    "replicas": n_rep, "capacity_qps": qps, "qps_per_dollar": qps / (n_gpus * gpu_price_per_hour),
                    "ttft_p90_s": s.get("ttft_p90_s"), "tbt_p99_s": s.get("tbt_p99_s"),
                    "e2e_p50_s": s.get("e2e_p50_s"), "sched_delay_p99_s": s.get("sched_delay_p99_s"),
                    "meets_latency_slo": bool(s) and s["ttft_p90_s"] <= ttft_p90_slo_s and s["tbt_p99_s"] <= tbt_p99_slo_s,
                    "n_sims": cap["n_sims"], "search_cpu_s": time.perf_counter() - t0})
        bar.update(1)
    bar.close()
    return out


def pareto(points: list[dict], x: str, y: str) -> list[dict]:
    """Points not dominated when maximising ``x`` and minimising ``y``."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    return [p for p in pts if not any((q[x] >= p[x] and q[y] <= p[y]) and (q[x] > p[x] or q[y] < p[y]) for q in pts)]


def grid(tps, schedulers, caps) -> list[SearchConfig]:
    """Cartesian product; a scheduler is ``"vllm"`` or ``("sarathi", chunk)``."""
    out = []
    for tp, s, cap in itertools.product(tps, schedulers, caps):
        name, chunk = (s, None) if isinstance(s, str) else s
        out.append(SearchConfig(tp, name, cap, chunk))
    return out
