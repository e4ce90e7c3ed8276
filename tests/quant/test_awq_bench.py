"""The AWQ bench's read-floor bounds (the GPU path; on CPU under the Triton interpreter)."""

import pytest
import torch

import mlsys24.kernels.stream as stream
from mlsys24.bench import Timing
from mlsys24.kernels import pdl_supported
from mlsys24.quant.bench import GROUP, _read_bounds, gemv_bytes

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _t(us):
    s = us * 1e-6
    return Timing(median_s=s, p10_s=s, p90_s=s, mean_s=s, min_s=s, n=1, device="cpu")

def test_read_bounds_record(monkeypatch):
    monkeypatch.setattr(stream, "READ_GRID", [stream.ReadConfig(256, 1, 2)])
    N, K = 24, 256
    wb = gemv_bytes(N, K, GROUP)
    recs = [{"shape": "s", "M": 1, "provider": "w4a16_chain_pdl", "median_us": 5.0, "cublas_chain_us": 30.0,
             "matmul_kn_chain_us": 20.0}]
    lines = []
    _read_bounds("s", N, K, 1, wb, _t(40.0), _t(36.0), _t(12.0), _t(33.0), 2, recs, lines.append, dev=DEV)
    r = recs[-1]
    assert r["provider"] == "read_floor" and r["weight_bytes"] == -(-wb // 64) * 64 >= wb
    one = r["median_us"]
    assert r["max_speedup_single_vs_cublas"] == pytest.approx(40.0 / one)
    assert r["max_speedup_single_vs_matmul_kn"] == pytest.approx(36.0 / one)
    assert r["w4a16_over_read_floor"] == pytest.approx(12.0 / one)
    # the chain bound is taken against the faster of the three fp16 chains (here matmul [K, N], 20 us)
    assert r["max_speedup_chain_vs_best_fp16"] == pytest.approx(20.0 / r["chain_us"])
    assert r["w4a16_pdl_chain_over_read_floor"] == pytest.approx(5.0 / r["chain_us"])
    modes = {"off", "wait_first", "wait_last"} if pdl_supported(DEV) else {"off"}
    assert set(r["chain_best_by_pdl_mode_us"]) == modes
    assert {c["provider"] for c in r["candidates"]["single"]} == {"torch_sum", "triton"}
    assert len(lines) == 1 and "read floor" in lines[0]
