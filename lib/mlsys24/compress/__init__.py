"""Layer-wise adaptive gradient compression (L-GreCo, MLSys 2024) for data-parallel training.

- :mod:`.compressors` — PowerSGD / Top-K / quantization with error feedback, and the layer-wise DDP
  communication hook that runs them and counts bytes.
- :mod:`.dp` — the dynamic program choosing per-layer parameters under an error budget (+ brute force).
- :mod:`.lgreco` — reference gradients, error tables, re-tuning consistent across workers, step-time model.
- :mod:`.train` — data-parallel training on torch.distributed (gloo on CPU, NCCL on GPUs).
- :mod:`.bench` — the GPU benchmark (``python -m mlsys24.bench lgreco``).
"""

from .compressors import (
    FAMILIES,
    CompressionState,
    PowerSGD,
    Quantizer,
    TopK,
    layerwise_compression_hook,
    make_compressor,
    orthogonalize,
    powersgd_allreduce_ref,
)
from .dp import brute_force, brute_force_real, discretise, solve
from .lgreco import ErrorTable, LGreCoTuner, LinkModel, error_table, plan, predict_step_s

__all__ = [
    "FAMILIES", "CompressionState", "PowerSGD", "Quantizer", "TopK", "layerwise_compression_hook",
    "make_compressor", "orthogonalize", "powersgd_allreduce_ref", "brute_force", "brute_force_real",
    "discretise", "solve", "ErrorTable", "LGreCoTuner", "LinkModel", "error_table", "plan", "predict_step_s",
]
