import json
import subprocess
import sys
import time

import pytest
import torch

from mlsys24.bench import (
    BENCHMARKS,
    device_peaks,
    device_slug,
    environment,
    load_results,
    measure,
    roofline,
    save_results,
)
from mlsys24.bench.registry import resolve
from mlsys24.paths import REPO_ROOT


def test_measure_cpu_reports_sleep_time():
    t = measure(lambda: time.sleep(0.002), warmup=1, repeats=5, device="cpu")
    assert t.n == 5 and t.device == "cpu"
    assert 0.0019 < t.median_s < 0.05
    assert t.p10_s <= t.median_s <= t.p90_s
    assert t.median_us == pytest.approx(t.median_s * 1e6)


def test_measure_min_time_raises_repeats():
    calls = []
    t = measure(lambda: calls.append(1), warmup=0, repeats=3, device="cpu", min_time_s=1e-3, max_repeats=500)
    assert t.n >= 3 and len(calls) == t.n


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0, device="cpu")


def test_roofline_arithmetic_h100():
    # 3.35 GB in 1 s is 3350 GB/s: an H100's full datasheet bandwidth.
    r = roofline(1e-3, bytes=3.35e9, device="NVIDIA H100 80GB HBM3")
    assert r["GBps"] == pytest.approx(3350.0)
    r = roofline(1.0, bytes=3.35e12, flops=2 * 4096**3, device="NVIDIA H100 80GB HBM3")
    assert r["pct_peak_bw"] == pytest.approx(100.0)
    assert r["bound"] == "memory"
    big = roofline(1.0, bytes=1.0, flops=1e15, device="H100")
    assert big["bound"] == "compute" and big["TFLOPs"] == pytest.approx(1000.0)


def test_peaks_table_and_errors():
    assert device_peaks("NVIDIA H200").hbm_GBps == 4800
    assert device_peaks("NVIDIA A100-SXM4-80GB").fp16_TFLOPs == 312
    assert device_peaks("cpu (x, 2 cores)").name.startswith("CPU")
    with pytest.raises(KeyError, match="no peak table entry"):
        device_peaks("Some Other Accelerator")
    with pytest.raises(ValueError):
        roofline(0.0, bytes=1)


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("cpu (Intel Xeon, 2 cores)") == "cpu"


def test_environment_has_provenance():
    env = environment(device="cpu", command="python -m mlsys24.bench x")
    for key in ("device", "torch", "python", "date", "command"):
        assert env[key]
    assert env["command"] == "python -m mlsys24.bench x"
    assert len(env["lib_sha1"]) == 12


def test_graph_floor_times_a_tiny_call():
    from mlsys24.bench import graph_floor

    t = graph_floor("cpu", repeats=3)
    assert t.n == 3 and 0 < t.median_s < 0.1 and t.device == "cpu"


def test_library_digest_names_the_sources(tmp_path):
    from mlsys24.bench.env import library_digest

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    d1 = library_digest(tmp_path)
    assert d1 == library_digest(tmp_path)                    # deterministic
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert library_digest(tmp_path) != d1                    # a content change shows
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").rename(tmp_path / "c.py")
    assert library_digest(tmp_path) != d1                    # and so does a renamed file


def test_results_round_trip(tmp_path):
    recs = [{"provider": "ours", "median_us": 12.5, "x": torch.tensor(3.0)}, {"provider": "torch", "median_us": float("nan")}]
    path = save_results("demo", recs, headline={"name": "speedup", "ours": 2.0, "paper": 2.5, "unit": "x"},
                        config={"quick": False, "sizes": [1, 2]}, out_dir=tmp_path / "demo", device="cpu")
    assert path.name == "cpu.json"
    doc = json.loads(path.read_text())
    assert doc["records"][0]["x"] == 3.0 and doc["records"][1]["median_us"] is None
    files = load_results("demo", root=tmp_path)
    assert len(files) == 1
    rf = files[0]
    assert rf.headline["ours"] == 2.0 and rf.where(provider="ours")[0]["median_us"] == 12.5
    assert "Measured on cpu" in rf.caption() and "torch" in rf.caption()
    quick = save_results("demo", recs, config={"quick": True}, out_dir=tmp_path / "demo", device="cpu")
    assert quick.name == "cpu.quick.json"
    assert len(load_results("demo", root=tmp_path)) == 1
    assert len(load_results("demo", root=tmp_path, include_quick=True)) == 2


def test_save_results_validates():
    with pytest.raises(ValueError, match="no records"):
        save_results("demo", [])
    with pytest.raises(ValueError, match="headline lacks"):
        save_results("demo", [{"a": 1}], headline={"name": "x"})


def test_registry_resolves_every_benchmark():
    for name in BENCHMARKS:
        assert callable(resolve(name)), name
    with pytest.raises(KeyError, match="registered"):
        resolve("no-such-paper")


def test_cli_help_lists_benchmarks():
    out = subprocess.run([sys.executable, "-m", "mlsys24.bench", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    for name in BENCHMARKS:
        assert name in out


def test_anchors_benchmark_runs_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlsys24.bench", "anchors", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    ops = {r["op"] for r in doc["records"]}
    assert ops == {"copy", "mm", "sdpa_decode"}
    assert all(r["median_us"] > 0 for r in doc["records"])



def test_gpu_results_modes(tmp_path, monkeypatch):
    from mlsys24.bench import gpu_results

    with pytest.raises(ValueError, match="mode"):
        gpu_results("awq", "live")
    assert gpu_results("awq", "skip") is None
    got = gpu_results("awq", "json")           # the committed H200 file (no GPU needed)
    assert got is not None and got.meta["device_type"] == "cuda"
    assert gpu_results("awq", "json", where=lambda f: False) is None


def test_measure_graphed_falls_back_to_plain_timing_off_cuda():
    from mlsys24.bench import measure_graphed

    calls = []
    t = measure_graphed(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert t.n == 5 and len(calls) == 7 and t.median_s >= 0


def test_copy_bandwidth_counts_read_and_write_bytes():
    from mlsys24.bench import copy_bandwidth

    t, gbps = copy_bandwidth("cpu", 1 << 20, warmup=1, repeats=3)
    assert t.n == 3 and gbps == pytest.approx(2 * (1 << 20) / t.median_s / 1e9)
    with pytest.raises(ValueError, match="nbytes"):
        copy_bandwidth("cpu", 0)
