"""Shared set-up of the S-LoRA engine tests: a tiny random Llama and five adapters of ranks 2/4/8."""

import pytest
import torch

from mlsys24.models import LlamaConfig, random_llama
from mlsys24.serving.lora import random_adapter
from mlsys24.slora.engine import ATTN_TARGETS

TINY = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=128, max_seq_len=128)


@pytest.fixture(scope="module")
def setup():
    """(model, {adapter id: adapter}) on CPU, float32, seeded."""
    torch.manual_seed(0)
    model = random_llama(TINY, "cpu", torch.float32, seed=0)
    ads = {a: random_adapter(model, [2, 4, 8][a % 3], seed=a, targets=ATTN_TARGETS, std=0.2) for a in range(5)}
    return model, ads
