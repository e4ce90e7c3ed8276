"""Bulk matrix samplers (GraphSAGE, LADIES) and the loop baselines: validity, distributions,
bulk/partition invariance, and agreement with the SpGEMM / dense references."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from mlsys24.graph.generators import rmat
from mlsys24.graph.samplers import (
    LoopLadiesSampler,
    LoopSageSampler,
    ladies_frontier_q,
    ladies_normalize,
    ladies_probs_ref,
    ladies_sample_bulk,
    make_minibatches,
    sage_frontier_q,
    sage_sample_bulk,
    sage_sample_spgemm,
    sage_sizes,
)
from mlsys24.graph.sparse import CSR, coalesce, csr_from_edges, esc_spgemm, spgemm_ref


@pytest.fixture(scope="module")
def graph():
    return rmat(10, 8, seed=0)


@pytest.fixture(scope="module")
def batches(graph):
    return make_minibatches(torch.arange(graph.n_rows), 16, seed=0)[:12]


def _is_edge(g: CSR, u, v):
    key = g.row_ids() * g.n_cols + g.indices
    q = u * g.n_cols + v
    i = torch.searchsorted(key, q).clamp(max=key.numel() - 1)
    return key[i] == q


def test_sage_bulk_validity(graph, batches):
    fan = (5, 3)
    s = sage_sample_bulk(graph, batches, fan, seed=1)
    assert [f.shape[1] for f in s.frontiers] == sage_sizes(16, fan)
    deg = graph.degrees()
    for layer, k in enumerate(fan):
        cur = s.frontiers[layer]
        assert torch.equal(s.frontiers[layer + 1][:, : cur.shape[1]], cur)
        nb = s.neighbours(layer)                                   # [k, b_l, s]
        valid = cur >= 0
        u = cur.unsqueeze(2).expand_as(nb)
        ok = nb >= 0
        assert bool(_is_edge(graph, u[ok], nb[ok]).all()), "a sample is not an edge"
        want = torch.where(valid, deg[cur.clamp_min(0)].clamp(max=k), 0)
        assert torch.equal(ok.sum(2), want), "per-row count != min(s, deg)"
        srt = torch.sort(torch.where(ok, nb, -torch.arange(1, k + 1)), dim=2).values
        assert bool((srt[..., 1:] != srt[..., :-1]).all()), "duplicate neighbour in a row"


def test_sage_bulk_size_and_spgemm_path_invariance(graph, batches):
    fan = (4, 2)
    full = sage_sample_bulk(graph, batches, fan, seed=7)
    spg = sage_sample_spgemm(graph, batches, fan, seed=7)
    ref = sage_sample_spgemm(graph, batches, fan, seed=7, spgemm=spgemm_ref)
    for a, b, c in zip(full.frontiers, spg.frontiers, ref.frontiers):
        assert torch.equal(a, b) and torch.equal(a, c)
    for lo in range(0, 12, 5):       # k = 5, 5, 2 — same sample as k = 12
        part = sage_sample_bulk(graph, batches[lo:lo + 5], fan, seed=7, first_batch=lo)
        for a, b in zip(full.frontiers, part.frontiers):
            assert torch.equal(a[lo:lo + 5], b)
    other = sage_sample_bulk(graph, batches, fan, seed=8)
    assert not torch.equal(other.frontiers[-1], full.frontiers[-1])


def test_sage_adjacency_is_row_column_extraction(graph, batches):
    """A^l ⊆ Q_R (A + I) Q_C^T, block-diagonal, 1 + min(s, deg) entries per valid row."""
    fan = (3, 2)
    s = sage_sample_bulk(graph, batches[:3], fan, seed=2)
    n = graph.n_rows
    eye_rows = torch.arange(n)
    a_i = coalesce(torch.cat([graph.row_ids(), eye_rows]), torch.cat([graph.indices, eye_rows]),
                   torch.ones(graph.nnz + n), (n, n)).to_csr()
    for layer in range(2):
        adj = s.adjacency(layer)
        qr = sage_frontier_q(s.frontiers[layer], n)
        full = esc_spgemm(qr, a_i).to_torch().to_dense()               # (k b_l) x n
        nxt = s.frontiers[layer + 1].reshape(-1)
        k, b_l, b_n = 3, s.frontiers[layer].shape[1], s.frontiers[layer + 1].shape[1]
        for r, c in zip(adj.rows.tolist(), adj.cols.tolist()):
            assert r // b_l == c // b_n                                 # same minibatch
            assert full[r, nxt[c]] > 0                                  # an edge (or self) of the row's vertex
        cnt = torch.bincount(adj.rows, minlength=k * b_l)
        deg = graph.degrees()[s.frontiers[layer].reshape(-1).clamp_min(0)]
        valid = s.frontiers[layer].reshape(-1) >= 0
        assert torch.equal(cnt, torch.where(valid, 1 + deg.clamp(max=fan[layer]), 0))


def test_sage_uniformity_card_claim():
    """Card claim 2: a vertex of degree d >= 4 s, 2,000 draws: inclusion frequency within 0.05 of s/d."""
    g = rmat(10, 8, seed=0)
    s = 5
    v = int(torch.nonzero(g.degrees() >= 4 * s)[0])
    d = int(g.degrees()[v])
    seeds = torch.full((2000, 1), v)
    samp = sage_sample_bulk(g, seeds, (s,), seed=11).neighbours(0).reshape(2000, s)
    freq = torch.bincount(samp.reshape(-1), minlength=g.n_rows)[g.indices[g.indptr[v]:g.indptr[v + 1]]] / 2000
    assert (freq - s / d).abs().max() < 0.05


def test_sage_subset_chi_square():
    star = csr_from_edges(torch.zeros(6, dtype=torch.int64), torch.arange(1, 7), 7)
    n = 10_000
    samp = sage_sample_bulk(star, torch.zeros((n, 1), dtype=torch.int64), (2,), seed=4).neighbours(0).reshape(n, 2)
    code = {c: i for i, c in enumerate(itertools.combinations(range(1, 7), 2))}
    idx = torch.tensor([code[tuple(sorted(r))] for r in samp.tolist()])
    assert chisquare(torch.bincount(idx, minlength=15).numpy()).pvalue > 1e-3


def test_loop_sage_validity(graph, batches):
    loop = LoopSageSampler(graph, (5, 3), seed=0)
    for i in range(3):
        smp = loop.sample(batches[i], i)
        assert torch.unique(smp.nodes).numel() == smp.nodes.numel()
        assert torch.equal(smp.nodes[:16], batches[i])
        for layer, (dst, src) in enumerate(smp.edges):
            assert int(dst.max()) < smp.n_dst[layer] and int(src.max()) < smp.n_dst[layer + 1]
            assert bool(_is_edge(graph, smp.nodes[dst], smp.nodes[src]).all())
            cnt = torch.bincount(dst, minlength=smp.n_dst[layer])
            want = graph.degrees()[smp.nodes[: smp.n_dst[layer]]].clamp(max=(5, 3)[layer])
            assert torch.equal(cnt, want)
    assert bool((loop._map == -1).all())


@pytest.fixture(scope="module")
def ladies(graph, batches):
    ahat = ladies_normalize(graph)
    return ahat, ladies_sample_bulk(ahat, batches, (24, 24), seed=3)


def test_ladies_normalisation(graph):
    ahat = ladies_normalize(graph)
    dense = ahat.to_torch().to_dense()
    a = graph.to_torch().to_dense().double() + torch.eye(graph.n_rows, dtype=torch.float64)
    d = a.sum(1)
    torch.testing.assert_close(dense, a / torch.sqrt(d[:, None] * d[None, :]))


def test_ladies_probabilities_match_dense_reference(graph, batches, ladies):
    """Card claim 3: p_j(v) from the SpGEMM path == dense reference within 1e-6; rows sum to 1;
    sampled counts == min(s, support)."""
    ahat, samp = ladies
    cur = samp.nodes[0]
    sq = CSR(ahat.indptr, ahat.indices, ahat.n_cols, ahat.values ** 2)
    p = esc_spgemm(ladies_frontier_q(cur, graph.n_rows), sq).to_torch().to_dense()
    p = p / p.sum(1, keepdim=True)
    for j in range(3):
        ref = ladies_probs_ref(ahat, cur[j])
        assert (p[j] - ref).abs().max() < 1e-6
        sel = samp.nodes[1][j]
        sel = sel[sel >= 0]
        assert sel.numel() == min(24, int((ref > 0).sum()))
        torch.testing.assert_close(samp.probs[0][j][: sel.numel()], ref[sel])
    torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0], dtype=torch.float64))


def test_ladies_adjacency(graph, ladies):
    ahat, samp = ladies
    dense = ahat.to_torch().to_dense()
    for layer, adj in enumerate(samp.adjs):
        k, m = samp.nodes[layer].shape
        s = samp.nodes[layer + 1].shape[1]
        rs = torch.zeros(k * m, dtype=torch.float64).index_add_(0, adj.rows, adj.values)
        has = torch.bincount(adj.rows, minlength=k * m) > 0
        torch.testing.assert_close(rs[has], torch.ones(int(has.sum()), dtype=torch.float64))
        # before normalisation the entry is Â[u, v] / (s p(v)): check ratios inside each row
        u = samp.nodes[layer].reshape(-1)[adj.rows]
        v = samp.nodes[layer + 1].reshape(-1)[adj.cols]
        assert bool((adj.rows // m == adj.cols // s).all())
        raw = dense[u, v] / (s * samp.probs[layer].reshape(-1)[adj.cols])
        scale = adj.values / raw
        torch.testing.assert_close(scale, 1.0 / rs.new_zeros(k * m).index_add_(0, adj.rows, raw)[adj.rows])
        # every nonzero Â[u, v] with u in S_l(j), v in S_{l+1}(j) is present
        for j in range(2):
            su, sv = samp.nodes[layer][j], samp.nodes[layer + 1][j]
            su, sv = su[su >= 0], sv[sv >= 0]
            want = int((dense[su][:, sv] > 0).sum())
            got = int(((adj.rows // m) == j).sum())
            assert got == want


def test_ladies_bulk_invariance_and_darts(graph, batches, ladies):
    ahat, full = ladies
    part = ladies_sample_bulk(ahat, batches[4:8], (24, 24), seed=3, first_batch=4)
    for a, b in zip(full.nodes, part.nodes):
        assert torch.equal(a[4:8], b)
    darts = ladies_sample_bulk(ahat, batches[:4], (24, 24), seed=3, selection="darts")
    for layer in (1, 2):
        nd = darts.nodes[layer]
        for j in range(4):
            x = nd[j][nd[j] >= 0]
            assert torch.unique(x).numel() == x.numel() == full.nodes[layer][j].ge(0).sum()


def test_loop_ladies_matches_matrix_distribution(graph, batches, ladies):
    ahat, samp = ladies
    loop = LoopLadiesSampler(ahat, (24, 24), seed=0)
    one = loop.sample(batches[0], 0)
    ref = ladies_probs_ref(ahat, batches[0])
    torch.testing.assert_close(one.probs[0], ref[one.layers[1]])
    assert one.layers[1].numel() == samp.nodes[1][0].ge(0).sum()
    for (dst, _src), w in zip(one.edges, one.weights):
        rs = torch.zeros(int(dst.max()) + 1, dtype=torch.float64).index_add_(0, dst, w)
        torch.testing.assert_close(rs[rs > 0], torch.ones(int((rs > 0).sum()), dtype=torch.float64))
