"""PAF families and layers: evaluation vs NumPy, oddness, sign-correctness, ReLU/MaxPool twins, surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsys24.privacy.paf import (
    COMPONENTS,
    PAF_FAMILIES,
    MaxPoolPAF,
    ReLUPAF,
    components_of,
    lstsq_sign_coeffs,
    make_sign,
    nonpolynomial_layers,
    odd_poly,
    odd_poly_ref,
    odd_to_chebyshev,
    paf_info,
    paf_numpy,
    preceding_parameters,
    relu_form_numpy,
    replace_nonpolynomial,
    set_scale_mode,
    sign_modules,
)

# float32 evaluation of a composite with coefficients up to ~60 (a7) on [-1, 1]: a few ulps times
# the coefficient sum; deg27 is evaluated in float64 (coefficients ~1e8).
TOL = {torch.float32: 5e-6, torch.float64: 1e-11}


@pytest.mark.parametrize("paf", list(PAF_FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 83, 127])
def test_sign_paf_matches_numpy(paf, dtype, n):
    u = torch.linspace(-1, 1, n, dtype=torch.float64)
    sign = make_sign(paf, dtype=dtype)
    got = sign.poly(u.to(dtype)).detach().double().numpy()
    want = paf_numpy(u.numpy(), components_of(paf))
    tol = TOL[dtype] if paf != "deg27" else 1e-6
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_horner_equals_power_chain(name):
    c = torch.tensor(COMPONENTS[name], dtype=torch.float64)
    u = torch.linspace(-1.2, 1.2, 101, dtype=torch.float64)
    torch.testing.assert_close(odd_poly(u, c), odd_poly_ref(u, c), atol=1e-12, rtol=0)


def test_non_contiguous_input():
    sign = make_sign("f2g3")
    x = torch.randn(6, 10, dtype=torch.float32).t()          # non-contiguous view
    assert not x.is_contiguous()
    torch.testing.assert_close(sign(x), sign(x.contiguous()))


@pytest.mark.parametrize("paf", list(PAF_FAMILIES))
def test_odd_and_sign_correct(paf):
    x = np.linspace(-1, 1, 200_001)
    c = components_of(paf)
    assert np.abs(paf_numpy(-x, c) + paf_numpy(x, c)).max() < 1e-9
    away = np.abs(x) >= 0.05
    assert (paf_numpy(x[away], c) * x[away]).min() > 0


def test_card_relu_errors_and_composition_order():
    """Max |ReLU-form - ReLU| on 0.3 <= |x| <= 1 (values from the paper card, code order = f first)."""
    x = np.linspace(-1, 1, 200_001)
    m = np.abs(x) >= 0.3
    err = {(p, o): np.abs(relu_form_numpy(x, components_of(p, o)) - np.maximum(x, 0))[m].max()
           for p in PAF_FAMILIES for o in ("code", "g_first")}
    card = {"f1g2": 0.086, "f2g2": 0.072, "f2g3": 0.126, "2f12g1": 0.048, "a7": 0.007}
    for p, v in card.items():
        assert abs(err[(p, "code")] - v) < 1.5e-3, (p, err[(p, "code")])
    assert err[("a7", "code")] < 0.01
    for p in ("f1g2", "f2g2", "f2g3", "2f12g1"):
        assert err[(p, "g_first")] < err[(p, "code")]


def test_lstsq27_is_least_squares():
    c = np.array(lstsq_sign_coeffs(27))
    assert len(c) == 14
    u = np.linspace(0.05, 1, 4000)
    resid = paf_numpy(u, [c]) - 1
    # perturbing any coefficient along an odd Chebyshev direction must not reduce the residual
    base = np.sum(resid ** 2)
    for k in range(14):
        e = np.zeros(28)
        e[2 * k + 1] = 1e-3
        d = np.polynomial.chebyshev.chebval(u, e)
        assert np.sum((resid + d) ** 2) >= base - 1e-9
        assert np.sum((resid - d) ** 2) >= base - 1e-9


def test_chebyshev_conversion_roundtrip():
    c = COMPONENTS["p1"]
    a = odd_to_chebyshev(c)
    u = np.linspace(-1, 1, 33)
    full = np.zeros(2 * len(a))
    full[1::2] = a
    np.testing.assert_allclose(np.polynomial.chebyshev.chebval(u, full), paf_numpy(u, [c]), atol=1e-12)


def test_paf_info_degrees():
    assert paf_info("2f12g1").composed_degree == 81 and paf_info("2f12g1").degree_sum == 12
    assert paf_info("f1g2").depth_relu == 8 and paf_info("f1g2").ct_mults_relu == 6
    assert paf_info("deg27").depth_relu == 16
    degs = [paf_info(p).degree_sum for p in ("f1g2", "f2g2", "f2g3", "a7", "deg27")]
    assert degs == sorted(degs)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (7, 5, 6, 8), (2, 1, 2, 2)])
def test_maxpool_paf_tree_with_exact_sign(shape):
    """With sign replaced by the exact sign, the pairwise tree equals max_pool2d."""
    sign = make_sign("a7")
    sign.poly = torch.sign                                   # exact sign: tests the tree and the unfold layout
    layer = MaxPoolPAF(sign, 2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), F.max_pool2d(x, 2))
    relu = ReLUPAF(sign)
    torch.testing.assert_close(relu(x), F.relu(x))


def test_paf_layers_close_to_exact_for_accurate_paf():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    relu = ReLUPAF(make_sign("a7"))
    pool = MaxPoolPAF(make_sign("a7"), 2)
    s = x.abs().max()
    assert (relu(x) - F.relu(x)).abs().max() < 0.05 * s
    assert (pool(x) - F.max_pool2d(x, 2)).abs().max() < 0.1 * s


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_surgery_and_scales():
    net = _net()
    assert nonpolynomial_layers(net) == ["2", "3", "5"]
    paf_net = replace_nonpolynomial(net, "f1g2")
    assert isinstance(net[2], nn.ReLU)                        # original untouched
    assert isinstance(paf_net[2], ReLUPAF) and isinstance(paf_net[3], MaxPoolPAF)
    assert len(sign_modules(paf_net)) == 3
    assert [p.shape for p in preceding_parameters(paf_net, "2")] == [(4, 1, 3, 3), (4,), (4,), (4,)]
    assert preceding_parameters(paf_net, "3") == []
    assert [p.shape for p in preceding_parameters(paf_net, "5")] == [(4, 4, 3, 3), (4,)]
    x = torch.randn(5, 1, 8, 8)
    paf_net.eval()
    y_ds = paf_net(x)
    with pytest.raises(RuntimeError):
        set_scale_mode(paf_net, "static")(x)                  # no static scale collected yet
    for s in sign_modules(paf_net).values():
        s.static_scale.fill_(1e3)
    assert torch.isfinite(paf_net(x)).all()
    set_scale_mode(paf_net, "dynamic")
    torch.testing.assert_close(paf_net(x), y_ds)


def test_gradients_reach_coefficients():
    sign = make_sign("f2g2")
    layer = ReLUPAF(sign)
    x = torch.randn(32)
    (layer(x) - F.relu(x)).pow(2).mean().backward()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in sign.coeffs)
