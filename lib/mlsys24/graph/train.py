"""GraphSAGE (mean aggregator) trained on sampled minibatches.

Layer: ``h_dst = W_self h_dst + W_neigh mean_{src in N(dst)} h_src`` (Hamilton et al. 2017), ReLU
between layers. One implementation serves both samplers: a minibatch is a list of
:class:`Block` (outermost hop first), each with the number of destination rows, and edges
``(dst_local, src_local)`` where the destinations are the first rows of the sources — true of the
bulk matrix layout (the next frontier starts with the current one) and of the de-duplicated loop
layout (current nodes keep their local ids).

Evaluation uses every neighbour (no sampling), layer by layer over the whole graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .samplers import LoopSageSampler, SageSample, make_minibatches, sage_sample_bulk
from .sparse import CSR

__all__ = ["Block", "SAGEConv", "GraphSAGE", "blocks_from_bulk", "blocks_from_loop", "full_graph_block",
           "TrainResult", "train_graphsage", "evaluate", "epoch_breakdown"]


@dataclass
class Block:
    n_dst: int
    edge_dst: torch.Tensor   # [E] local destination rows
    edge_src: torch.Tensor   # [E] local source rows (sources: the previous layer's rows)


class SAGEConv(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin_self = nn.Linear(d_in, d_out)
        self.lin_neigh = nn.Linear(d_in, d_out, bias=False)

    def forward(self, h_src: torch.Tensor, block: Block) -> torch.Tensor:
        # h_src: [n_src, d_in] -> [n_dst, d_out]
        agg = torch.zeros(block.n_dst, h_src.shape[1], dtype=h_src.dtype, device=h_src.device)
        agg.index_add_(0, block.edge_dst, h_src[block.edge_src])
        cnt = torch.bincount(block.edge_dst, minlength=block.n_dst).clamp_min(1).to(h_src.dtype)
        return self.lin_self(h_src[: block.n_dst]) + self.lin_neigh(agg / cnt.unsqueeze(1))


class GraphSAGE(nn.Module):
    def __init__(self, d_in: int, hidden: int, n_classes: int, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        dims = [d_in] + [hidden] * (n_layers - 1) + [n_classes]
        self.convs = nn.ModuleList(SAGEConv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
        h = x
        for i, (conv, blk) in enumerate(zip(self.convs, blocks)):
            h = conv(h, blk)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
                h = nn.functional.dropout(h, self.dropout, self.training)
        return h


def blocks_from_bulk(sample: SageSample, j: int) -> tuple[torch.Tensor, list[Block]]:
    """Input vertex ids (``[b_L]``, -1 padding) and blocks (outermost first) of minibatch ``j``."""
    blocks = []
    for layer in reversed(range(len(sample.fanouts))):
        nb = sample.neighbours(layer)[j]                                   # [b_l, s_l]
        b_l, s = nb.shape
        ok = nb >= 0
        dst = torch.arange(b_l, device=nb.device).unsqueeze(1).expand(b_l, s)[ok]
        src = (b_l + torch.arange(b_l * s, device=nb.device).view(b_l, s))[ok]
        blocks.append(Block(b_l, dst, src))
    return sample.frontiers[-1][j], blocks


def blocks_from_loop(sample) -> tuple[torch.Tensor, list[Block]]:
    """Input vertex ids and blocks (outermost first) of a :class:`~.samplers.LoopSample`."""
    blocks = [Block(sample.n_dst[layer], *sample.edges[layer]) for layer in reversed(range(len(sample.edges)))]
    return sample.nodes, blocks


def full_graph_block(graph: CSR) -> Block:
    return Block(graph.n_rows, graph.row_ids(), graph.indices)


@torch.no_grad()
def evaluate(model: GraphSAGE, graph: CSR, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    """Accuracy on ``idx`` with full-neighbour inference."""
    model.eval()
    blk = full_graph_block(graph)
    out = model(x, [blk] * len(model.convs))
    model.train()
    return float((out[idx].argmax(1) == y[idx]).float().mean())


@dataclass
class TrainResult:
    sampler: str
    history: list[dict] = field(default_factory=list)   # per epoch: epoch, loss, test_acc
    model: GraphSAGE | None = None

    @property
    def final_test_acc(self) -> float:
        return self.history[-1]["test_acc"]


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x[ids.clamp_min(0)]


def train_graphsage(graph: CSR, x: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor, test_idx: torch.Tensor,
                    *, sampler: str = "matrix", fanouts=(10, 5), batch_size: int = 64, epochs: int = 3,
                    hidden: int = 64, lr: float = 0.01, seed: int = 0, bulk: int | None = None,
                    progress: bool = False) -> TrainResult:
    """Train a ``len(fanouts)``-layer GraphSAGE with ``sampler`` in {"matrix", "loop"}.

    matrix: every epoch's minibatches are sampled ``bulk`` at a time (None = all at once).
    loop: one minibatch at a time with :class:`~.samplers.LoopSageSampler`.
    Test accuracy (full-neighbour inference) is recorded after every epoch.
    """
    if sampler not in ("matrix", "loop"):
        raise ValueError(f"train_graphsage: sampler must be 'matrix' or 'loop', got {sampler!r}")
    torch.manual_seed(seed)
    n_classes = int(y.max()) + 1
    model = GraphSAGE(x.shape[1], hidden, n_classes, len(fanouts)).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loop = LoopSageSampler(graph, fanouts, seed=seed) if sampler == "loop" else None
    res = TrainResult(sampler, model=model)
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs_iter = tqdm(epochs_iter, leave=False, desc=f"train ({sampler})")
    for ep in epochs_iter:
        batches = make_minibatches(train_idx, batch_size, seed=seed * 7919 + ep)
        n_b = batches.shape[0]
        first = ep * n_b
        losses = []
        k = n_b if bulk is None else bulk
        for lo in range(0, n_b, k):
            chunk = batches[lo:lo + k]
            if loop is None:
                samp = sage_sample_bulk(graph, chunk, fanouts, seed=seed, first_batch=first + lo)
                items = [blocks_from_bulk(samp, j) for j in range(chunk.shape[0])]
            else:
                items = [blocks_from_loop(loop.sample(chunk[j], first + lo + j)) for j in range(chunk.shape[0])]
            for j, (ids, blocks) in enumerate(items):
                out = model(_gather(x, ids), blocks)
                loss = nn.functional.cross_entropy(out, y[chunk[j]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        res.history.append({"epoch": ep + 1, "loss": sum(losses) / len(losses),
                            "test_acc": evaluate(model, graph, x, y, test_idx)})
    return res


def epoch_breakdown(graph: CSR, x: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor, *,
                    sampler: str = "matrix", fanouts=(10, 5), batch_size: int = 64, hidden: int = 64,
                    seed: int = 0, repeats: int = 3, warmup: int = 1) -> dict:
    """Seconds per epoch spent sampling, fetching features and propagating (forward + backward +
    step), each timed separately with :func:`mlsys24.bench.measure` (medians)."""
    from ..bench import measure

    torch.manual_seed(seed)
    model = GraphSAGE(x.shape[1], hidden, int(y.max()) + 1, len(fanouts)).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = make_minibatches(train_idx, batch_size, seed=seed)
    loop = LoopSageSampler(graph, fanouts, seed=seed)

    def sample_epoch():
        if sampler == "matrix":
            s = sage_sample_bulk(graph, batches, fanouts, seed=seed)
            return [blocks_from_bulk(s, j) for j in range(batches.shape[0])]
        return [blocks_from_loop(loop.sample(batches[j], j)) for j in range(batches.shape[0])]

    items = sample_epoch()

    def fetch_epoch():
        return [_gather(x, ids) for ids, _ in items]

    feats = fetch_epoch()

    def compute_epoch():
        for j, (f, (_, blocks)) in enumerate(zip(feats, items)):
            loss = nn.functional.cross_entropy(model(f, blocks), y[batches[j]])
            opt.zero_grad()
            loss.backward()
            opt.step()

    out = {}
    for name, fn in (("sampling", sample_epoch), ("feature fetch", fetch_epoch), ("propagation", compute_epoch)):
        out[name] = measure(fn, warmup=warmup, repeats=repeats, device=x.device).median_s
    return out
