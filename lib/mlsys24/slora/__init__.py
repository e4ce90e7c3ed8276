"""S-LoRA (Sheng et al., MLSys 2024): serving thousands of concurrent LoRA adapters.

- :mod:`.pool` — Unified Paging: one slot pool (page = one token = H elements) shared by KV-cache
  tokens and adapter rows of any rank; :class:`UnifiedAllocator` with exact occupancy by owner;
  :func:`kv_capacity_trace` (unified vs partitioned vs contiguous accounting).
- :mod:`.adapters` — adapters packed in host memory, paged into the pool on demand (side CUDA
  stream on a GPU), LRU eviction of idle adapters (:class:`AdapterPager`).
- :mod:`.mbgmv` — heterogeneous-rank MBGMM (prefill) / MBGMV (decode) Triton kernels reading
  scattered pool slots, the padded-BMM baseline, the float32 reference, gathered-bytes counting.
- :mod:`.graph` — decode steps replayed from CUDA graphs that hold the step's LoRA kernels
  (:class:`LoRADecodeGraphs`; static index buffers, two host-to-device copies per step).
- :mod:`.engine` — the shared serving engine with the unified pool (:class:`SLoRAEngine`), the
  baselines (``no_unify``, ``bmm``, ``peft``; :class:`MergedServer` for merged copies), the trace
  generator of S-LoRA's benchmarks and :func:`serve` (throughput over a fixed window, SLO metrics).
- :mod:`.tp` — S-LoRA's tensor-parallel LoRA layout (rank-sized all-gather / all-reduce), gloo-tested.
- :mod:`.bench` — the GPU benchmark (``python -m mlsys24.slora.bench``).
"""

from .adapters import AdapterPager, HostAdapter, layer_index, pack_adapter
from .engine import (
    SYSTEMS,
    MergedServer,
    SLoRABackend,
    SLoRAEngine,
    SLoRAScheduler,
    merge_adapter,
    model_bytes,
    serve,
    slora_trace,
    slot_bytes,
)
from .graph import LoRADecodeGraphs
from .mbgmv import (
    PoolTables,
    gathered_elements,
    lora_mbgmm,
    lora_mbgmv,
    lora_padded_bmm,
    lora_padded_bmm_rows,
    lora_pool_torch,
    make_tables,
    mbgmm_ref,
)
from .pool import UnifiedAllocator, adapter_slots, kv_capacity_trace

__all__ = [
    "SYSTEMS", "AdapterPager", "HostAdapter", "LoRADecodeGraphs", "MergedServer", "PoolTables", "SLoRABackend", "SLoRAEngine",
    "SLoRAScheduler", "UnifiedAllocator", "adapter_slots", "gathered_elements", "kv_capacity_trace",
    "layer_index", "lora_mbgmm", "lora_mbgmv", "lora_padded_bmm", "lora_padded_bmm_rows", "lora_pool_torch", "make_tables",
    "mbgmm_ref", "merge_adapter", "model_bytes", "pack_adapter", "serve", "slora_trace", "slot_bytes",
]
