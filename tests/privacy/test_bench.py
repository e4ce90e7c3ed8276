"""The VGG-11-bn study: model surgery on all 13 non-polynomial ops, the upsampled digits, the bench's --quick run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn as nn

from mlsys24.privacy.bench import _headline, run
from mlsys24.privacy.paf import (
    MaxPoolPAF,
    ReLUPAF,
    nonpolynomial_layers,
    preceding_parameters,
    replace_nonpolynomial,
)
from mlsys24.privacy.vgg import digits32, vgg11_bn


def test_vgg11_bn_shape_and_layers():
    m = vgg11_bn(width=1 / 16).eval()
    assert m(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    names = nonpolynomial_layers(m)
    kinds = [type(m.get_submodule(n)).__name__ for n in names]
    assert kinds.count("ReLU") == 8 and kinds.count("MaxPool2d") == 5 and len(names) == 13
    assert names == sorted(names, key=lambda n: int(n.split(".")[1]))         # forward order
    convs = [c.out_channels for c in vgg11_bn(width=1.0).modules() if isinstance(c, nn.Conv2d)]
    assert convs == [64, 128, 256, 256, 512, 512, 512, 512]                 # VGG-11
    # up_weight of a ReLU: its conv + BN; a MaxPool right after a ReLU has none
    assert len(preceding_parameters(m, "features.2")) == 4 and preceding_parameters(m, "features.3") == []
    r = replace_nonpolynomial(m, "f1g2")
    assert sum(isinstance(x, (ReLUPAF, MaxPoolPAF)) for x in r.modules()) == 13
    assert torch.isfinite(r(torch.rand(2, 3, 32, 32))).all()


def test_digits32_is_the_digits_split_upsampled():
    d = digits32(0)
    assert d.sizes() == {"train": 1149, "val": 288, "test": 360}
    assert d.x_train.shape[1:] == (3, 32, 32)
    assert float(d.x_train.min()) >= 0 and float(d.x_train.max()) <= 1
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])


def test_headline_from_records():
    recs = [{"paf": "2f12g1", "technique": "ct_pa_at", "scale": "DS", "test_acc": a, "float_test_acc": 98.0}
            for a in (97.0, 96.0)] + [{"paf": "f1g2", "technique": "ct_pa_at", "scale": "DS", "test_acc": 10.0,
                                       "float_test_acc": 98.0}]
    h = _headline(recs)
    assert h["ours"] == pytest.approx(1.5) and h["paper"] == pytest.approx(0.35) and h["unit"] == "points"
    assert _headline(recs[2:]) is None


def test_quick_run_writes_the_ablation(tmp_path):
    path = run(argparse.Namespace(quick=True, out=tmp_path, extra=[]))
    assert path.name.endswith(".quick.json")
    doc = json.loads(path.read_text())
    recs = doc["records"]
    got = {(r["paf"], r["technique"], r["scale"]) for r in recs}
    assert got == {("f1g2", t, s) for t in ("direct", "ct", "baseline_ds", "ct_pa_at") for s in ("DS", "SS")}
    ep = {r["technique"]: r["epochs"] for r in recs}
    assert ep["baseline_ds"] == ep["ct_pa_at"] > 0 and ep["direct"] == 0
    assert all(0 <= r["test_acc"] <= 100 and r["seed"] == 0 for r in recs)
    assert all(len(r["ct_mse_best"]) == 13 for r in recs if r["technique"] in ("ct", "ct_pa_at"))
    assert doc["config"]["quick"] is True and doc["config"]["skipped"] == []
    assert doc["meta"]["command"].endswith("--quick")
