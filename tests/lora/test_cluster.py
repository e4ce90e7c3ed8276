"""Cluster scheduler simulator: no request lost, capacity respected, consolidation at low load;
Punica's workload generators."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsys24.lora.cluster import POLICIES, ClusterSim, GPUSpec, SimRequest, StepModel, simulate
from mlsys24.lora.workload import (
    popularity_segments,
    punica_lengths,
    punica_requests,
    ramp_arrivals,
    request_adapter_ids,
)

MODEL = StepModel(0.02, 0.0005, 0.0001)


def requests(n, rate, maxlen=256, seed=0):
    t = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    p, o = punica_lengths(n, maxlen=maxlen, seed=seed + 1)
    return [SimRequest(i, float(t[i]), int(p[i]), int(o[i])) for i in range(n)]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), n_gpus=st.integers(1, 4), n_blocks=st.integers(20, 80),
       policy=st.sampled_from(POLICIES), evict=st.sampled_from(["newest", "oldest"]),
       rate=st.sampled_from([2.0, 50.0]))
def test_no_request_lost_and_capacity_respected(seed, n_gpus, n_blocks, policy, evict, rate):
    reqs = requests(40, rate, maxlen=200, seed=seed)
    gpu = GPUSpec(n_blocks=n_blocks, max_batch=6)
    reqs = [r for r in reqs if math.ceil((r.prompt_len + r.output_len) / 16) + 1 <= n_blocks]
    res = ClusterSim(n_gpus, gpu, MODEL, policy, evict=evict).run(reqs)
    assert sorted(f["rid"] for f in res.finished) == sorted(r.rid for r in reqs)
    by_id = {r.rid: r for r in reqs}
    for f in res.finished:
        assert f["output_len"] == by_id[f["rid"]].output_len
        assert f["arrival_s"] <= f["first_token_s"] <= f["finish_s"]
    assert res.max_batch_seen <= 6
    assert res.max_blocks_seen <= n_blocks
    assert res.timeline_batch.max() <= 6
    assert (res.timeline_busy <= n_gpus).all()


def test_memory_pressure_forces_migrations_without_losing_work():
    reqs = requests(60, 40.0, maxlen=400, seed=3)
    res = ClusterSim(2, GPUSpec(n_blocks=60, max_batch=32), MODEL, "punica").run(reqs)
    assert res.migrations > 0
    assert sum(f["output_len"] for f in res.finished) == sum(r.output_len for r in reqs)
    assert res.max_blocks_seen <= 60


def test_punica_consolidates_at_low_load():
    reqs = requests(80, 3.0, maxlen=256, seed=1)
    out = simulate(reqs, n_gpus=8, gpu=GPUSpec(n_blocks=400), step_model=MODEL)
    p, rr, ll = out["punica"], out["round_robin"], out["least_loaded"]
    assert p.avg_busy_gpus() < 0.6 * rr.avg_busy_gpus()
    assert p.avg_busy_gpus() < ll.avg_busy_gpus()
    assert abs(p.throughput_tok_s / rr.throughput_tok_s - 1) < 0.05
    # the Punica policy places on the busiest GPU that fits: GPU 0 takes everything at this load
    assert max(f["gpu"] for f in p.finished) <= 1


def test_fifo_head_of_line():
    """A request that fits nowhere blocks later (smaller) ones: placement is strictly FIFO."""
    gpu = GPUSpec(n_blocks=20, max_batch=32)
    reqs = [SimRequest(0, 0.0, 200, 50), SimRequest(1, 0.1, 200, 50), SimRequest(2, 0.2, 5, 5)]
    res = ClusterSim(1, gpu, MODEL, "punica").run(reqs)
    first = {f["rid"]: f["first_token_s"] for f in res.finished}
    finish0 = res.finished[0]["finish_s"]
    assert first[1] > finish0 and first[2] >= first[1]  # request 2 would fit at once, but waits its turn


def test_step_model_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    recs = [{"rows": int(b), "prefill_tokens": int(p), "duration_s": 0.01 + 0.002 * b + 0.0003 * p}
            for b, p in zip(rng.integers(1, 32, 50), rng.integers(0, 200, 50))]
    m = StepModel.fit(recs)
    assert m.base_s == pytest.approx(0.01, rel=1e-6) and m.per_row_s == pytest.approx(0.002, rel=1e-6)
    assert m.per_prefill_token_s == pytest.approx(0.0003, rel=1e-6) and m.r2 == pytest.approx(1.0)
    # a negative slope is dropped, not returned
    m2 = StepModel.fit([{"rows": b, "prefill_tokens": 0, "duration_s": 0.05 - 0.001 * b} for b in range(1, 10)])
    assert m2.per_row_s >= 0 and m2.base_s > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="policy"):
        ClusterSim(2, GPUSpec(100), MODEL, "random")
    with pytest.raises(ValueError, match="never fit"):
        ClusterSim(1, GPUSpec(4), MODEL).run([SimRequest(0, 0.0, 100, 10)])
    with pytest.raises(ValueError, match="duplicate"):
        ClusterSim(1, GPUSpec(100), MODEL).run([SimRequest(0, 0.0, 3, 3), SimRequest(0, 1.0, 3, 3)])
    g = GPUSpec.for_model(gpu_mem_bytes=80e9, n_params=6.74e9, kv_bytes_per_token=2 * 32 * 4096 * 2)
    assert 5000 < g.n_blocks < 6500  # Llama-2-7B on an 80 GB GPU: ~6000 blocks of 16 tokens


@pytest.mark.parametrize("bs", [1, 7, 32, 64])
def test_popularity_segments(bs):
    for pop in ("distinct", "uniform", "skewed", "identical"):
        seg = popularity_segments(bs, pop)
        assert sum(seg) == bs and min(seg) >= 1
    assert len(popularity_segments(bs, "distinct")) == bs
    assert len(popularity_segments(bs, "uniform")) == math.ceil(math.sqrt(bs))
    assert popularity_segments(bs, "identical") == [bs]
    sk = popularity_segments(bs, "skewed")
    assert sk == sorted(sk, reverse=True)


def test_skewed_matches_punica_generator():
    assert popularity_segments(64, "skewed") == [17, 17, 11, 7, 5, 3, 2, 1, 1]
    with pytest.raises(ValueError, match="popularity"):
        popularity_segments(4, "zipf")


def test_lengths_and_requests():
    p, o = punica_lengths(500, maxlen=512, seed=0)
    assert p.min() >= 1 and p.max() <= 510 and o.min() >= 2 and (p + o).max() <= 511
    assert 10 < np.median(p) < 30  # LogNormal(0.8, -1, 18): median 17
    ids = request_adapter_ids(100, "uniform", seed=0)
    assert len(set(ids.tolist())) == 10 and sorted(np.bincount(ids).tolist()) == [10] * 10
    assert len(set(request_adapter_ids(50, "distinct").tolist())) == 50
    reqs = punica_requests(20, "skewed", maxlen=64, seed=2)
    assert all(len(r.prompt) + r.max_new_tokens <= 64 for r in reqs)
    t = ramp_arrivals(100, peak_rate=10, base_rate=1, seed=0)
    assert np.all(np.diff(t) >= 0)
    mid = ((t > 40) & (t < 60)).sum()
    edge = (t < 20).sum()
    assert mid > 2 * edge  # the rate peaks in the middle
