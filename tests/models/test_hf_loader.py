"""load_hf_llama maps a HF-format Llama directory onto our module: logits equal transformers'."""

import json

import pytest
import torch

from mlsys24.models import Llama, LlamaConfig, load_hf_llama, save_checkpoint

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, **over):
    conf = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    conf.update(over)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf)).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb so a missing norm would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("over", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 1, "attention_bias": True},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
], ids=["mha-untied", "tied", "mqa-bias", "rope-linear", "rope-llama3"])
def test_logits_match_transformers(tmp_path, over):
    hf = _hf_model(tmp_path, **over)
    ours = load_hf_llama(tmp_path)
    x = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(37)[None].repeat(2, 1) * 3 + 5  # explicit, non-contiguous position ids
    with torch.no_grad():
        for p in (None, pos):
            ref = hf(x, position_ids=p).logits
            got = ours(x, position_ids=p)
            assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (got - ref).abs().max()


def test_sharded_index(tmp_path):
    hf = _hf_model(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    x = torch.randint(0, 101, (1, 11))
    with torch.no_grad():
        assert torch.allclose(load_hf_llama(tmp_path / "b")(x), hf(x).logits, atol=2e-5)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = Llama(LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256)).eval()
    save_checkpoint(ours, tmp_path, dtype=torch.float32)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == "llama" and "mlsys24" in conf
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=2e-5)
    back = load_hf_llama(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))
