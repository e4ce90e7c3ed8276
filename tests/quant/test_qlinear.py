"""QuantLinear (packed int4) and AWQ-format checkpoints: round trip, CPU path vs kernel path."""

import copy
import json

import pytest
import torch

from mlsys24.models import random_llama
from mlsys24.quant.qlinear import QuantLinear, load_awq_checkpoint, quantize_linears, save_awq_checkpoint
from mlsys24.quant.quantizer import fake_quant

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the Triton interpreter (tests/conftest.py)


def test_quantlinear_matches_rtn_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 72, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=g) * 0.1)
    q = QuantLinear.from_linear(lin, 4, 64)
    x = torch.randn(5, 128, generator=g)
    w_hat = q.dequantized_weight()
    assert torch.allclose(q(x), x @ w_hat.t() + lin.bias, atol=1e-5)
    # the stored weight is RTN's up to the fp16 rounding of the stored steps (at most one step, rarely)
    w_rtn = fake_quant(lin.weight.data, 4, 64)
    assert (w_hat - w_rtn).abs().max() <= q.scales.float().max() * 1.01
    assert ((w_hat - w_rtn).abs() < 1e-4).float().mean() > 0.97


def test_quantlinear_kernel_path_matches_cpu_path():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 40, bias=False)
    q = QuantLinear.from_linear(lin, 4, 32)
    x = torch.randn(3, 96, generator=g).half()
    y_cpu = q(x.float())
    q.use_kernel = True
    y_k = q.to(DEV)(x.to(DEV)).cpu()
    assert y_k.dtype == torch.float16
    assert torch.allclose(y_k.float(), y_cpu, atol=2e-2, rtol=2e-3)


def test_awq_checkpoint_round_trip(tmp_path):
    m = random_llama("tiny", seed=0)
    done = quantize_linears(m, 4, 64)
    assert len(done) == 7 * len(m.layers)
    path = save_awq_checkpoint(m, tmp_path / "ckpt")
    cfg = json.loads((path / "quant_config.json").read_text())
    assert cfg["quant_method"] == "awq" and cfg["bits"] == 4 and cfg["group_size"] == 64 and cfg["version"] == "gemm"
    fresh = load_awq_checkpoint(random_llama("tiny", seed=1), path)
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            other = fresh.get_submodule(name)
            assert isinstance(other, QuantLinear)
            for k in ("qweight", "qzeros", "scales"):
                a, b = getattr(mod, k), getattr(other, k)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, k)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))


def test_checkpoint_requires_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="QuantLinear"):
        save_awq_checkpoint(copy.deepcopy(random_llama("tiny")), tmp_path)


@pytest.mark.parametrize("quant", [False, True])
def test_fused_decoder_matches_module_forward(quant):
    # step-by-step fused decode (fused projections, add+norm, RoPE+KV write, split-KV attention,
    # silu*mul) gives the logits of the module-by-module forward over the whole prefix
    from mlsys24.models.config import preset
    from mlsys24.quant.qlinear import FusedDecoder

    cfg = preset("llama2-7b", n_layers=1, d_model=128, n_heads=2, n_kv_heads=2, ffn_dim=128, vocab_size=64)
    model = random_llama(cfg, DEV, torch.float32, seed=3)
    model.cfg.init_std = 0.05
    model.reset_parameters(seed=3)
    dec = FusedDecoder(model, max_len=8, quantize=quant, group_size=64)
    if quant:
        quantize_linears(model, 4, 64)
    ids = torch.tensor([[5, 17, 60]], device=DEV)
    with torch.no_grad():
        ref = model(ids)[0].float()                       # [T, vocab]
        got = torch.cat([dec.step(int(t), i) for i, t in enumerate(ids[0].tolist())]).float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err
    d, F = cfg.d_model, cfg.ffn_dim
    n_weights = 4 * d * d + 3 * d * F
    # fp32 weights: 4 bytes each; W4A16: half a byte + an fp16 step and a uint8 zero per 64 weights
    assert dec.weight_bytes() == (n_weights // 2 + 3 * n_weights // 64 if quant else 4 * n_weights)
