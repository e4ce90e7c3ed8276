"""Vidur (Agrawal et al., MLSys 2024): profile operators, predict step times, simulate serving.

- :mod:`.profile` — operator profiler over a size grid, tidy CSV rows.
- :mod:`.predictor` — random-forest operator models, Vidur's iteration-time sum, the fitted
  per-step overhead, a known analytic cost (synthetic ground truth).
- :mod:`.simulator` — event-driven replicas + global scheduler + KV ledger driving the serving
  engine's own :class:`~mlsys24.serving.Scheduler`; :func:`run_engine` logs the real engine.
- :mod:`.search` — Vidur-Search: capacity under a scheduling-delay SLO, QPS/$, Pareto.
- :mod:`.traces` — chat / arxiv / code-shaped synthetic traces.
"""

from .predictor import (
                        AnalyticCost,
                        ConstantCost,
                        OperatorCost,
                        OperatorModels,
                        ReplayCost,
                        StepShape,
                        fit_operator_models,
                        fit_overhead,
                        synthetic_profile,
                        weighted_error,
)
from .profile import ALL_OPS, TOKEN_OPS, ProfileGrid, profile_operators, read_csv, tp_shard, write_csv
from .search import SearchConfig, capacity, pareto, scheduler_config, search
from .simulator import (
                        EngineRun,
                        RecordingScheduler,
                        ReplicaConfig,
                        SimResult,
                        Simulator,
                        kv_blocks_for,
                        latency_summary,
                        plan_rows,
                        run_engine,
)
from .traces import TRACE_STATS, make_trace, scale_arrivals

__all__ = [
    "ALL_OPS", "TOKEN_OPS", "TRACE_STATS", "AnalyticCost", "ConstantCost", "EngineRun", "OperatorCost",
    "OperatorModels", "ProfileGrid", "RecordingScheduler", "ReplayCost", "ReplicaConfig", "SearchConfig",
    "SimResult", "Simulator", "StepShape", "capacity", "fit_operator_models", "fit_overhead", "kv_blocks_for",
    "latency_summary", "make_trace", "pareto", "plan_rows", "profile_operators", "read_csv", "run_engine",
    "scale_arrivals",
    "scheduler_config", "search", "synthetic_profile", "tp_shard", "weighted_error", "write_csv",
]
