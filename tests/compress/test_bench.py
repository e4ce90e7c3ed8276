"""The GPU benchmark's code path, run as its CPU/gloo smoke configuration."""

import argparse
import json

import pytest

from mlsys24.compress.bench import run

pytestmark = pytest.mark.distributed


def test_bench_runs_on_cpu_with_gloo(tmp_path):
    path = run(argparse.Namespace(quick=True, out=tmp_path, extra=["--force-cpu", "--models", "gpt2"]))
    doc = json.loads(path.read_text())
    recs = {r["scheme"]: r for r in doc["records"]}
    assert set(recs) == {"none", "uniform", "lgreco"}
    assert recs["lgreco"]["retunes"] >= 1
    assert recs["lgreco"]["bytes_per_step"] <= recs["uniform"]["bytes_per_step"] < recs["none"]["bytes_per_step"]
    assert recs["lgreco"]["chosen_error"] <= recs["lgreco"]["budget"] * (1 + 1e-9)
    for r in recs.values():
        assert r["step_ms"] > 0 and r["compute_ms"] > 0 and r["backend"] == "gloo"
    assert doc["headline"]["unit"] == "x" and doc["config"]["gpu"] is False
