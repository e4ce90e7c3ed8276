"""The shared serving engine: paged KV cache, continuous batching, multi-LoRA and KV-policy hooks.

- :class:`Engine` — iteration-level batching over :class:`~mlsys24.models.PagedKVCache`.
- :class:`Scheduler`, :class:`SchedulerConfig`, :data:`PRESETS` — the policies (orca, vllm,
  sarathi, static; preemption by recompute or swap), shared with the Vidur simulator.
- :mod:`.lora` — per-token adapter ids and the LoRA backend interface (Punica, S-LoRA fill it in).
- :class:`KVPolicy` — eviction / reuse hooks (Keyformer, Prompt Cache).
- :mod:`.workload` — seeded arrivals, lengths, adapter popularity; :mod:`.metrics` — TTFT, TPOT, ...
"""

from .engine import Engine, PoolLedger
from .kv_policy import KVPolicy
from .lora import (
    AdapterWeights,
    LoopBackend,
    LoRABackend,
    LoRAContext,
    LoRALinear,
    attach_lora,
    random_adapter,
)
from .metrics import RequestMetrics, StepRecord, request_metrics, summarize
from .request import Request, SeqStatus, Sequence
from .scheduler import PRESETS, CannotSchedule, CountingLedger, KVLedger, Scheduler, SchedulerConfig, StepPlan
from .workload import WorkloadSpec, adapter_ids, arrival_times, make_requests, sample_lengths

__all__ = [
    "PRESETS", "AdapterWeights", "CannotSchedule", "CountingLedger", "Engine", "KVLedger", "KVPolicy",
    "LoRABackend", "LoRAContext", "LoRALinear", "LoopBackend", "PoolLedger", "Request", "RequestMetrics",
    "Scheduler", "SchedulerConfig", "SeqStatus", "Sequence", "StepPlan", "StepRecord", "WorkloadSpec",
    "adapter_ids", "arrival_times", "attach_lora", "make_requests", "random_adapter", "request_metrics",
    "sample_lengths", "summarize",
]
