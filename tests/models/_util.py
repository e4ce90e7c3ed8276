"""Shared helpers of the model tests."""

import torch

from mlsys24.models import Llama, LlamaConfig


def small_model(n_kv_heads: int = 4, seed: int = 0, **kw) -> Llama:
    """A random 2-layer Llama of the tiny shape family (fast on CPU)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96, max_seq_len=128, **kw)
    m = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains so a misplaced norm would show
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n == "norm.weight":
                p.add_(0.2 * torch.randn_like(p))
    return m
