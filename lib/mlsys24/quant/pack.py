"""4-bit nibble packing and the AWQ int4 checkpoint layout.

Eight 4-bit values share one int32 ("nibble" i = bits 4i..4i+3). Along the packed dimension, the
int32 at packed index ``c`` holds the eight values ``8c .. 8c+7``; which value sits in which nibble
is the *order*:

- ``order="awq"`` (the AWQ "GEMM" format of llm-awq's original ``WQLinear``, AutoAWQ's
  ``WQLinear_GEMM`` and vLLM's AWQ kernels): nibble ``i`` holds value ``8c + AWQ_ORDER[i]`` with
  ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``; equivalently value ``8c + j`` sits in nibble
  ``AWQ_REVERSE_ORDER[j] = (0, 4, 1, 5, 2, 6, 3, 7)[j]`` (= ``j // 2 + 4 * (j % 2)``). The
  interleave lets the CUDA kernel turn one int32 into four fp16 pairs with two shifts and masks.
- ``order="linear"``: nibble ``i`` holds value ``8c + i`` (plain little-endian nibbles).

AWQ layout of one ``Linear(in=K, out=N)`` with group size G (``awq_pack``)::

    qweight  int32 [K, N/8]      packed along N (output channels), AWQ order
    qzeros   int32 [K/G, N/8]    zero points, packed the same way
    scales   fp16  [K/G, N]      step of each (group, output channel)
    w[n, k]  = (q[k, n] - z[k // G, n]) * scales[k // G, n]

(Newer llm-awq/TinyChat releases use a different, kernel-specific interleave with fp16
``scaled_zeros``; this module implements the GEMM layout that AutoAWQ/vLLM/transformers load.)

GEMV layout (``gemv_repack``, made once at load time from the AWQ tensors, like TinyChat's offline
repacking for its batch-1 kernel): K-major rows, so one output channel's weights are contiguous::

    qweight_t int32 [N, Kp/8]    row n: the Kp/G groups of W = G/8 words each
    scales_t  fp16  [N, Kp/G]    step s of each (output channel, group)
    zeros_t   uint8 [N, Kp/G]    zero point z:  w = (q - z) * s

``gemv_repack(..., layout="group")`` stores the same words group-major (``[Kp/G, N, G/8]``, steps
and zeros ``[Kp/G, N]``) and returns strided views with the shapes above (``qweight_t`` as
``[N, Kp/G, G/8]``): one group of consecutive channels is then one contiguous block.

Inside a group, nibble ``i`` of word ``c`` holds input channel ``g*G + (i % 4)*2W + 2c + i // 4``:
nibbles i and i+4 (the low and high half of ``(word >> 4i) & 0x000F000F``, one LOP3 away from a
pair of fp16 numbers) hold two *adjacent* channels, so they meet one aligned fp16 pair of x, and the
pairs of a nibble position over the W words are contiguous in x (vector loads, no gather).
"""

from __future__ import annotations

import torch

from .quantizer import pad_cols, quantize

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "pack_int4", "unpack_int4", "awq_pack", "awq_unpack",
           "dequantize_awq", "gemv_repack", "gemv_unpack", "dequantize_gemv"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i holds value 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # value 8c + j sits in nibble AWQ_REVERSE_ORDER[j]


def _order(order: str) -> tuple[int, ...]:
    if order == "awq":
        return AWQ_ORDER
    if order == "linear":
        return tuple(range(8))
    raise ValueError(f"order must be 'awq' or 'linear', got {order!r}")


def pack_int4(q: torch.Tensor, order: str = "awq") -> torch.Tensor:
    """Pack integers ``q [R, C]`` in [0, 15] (C a multiple of 8) along C into int32 ``[R, C/8]``."""
    if q.dim() != 2 or q.shape[1] % 8:
        raise ValueError(f"pack_int4 needs [R, C] with C % 8 == 0, got {tuple(q.shape)}")
    qi = q.to(torch.int64)
    if bool((qi < 0).any()) or bool((qi > 15).any()):
        raise ValueError("pack_int4: values must lie in [0, 15]")
    qi = qi.reshape(q.shape[0], -1, 8)                        # [R, C/8, 8]
    packed = torch.zeros(qi.shape[:2], dtype=torch.int64, device=q.device)
    for nib, j in enumerate(_order(order)):
        packed |= qi[..., j] << (4 * nib)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)   # two's complement into int32
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor, order: str = "awq") -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[R, C/8]`` -> uint8 ``[R, C]``."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*p.shape, 8, dtype=torch.uint8, device=p.device)
    for nib, j in enumerate(_order(order)):
        out[..., j] = ((p >> (4 * nib)) & 0xF).to(torch.uint8)
    return out.reshape(p.shape[0], -1)


def awq_pack(weight: torch.Tensor, bits: int = 4, group_size: int = 128, *, scale_dtype=torch.float16
             ) -> dict[str, torch.Tensor]:
    """Quantize ``weight [N, K]`` (a Linear's ``[out, in]``) and pack it in the AWQ layout.

    K is zero-padded to a multiple of ``group_size`` and N to a multiple of 8 (the padded rows and
    columns are zero weights); returns ``{"qweight", "qzeros", "scales"}`` plus nothing else. The
    stored scales are rounded to ``scale_dtype`` before the integers are computed, so dequantizing
    the stored tensors reproduces exactly the integers' grid.
    """
    if bits > 4:
        raise ValueError("the AWQ int4 layout stores at most 4 bits per value")
    N, K = weight.shape
    w = pad_cols(weight.float(), group_size)                         # [N, Kp]
    w = pad_cols(w.t(), 8).t()                                        # [Np, Kp]
    from .quantizer import quant_params

    delta, zero = quant_params(w, bits, group_size)
    delta = delta.to(scale_dtype).float()                            # the grid the checkpoint stores
    q, _, _ = quantize(w, bits, group_size, delta=delta, zero=zero)  # [Np, Kp]
    return {
        "qweight": pack_int4(q.t().contiguous(), "awq"),             # [Kp, Np/8]
        "qzeros": pack_int4(zero.t().to(torch.int16).contiguous(), "awq"),   # [Kp/G, Np/8]
        "scales": delta.t().to(scale_dtype).contiguous(),            # [Kp/G, Np]
    }


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [Np, Kp] uint8, zero [Np, Kp/G] float32, delta [Np, Kp/G] float32)`` in ``[out, in]`` form."""
    q = unpack_int4(qweight, "awq").t()
    zero = unpack_int4(qzeros, "awq").t().float()
    return q, zero, scales.t().float()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   out_features: int | None = None, in_features: int | None = None) -> torch.Tensor:
    """The float32 weight ``[N, K]`` an AWQ-layout tensor triple stands for (padding sliced off)."""
    q, zero, delta = awq_unpack(qweight, qzeros, scales)
    Np, Kp = q.shape
    G = Kp // zero.shape[1]
    w = ((q.float().reshape(Np, -1, G) - zero[..., None]) * delta[..., None]).reshape(Np, Kp)
    return w[: out_features or Np, : in_features or Kp]


def gemv_repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                out_features: int | None = None, *, layout: str = "row") -> dict[str, torch.Tensor]:
    """AWQ-layout tensors -> the GEMV layout ``{"qweight_t", "scales_t", "zeros_t"}`` (module docstring).

    The integers are moved, not requantized. Rows past ``out_features`` (the AWQ layout's padding
    of N to a multiple of 8) are dropped. ``layout="group"`` stores the same words group-major,
    ``[Kp/G, N, G/8]`` (and steps/zeros ``[Kp/G, N]``), and returns views with the row-major shapes
    ``qweight_t [N, Kp/G, G/8]``, ``scales_t``/``zeros_t [N, Kp/G]``: a tile of consecutive channels
    of one group is then one contiguous block (and its steps one contiguous row).
    """
    if layout not in ("row", "group"):
        raise ValueError(f"layout must be 'row' or 'group', got {layout!r}")
    t = _gemv_repack_rows(qweight, qzeros, scales, out_features)
    if layout == "row":
        return t
    N, n_groups = t["scales_t"].shape
    qw = t["qweight_t"].reshape(N, n_groups, -1)
    return {"qweight_t": qw.transpose(0, 1).contiguous().transpose(0, 1),
            "scales_t": t["scales_t"].t().contiguous().t(),
            "zeros_t": t["zeros_t"].t().contiguous().t()}


def _gemv_repack_rows(qweight, qzeros, scales, out_features):
    q, zero, delta = awq_unpack(qweight, qzeros, scales)          # [Np, Kp] uint8, [Np, Kp/G] x2
    N = out_features or q.shape[0]
    Kp = q.shape[1]
    G = Kp // zero.shape[1]
    if G % 8:
        raise ValueError(f"group size {G} must be a multiple of 8")
    W = G // 8
    # channel p*2W + 2c + h of a group -> word c, nibble p + 4h
    q = q[:N].reshape(N, Kp // G, 4, W, 2).permute(0, 1, 3, 4, 2).reshape(N, Kp)
    return {
        "qweight_t": pack_int4(q.contiguous(), "linear"),            # [N, Kp/8]
        "scales_t": delta[:N].to(scales.dtype).contiguous(),         # [N, Kp/G]
        "zeros_t": zero[:N].to(torch.uint8).contiguous(),            # [N, Kp/G]
    }


def gemv_unpack(qweight_t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`gemv_repack`'s integer permutation: ``q [N, Kp]`` uint8 in channel order."""
    qweight_t = qweight_t.reshape(qweight_t.shape[0], -1)     # (a group-major view: copied row-major)
    N, KW = qweight_t.shape
    W = group_size // 8
    q = unpack_int4(qweight_t, "linear").reshape(N, KW * 8 // group_size, W, 2, 4)
    return q.permute(0, 1, 4, 2, 3).reshape(N, KW * 8).contiguous()


def dequantize_gemv(qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                    in_features: int | None = None) -> torch.Tensor:
    """The float32 weight ``[N, K]`` a GEMV-layout triple stands for: ``w = (q - z) * s``."""
    qweight_t = qweight_t.reshape(qweight_t.shape[0], -1)
    N, KW = qweight_t.shape
    Kp = KW * 8
    n_groups = scales_t.shape[1]
    G = Kp // n_groups
    q = gemv_unpack(qweight_t, G).reshape(N, n_groups, G)
    w = (q.float() - zeros_t.float()[..., None]) * scales_t.float()[..., None]
    return w.reshape(N, Kp)[:, : in_features or Kp]
