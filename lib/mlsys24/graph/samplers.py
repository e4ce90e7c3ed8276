"""GraphSAGE (node-wise) and LADIES (layer-wise) sampling as sparse-matrix operations, for k
minibatches at once (bulk), plus the per-minibatch loop samplers they are compared with.

Notation (Tripathy, Yelick, Buluç, MLSys 2024): A is the n x n adjacency (CSR), b the minibatch
size, k the number of minibatches sampled together, s_l the fanout / layer size of layer l.

GraphSAGE, bulk (``sage_sample_bulk``). The frontier matrix Q^l has k*b_l rows with one nonzero
each (row r = r-th frontier vertex of its minibatch). P = Q^l A is a row gather of A; its rows are
uniform distributions over neighbours, so sampling ``min(s_l, deg)`` distinct columns per row is
done with random offsets into the CSR rows (O(s_l) per row, P never built). The next frontier of
each minibatch is the current one followed by every row's ``s_l`` samples (padding -1 where
deg < s_l): b_{l+1} = b_l (1 + s_l), duplicates kept (fixed-size blocks). ``sage_sample_spgemm``
builds P explicitly with the ESC SpGEMM and samples offsets into P's rows: the same result, and the
form the distributed sampler uses.

LADIES, bulk (``ladies_sample_bulk``). Â = D^-1/2 (A + I) D^-1/2. Q^l is k x n, row j the indicator
of minibatch j's node set S_l(j). P = Q^l (Â∘Â) gives p_j(v) = sum_{u in S_l(j)} Â[u, v]^2 / Z_j;
``s_l`` columns per row are drawn without replacement (Efraimidis–Spirakis, or dart throwing) to
form S_{l+1}(j). The sampled adjacency A^l(j) = Â[S_l(j), S_{l+1}(j)] (rows extracted by a
second SpGEMM with a one-nonzero-per-row selection matrix, columns by membership) has column v
scaled by 1 / (s_l p_j(v)) and is then row-normalised; the bulk result is the block-diagonal stack.

Loop baselines (``LoopSageSampler``, ``LoopLadiesSampler``): one minibatch and one layer at a time,
the way DGL / PyG / the LADIES reference code do it — CSR row slicing, per-row sampling, the node
set de-duplicated and relabelled to local ids (SAGE); a dense length-n probability vector and
``torch.multinomial`` without replacement (LADIES).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sparse import COO, CSR, coalesce, esc_spgemm, segment_offsets
from .wor import dart_select, es_select, hash_uniform, rank_in_row, row_hash, uniform_offsets

__all__ = ["SageSample", "sage_sample_bulk", "sage_sample_spgemm", "sage_expand", "sage_frontier_q",
           "LadiesSample", "ladies_normalize", "ladies_sample_bulk", "ladies_select", "ladies_extract",
           "ladies_frontier_q", "ladies_rows_q", "ladies_probs_ref",
           "LoopSample", "LoopLadiesSample", "LoopSageSampler", "LoopLadiesSampler", "sage_sizes", "make_minibatches"]


def make_minibatches(nodes: torch.Tensor, batch_size: int, *, seed: int | None = None) -> torch.Tensor:
    """``[n_batches, batch_size]`` seeds: ``nodes`` (shuffled when ``seed`` is given), remainder dropped."""
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        nodes = nodes[torch.randperm(nodes.numel(), generator=g).to(nodes.device)]
    nb = nodes.numel() // batch_size
    if nb == 0:
        raise ValueError(f"make_minibatches: {nodes.numel()} nodes < batch_size {batch_size}")
    return nodes[: nb * batch_size].reshape(nb, batch_size)


def sage_sizes(batch_size: int, fanouts) -> list[int]:
    """Frontier sizes b_0 = b, b_{l+1} = b_l (1 + s_l)."""
    sizes = [batch_size]
    for s in fanouts:
        sizes.append(sizes[-1] * (1 + s))
    return sizes


# --------------------------------------------------------------------------------------------- SAGE
@dataclass
class SageSample:
    """Bulk GraphSAGE sample of k minibatches.

    ``frontiers[l]``: ``[k, b_l]`` vertex ids (-1 = padding). ``frontiers[l+1][:, :b_l]`` is
    ``frontiers[l]``; ``frontiers[l+1][:, b_l:].view(k, b_l, s_l)[:, r]`` are row r's samples.
    """

    frontiers: list[torch.Tensor]
    fanouts: tuple[int, ...]
    first_batch: int = 0

    @property
    def k(self) -> int:
        return self.frontiers[0].shape[0]

    @property
    def batch_size(self) -> int:
        return self.frontiers[0].shape[1]

    def neighbours(self, layer: int) -> torch.Tensor:
        """``[k, b_l, s_l]`` sampled neighbours of every layer-l frontier row (-1 = none)."""
        b_l = self.frontiers[layer].shape[1]
        return self.frontiers[layer + 1][:, b_l:].reshape(self.k, b_l, self.fanouts[layer])

    def adjacency(self, layer: int) -> COO:
        """Block-diagonal sampled adjacency A^l: ``(k b_l) x (k b_{l+1})``, entry 1 for the row's own
        copy (column r of its block) and each of its samples (column b_l + r s_l + slot)."""
        k, b_l, s = self.k, self.frontiers[layer].shape[1], self.fanouts[layer]
        b_n = self.frontiers[layer + 1].shape[1]
        dev = self.frontiers[0].device
        valid_row = self.frontiers[layer] >= 0                                   # [k, b_l]
        valid_nb = self.neighbours(layer) >= 0                                   # [k, b_l, s]
        j = torch.arange(k, device=dev).view(k, 1, 1)
        r = torch.arange(b_l, device=dev).view(1, b_l, 1)
        slot = torch.arange(s, device=dev).view(1, 1, s)
        rows_self = (j * b_l + r).expand(k, b_l, 1)[valid_row.unsqueeze(2)]
        cols_self = (j * b_n + r).expand(k, b_l, 1)[valid_row.unsqueeze(2)]
        rows_nb = (j * b_l + r).expand(k, b_l, s)[valid_nb]
        cols_nb = (j * b_n + b_l + r * s + slot)[valid_nb]
        rows, cols = torch.cat([rows_self, rows_nb]), torch.cat([cols_self, cols_nb])
        ones = torch.ones(rows.numel(), device=dev)
        return coalesce(rows, cols, ones, (k * b_l, k * b_n))


def sage_frontier_q(frontier: torch.Tensor, n: int) -> COO:
    """Q^l: one nonzero per (valid) frontier entry; rows = flat frontier positions, shape ``(k b_l, n)``."""
    flat = frontier.reshape(-1)
    pos = torch.nonzero(flat >= 0).squeeze(1)
    return COO(pos, flat[pos], torch.ones(pos.numel(), device=flat.device), (flat.numel(), n))


def sage_expand(frontier: torch.Tensor, start: torch.Tensor, deg: torch.Tensor, indices: torch.Tensor,
                s: int, *, seed: int, layer: int, first_batch: int) -> torch.Tensor:
    """Next frontier ``[k, b_l (1 + s)]`` from the rows (``start``, ``deg`` into ``indices``) of
    P = Q^l A, one row per flat frontier position. Random offsets are keyed by the global row
    id ``(first_batch + j) * b_l + r``, so the result does not depend on k or on partitioning."""
    k, b_l = frontier.shape
    dev = frontier.device
    R = k * b_l
    counter = first_batch * b_l + torch.arange(R, device=dev)
    off = uniform_offsets(deg, s, row_hash(seed, layer, counter))                # [R, s]
    idx = (start.unsqueeze(1) + off.clamp_min(0)).clamp_(max=max(indices.numel() - 1, 0))
    nb = torch.where(off >= 0, indices[idx] if indices.numel() else torch.zeros_like(idx), -1)
    return torch.cat([frontier, nb.reshape(k, b_l * s)], 1)


def sage_sample_bulk(graph: CSR, seeds: torch.Tensor, fanouts, *, seed: int = 0, first_batch: int = 0) -> SageSample:
    """Bulk GraphSAGE sampling of ``seeds`` ``[k, b]`` by random offsets into A's CSR rows."""
    fr = seeds
    frontiers = [fr]
    for layer, s in enumerate(fanouts):
        flat = fr.reshape(-1)
        valid = flat >= 0
        v = flat.clamp_min(0)
        start = graph.indptr[v]
        deg = torch.where(valid, graph.indptr[v + 1] - start, 0)
        fr = sage_expand(fr, start, deg, graph.indices, s, seed=seed, layer=layer, first_batch=first_batch)
        frontiers.append(fr)
    return SageSample(frontiers, tuple(fanouts), first_batch)


def sage_sample_spgemm(graph: CSR, seeds: torch.Tensor, fanouts, *, seed: int = 0, first_batch: int = 0,
                       spgemm=esc_spgemm) -> SageSample:
    """The same sample with P = Q^l A built explicitly by a SpGEMM (``spgemm(Q, A) -> COO``)."""
    fr = seeds
    frontiers = [fr]
    n = graph.n_cols
    for layer, s in enumerate(fanouts):
        p = spgemm(sage_frontier_q(fr, n), graph).to_csr()
        fr = sage_expand(fr, p.indptr[:-1], p.degrees(), p.indices, s, seed=seed, layer=layer,
                         first_batch=first_batch)
        frontiers.append(fr)
    return SageSample(frontiers, tuple(fanouts), first_batch)


# ------------------------------------------------------------------------------------------- LADIES
def ladies_normalize(graph: CSR) -> CSR:
    """Â = D^-1/2 (A + I) D^-1/2 (D = degree + 1), float64 values, columns sorted."""
    n = graph.n_rows
    dev = graph.device
    rows = torch.cat([graph.row_ids(), torch.arange(n, device=dev)])
    cols = torch.cat([graph.indices, torch.arange(n, device=dev)])
    d = (graph.degrees() + 1).double()
    vals = (d[rows] * d[cols]).rsqrt()
    return coalesce(rows, cols, vals, (n, n)).to_csr()


def _squared(a: CSR) -> CSR:
    return CSR(a.indptr, a.indices, a.n_cols, a.vals(torch.float64) ** 2)


@dataclass
class LadiesSample:
    """Bulk LADIES sample of k minibatches.

    ``nodes[l]``: ``[k, m_l]`` (m_0 = b, m_{l+1} = s_l; -1 = padding, valid ids sorted ascending).
    ``probs[l]``: ``[k, s_l]`` p_j(v) of the nodes of ``nodes[l+1]``. ``adjs[l]``: block-diagonal
    ``(k m_l) x (k m_{l+1})`` sampled, rescaled and row-normalised Â.
    """

    nodes: list[torch.Tensor]
    probs: list[torch.Tensor] = field(default_factory=list)
    adjs: list[COO] = field(default_factory=list)


def ladies_frontier_q(nodes: torch.Tensor, n: int) -> COO:
    """Q^l: ``k x n`` indicator, row j = minibatch j's node set."""
    k, m = nodes.shape
    flat = nodes.reshape(-1)
    pos = torch.nonzero(flat >= 0).squeeze(1)
    return COO(torch.div(pos, m, rounding_mode="floor"), flat[pos],
               torch.ones(pos.numel(), dtype=torch.float64, device=flat.device), (k, n))


def ladies_rows_q(nodes: torch.Tensor, n: int) -> COO:
    """Q_R: one nonzero per (valid) node, rows = flat positions ``j m + r``: Q_R Â extracts Â's rows."""
    flat = nodes.reshape(-1)
    pos = torch.nonzero(flat >= 0).squeeze(1)
    return COO(pos, flat[pos], torch.ones(pos.numel(), dtype=torch.float64, device=flat.device), (flat.numel(), n))


def ladies_select(p: COO, s: int, *, seed: int, layer: int, first_batch: int, selection: str = "es",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``min(s, support)`` columns per row of the unnormalised P (``k x n``, coalesced).

    Returns ``(nodes [k, s]`` sorted ids with -1 padding, ``probs [k, s]`` p_j(v), 0 at padding).
    Draws are keyed by (global minibatch id, vertex id).
    """
    k, n = p.shape
    dev = p.rows.device
    z = torch.zeros(k, dtype=torch.float64, device=dev).index_add_(0, p.rows, p.values.double())
    prob = p.values.double() / z[p.rows].clamp_min(1e-300)
    if selection == "es":
        u = hash_uniform(row_hash(seed, 1000 + layer, (first_batch + p.rows) * n + p.cols))
        mask = es_select(p.rows, prob, s, u, k)
    elif selection == "darts":
        mask = dart_select(p.rows, prob, s, k, seed=seed + 7 * first_batch, stream=1000 + layer)
    else:
        raise ValueError(f"ladies_select: selection must be 'es' or 'darts', got {selection!r}")
    rows, cols, pr = p.rows[mask], p.cols[mask], prob[mask]
    slot = rank_in_row(rows, k)
    nodes = torch.full((k, s), -1, dtype=torch.int64, device=dev)
    probs = torch.zeros((k, s), dtype=torch.float64, device=dev)
    nodes[rows, slot] = cols
    probs[rows, slot] = pr
    return nodes, probs


def ladies_extract(r: COO, nodes: torch.Tensor, nxt: torch.Tensor, probs: torch.Tensor, s: int) -> COO:
    """A^l from R = Q_R Â (rows = flat positions of ``nodes``): keep columns in S_{l+1}(j), scale
    column v by 1 / (s p_j(v)), row-normalise. Shape ``(k m_l) x (k s)``."""
    k, m = nodes.shape
    n = r.shape[1]
    dev = nodes.device
    j = torch.div(r.rows, m, rounding_mode="floor")
    flat = nxt.reshape(-1)
    valid = torch.nonzero(flat >= 0).squeeze(1)                                 # flat positions j*s + slot
    sel_key = torch.div(valid, s, rounding_mode="floor") * n + flat[valid]     # ascending (ids sorted per row)
    key = j * n + r.cols
    idx = torch.searchsorted(sel_key, key).clamp_(max=max(sel_key.numel() - 1, 0))
    hit = sel_key[idx] == key if sel_key.numel() else torch.zeros_like(key, dtype=torch.bool)
    pos = valid[idx[hit]]
    val = r.values.double()[hit] / (s * probs.reshape(-1)[pos])
    rows = r.rows[hit]
    rs = torch.zeros(k * m, dtype=torch.float64, device=dev).index_add_(0, rows, val)
    return COO(rows, pos, val / rs[rows], (k * m, k * s))


def ladies_sample_bulk(ahat: CSR, seeds: torch.Tensor, sizes, *, seed: int = 0, first_batch: int = 0,
                       selection: str = "es", spgemm=esc_spgemm) -> LadiesSample:
    """Bulk LADIES over ``seeds`` ``[k, b]``; ``ahat`` from :func:`ladies_normalize`."""
    n = ahat.n_cols
    ahat_sq = _squared(ahat)
    out = LadiesSample([seeds])
    cur = seeds
    for layer, s in enumerate(sizes):
        p = spgemm(ladies_frontier_q(cur, n), ahat_sq)                           # k x n
        nxt, probs = ladies_select(p, s, seed=seed, layer=layer, first_batch=first_batch, selection=selection)
        r = spgemm(ladies_rows_q(cur, n), ahat)                                  # (k m) x n rows of Â
        out.adjs.append(ladies_extract(r, cur, nxt, probs, s))
        out.nodes.append(nxt)
        out.probs.append(probs)
        cur = nxt
    return out


def ladies_probs_ref(ahat: CSR, node_set: torch.Tensor) -> torch.Tensor:
    """Reference p(v) = sum_{u in S} Â[u, v]^2 / Z for one node set, as a dense length-n float64
    vector built row by row (one Python iteration per vertex of S)."""
    p = torch.zeros(ahat.n_cols, dtype=torch.float64, device=ahat.device)
    for u in node_set.tolist():
        lo, hi = int(ahat.indptr[u]), int(ahat.indptr[u + 1])
        p[ahat.indices[lo:hi]] += ahat.vals(torch.float64)[lo:hi] ** 2
    return p / p.sum()


# --------------------------------------------------------------------------------------- loop samplers
@dataclass
class LoopSample:
    """One minibatch, DGL/PyG style: ``nodes`` unique global ids; layer l uses the first
    ``n_dst[l]`` of them as destinations and the first ``n_dst[l+1]`` as sources; edges local."""

    nodes: torch.Tensor
    n_dst: list[int]
    edges: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: (dst_local, src_local)


@dataclass
class LoopLadiesSample:
    """One LADIES minibatch: ``layers[l]`` the node set of layer l (``layers[0]`` = seeds), ``edges[l]``
    (row in ``layers[l]``, column in ``layers[l+1]``) with row-normalised ``weights[l]``, ``probs[l]``
    p(v) of ``layers[l+1]``."""

    layers: list[torch.Tensor]
    edges: list[tuple[torch.Tensor, torch.Tensor]]
    weights: list[torch.Tensor]
    probs: list[torch.Tensor]


class LoopSageSampler:
    """Per-minibatch, per-layer GraphSAGE sampler: CSR row slicing, ``min(s, deg)`` uniform
    neighbours per node, node set de-duplicated and relabelled through an id map of size n."""

    def __init__(self, graph: CSR, fanouts, *, seed: int = 0):
        self.graph, self.fanouts, self.seed = graph, tuple(fanouts), seed
        self._map = torch.full((graph.n_rows,), -1, dtype=torch.int64, device=graph.device)

    def sample(self, seeds: torch.Tensor, batch_id: int) -> LoopSample:
        g, m = self.graph, self._map
        nodes = seeds
        n_dst = [seeds.numel()]
        edges = []
        m[nodes] = torch.arange(nodes.numel(), device=nodes.device)
        for layer, s in enumerate(self.fanouts):
            R = nodes.numel()
            start = g.indptr[nodes]
            deg = g.indptr[nodes + 1] - start
            counter = batch_id * (1 << 32) + torch.arange(R, device=nodes.device)
            off = uniform_offsets(deg, s, row_hash(self.seed + 1, 100 + layer, counter))
            ok = off >= 0
            nb = g.indices[(start.unsqueeze(1) + off.clamp_min(0))[ok]]
            dst = torch.arange(R, device=nodes.device).unsqueeze(1).expand(R, s)[ok]
            new = torch.unique(nb[m[nb] < 0])
            m[new] = torch.arange(R, R + new.numel(), device=nodes.device)
            edges.append((dst, m[nb]))
            nodes = torch.cat([nodes, new])
            n_dst.append(nodes.numel())
        m[nodes] = -1
        return LoopSample(nodes, n_dst, edges)

    def sample_all(self, batches: torch.Tensor, first_batch: int = 0) -> list[LoopSample]:
        return [self.sample(batches[i], first_batch + i) for i in range(batches.shape[0])]


class LoopLadiesSampler:
    """Per-minibatch LADIES as in its reference code: rows of Â for the node set, a dense length-n
    vector of squared column sums, ``torch.multinomial`` without replacement, Â[S_l, S_{l+1}]
    rescaled by 1 / (s p) and row-normalised."""

    def __init__(self, ahat: CSR, sizes, *, seed: int = 0):
        self.ahat, self.sizes, self.seed = ahat, tuple(sizes), seed
        self._pos = torch.full((ahat.n_rows,), -1, dtype=torch.int64, device=ahat.device)

    def sample(self, seeds: torch.Tensor, batch_id: int) -> LoopLadiesSample:
        a, pos = self.ahat, self._pos
        n = a.n_rows
        dev = seeds.device
        g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + batch_id)
        cur = seeds
        layers, edges, weights, probs = [seeds], [], [], []
        for s in self.sizes:
            start = a.indptr[cur]
            deg = a.indptr[cur + 1] - start
            owner = torch.repeat_interleave(torch.arange(cur.numel(), device=dev), deg)
            e = torch.arange(owner.numel(), device=dev) - segment_offsets(deg)[owner] + start[owner]
            cols, vals = a.indices[e], a.values[e]
            p = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, cols, vals ** 2)
            support = int((p > 0).sum())
            nxt = torch.multinomial(p / p.sum(), min(s, support), replacement=False, generator=g)
            nxt = torch.sort(nxt).values
            pnext = p[nxt] / p.sum()
            pos[nxt] = torch.arange(nxt.numel(), device=dev)
            hit = pos[cols] >= 0
            dst, src = owner[hit], pos[cols[hit]]
            w = vals[hit] / (s * pnext[src])
            rs = torch.zeros(cur.numel(), dtype=torch.float64, device=dev).index_add_(0, dst, w)
            pos[nxt] = -1
            edges.append((dst, src))
            weights.append(w / rs[dst])
            probs.append(pnext)
            layers.append(nxt)
            cur = nxt
        return LoopLadiesSample(layers, edges, weights, probs)

    def sample_all(self, batches: torch.Tensor, first_batch: int = 0) -> list[LoopLadiesSample]:
        return [self.sample(batches[i], first_batch + i) for i in range(batches.shape[0])]
