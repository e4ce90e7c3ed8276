"""Group quantization: the integer grid, RTN, padding, symmetric mode."""

import pytest
import torch

from mlsys24.quant.quantizer import dequantize, fake_quant, pad_cols, quant_params, quantize


def _w(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g) ** 2


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_fake_quant_is_quantize_then_dequantize(sym, bits, group):
    w = _w()
    q, d, z = quantize(w, bits, group, sym=sym)
    assert torch.equal(dequantize(q, d, z, group), fake_quant(w, bits, group, sym=sym))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi


@pytest.mark.parametrize("bits", [3, 4])
def test_asymmetric_grid_covers_min_and_max(bits):
    # with a zero point, the group's max and min are within delta/2 of a grid point
    w = _w(cols=128)
    d, _ = quant_params(w, bits, 64)
    err = (fake_quant(w, bits, 64) - w).abs().reshape(w.shape[0], 2, 64)
    assert bool((err <= d[..., None] * 0.5 + 1e-6).all())
    # and the error grows as bits shrink
    assert (fake_quant(w, 3, 64) - w).pow(2).mean() > (fake_quant(w, 4, 64) - w).pow(2).mean()


def test_fake_quant_idempotent_and_dtype():
    w = _w().half()
    wq = fake_quant(w, 4, 64)
    assert wq.dtype == torch.float16 and wq.shape == w.shape
    w32 = _w()
    once = fake_quant(w32, 3, 64)
    assert torch.allclose(fake_quant(once, 3, 64), once, atol=1e-6)


def test_group_must_divide_columns():
    with pytest.raises(ValueError, match="pad_cols"):
        fake_quant(torch.randn(4, 100), 4, 64)
    assert pad_cols(torch.randn(4, 100), 64).shape == (4, 128)
