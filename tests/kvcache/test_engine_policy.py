"""The KV policies inside the serving engine (masked over the paged cache) generate what the
standalone masked cache generates, with the same budget."""

from __future__ import annotations

import pytest
import torch

from mlsys24.kvcache import KVPolicyConfig, greedy
from mlsys24.kvcache.engine_policy import EngineKVPolicy
from mlsys24.models import Llama, LlamaConfig
from mlsys24.serving import Engine
from mlsys24.serving.request import Request


@pytest.mark.parametrize("name", ["window", "sink", "h2o"])
def test_engine_policy_matches_standalone_masked_cache(name):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              init_std=0.2)).eval()
    prompts = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(3))
    gen = 10
    pol = KVPolicyConfig(name, kv_budget=0.5, n_sink=2)
    ref = greedy(model, prompts, gen, pol, mode="masked").tolist()
    kvp = EngineKVPolicy(pol, gen_len=gen)
    eng = Engine(model, "orca", n_blocks=64, block_size=4, kv_policy=kvp)
    out = {s.rid: s.output for s in eng.run([Request(i, prompts[i].tolist(), gen) for i in range(2)])}
    kvp.detach()
    assert [out[0], out[1]] == ref
    full = greedy(model, prompts, gen, KVPolicyConfig("full")).tolist()
    assert ref != full  # eviction changed something (the comparison is not vacuous)
