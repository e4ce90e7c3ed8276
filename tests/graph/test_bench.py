"""The GPU benchmark's code path, run on CPU with a tiny configuration."""

import json
from types import SimpleNamespace

import pytest

from mlsys24.graph import bench


def test_bench_cpu_tiny(tmp_path):
    args = SimpleNamespace(quick=True, out=tmp_path, extra=[
        "--device", "cpu", "--scale", "8", "--edge-factor", "4", "--batch-size", "8", "--n-batches", "4",
        "--bulk", "1,4", "--fanouts", "3,2", "--ladies", "8,8", "--repeats", "1"])
    path = bench.run(args)
    doc = json.loads(path.read_text())
    recs = doc["records"]
    got = {(r["sampler"], r["provider"], r["k"]) for r in recs}
    assert {("sage", "loop", 1), ("sage", "matrix", 1), ("sage", "matrix", 4),
            ("ladies", "loop", 1), ("ladies", "matrix", 4)} <= got
    assert all(r["ms_per_minibatch"] > 0 for r in recs)
    assert doc["headline"]["unit"] == "x" and doc["headline"]["ours"] > 0
    assert doc["config"]["kind"] == "single" and doc["config"]["quick"]
    assert any("pyg" in n for n in doc["config"]["notes"]) or any(r["provider"] == "pyg" for r in recs)


def test_config_overrides():
    cfg = bench.config_from_args(SimpleNamespace(quick=False, extra=["--bulk", "1,64,4096", "--n-batches", "64"]))
    assert cfg["bulk"] == (1, 64) and cfg["scale"] == 22 and cfg["fanouts"] == (15, 10, 5)


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_dist_cpu_tiny(tmp_path):
    """The multi-GPU entry point's code path on 4 gloo processes."""
    args = SimpleNamespace(quick=True, out=tmp_path, extra=[
        "--device", "cpu", "--scale", "7", "--edge-factor", "4", "--batch-size", "4", "--n-batches", "4",
        "--fanouts", "2,2", "--ladies", "4,4", "--repeats", "1", "--grids", "4:1,4:2"])
    doc = json.loads(bench.run_dist(args).read_text())
    recs = doc["records"]
    assert {(r["p"], r["c"]) for r in recs} == {(4, 1), (4, 2)}
    assert all(r["time_s"] > 0 and r["bytes_recv"] > 0 for r in recs)
    assert all(r["features_ok"] for r in recs if r["sampler"] == "sage")
