"""Vidur simulator: analytic queueing results, the engine's batches step by step, invariants,
fidelity of the operator-model step against a known cost function, capacity search."""

import numpy as np
import pytest
import torch

from mlsys24.models import LlamaConfig, random_llama
from mlsys24.serving import Request, SchedulerConfig
from mlsys24.sim import (
    AnalyticCost,
    ConstantCost,
    OperatorCost,
    ProfileGrid,
    ReplayCost,
    ReplicaConfig,
    Simulator,
    StepShape,
    capacity,
    fit_operator_models,
    latency_summary,
    make_trace,
    run_engine,
    scheduler_config,
    synthetic_profile,
    weighted_error,
)


def _one_at_a_time(arrivals, prompt=8):
    return [Request(i, [0] * prompt, 1, arrival_s=float(t)) for i, t in enumerate(arrivals)]


def _waits(res):
    return np.array([s.first_scheduled_s - s.request.arrival_s for s in sorted(res.finished, key=lambda s: s.rid)])


def test_md1_mean_wait_matches_pollaczek_khinchine():
    lam, D, n = 1.0, 0.7, 20000  # rho = 0.7
    arr = np.cumsum(np.random.default_rng(0).exponential(1 / lam, n))
    sim = Simulator(ReplicaConfig(SchedulerConfig("orca", max_batch_size=1), 10**6), 1, ConstantCost(D))
    w = _waits(sim.run(_one_at_a_time(arr)))[n // 10:]  # drop the warm-up
    rho = lam * D
    analytic = rho * D / (2 * (1 - rho))
    assert abs(w.mean() - analytic) / analytic < 0.08, (w.mean(), analytic)


@pytest.mark.parametrize("D", [0.5, 1.5])
def test_dd1_waits(D):
    n, gap = 200, 1.0
    arr = gap * np.arange(1, n + 1)
    sim = Simulator(ReplicaConfig(SchedulerConfig("orca", max_batch_size=1), 10**6), 1, ConstantCost(D))
    w = _waits(sim.run(_one_at_a_time(arr)))
    expect = np.maximum(0.0, np.arange(n) * (D - gap))  # stable: 0; overloaded: grows by D - gap each
    np.testing.assert_allclose(w, expect, atol=1e-9)


def test_invariants_and_single_request_e2e_is_sum_of_steps():
    cost = AnalyticCost()
    reqs = make_trace("chat", 60, 5.0, seed=1, length_scale=0.1, max_prompt=256, max_output=32)
    res = Simulator(ReplicaConfig(scheduler_config("sarathi", 16, 64), 400), 2, cost).run(reqs)
    assert sorted(s.rid for s in res.finished) == list(range(60))
    for s in res.finished:
        a = s.request.arrival_s
        assert a <= s.first_scheduled_s <= s.token_times_s[0] <= s.finish_s
        assert len(s.output) == s.request.max_new_tokens
    one = [Request(0, [0] * 100, 5, arrival_s=3.0)]
    r1 = Simulator(ReplicaConfig(SchedulerConfig("vllm"), 100), 1, cost).run(one)
    total = sum(cost.step_time(st["shape"]) for st in r1.steps)
    assert r1.finished[0].finish_s - 3.0 == pytest.approx(total, rel=1e-12)
    assert [st["shape"].width for st in r1.steps] == [100, 1, 1, 1, 1]


@pytest.mark.parametrize("policy", ["vllm", "sarathi", "orca"])
def test_simulator_forms_the_engines_batches(policy):
    torch.manual_seed(0)
    model = random_llama(LlamaConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=128), "cpu", torch.float32)
    sc = scheduler_config(policy, 6, 24) if policy != "orca" else SchedulerConfig("orca", max_batch_size=6)
    kw = dict(length_scale=0.03, max_prompt=64, max_output=10, min_len=2)
    # a burst at t=0, then arrivals far apart from each other: joins cannot race a step boundary
    reqs = make_trace("chat", 14, None, seed=3, token_ids=True, **kw)
    late = [Request(100 + i, r.prompt, r.max_new_tokens, arrival_s=0.5 + 0.5 * i) for i, r in enumerate(reqs[:4])]
    real = run_engine(model, reqs + late, sc, n_blocks=24)  # tight pool: preemptions happen
    sim_reqs = [Request(r.rid, [0] * len(r.prompt), r.max_new_tokens, arrival_s=r.arrival_s) for r in reqs + late]
    sim = Simulator(ReplicaConfig(sc, 24), 1, ReplayCost(real.step_intervals())).run(sim_reqs)
    assert sim.plans() == real.plans
    assert {s.rid: s.n_preemptions for s in sim.finished} == {s.rid: s.n_preemptions for s in real.finished}


def test_operator_models_reproduce_a_known_cost_function():
    cost = AnalyticCost(n_layers=4)
    grid = ProfileGrid(num_tokens=[1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
                       decode_batch=[1, 2, 4, 8, 16], decode_kv=[16, 64, 128, 256, 384, 512],
                       prefill_batch=[1, 2, 4, 8], prefill_q=[8, 16, 32, 64, 128, 256],
                       prefill_prefix=[0, 64, 256], lm_rows=[1, 2, 4, 8, 16, 32])
    om = fit_operator_models(synthetic_profile(cost, grid, noise=0.0, seed=0), grid="fast")
    fitted = OperatorCost(om, cost.n_layers, 256)

    class Fitted:  # fitted operator models + the same (known) per-step overhead
        def step_time(self, shape):
            return fitted.op_seconds(shape) + cost.step_time(shape) - cost.op_seconds(shape)

    sc = scheduler_config("sarathi", 16, 128)
    reqs = make_trace("chat", 80, 30.0, seed=2, length_scale=0.1, max_prompt=256, max_output=48)
    a = latency_summary(Simulator(ReplicaConfig(sc, 2000), 1, cost).run(reqs).finished)
    b = latency_summary(Simulator(ReplicaConfig(sc, 2000), 1, Fitted()).run(reqs).finished)
    for k in ("e2e_p50_s", "e2e_p90_s"):
        assert abs(b[k] - a[k]) / a[k] < 0.05, (k, a[k], b[k])
    assert weighted_error(np.array([100.0, 10.0]), np.array([110.0, 0.0])) == pytest.approx(0.1)


def test_capacity_grows_with_replicas_and_meets_the_slo():
    cost = AnalyticCost()
    reqs = make_trace("chat", 150, 1.0, seed=4, length_scale=0.1, max_prompt=256, max_output=48)
    rep = ReplicaConfig(scheduler_config("vllm", 32), 1000)
    c1 = capacity(reqs, rep, 1, cost, slo_delay_s=1.0, steps=6)
    c2 = capacity(reqs, rep, 2, cost, slo_delay_s=1.0, steps=6)
    assert c2["capacity_qps"] >= c1["capacity_qps"] > 0
    assert c1["summary"]["sched_delay_p99_s"] <= 1.0


def test_step_shape_counts_padding_and_samples():
    from mlsys24.serving import Sequence

    a, b = Sequence(Request(0, [1] * 10, 3)), Sequence(Request(1, [1] * 4, 3))
    b.num_computed = 4
    b.output.append(1)  # b decodes its first output token
    sh = StepShape.from_rows([(a, 10), (b, 1)])
    assert (sh.rows, sh.width, sh.padded_tokens, sh.tokens, sh.samples, sh.max_kv) == (2, 10, 20, 11, 2, 10)
