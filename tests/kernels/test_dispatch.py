"""Heuristic GEMM dispatcher: picks from its table, fits inflection points, runs the picked kernel."""

import json

import pytest
import torch

import mlsys24.kernels  # noqa: F401
from mlsys24.kernels import dispatch
from mlsys24.kernels.dispatch import GemmDispatcher, choose_from_table, default_table, fit_thresholds

TABLE = {
    "kind": "fdpp_dispatch_table", "device": "Test GPU",
    "default": {"M1": 1, "M2": 8},
    "shapes": [
        {"N": 48, "K": 64, "M1": 4, "M2": 16,
         "configs": {"gemv": {"block_m": 1, "block_n": 16, "block_k": 32, "num_warps": 4, "num_stages": 1},
                     "flat": {"by_m": {"16": {"block_m": 16, "block_n": 16, "block_k": 32, "num_warps": 4,
                                              "num_stages": 2}}}}},
        {"N": 64, "K": 64, "M1": 0, "M2": 0, "configs": {}},
    ],
}


def test_picks_from_table():
    d = GemmDispatcher(TABLE)
    assert [d.choose(m, 48, 64) for m in (1, 4, 5, 16, 17, 256)] == \
        ["gemv", "gemv", "flat", "flat", "cublas", "cublas"]
    assert [d.choose(m, 64, 64) for m in (1, 2, 100)] == ["cublas"] * 3
    # an unlisted shape uses the table's default thresholds
    assert [d.choose(m, 4096, 4096) for m in (1, 2, 8, 9)] == ["gemv", "flat", "flat", "cublas"]
    impl, cfg = d.plan(3, 48, 64)
    assert impl == "gemv" and cfg.block_n == 16 and cfg.block_k == 32
    impl, cfg = d.plan(9, 48, 64)
    assert impl == "flat" and cfg.num_stages == 2
    assert d.plan(9, 4096, 4096)[1] is None


def test_table_validation():
    bad = json.loads(json.dumps(TABLE))
    bad["shapes"][0]["M1"] = 8                   # GEMV only handles M <= 4
    with pytest.raises(ValueError, match="M1"):
        GemmDispatcher(bad)
    bad = dict(TABLE, default={"M1": 4, "M2": 2})
    with pytest.raises(ValueError, match="M1 <= M2"):
        GemmDispatcher(bad)
    with pytest.raises(ValueError, match="kind"):
        GemmDispatcher({"shapes": []})


def test_fit_thresholds_is_argmin_on_a_synthetic_cost_table():
    ms = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # GEMV best up to 2, flat GEMM best up to 32, cuBLAS beyond
    times = {"gemv": {m: 10.0 * m for m in ms if m <= 4},
             "flat": {m: 15.0 + 0.5 * m for m in ms},
             "cublas": {m: 40.0 + 0.05 * m for m in ms}}
    fit = fit_thresholds(times)
    assert (fit["M1"], fit["M2"]) == (1, 32)
    assert fit["M1"] <= fit["M2"] and fit["max_loss"] == pytest.approx(0.0)
    table = {"kind": "fdpp_dispatch_table", "default": {"M1": fit["M1"], "M2": fit["M2"]}, "shapes": []}
    for m in ms:
        picked = choose_from_table(table, m, 1, 1)[0]
        best = min(times, key=lambda i: times[i].get(m, float("inf")))
        assert picked == best
    # non-monotone costs: the fit cannot follow a flip-flop, it reports the loss it accepts
    times["flat"][8] = 100.0
    fit2 = fit_thresholds(times)
    assert fit2["M1"] <= fit2["M2"] and fit2["max_loss"] > 0


def test_runs_the_chosen_kernel_and_matches_matmul():
    d = GemmDispatcher(TABLE)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g).half()            # nn.Linear weight [N, K]
    for m in (1, 3, 7, 20):
        x = torch.randn(m, 64, generator=g).half()
        y = d.linear(x, weight)
        ref = x.float() @ weight.float().t()
        assert y.shape == (m, 48)
        assert (y.float() - ref).abs().max() < 2e-2
    x3 = torch.randn(2, 3, 64, generator=g).half()                # leading dims are flattened into M
    assert d.linear(x3, weight).shape == (2, 3, 48)


def test_default_table_and_device_lookup(tmp_path):
    d = GemmDispatcher()
    assert not d.profiled and d.table == dispatch._validate(default_table())
    path = dispatch.table_path("Test GPU", root=tmp_path)
    path.write_text(json.dumps(TABLE))
    d2 = GemmDispatcher.for_device("Test GPU", root=tmp_path)
    assert d2.profiled and d2.choose(16, 48, 64) == "flat"
    assert path.name in d2.source and "Test GPU" in repr(d2)      # it says which table it uses
    other = GemmDispatcher.for_device("Other GPU", root=tmp_path)
    assert not other.profiled and "built-in default" in other.source


def test_split_k_config_from_table_runs():
    t = json.loads(json.dumps(TABLE))
    t["shapes"][0]["configs"]["flat"]["by_m"]["16"]["split_k"] = 2
    t["shapes"][0]["configs"]["gemv"]["split_k"] = 3
    d = GemmDispatcher(t)
    assert d.plan(9, 48, 64)[1].split_k == 2 and d.plan(2, 48, 64)[1].split_k == 3
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=g).half()
    for m in (2, 9):
        x = torch.randn(m, 64, generator=g).half()
        assert (d.linear(x, weight).float() - x.float() @ weight.float().t()).abs().max() < 2e-2
