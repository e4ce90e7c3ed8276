"""Keyformer / H2O / window / sink KV policies: exact budgets, masked == compacted, Keyformer(no noise,
tau=1) == H2O, chunked prompt scores == the whole-matrix reference, the Gumbel sampler."""

from __future__ import annotations

import math

import pytest
import torch

from mlsys24.kvcache import (
    KVPolicyConfig,
    PolicyKVCache,
    budget_tokens,
    gumbel,
    policy_backend,
    prompt_scores,
    prompt_scores_ref,
    quality_metrics,
    rouge_l,
    teacher_forced,
)
from mlsys24.models import Llama, LlamaConfig

N, T = 37, 9  # odd prompt / continuation lengths


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, init_std=0.2)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, N + T), generator=g)
    return ids[:, :N], ids[:, N:]


def _steps(model, prompts, conts, policy, mode):
    """Yield the cache after the prompt and after every decode step."""
    B, n = prompts.shape
    cache = PolicyKVCache.for_model(model, B, n, conts.shape[1], policy, mode=mode)
    # grad mode and backend are scoped to each forward, never held across a yield: a consumer that
    # stops early (zip with a shorter sequence) must not leave autograd disabled for later tests
    with torch.no_grad(), policy_backend(model):
        model(prompts, kv_cache=cache)
    yield cache
    for t in range(conts.shape[1] - 1):
        with torch.no_grad(), policy_backend(model):
            model(conts[:, t:t + 1], kv_cache=cache)
        yield cache


def test_gumbel_moments():
    g = gumbel((1_000_000,), generator=torch.Generator().manual_seed(0))
    assert abs(float(g.mean()) - 0.5772156649) < 0.01
    assert abs(float(g.var()) - math.pi ** 2 / 6) < 0.02


@pytest.mark.parametrize("name,budget,expect", [("window", 0.5, (18, 18)), ("sink", 0.5, (18, 14)),
                                                ("h2o", 0.5, (18, 5)), ("keyformer", 0.3, (11, 3)),
                                                ("full", 0.5, (N, N)), ("keyformer", 1.0, (N, N))])
def test_budget_tokens(name, budget, expect):
    assert budget_tokens(KVPolicyConfig(name, kv_budget=budget), N) == expect


@pytest.mark.parametrize("name", ["h2o", "keyformer"])
def test_chunked_prompt_scores_match_reference(name):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 83, 4, 16, generator=g), torch.randn(2, 83, 2, 16, generator=g)
    pol = KVPolicyConfig(name, noise="none", tau_init=1.3)
    ref = prompt_scores_ref(q, k, 0.25, pol)
    got = prompt_scores(q, k, 0.25, pol, chunk=7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ref.sum(-1), torch.full((2, 2), 2 * 83.0), rtol=1e-4)  # each row sums to 1, x2 heads


def test_keyformer_without_noise_at_tau_1_selects_h2o_tokens(model, data):
    P, C = data
    h2o = KVPolicyConfig("h2o", kv_budget=0.5, recent_ratio=0.3)
    kf = KVPolicyConfig("keyformer", kv_budget=0.5, recent_ratio=0.3, noise="none", tau_init=1.0, tau_end=1.0)
    n_cmp = 0
    for ch, ck in zip(_steps(model, P, C, h2o, "compact"), _steps(model, P, C, kf, "compact")):
        for layer in range(model.cfg.n_layers):
            assert torch.equal(ch.kept_positions(layer), ck.kept_positions(layer))
            n_cmp += 1
    assert n_cmp == T * model.cfg.n_layers
    # and with noise the selection differs somewhere (the test can fail)
    kfg = KVPolicyConfig("keyformer", kv_budget=0.5, recent_ratio=0.3)
    _, cg = teacher_forced(model, P, C, kfg, return_cache=True)
    _, chh = teacher_forced(model, P, C, h2o, return_cache=True)
    assert any(not torch.equal(cg.kept_positions(i), chh.kept_positions(i)) for i in range(model.cfg.n_layers))


@pytest.mark.parametrize("name", ["window", "sink", "h2o", "keyformer"])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_masked_and_compacted_give_same_logits(model, data, name, budget):
    P, C = data
    pol = KVPolicyConfig(name, kv_budget=budget, n_sink=2, seed=3)
    lc, cc = teacher_forced(model, P, C, pol, mode="compact", return_cache=True)
    lm, cm = teacher_forced(model, P, C, pol, mode="masked", return_cache=True)
    assert (lc - lm).abs().max() < 1e-4
    for layer in range(model.cfg.n_layers):
        assert torch.equal(cc.kept_positions(layer), cm.kept_positions(layer))
    k, _ = budget_tokens(pol, N)
    assert cc.capacity == k + 1 and cm.capacity == N + T  # memory really smaller
    assert cc.nbytes() < cm.nbytes()
    full = teacher_forced(model, P, C, KVPolicyConfig("full"))
    assert (lc - full).abs().max() > 1e-3  # eviction does change the logits


@pytest.mark.parametrize("name", ["window", "sink", "h2o", "keyformer"])
def test_budget_respected_exactly_and_evicted_never_return(model, data, name):
    P, C = data
    pol = KVPolicyConfig(name, kv_budget=0.4, n_sink=3)
    k, w = budget_tokens(pol, N)
    prev = None
    for step, cache in enumerate(_steps(model, P, C, pol, "compact")):
        cache.check_invariants()  # |K| = n_valid per (layer, seq, head), recent window + sinks kept
        assert cache.n_valid == k
        assert int((cache.pos >= 0).sum(-1).max()) == k
        kept = [set(map(tuple, cache.kept_positions(i).reshape(-1, k).tolist())) for i in range(2)]
        cur = [cache.kept_positions(i) for i in range(2)]
        if prev is not None:
            newest = N + step - 1
            for i in range(2):
                for old, new in zip(prev[i].reshape(-1, k).tolist(), cur[i].reshape(-1, k).tolist()):
                    assert set(new) <= set(old) | {newest}
        prev = cur
        del kept


def test_full_policy_matches_plain_forward(model, data):
    P, C = data
    lg = teacher_forced(model, P, C, KVPolicyConfig("full"))
    with torch.no_grad():
        ref = model(torch.cat([P, C], 1))[:, N - 1:N + T - 1]
    assert (lg - ref).abs().max() < 1e-4
    lg1 = teacher_forced(model, P, C, KVPolicyConfig("keyformer", kv_budget=1.0))
    assert (lg1 - ref).abs().max() < 1e-4
    m = quality_metrics(lg, ref, C[:, :T])
    assert m["kl"] < 1e-6 and m["top1_agree"] == 1.0


def test_tau_schedule_logged(model, data):
    P, C = data
    pol = KVPolicyConfig("keyformer", kv_budget=0.5, tau_init=1.0, tau_end=2.0)
    _, cache = teacher_forced(model, P, C, pol, return_cache=True)
    assert cache.taus[0] == 1.0 and len(cache.taus) == T
    assert all(b > a for a, b in zip(cache.taus, cache.taus[1:]))
    assert abs(cache.taus[-1] - (1.0 + (T - 1) / T)) < 1e-6


def test_rouge_l():
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [5, 6]) == 0.0
    assert abs(rouge_l([1, 2, 3, 4], [1, 3, 4, 9]) - 0.75) < 1e-9
