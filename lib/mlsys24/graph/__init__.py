"""Matrix-based GNN minibatch sampling (Tripathy, Yelick, Buluç — MLSys 2024).

- :mod:`.generators` — seeded R-MAT and stochastic-block-model graphs.
- :mod:`.sparse` — CSR / COO, the expand-sort-compress SpGEMM and its ``torch.sparse`` reference.
- :mod:`.wor` — counter-based random draws; uniform and weighted sampling without replacement per row.
- :mod:`.samplers` — bulk GraphSAGE and LADIES samplers as matrix operations; per-minibatch loop baselines.
- :mod:`.distributed` — 1.5D distributed SpGEMM / sampling on ``torch.distributed`` with byte counts.
- :mod:`.train` — GraphSAGE trained on sampled minibatches.
- :mod:`.bench` — the GPU benchmark (``python -m mlsys24.bench gnn_matrix_sampling``).
"""

from .generators import SBMGraph, rmat, sbm, split_nodes
from .samplers import (
                       LadiesSample,
                       LoopLadiesSampler,
                       LoopSageSampler,
                       SageSample,
                       ladies_normalize,
                       ladies_sample_bulk,
                       make_minibatches,
                       sage_sample_bulk,
                       sage_sample_spgemm,
)
from .sparse import COO, CSR, esc_spgemm, spgemm_ref

__all__ = ["COO", "CSR", "LadiesSample", "LoopLadiesSampler", "LoopSageSampler", "SBMGraph", "SageSample",
           "esc_spgemm", "ladies_normalize", "ladies_sample_bulk", "make_minibatches", "rmat", "sage_sample_bulk",
           "sage_sample_spgemm", "sbm", "spgemm_ref", "split_nodes"]
