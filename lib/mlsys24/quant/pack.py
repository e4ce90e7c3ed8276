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
Values wider than 4 bits are rejected; 2/3-bit integers are stored in nibbles unchanged.
"""

from __future__ import annotations

import torch

from .quantizer import pad_cols, quantize

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "pack_int4", "unpack_int4", "awq_pack", "awq_unpack",
           "dequantize_awq"]

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
