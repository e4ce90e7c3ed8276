"""Weight quantization shared by the papers: group-wise INT-N, nibble packing, AWQ, W4A16 kernels.

- :mod:`.quantizer` — asymmetric (zero point) or symmetric group quantization along the input
  dimension, ``quantize`` / ``dequantize`` / ``fake_quant`` (round-to-nearest, RTN).
- :mod:`.pack` — 4-bit nibble packing into int32 in the AWQ ("GEMM") interleaved order or in plain
  order, and the AWQ int4 tensor layout ``qweight / qzeros / scales``.
- :mod:`.awq` — AWQ (Lin et al., MLSys 2024): activation statistics by hooks, the per-channel scale
  search ``s = s_x^alpha``, folding ``s`` into the previous op, weight-clipping search, the
  salient-channel probes (paper Table 1/2), drivers for the Llama decoder and the MiniLM encoder.
- :mod:`.calib` — calibration windows (train split) and docstring texts from the committed corpus.
- :mod:`.qlinear` — ``QuantLinear`` (packed int4 weights; Triton kernel on GPU, dequantize+matmul on
  CPU) and AWQ-format checkpoint save/load.
- :mod:`.w4a16` — Triton W4A16 GEMM/GEMV (dequantize in registers, fp32 accumulation, split-K) and
  ``w4a16_ref``. Imported lazily (needs Triton).
- :mod:`.bench` — the GPU benchmark (``python -m mlsys24.bench awq``).

This package imports torch only; Triton is imported when a kernel is first used.
"""

from .pack import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    awq_pack,
    awq_unpack,
    pack_int4,
    unpack_int4,
)
from .quantizer import dequantize, fake_quant, quant_params, quantize

__all__ = [
    "AWQ_ORDER", "AWQ_REVERSE_ORDER", "awq_pack", "awq_unpack", "dequantize", "fake_quant", "pack_int4",
    "quant_params", "quantize", "unpack_int4",
]
