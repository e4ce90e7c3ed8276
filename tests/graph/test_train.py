"""GraphSAGE on sampled minibatches learns the SBM labels, with either sampler."""

import torch

from mlsys24.graph.generators import sbm, split_nodes
from mlsys24.graph.samplers import LoopSageSampler, make_minibatches, sage_sample_bulk
from mlsys24.graph.train import (
    GraphSAGE,
    blocks_from_bulk,
    blocks_from_loop,
    full_graph_block,
    train_graphsage,
)


def _data():
    d = sbm(4, 128, 0.08, 0.004, feat_dim=8, seed=1)
    tr, te = split_nodes(d.graph.n_rows, 0.5, seed=1)
    return d, tr, te


def test_training_beats_chance_with_both_samplers():
    d, tr, te = _data()
    accs = {}
    for sampler in ("matrix", "loop"):
        res = train_graphsage(d.graph, d.features, d.labels, tr, te, sampler=sampler, fanouts=(5, 3),
                              batch_size=32, epochs=3, hidden=32, lr=0.02, seed=0)
        accs[sampler] = res.final_test_acc
        assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert accs["matrix"] > 0.6 and accs["loop"] > 0.6          # chance: 0.25
    assert abs(accs["matrix"] - accs["loop"]) < 0.1


def test_blocks_agree_with_full_neighbourhood_when_fanout_covers_all():
    """With fanouts >= max degree both samplers see every neighbour: outputs equal full-graph inference."""
    d, tr, _ = _data()
    g = d.graph
    big = int(g.degrees().max())
    model = GraphSAGE(8, 16, 4, 2)
    model.eval()
    seeds = make_minibatches(tr, 16, seed=0)[:2]
    with torch.no_grad():
        full = model(d.features, [full_graph_block(g)] * 2)
        s = sage_sample_bulk(g, seeds, (big, big), seed=0)
        ids, blocks = blocks_from_bulk(s, 1)
        out_m = model(d.features[ids.clamp_min(0)], blocks)
        ids, blocks = blocks_from_loop(LoopSageSampler(g, (big, big)).sample(seeds[1], 0))
        out_l = model(d.features[ids], blocks)
    torch.testing.assert_close(out_m, full[seeds[1]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_l, full[seeds[1]], rtol=1e-4, atol=1e-5)
