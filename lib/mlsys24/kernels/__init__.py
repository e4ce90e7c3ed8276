"""Kernels shared by the papers: decode attention (split-KV, sync and unified-max async), flat GEMM,
GEMV and the heuristic GEMM dispatcher (FlashDecoding++), and the RMSNorm / RoPE row kernels the model
takes on a GPU.

Submodules (``decode_attention``, ``flat_gemm``, ``dispatch``, ``norm``) import Triton; this package does not
import them, so ``import mlsys24.kernels`` stays cheap. Under ``TRITON_INTERPRET=1`` (CPU) it also applies a small
compatibility fix to Triton's interpreter (see :func:`_interpreter_numpy_compat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

__all__ = ["no_overflow_checks", "pdl_supported"]   # kernels: import from the submodules (decode_attention, flat_gemm, dispatch)


def pdl_supported(device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch (``launch_pdl=True`` with
    ``tl.extra.cuda.gdc_*``): a CUDA GPU of compute capability 9.0 or newer, not the CPU interpreter."""
    import torch

    return (os.environ.get("TRITON_INTERPRET") != "1" and getattr(device, "type", None) == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@contextlib.contextmanager
def no_overflow_checks():
    """Under the CPU interpreter (``TRITON_INTERPRET=1``), skip its int32-overflow assertions while
    the kernels launched inside run: they double the interpreter's cost, and compiled kernels never
    run them. No effect on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter as _interp

    b = _interp.interpreter_builder
    old = b.options
    b.options = dataclasses.replace(old, sanitize_overflow=False)
    try:
        yield
    finally:
        b.options = old


def _interpreter_numpy_compat() -> None:
    """Two fixes to Triton 3.6's CPU interpreter (no effect on compiled kernels):

    - it turns a scalar tensor into a Python int with ``int(array)`` on a one-element array (used by
      ``range(start, end)`` with run-time bounds), which NumPy >= 2.4 refuses: re-point ``__index__``
      at the array's single element;
    - its ``tl.dot`` multiplies bfloat16 operands as their raw uint16 bit patterns: widen them to
      float32 first (bf16 products are exact in fp32, so this is what the tensor cores compute).
    """
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - no triton
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_mlsys24_compat", False):
        return

    def _patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patched._mlsys24_compat = True
    _interp._patch_lang_tensor = _patched

    import numpy as np
    import triton.language as tl

    builder_cls = _interp.InterpreterBuilder
    orig_dot = builder_cls.create_dot

    def _widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_compat()

