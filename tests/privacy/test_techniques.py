"""SmartPAF techniques on a tiny digits CNN: CT, SS collection, AT, technique sets, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mlsys24.privacy.digits import DigitsCNN, DigitsData, evaluate, load_digits_split, train_float
from mlsys24.privacy.paf import MaxPoolPAF, ReLUPAF, make_sign, replace_nonpolynomial, sign_modules
from mlsys24.privacy.techniques import (
    TechniqueConfig,
    alternate_training,
    apply_technique,
    coefficient_tuning,
    collect_layer_inputs,
    collect_static_scales,
    run_ablation,
)


@pytest.fixture(scope="module")
def tiny():
    full = load_digits_split(0)
    data = DigitsData(full.x_train[:240], full.y_train[:240], full.x_val[:96], full.y_val[:96],
                      full.x_test[:120], full.y_test[:120])
    torch.manual_seed(0)
    net = DigitsCNN(4, 8)
    train_float(net, data, epochs=4, seed=0)
    return net, data


CFG = TechniqueConfig(ct_epochs=3, ct_samples=64, group_epochs=1, max_groups=2, lr_c=1e-3, lr_w=1e-3,
                      batch_size=48, eval_batch=60)


def test_split_sizes_and_model_shapes():
    d = load_digits_split(0)
    assert d.sizes() == {"train": 1149, "val": 288, "test": 360}
    assert d.x_train.shape[1:] == (1, 8, 8) and float(d.x_train.max()) <= 1.0
    assert DigitsCNN(8, 16)(d.x_test[:5]).shape == (5, 10)
    assert [n for n, m in DigitsCNN(8, 16, depth=2).named_children() if isinstance(m, nn.ReLU)] == \
        ["relu1a", "relu1b", "relu2a", "relu2b"]


@pytest.mark.parametrize("paf", ["f1g2", "2f12g1"])
def test_ct_improves_relu_fit(paf):
    x = torch.randn(400, 4, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    layer = ReLUPAF(make_sign(paf))
    res = coefficient_tuning(layer, x, TechniqueConfig(ct_epochs=6, ct_batch=50))
    assert res.mse_best <= res.mse_init
    assert res.mse_best < 0.7 * res.mse_init                  # low-degree PAFs gain a lot from tuning
    assert res.mse_best == pytest.approx(min(res.history))


def test_ct_maxpool_never_worse():
    x = torch.randn(100, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    layer = MaxPoolPAF(make_sign("a7"), 2)
    res = coefficient_tuning(layer, x, TechniqueConfig(ct_epochs=3, ct_batch=25))
    assert res.mse_best <= res.mse_init


def test_static_scale_is_training_max(tiny):
    net, data = tiny
    m = replace_nonpolynomial(net, "f1g2")
    scales = collect_static_scales(m, data.x_train, batch_size=60)
    ins = collect_layer_inputs(net, ["relu1", "relu2"], data.x_train)
    # ReLU sign modules see the layer input itself; their static scale is its max |x| over the split
    for n in ("relu1",):                                      # relu1's input does not depend on earlier PAFs
        assert scales[n] == pytest.approx(float(ins[n].abs().max()), rel=1e-6)
    assert all(s.scale_mode == "dynamic" for s in sign_modules(m).values())
    assert all(s > 0 for s in scales.values())


def test_alternate_training_never_worse_on_validation(tiny):
    net, data = tiny
    m = replace_nonpolynomial(net, "f1g2")
    before = evaluate(m, data.x_val, data.y_val, CFG.eval_batch)
    log = []
    epochs = alternate_training(m, "relu1", data, CFG, log)
    after = evaluate(m, data.x_val, data.y_val, CFG.eval_batch)
    assert 1 <= epochs <= CFG.max_groups * CFG.group_epochs
    assert (after[0], -after[1]) >= (before[0], -before[1])
    assert log and log[0]["group"] == "coef"
    # a layer without preceding weights trains its coefficients only
    m2 = replace_nonpolynomial(net, "f1g2")
    bn_before = copy.deepcopy(m2.bn1.state_dict())
    alternate_training(m2, "pool1", data, CFG)
    assert all(torch.equal(bn_before[k], v) for k, v in m2.bn1.state_dict().items())


def test_technique_sets_replace_every_layer_and_are_deterministic(tiny):
    net, data = tiny
    for tech in ("direct", "ct", "ct_pa_at"):
        r = apply_technique(net, "f1g2", tech, data, CFG)
        assert len(sign_modules(r.model)) == 4
        assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in r.model.modules())
        assert (r.epochs > 0) == (tech == "ct_pa_at")
        assert len(r.ct) == (4 if tech != "direct" else 0)
    assert isinstance(net.relu1, nn.ReLU)                     # the float model is untouched
    a, _ = run_ablation(net, data, ["f1g2"], ["ct_pa_at", "baseline_ds"], CFG)
    b, _ = run_ablation(net, data, ["f1g2"], ["baseline_ds", "ct_pa_at"], CFG)
    key = lambda rs: sorted((r["technique"], r["scale"], r["test_acc"], r["epochs"]) for r in rs)
    assert key(a) == key(b)
    ep = {r["technique"]: r["epochs"] for r in a}
    assert ep["baseline_ds"] == ep["ct_pa_at"]                 # equal epoch budget


def test_committed_ablation_matches_default_study():
    """The notebook reads the committed ablation only when its configuration is the current default:
    guard against editing the defaults without re-running ``python -m mlsys24.privacy.ablation``."""
    import json

    from mlsys24.bench import load_results
    from mlsys24.privacy.ablation import DEFAULT_STUDY

    files = [r for r in load_results("smartpaf") if r.path.name.endswith(".ablation.json")]
    if not files:
        pytest.skip("no committed ablation (PYTHONPATH=lib python -m mlsys24.privacy.ablation)")
    cfg = files[0].config["studies"]["default"]["config"]
    assert cfg == json.loads(json.dumps(DEFAULT_STUDY.as_dict()))
    recs = files[0].records
    assert {r["technique"] for r in recs} >= {"direct", "ct", "baseline_ds", "ct_pa_at"}
    assert all(0 <= r["test_acc"] <= 100 for r in recs)
