"""CKKS (TenSEAL) evaluation of PAFs: security of every context, encrypted == float64 twin, cost accounting."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys24.privacy.ckks import (
    CHAIN,
    POLY_DEGREE,
    LevelCosts,
    LevelTracer,
    NumpyOps,
    eval_relu,
    eval_sign,
    max_depth,
    model_latency,
    pack_conv_taps,
    security_bits,
    trace_relu,
)
from mlsys24.privacy.paf import PAF_FAMILIES, components_of, paf_info, paf_numpy, relu_form_numpy

CKKS_TOL = 1e-2          # max abs error budget at scale 2^40 and depth <= 16 (observed ~1e-5)


def test_security_table():
    assert security_bits(POLY_DEGREE, CHAIN) == 128
    assert sum(CHAIN) == 880 and max_depth(CHAIN) == 19
    assert security_bits(16384, CHAIN) == 0                    # the chain is too long for N = 16384
    assert security_bits(8192, [60, 40, 40, 60]) == 128
    assert security_bits(8192, [40, 40]) == 256


@pytest.mark.parametrize("paf", list(PAF_FAMILIES))
@pytest.mark.parametrize("basis", ["chebyshev", "monomial"])
def test_numpy_twin_equals_paf(paf, basis):
    """The op sequence the encrypted evaluator runs computes the PAF (checked on plain float64 arrays)."""
    x = np.linspace(-1, 1, 1001)
    comps = components_of(paf)
    # deg27's monomial coefficients reach 1e8: any float64 evaluation of it carries ~1e-8 rounding
    tol = 1e-9 if paf != "deg27" else (1e-7 if basis == "chebyshev" else 1e-4)
    np.testing.assert_allclose(eval_sign(NumpyOps(), x, comps, basis=basis), paf_numpy(x, comps), atol=tol)
    np.testing.assert_allclose(eval_relu(NumpyOps(), x, comps, basis=basis), relu_form_numpy(x, comps), atol=tol)


@pytest.mark.parametrize("paf", list(PAF_FAMILIES))
def test_trace_matches_cost_accounting(paf):
    """Depth and ciphertext-product count of the traced circuit equal the card's accounting (paf_info)."""
    info = paf_info(paf)
    for basis in ("chebyshev", "monomial"):
        tr = trace_relu(components_of(paf), basis=basis)
        assert tr.count("ct_mul") == info.ct_mults_relu
        assert tr.ops[-1].depth == info.depth_relu
        assert tr.count("pt_mul") == info.scalar_mults_relu
        assert info.depth_relu <= max_depth()


def test_degree_depth_latency_monotone():
    costs = LevelCosts({"ct_mul": {0: 0.5, 18: 0.05}, "pt_mul": {0: 0.05, 18: 0.01}, "add": {0: 1e-3},
                        "add_const": {0: 0.02}})
    order = ["f1g2", "f2g2", "f2g3", "deg27"]
    depth = [paf_info(p).depth_relu for p in order]
    lat = [model_latency(trace_relu(components_of(p)), costs) for p in order]
    assert depth == sorted(depth) and lat == sorted(lat)
    assert costs.cost("ct_mul", 9) == pytest.approx(0.5 + (0.05 - 0.5) * 9 / 18)


def test_pack_conv_taps_is_im2col():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1, (3, 1, 5, 6))
    w = rng.normal(size=(4, 1, 3, 3))
    taps = pack_conv_taps(imgs, 4)
    got = sum(t * np.broadcast_to(w.reshape(4, 9)[:, k][None, :, None], (3, 4, 30)).reshape(-1)
              for k, t in enumerate(taps)).reshape(3, 4, 5, 6)
    want = F.conv2d(torch.from_numpy(imgs), torch.from_numpy(w), padding=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_level_tracer_records():
    tr = LevelTracer()
    d = tr.mul(tr.mul_const(0, 2.0), 3)
    assert d == 4 and [r.op for r in tr.ops] == ["pt_mul", "ct_mul"]


# ---- real encryption (TenSEAL); a small context where the test does not need depth ----

ts = pytest.importorskip("tenseal")


def _small_ctx():
    from mlsys24.privacy.ckks import make_context

    return make_context(8192, (60, 40, 40, 60), 40)


def test_context_rejects_insecure_parameters():
    from mlsys24.privacy.ckks import make_context

    with pytest.raises(ValueError):
        make_context(16384, CHAIN, 40)
    with pytest.raises(ValueError):                             # SEAL refuses them as well
        ts.context(ts.SCHEME_TYPE.CKKS, 16384, coeff_mod_bit_sizes=list(CHAIN))


def test_small_context_is_secure_and_evaluates_square():
    assert security_bits(8192, (60, 40, 40, 60)) == 128
    ctx = _small_ctx()
    x = np.linspace(-1, 1, 4096)
    enc = ts.ckks_vector(ctx, x.tolist())
    got = np.asarray((enc * enc + enc * 0.5).decrypt())
    assert np.abs(got - (x * x + 0.5 * x)).max() < 1e-4


@pytest.mark.slow
def test_full_context_relu_paf_matches_plaintext():
    """The production context (N=32768, 128-bit): f1g2 ReLU-PAF encrypted == float within CKKS error."""
    from mlsys24.privacy.ckks import context_info, make_context, time_relu_paf

    assert context_info()["security_bits"] == 128
    ctx = make_context()
    r = time_relu_paf(ctx, components_of("f1g2"), name="f1g2", n=2048)
    assert r.max_abs_err < CKKS_TOL and r.max_abs_err_exact < CKKS_TOL
    assert r.depth == paf_info("f1g2").depth_relu


def test_encrypted_conv_relu_layer_matches_torch():
    """Encrypted conv + PAF-ReLU on packed images (N=16384, 7 levels, 128-bit) == torch twin."""
    import torch
    import torch.nn.functional as F

    from mlsys24.privacy.ckks import encrypted_conv_relu, make_context
    from mlsys24.privacy.paf import ReLUPAF, make_sign

    chain = (60,) + (40,) * 7 + (60,)
    assert security_bits(16384, chain) == 128
    ctx = make_context(16384, chain, 40)
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1, (4, 1, 8, 8))
    w = rng.normal(size=(4, 1, 3, 3)) * 0.3
    b = rng.normal(size=4) * 0.1
    comps = [COMPONENTS_F1]
    res = encrypted_conv_relu(ctx, imgs, w, b, comps, slots=8192)
    assert res.depth == 1 + 3 + 1
    assert np.abs(res.output - res.twin).max() < CKKS_TOL
    pre = F.conv2d(torch.from_numpy(imgs), torch.from_numpy(w), torch.from_numpy(b), padding=1)
    sign = make_sign("f1g2", components=comps, dtype=torch.float64)
    sign.scale_mode, sign.static_scale = "static", torch.tensor(1.0, dtype=torch.float64)
    want = ReLUPAF(sign)(pre).detach().numpy()
    assert np.abs(res.output - want).max() < CKKS_TOL


COMPONENTS_F1 = (1.5, -0.5)
