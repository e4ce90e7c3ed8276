"""ESC SpGEMM against torch.sparse.mm, over odd shapes, weighted and 0/1 matrices, empty rows."""

import pytest
import torch

from mlsys24.graph.generators import rmat
from mlsys24.graph.sparse import COO, CSR, coalesce, esc_spgemm, spgemm_ref


def _random_csr(n_rows, n_cols, density, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    vals = torch.rand(rows.numel(), generator=g, dtype=torch.float64) + 0.1
    c = coalesce(rows, cols, vals, (n_rows, n_cols)).to_csr()
    return c if weighted else CSR(c.indptr, c.indices, n_cols, None)


@pytest.mark.parametrize("m,n", [(1, 7), (7, 83), (83, 127), (127, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_esc_spgemm_matches_torch_sparse(m, n, weighted):
    a = _random_csr(n, 97, 0.1, weighted, seed=m * 1000 + n)
    q = _random_csr(m, n, 0.3, True, seed=m + n).to_coo()
    got = esc_spgemm(q, a, value_dtype=torch.float64)
    ref = spgemm_ref(q, a)
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.cols, ref.cols)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-12, atol=1e-12)


def test_one_nonzero_per_row_is_a_row_gather():
    g = rmat(8, 8, seed=1)
    pick = torch.tensor([5, 5, 0, 255, 17])
    q = COO(torch.arange(5), pick, torch.ones(5), (5, g.n_rows))
    p = esc_spgemm(q, g).to_csr()
    for r, v in enumerate(pick.tolist()):
        assert torch.equal(p.indices[p.indptr[r]:p.indptr[r + 1]], g.indices[g.indptr[v]:g.indptr[v + 1]])


def test_col_offset_and_empty():
    a = _random_csr(10, 20, 0.3, True, seed=0)
    q = COO(torch.tensor([0, 2]), torch.tensor([103, 109]), torch.ones(2, dtype=torch.float64), (3, 200))
    p = esc_spgemm(q, a, col_offset=100)
    dense = a.to_torch().to_dense()
    ref = torch.zeros(3, 20, dtype=torch.float64)
    ref[0], ref[2] = dense[3], dense[9]
    got = torch.sparse_coo_tensor(torch.stack([p.rows, p.cols]), p.values, (3, 20), check_invariants=True)
    torch.testing.assert_close(got.to_dense(), ref)
    e = torch.empty(0, dtype=torch.int64)
    empty = esc_spgemm(COO(e, e, torch.empty(0), (4, 10)), a)
    assert empty.nnz == 0 and empty.shape == (4, 20)
