"""Punica (Chen et al., MLSys 2024): multi-tenant LoRA serving.

- :mod:`.sgmv` — (``from mlsys24.lora.sgmv import sgmv``: the op itself is not re-exported here, so
  the name keeps meaning the module) the SGMV (segmented gather matrix-vector) and BGMV Triton kernels, Loop /
  Gather-BMM / segmented-PyTorch baselines and float32 references.
- :mod:`.registry` — adapters in host memory, copied into device slots on demand (LRU); PEFT loading.
- :mod:`.backends` — LoRA backends of the serving engine: ``loop | gather_bmm | segmented | bgmv | sgmv``.
- :mod:`.engine` — mixed-adapter continuous batching (:class:`PunicaScheduler`), the
  same-adapter-only baseline (:class:`SameAdapterScheduler`), LoRA on the CUDA-graph decode path
  (:class:`LoRAEngine`).
- :mod:`.workload` — Punica's popularity models (distinct, uniform, skewed, identical) and lengths.
- :mod:`.cluster` — the consolidating cluster scheduler in an event simulator (vs round-robin and
  least-loaded), with step times fitted on measured engine steps.
- :mod:`.bench` — the GPU benchmark (``python -m mlsys24.bench punica``).
"""

from .backends import BACKENDS, BGMVBackend, GatherBMMBackend, LoopPoolBackend, SGMVBackend, make_backend
from .cluster import POLICIES, ClusterSim, GPUSpec, SimRequest, SimResult, StepModel
from .engine import LoRAEngine, PunicaScheduler, SameAdapterScheduler, punica_config
from .registry import AdapterRegistry, load_peft_adapter
from .sgmv import (
    Segments,
    bgmv_ref,
    lora_bgmv,
    lora_gather_bmm,
    lora_loop,
    lora_ref,
    lora_segmented_torch,
    lora_sgmv,
    segments_from_indptr,
    segments_from_slots,
    sgmv_expand,
    sgmv_ref,
    sgmv_shrink,
)
from .workload import (
    POPULARITIES,
    popularity_segments,
    punica_lengths,
    punica_requests,
    ramp_arrivals,
    request_adapter_ids,
)

__all__ = [
    "BACKENDS", "POLICIES", "POPULARITIES", "AdapterRegistry", "BGMVBackend", "ClusterSim", "GPUSpec",
    "GatherBMMBackend", "LoRAEngine", "LoopPoolBackend", "PunicaScheduler", "SGMVBackend", "SameAdapterScheduler",
    "Segments", "SimRequest", "SimResult", "StepModel", "bgmv_ref", "load_peft_adapter", "lora_bgmv",
    "lora_gather_bmm", "lora_loop", "lora_ref", "lora_segmented_torch", "lora_sgmv", "make_backend",
    "popularity_segments", "punica_config", "punica_lengths", "punica_requests", "ramp_arrivals",
    "request_adapter_ids", "segments_from_indptr", "segments_from_slots", "sgmv_expand", "sgmv_ref",
    "sgmv_shrink",
]
