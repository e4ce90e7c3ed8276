"""The GPU benchmark's code paths, run on CPU at toy sizes (the Triton kernels in the interpreter):
a benchmark that crashes on the GPU machine wastes the run, so its logic is exercised here."""

import torch

from mlsys24.lora.bench import _headline, e2e_bench, operator_bench
from mlsys24.models import Llama, LlamaConfig


def test_operator_bench_runs_and_checks():
    recs = operator_bench(device="cpu", dtype=torch.float32, h1=48, h2s=(40,), ranks=(8,), batches=(1, 3),
                          popularities=("distinct", "skewed"), repeats=1, tune=False, log=lambda m: None)
    ops = [r for r in recs if r["kind"] == "op"]
    assert {r["provider"] for r in ops} == {"dense", "loop", "gather_bmm", "bgmv", "sgmv"}
    assert all(r["median_us"] > 0 and "GBps" in r for r in ops)
    checks = [r for r in recs if r["kind"] == "check"]
    assert len(checks) == 8 and all(r["max_rel_err"] < 1e-4 for r in checks)


def test_e2e_bench_runs_both_systems():
    cfg = LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=48, vocab_size=64)
    model = Llama(cfg).eval()
    recs = e2e_bench(model, popularities=("distinct",), n_requests=4, n_baseline=2, maxlen=12, max_batch=4,
                     rank=8, n_sets=2, n_slots=4, caps={"punica": 60.0, "same_adapter": 60.0}, backend="sgmv",
                     graphs=True, log=lambda m: None)
    e2e = {r["system"]: r for r in recs if r["kind"] == "e2e"}
    assert set(e2e) == {"punica", "same_adapter"}
    assert e2e["punica"]["finished"] == 4 and e2e["same_adapter"]["finished"] == 2
    assert e2e["punica"]["adapter_loads"] >= 2
    assert max(rows for rows, _, _ in e2e["punica"]["step_samples"]) > 1  # mixed adapters share steps
    assert max(rows for rows, _, _ in e2e["same_adapter"]["step_samples"]) == 1  # Distinct: batch 1
    head = _headline(recs)
    assert head["ours"] == e2e["punica"]["tokens_per_s"] / e2e["same_adapter"]["tokens_per_s"]


def _op(provider, bs, pop, us, mode="graph", r=16, h2=11008, pct=60.0):
    return {"kind": "op", "mode": mode, "provider": provider, "h2": h2, "r": None if provider == "dense" else r,
            "bs": bs, "popularity": "any" if provider == "dense" else pop, "median_us": us, "GBps": 1000.0,
            "pct_peak_bw": pct, "device_peaks": "H100"}


def test_gpu_claims_from_records():
    from mlsys24.lora.report import gpu_claims, op_latency, paper_speedups, timing_mode

    recs = [_op("dense", 1, "any", 30.0), _op("loop", 64, "distinct", 900.0), _op("sgmv", 1, "distinct", 10.0),
            _op("sgmv", 64, "distinct", 15.0), _op("sgmv", 64, "distinct", 40.0, r=64, pct=70.0)]
    recs += [_op("sgmv", 64, p, 14.0) for p in ("uniform", "skewed", "identical")]
    recs += [{"kind": "check", "max_rel_err": 1e-3},
             {"kind": "e2e", "system": "punica", "popularity": "distinct", "tokens_per_s": 1000.0},
             {"kind": "e2e", "system": "same_adapter", "popularity": "distinct", "tokens_per_s": 100.0}]
    c = gpu_claims(recs)
    assert timing_mode(recs) == "graph"
    assert c["sgmv_bs64_over_bs1"]["value"] == 1.5 and c["sgmv_bs64_over_bs1"]["ok"]
    assert c["loop_over_sgmv_bs64"]["value"] == 60.0 and c["sgmv_pct_hbm_r64"]["value"] == 70.0
    assert c["sgmv_flatness_bs64"]["ok"] and c["e2e_distinct_speedup"]["value"] == 10.0 and c["max_rel_err"]["ok"]
    assert op_latency(recs, "dense", h2=11008, bs=1, popularity="x") == 30.0
    # a slow batch-64 SGMV fails its claims (the asserts can fail)
    bad = gpu_claims([r if not (r.get("provider") == "sgmv" and r["bs"] == 64 and r["r"] == 16
                                and r["popularity"] == "distinct") else {**r, "median_us": 300.0} for r in recs])
    assert not bad["sgmv_bs64_over_bs1"]["ok"] and not bad["loop_over_sgmv_bs64"]["ok"] and not bad["sgmv_flatness_bs64"]["ok"]
    # Python-launched timings answer only what launch cost cannot fake
    eager = gpu_claims([{**r, "mode": "eager"} if r["kind"] == "op" else r for r in recs])
    assert eager["sgmv_bs64_over_bs1"] is None and eager["sgmv_pct_hbm_r64"] is None
    assert eager["sgmv_flatness_bs64"] is None and eager["loop_over_sgmv_bs64"]["ok"]
    assert gpu_claims([])["max_rel_err"] is None
    assert abs(paper_speedups()["distinct"] - 1053 / 87) < 1e-9


def test_run_refuses_without_gpu():
    import types

    import pytest

    from mlsys24.bench.registry import resolve
    from mlsys24.lora.bench import run

    assert resolve("punica") is run
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            run(types.SimpleNamespace(quick=True, out=None, extra=[]))
