"""Group-wise uniform quantization of a weight matrix along its input dimension.

A weight ``w [rows, cols]`` (rows = output channels, cols = input channels) is cut into groups of
``group_size`` consecutive input channels per row. Asymmetric INT-N with a zero point (AWQ's
``pseudo_quantize_tensor``, GPTQ, Atom), per group::

    delta = max(max(w) - min(w), 1e-5) / (2^N - 1)
    z     = clamp(round(-min(w) / delta), 0, 2^N - 1)
    q     = clamp(round(w / delta) + z, 0, 2^N - 1)            # the stored integer, in [0, 2^N - 1]
    w_hat = (q - z) * delta                                     # what the matmul sees

Symmetric INT-N (``sym=True``): ``delta = max|w| / (2^(N-1) - 1)``, ``z = 0``,
``q = clamp(round(w / delta), -2^(N-1), 2^(N-1) - 1)``.

``group_size <= 0`` means one group per row. ``cols`` must be a multiple of ``group_size`` (pad
the weight first: :func:`pad_cols`). Arithmetic is float32 whatever the input dtype, so that
round-to-nearest (:func:`fake_quant`) is bit-reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["quant_params", "quantize", "dequantize", "fake_quant", "pad_cols", "n_levels"]


def n_levels(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    return 2 ** bits


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # [rows, cols] -> [rows, n_groups, group_size] (float32)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [rows, cols], got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = cols if group_size <= 0 else group_size
    if cols % g:
        raise ValueError(f"cols={cols} is not a multiple of group_size={g} (pad with pad_cols first)")
    return w.float().reshape(rows, cols // g, g)


def pad_cols(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the columns of ``w [rows, cols]`` up to a multiple of ``multiple``."""
    extra = (-w.shape[1]) % multiple
    return F.pad(w, (0, extra)) if extra else w


def quant_params(w: torch.Tensor, bits: int, group_size: int, *, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group step ``delta`` and zero point ``z`` (float32, integer-valued), each ``[rows, n_groups]``."""
    wg = _grouped(w, group_size)
    if sym:
        qmax = n_levels(bits) // 2 - 1
        delta = wg.abs().amax(-1).clamp(min=1e-5) / max(qmax, 1)
        return delta, torch.zeros_like(delta)
    qmax = n_levels(bits) - 1
    mx, mn = wg.amax(-1), wg.amin(-1)
    delta = (mx - mn).clamp(min=1e-5) / qmax
    zero = torch.round(-mn / delta).clamp(0, qmax)
    return delta, zero


def quantize(w: torch.Tensor, bits: int, group_size: int, *, sym: bool = False,
             delta: torch.Tensor | None = None, zero: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, delta, zero)``: integers ``q [rows, cols]`` (int16; [0, 2^N-1], or signed if ``sym``),
    ``delta, zero [rows, n_groups]`` float32. Pass ``delta``/``zero`` to quantize with given ones."""
    wg = _grouped(w, group_size)
    if delta is None:
        delta, zero = quant_params(w, bits, group_size, sym=sym)
    elif zero is None:
        zero = torch.zeros_like(delta)
    delta, zero = delta.float(), zero.float()
    if sym:
        lo, hi = -(n_levels(bits) // 2), n_levels(bits) // 2 - 1
    else:
        lo, hi = 0, n_levels(bits) - 1
    q = torch.clamp(torch.round(wg / delta[..., None]) + zero[..., None], lo, hi)
    return q.reshape(w.shape).to(torch.int16), delta, zero


def dequantize(q: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - z) * delta`` per group, float32 ``[rows, cols]``."""
    rows, cols = q.shape
    g = cols if group_size <= 0 else group_size
    qg = q.float().reshape(rows, cols // g, g)
    return ((qg - zero.float()[..., None]) * delta.float()[..., None]).reshape(rows, cols)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, *, sym: bool = False) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` (the RTN baseline); same shape and dtype.

    The same arithmetic as :func:`quant_params` + :func:`quantize` + :func:`dequantize`, fused with
    in-place ops (this runs inside AWQ's search loops)."""
    wg = _grouped(w, group_size)
    if sym:
        qmax = n_levels(bits) // 2 - 1
        delta = wg.abs().amax(-1, keepdim=True).clamp_(min=1e-5).div_(max(qmax, 1))
        q = (wg / delta).round_().clamp_(-(qmax + 1), qmax)
        return q.mul_(delta).reshape(w.shape).to(w.dtype)
    qmax = n_levels(bits) - 1
    mn, mx = torch.aminmax(wg, dim=-1, keepdim=True)
    delta = (mx - mn).clamp_(min=1e-5).div_(qmax)
    zero = (-mn / delta).round_().clamp_(0, qmax)
    q = (wg / delta).round_().add_(zero).clamp_(0, qmax)
    return q.sub_(zero).mul_(delta).reshape(w.shape).to(w.dtype)
