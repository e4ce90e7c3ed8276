"""Multi-tenant LoRA serving on the shared engine: Punica's batching and the same-adapter baseline.

- :class:`PunicaScheduler` — mixed-adapter continuous batching (Punica's ``bench_textgen_lora.py``):
  any policy of :class:`~mlsys24.serving.Scheduler`, with the step's rows sorted by adapter id so
  that SGMV segments are contiguous (the paper re-sorts the working set after every step). Use it
  with ``max_new_per_step=1`` for Punica's "admit at most one new request per iteration".
- :class:`SameAdapterScheduler` — the baselines' restriction (HF PEFT, DeepSpeed, FasterTransformer
  and vLLM in Punica's harness): a batch only holds requests of one adapter, taken as a run of
  *consecutive* requests of the FIFO queue with the same adapter (no regrouping). ``static``: the
  batch runs to completion before the next forms (HF/DeepSpeed/FT); otherwise requests of the running
  adapter may join as others finish (vLLM-like continuous batching).
- :class:`LoRAEngine` — the engine with LoRA also on the decode fast path: with a backend that
  supports static buffers (``sgmv``, ``bgmv``, ``gather_bmm``), pure-decode steps run through
  :class:`~mlsys24.serving.graph.DecodeGraphs` (CUDA graphs on GPU) with the LoRA kernels captured
  inside the graph; the adapter slots / segment tiles are refilled before each replay.
"""

from __future__ import annotations

from ..serving.engine import Engine
from ..serving.graph import BATCH_BUCKETS
from ..serving.kv_policy import KVPolicy
from ..serving.scheduler import Scheduler, SchedulerConfig, StepPlan

__all__ = ["PunicaScheduler", "SameAdapterScheduler", "LoRAEngine", "punica_config"]


def punica_config(max_batch_size: int = 32, **overrides) -> SchedulerConfig:
    """Punica's serving loop: continuous batching, prefill batched with decodes, one admission per step."""
    kw = {"max_batch_size": max_batch_size, "max_new_per_step": 1, **overrides}
    return SchedulerConfig("orca", **kw)


class PunicaScheduler(Scheduler):
    """Mixed-adapter continuous batching; rows of every step sorted by adapter id (stable)."""

    def schedule(self, ledger) -> StepPlan:
        plan = super().schedule(ledger)
        plan.rows.sort(key=lambda r: r[0].request.adapter_id)
        return plan


class SameAdapterScheduler(Scheduler):
    """Only consecutive requests of one adapter share a batch.

    ``static=True`` (default) uses the ``static`` policy (a batch runs to completion); False keeps
    the configured policy (``orca``: continuous, but only requests of the running adapter join).
    """

    def __init__(self, config: SchedulerConfig | str = "static", *, static: bool = True, **overrides):
        super().__init__(config, **overrides)
        if static and self.config.policy != "static":
            from dataclasses import replace

            self.config = replace(self.config, policy="static")

    def schedule(self, ledger) -> StepPlan:
        key = None
        if self.running:
            key = self.running[0].request.adapter_id
        elif self.swapped:
            key = self.swapped[0].request.adapter_id
        elif self.waiting:
            key = self.waiting[0].request.adapter_id
        if key is None:
            return super().schedule(ledger)
        n = 0
        for s in self.waiting:
            if s.request.adapter_id != key:
                break
            n += 1
        with self.only_visible(n):
            return super().schedule(ledger)


class LoRAEngine(Engine):
    """:class:`~mlsys24.serving.Engine` whose decode fast path (CUDA graphs) also carries LoRA.

    Same constructor as the engine. Only differs when ``decode_graphs=True`` and the LoRA backend has
    ``supports_static``: then every pure-decode step takes the fast path with the LoRA context on
    static buffers (rows padded to the graph's batch bucket get adapter -1), so graphs always contain
    the LoRA kernels and a replay reads the current step's slots and segments.
    """

    def _static_lora(self) -> bool:
        return self.lora is not None and getattr(self.lora.backend, "supports_static", False)

    def _fast_decode_ok(self, rows) -> bool:
        if self.decode_graphs is None or type(self.kv_policy) is not KVPolicy:
            return False
        if not all(n == 1 and s.pending == 1 for s, n in rows):
            return False
        return self.lora is None or self._static_lora() or not self.lora.active_for(rows)

    def _bucket(self, n: int) -> int:
        for b in BATCH_BUCKETS:
            if n <= b <= self.decode_graphs.max_batch:
                return b
        return n

    def _forward(self, rows) -> None:
        if self._static_lora() and self._fast_decode_ok(rows):
            B = self._bucket(len(rows))
            ids = [s.request.adapter_id for s, _ in rows] + [-1] * (B - len(rows))
            backend = self.lora.backend
            backend.set_static(self.lora, ids)
            try:
                super()._forward(rows)
            finally:
                backend.clear_static(self.lora)
            return
        super()._forward(rows)
