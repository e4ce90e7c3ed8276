"""Seeded synthetic graphs: R-MAT (skewed degrees, the Graph500 generator) and a stochastic block
model with learnable labels and features.

R-MAT (Chakrabarti, Zhan, Faloutsos 2004): each of ``edge_factor * 2**scale`` edges picks, for each
of ``scale`` bit levels, one quadrant of the adjacency matrix with probabilities (a, b, c, d); the
source bit is 1 in quadrants c, d and the target bit is 1 in quadrants b, d. Vertex ids are then
permuted at random (as Graph500 does) so that degree is not correlated with id. The result is
symmetrised, with self-loops and duplicate edges removed.

SBM: ``n_blocks`` blocks of ``block_size`` vertices; an intra-block pair is an edge with probability
``p_in``, an inter-block pair with ``p_out``. Features ``x_v = onehot(block(v)) + noise * N(0, I)``
in ``feat_dim >= n_blocks`` dimensions; the label is the block. The features alone are a weak
signal; a neighbourhood mean over 1–2 hops (mostly intra-block edges) recovers the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparse import CSR, csr_from_edges

__all__ = ["rmat_edges", "rmat", "SBMGraph", "sbm", "split_nodes"]


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def rmat_edges(scale: int, edge_factor: int = 16, abcd=(0.57, 0.19, 0.19, 0.05), *, seed: int = 0,
               device="cpu", permute: bool = True, chunk: int = 1 << 24):
    """Directed R-MAT edge list ``(src, dst)`` of ``edge_factor * 2**scale`` edges (ids < 2**scale)."""
    a, b, c, d = abcd
    if abs(a + b + c + d - 1.0) > 1e-6 or min(abcd) < 0:
        raise ValueError(f"rmat: (a, b, c, d) must be non-negative and sum to 1, got {abcd}")
    n = 1 << scale
    m = edge_factor * n
    g = _gen(seed, device)
    src = torch.zeros(m, dtype=torch.int64, device=device)
    dst = torch.zeros(m, dtype=torch.int64, device=device)
    for lo in range(0, m, chunk):
        hi = min(m, lo + chunk)
        s = torch.zeros(hi - lo, dtype=torch.int64, device=device)
        t = torch.zeros(hi - lo, dtype=torch.int64, device=device)
        for level in range(scale):
            u = torch.rand(hi - lo, generator=g, device=device)
            src_bit = u >= a + b                                 # quadrants c, d
            dst_bit = ((u >= a) & (u < a + b)) | (u >= a + b + c)  # quadrants b, d
            s |= src_bit.to(torch.int64) << level
            t |= dst_bit.to(torch.int64) << level
        src[lo:hi], dst[lo:hi] = s, t
    if permute:
        perm = torch.randperm(n, generator=g, device=device)
        src, dst = perm[src], perm[dst]
    return src, dst


def rmat(scale: int, edge_factor: int = 16, abcd=(0.57, 0.19, 0.19, 0.05), *, seed: int = 0,
         device="cpu") -> CSR:
    """Symmetric, loop-free, duplicate-free R-MAT graph on ``2**scale`` vertices as CSR."""
    src, dst = rmat_edges(scale, edge_factor, abcd, seed=seed, device=device)
    return csr_from_edges(src, dst, 1 << scale)


@dataclass
class SBMGraph:
    graph: CSR
    features: torch.Tensor   # [n, feat_dim] float32
    labels: torch.Tensor     # [n] int64 block id
    n_blocks: int


def sbm(n_blocks: int = 8, block_size: int = 512, p_in: float = 0.02, p_out: float = 0.001, *,
        feat_dim: int = 16, noise: float = 1.0, seed: int = 0, device="cpu") -> SBMGraph:
    """Stochastic block model with one-hot-plus-noise features and block labels.

    Edges are drawn per block pair: the number of pairs that are edges is Binomial(pairs, p), and
    that many pairs are drawn uniformly (duplicates then merge, which lowers the count by a
    fraction ~ p/2: negligible at the sparse p used here).
    """
    if feat_dim < n_blocks:
        raise ValueError(f"sbm: feat_dim ({feat_dim}) must be >= n_blocks ({n_blocks})")
    n = n_blocks * block_size
    g = _gen(seed, "cpu")
    srcs, dsts = [], []
    for bi in range(n_blocks):
        for bj in range(bi, n_blocks):
            p = p_in if bi == bj else p_out
            pairs = block_size * (block_size - 1) // 2 if bi == bj else block_size * block_size
            if p <= 0 or pairs == 0:
                continue
            cnt = int(torch.binomial(torch.tensor(float(pairs)), torch.tensor(float(p)), generator=g))
            u = torch.randint(0, block_size, (cnt,), generator=g) + bi * block_size
            v = torch.randint(0, block_size, (cnt,), generator=g) + bj * block_size
            srcs.append(u)
            dsts.append(v)
    src, dst = torch.cat(srcs), torch.cat(dsts)
    graph = csr_from_edges(src, dst, n)
    labels = torch.arange(n) // block_size
    feats = torch.nn.functional.one_hot(labels, feat_dim).float()
    feats += noise * torch.randn(n, feat_dim, generator=g)
    return SBMGraph(graph.to(device), feats.to(device), labels.to(device), n_blocks)


def split_nodes(n: int, train_frac: float = 0.5, *, seed: int = 0, device="cpu"):
    """Random disjoint (train, test) vertex id tensors."""
    perm = torch.randperm(n, generator=_gen(seed, "cpu"))
    k = int(round(train_frac * n))
    return perm[:k].to(device), perm[k:].to(device)
