"""Seeded graph generators: R-MAT structure and determinism, SBM statistics."""

import torch

from mlsys24.graph.generators import rmat, rmat_edges, sbm, split_nodes
from mlsys24.graph.sparse import csr_from_edges


def _check_simple_symmetric(g):
    rows, cols = g.row_ids(), g.indices
    assert not bool((rows == cols).any()), "self-loops left"
    key = rows * g.n_cols + cols
    assert bool((key[1:] > key[:-1]).all()), "not sorted / duplicates"
    rkey = cols * g.n_cols + rows
    assert torch.equal(torch.sort(rkey).values, key), "not symmetric"


def test_rmat_is_simple_symmetric_and_seeded():
    g = rmat(9, 8, seed=3)
    assert g.n_rows == 512
    _check_simple_symmetric(g)
    g2 = rmat(9, 8, seed=3)
    assert torch.equal(g.indptr, g2.indptr) and torch.equal(g.indices, g2.indices)
    g3 = rmat(9, 8, seed=4)
    assert not torch.equal(g.indices[:100], g3.indices[:100])


def test_rmat_degrees_are_skewed():
    src, dst = rmat_edges(12, 16, seed=0, permute=False)
    assert src.numel() == 16 * 4096
    deg = torch.bincount(src, minlength=4096).float()
    # vertex 0 collects quadrant a at every level: far above the mean degree
    assert deg.max() > 20 * deg.mean()


def test_csr_from_edges_removes_duplicates_and_loops():
    src = torch.tensor([0, 0, 1, 2, 2, 3])
    dst = torch.tensor([1, 1, 0, 2, 3, 0])
    g = csr_from_edges(src, dst, 4)
    assert g.indptr.tolist() == [0, 2, 3, 4, 6]
    assert g.indices.tolist() == [1, 3, 0, 3, 0, 2]


def test_sbm_matches_the_card_statistics():
    d = sbm(8, 512, 0.02, 0.001, feat_dim=16, seed=0)
    g = d.graph
    _check_simple_symmetric(g)
    mean_deg = g.nnz / g.n_rows
    intra = float((d.labels[g.row_ids()] == d.labels[g.indices]).float().mean())
    assert 12.5 < mean_deg < 15.5
    assert 0.70 < intra < 0.78
    assert d.features.shape == (4096, 16) and d.labels.max() == 7
    tr, te = split_nodes(4096, 0.5, seed=0)
    assert tr.numel() == te.numel() == 2048
    assert torch.unique(torch.cat([tr, te])).numel() == 4096
