"""Sampling without replacement: validity and the sampled distributions (chi-square over many draws)."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from mlsys24.graph.wor import dart_select, es_select, hash_uniform, row_hash, uniform_offsets

ALPHA = 1e-3   # fixed seeds make every test deterministic; a correct sampler passes at this level


def test_hash_uniform_is_uniform_and_keyed():
    h = row_hash(0, 1, torch.arange(200_000))
    u = hash_uniform(h)
    assert float(u.min()) > 0 and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=50, min=0, max=1)
    assert chisquare(counts.numpy()).pvalue > ALPHA
    assert not torch.equal(h, row_hash(1, 1, torch.arange(200_000)))
    assert not torch.equal(h, row_hash(0, 2, torch.arange(200_000)))
    big = row_hash(0, 1, torch.arange(10) + (5 << 32))
    assert not torch.equal(big, h[:10])


@pytest.mark.parametrize("s", [1, 3, 7])
def test_uniform_offsets_valid(s):
    deg = torch.tensor([0, 1, 2, 3, 7, 8, 50, 1000])
    off = uniform_offsets(deg, s, row_hash(0, 0, torch.arange(8)))
    for r, d in enumerate(deg.tolist()):
        taken = off[r][off[r] >= 0]
        assert taken.numel() == min(s, d)
        assert torch.unique(taken).numel() == taken.numel()
        assert bool((taken < d).all())


def test_uniform_offsets_chi_square_over_subsets():
    d, s, n = 6, 3, 20_000
    off = uniform_offsets(torch.full((n,), d), s, row_hash(5, 0, torch.arange(n)))
    subsets = {c: i for i, c in enumerate(itertools.combinations(range(d), s))}
    idx = torch.tensor([subsets[tuple(sorted(r))] for r in off.tolist()])
    counts = torch.bincount(idx, minlength=len(subsets)).numpy()
    assert chisquare(counts).pvalue > ALPHA


def _exact_pair_probs(w):
    """Successive sampling of 2 items without replacement: P({a, b})."""
    W = sum(w)
    return {(a, b): w[a] / W * w[b] / (W - w[a]) + w[b] / W * w[a] / (W - w[b])
            for a, b in itertools.combinations(range(len(w)), 2)}


def test_es_select_matches_successive_sampling():
    w = [0.5, 1.0, 2.0, 3.0, 0.25]
    n = 20_000
    rows = torch.arange(n).repeat_interleave(len(w))
    weights = torch.tensor(w, dtype=torch.float64).repeat(n)
    u = hash_uniform(row_hash(3, 0, torch.arange(rows.numel())))
    mask = es_select(rows, weights, 2, u, n)
    picked = mask.view(n, len(w))
    assert bool((picked.sum(1) == 2).all())
    exact = _exact_pair_probs(w)
    keys = list(exact)
    code = {k: i for i, k in enumerate(keys)}
    idx = torch.tensor([code[tuple(torch.nonzero(r).squeeze(1).tolist())] for r in picked])
    counts = torch.bincount(idx, minlength=len(keys)).numpy()
    expected = [exact[k] * n for k in keys]
    assert math.isclose(sum(expected), n)
    assert chisquare(counts, expected).pvalue > ALPHA


def test_es_select_support_and_variable_s():
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    u = hash_uniform(row_hash(0, 0, torch.arange(9)))
    m = es_select(rows, w, torch.tensor([5, 1, 2]), u, 3)
    assert m[:3].tolist() == [True, False, True]          # support 2 < s: all positive weights
    assert not bool(m[3:5].any())                         # zero support: nothing
    assert int(m[5:].sum()) == 2


def test_dart_select_valid_and_close_to_exact():
    w = [0.5, 1.0, 2.0, 3.0, 0.25]
    n = 4000
    rows = torch.arange(n).repeat_interleave(len(w))
    weights = torch.tensor(w, dtype=torch.float64).repeat(n)
    mask = dart_select(rows, weights, 2, n, seed=0, stream=0)
    picked = mask.view(n, len(w))
    assert bool((picked.sum(1) == 2).all())
    # dart throwing approximates successive sampling: inclusion frequencies within 0.06 of exact
    exact = _exact_pair_probs(w)
    incl = [sum(p for k, p in exact.items() if i in k) for i in range(len(w))]
    freq = picked.double().mean(0)
    assert (freq - torch.tensor(incl)).abs().max() < 0.06
    # rows with fewer positive weights than s take them all
    m = dart_select(torch.tensor([0, 0, 0]), torch.tensor([1.0, 0.0, 1.0]), 5, 1, seed=0, stream=0)
    assert m.tolist() == [True, False, True]
