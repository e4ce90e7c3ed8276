"""Nibble packing (AWQ interleaved and plain order) and the AWQ int4 layout."""

import pytest
import torch

from mlsys24.quant.pack import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    awq_pack,
    awq_unpack,
    dequantize_awq,
    dequantize_gemv,
    gemv_repack,
    gemv_unpack,
    pack_int4,
    unpack_int4,
)
from mlsys24.quant.quantizer import fake_quant, pad_cols


@pytest.mark.parametrize("order", ["awq", "linear"])
@pytest.mark.parametrize("shape", [(1, 8), (7, 16), (83, 128), (130, 40)])
def test_pack_unpack_round_trip(order, shape):
    g = torch.Generator().manual_seed(shape[0])
    q = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    p = pack_int4(q, order)
    assert p.dtype == torch.int32 and p.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_int4(p, order), q)


def test_awq_nibble_order_is_the_official_interleave():
    # column j of a pack of 8 sits in nibble AWQ_REVERSE_ORDER[j]; nibble i holds column AWQ_ORDER[i]
    q = torch.arange(8, dtype=torch.uint8)[None]                # columns 0..7 hold values 0..7
    word = int(pack_int4(q, "awq")[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [AWQ_ORDER.index(j) for j in range(8)] == list(AWQ_REVERSE_ORDER)
    assert int(pack_int4(q, "linear")[0, 0]) == 0x76543210
    # the sign bit: value 15 in nibble 7 makes a negative int32 and still round-trips
    top = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    assert int(pack_int4(top, "awq")[0, 0]) < 0 and torch.equal(unpack_int4(pack_int4(top)), top)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 8), 16))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(1, 7))


@pytest.mark.parametrize("N,K,G", [(64, 128, 64), (83, 127, 64), (8, 256, 128), (130, 130, 32)])
def test_awq_layout_shapes_and_values(N, K, G):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g)
    p = awq_pack(w, 4, G)
    Kp, Np = -(-K // G) * G, -(-N // 8) * 8
    assert p["qweight"].shape == (Kp, Np // 8) and p["qweight"].dtype == torch.int32
    assert p["qzeros"].shape == (Kp // G, Np // 8) and p["qzeros"].dtype == torch.int32
    assert p["scales"].shape == (Kp // G, Np) and p["scales"].dtype == torch.float16
    q, zero, delta = awq_unpack(p["qweight"], p["qzeros"], p["scales"])
    assert q.shape == (Np, Kp) and int(q.max()) <= 15
    # dequantized = RTN of the (zero-padded) weight up to the fp16 rounding of the stored step
    w_hat = dequantize_awq(p["qweight"], p["qzeros"], p["scales"], N, K)
    ref = fake_quant(pad_cols(w, G), 4, G)[:, :K]
    step = delta.max().item()
    assert w_hat.shape == (N, K)
    # the fp16 step can move a value across a rounding boundary: at most one step, rarely
    assert (w_hat - ref).abs().max().item() <= 1.01 * step
    assert ((w_hat - ref).abs() < 1e-3).float().mean().item() > 0.95
    assert (w_hat - w).abs().max().item() <= 0.51 * step + 1e-3


@pytest.mark.parametrize("N,K,G", [(64, 128, 64), (83, 127, 64), (7, 256, 128), (130, 130, 32), (5, 16, 16)])
def test_gemv_repack_round_trip(N, K, G):
    # AWQ layout -> K-major GEMV layout: the same integers, steps and zero points, only moved
    g = torch.Generator().manual_seed(N * K)
    p = awq_pack(torch.randn(N, K, generator=g), 4, G)
    t = gemv_repack(p["qweight"], p["qzeros"], p["scales"], N)
    Kp = -(-K // G) * G
    assert t["qweight_t"].shape == (N, Kp // 8) and t["qweight_t"].dtype == torch.int32
    assert t["scales_t"].shape == t["zeros_t"].shape == (N, Kp // G) and t["zeros_t"].dtype == torch.uint8
    q, zero, delta = awq_unpack(p["qweight"], p["qzeros"], p["scales"])
    assert torch.equal(gemv_unpack(t["qweight_t"], G), q[:N])
    assert torch.equal(t["zeros_t"].float(), zero[:N]) and torch.equal(t["scales_t"].float(), delta[:N])
    assert torch.equal(dequantize_gemv(**t, in_features=K), dequantize_awq(p["qweight"], p["qzeros"], p["scales"], N, K))


def test_gemv_nibble_layout():
    # nibble i of word c (group of G = 16, W = 2 words) holds channel (i % 4) * 2W + 2c + i // 4
    G, W = 16, 2
    q = (torch.arange(G) % 16).to(torch.uint8)[None]             # channel k holds value k
    t = gemv_repack(*(awq_pack_from_ints(q, G)), 1)
    words = [int(w) & 0xFFFFFFFF for w in t["qweight_t"][0]]
    for c, word in enumerate(words):
        for i in range(8):
            assert (word >> (4 * i)) & 0xF == (i % 4) * 2 * W + 2 * c + i // 4


def awq_pack_from_ints(q: torch.Tensor, G: int):
    """AWQ tensors holding the integers ``q [N, K]`` with zero point 0 and step 1."""
    N, K = q.shape
    Np = -(-N // 8) * 8
    qp = torch.zeros(Np, K, dtype=torch.uint8)
    qp[:N] = q
    qweight = pack_int4(qp.t().contiguous(), "awq")
    qzeros = pack_int4(torch.zeros(K // G, Np, dtype=torch.uint8), "awq")
    return qweight, qzeros, torch.ones(K // G, Np, dtype=torch.float16)
