"""Atom's recipe: quantizer codes, reordering and outlier injection are FP-preserving, GPTQ, KV4."""

from __future__ import annotations

import copy

import pytest
import torch

from mlsys24.models import LlamaConfig, random_llama
from mlsys24.quant.atom import (
    AtomConfig,
    apply_atom,
    channel_scores,
    fake_quant_act,
    fake_quant_weight,
    gptq_quantize,
    inject_outliers,
    quantize_kv_asym,
    reorder_llama,
    staircase_configs,
    sym_group_quant,
)


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return random_llama(cfg, seed=0).float().eval()


def test_sym_group_codes_and_ragged_group():
    torch.manual_seed(0)
    x = torch.randn(5, 120) * torch.linspace(0.1, 3, 120)      # 120 = 64 + 56: ragged last group
    q, d = sym_group_quant(x, 4, 64)
    assert d.shape == (5, 2) and q.shape == x.shape
    assert int(q.min()) >= -7 and int(q.max()) <= 7            # unclipped: scale uses 7, -8 unused
    # the ragged group's scale comes from its own 56 entries only
    assert torch.allclose(d[:, 1], x[:, 64:].abs().amax(1) / 7)
    deq = q.float() * d.repeat_interleave(64, 1)[:, :120]
    assert bool(((deq - x).abs() <= d.repeat_interleave(64, 1)[:, :120] / 2 + 1e-6).all())
    q8, d8 = sym_group_quant(x, 8, 0)
    assert int(q8.abs().max()) <= 127 and d8.shape == (5, 1)
    qc, dc = sym_group_quant(x, 4, 64, clip=0.8)
    assert torch.allclose(dc, d * 0.8)


def test_fake_quant_matches_code_path():
    torch.manual_seed(1)
    cfg = AtomConfig(group_size=64, keeper=8, a_clip=0.9)
    x = torch.randn(3, 7, 128)
    y = fake_quant_act(x, cfg)
    q, d = sym_group_quant(x[..., :120], 4, 64, 0.9)
    ref = q.float() * d.repeat_interleave(64, -1)[..., :120]
    assert torch.equal(y[..., :120], ref)
    q8, d8 = sym_group_quant(x[..., 120:], 8, 0)
    assert torch.equal(y[..., 120:], q8.float() * d8)
    w = torch.randn(16, 128)
    assert fake_quant_weight(w, replace_keeper(cfg, 16))[:, 120:].equal(w[:, 120:])


def replace_keeper(cfg, bits):
    from dataclasses import replace

    return replace(cfg, keeper_bits=bits)


def test_kv_asym_roundtrip():
    torch.manual_seed(2)
    x = torch.randn(2, 9, 3, 64)
    q, d, z = quantize_kv_asym(x, 4)
    assert int(q.max()) <= 15 and q.dtype == torch.uint8
    err = ((q.float() - z[..., None]) * d[..., None] - x).abs()
    assert bool((err <= d[..., None] / 2 + 1e-5).all())


@torch.no_grad()
def test_inject_and_reorder_preserve_function(model):
    x = torch.randint(0, 256, (2, 48))
    m = copy.deepcopy(model)
    ref = m(x)
    inject_outliers(m, 4, 20.0, seed=0)
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    calib = torch.randint(0, 256, (4, 32))
    idx = reorder_llama(m, channel_scores(m, calib, "hessian"))
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    # outliers go last: the injected channels are the top scores of the norm-fed inputs
    assert len(idx) == model.cfg.n_layers and all(sorted(i["qkv"].tolist()) == list(range(64)) for i in idx)
    with m.capture(inputs=["layers.0.self_attn.q_proj"]) as cap:
        m(x)
    amax = cap.inputs["layers.0.self_attn.q_proj"][0].abs().amax((0, 1))
    assert amax[-4:].min() > amax[:-4].max()


def test_abs_mean_metric_and_bad_metric(model):
    calib = torch.randint(0, 256, (2, 16))
    s = channel_scores(model, calib, "abs_mean")
    assert s[0]["down"].shape == (96,)
    with pytest.raises(ValueError):
        channel_scores(model, calib, "bogus")


def test_gptq_beats_rtn_on_layer_loss():
    torch.manual_seed(3)
    X = torch.randn(512, 72) * torch.linspace(0.2, 2, 72)
    X[:, -8:] *= 10
    W = torch.randn(24, 72)
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    cfg = AtomConfig(group_size=32, keeper=8)   # 64 normal channels -> 2 groups; 8 INT8 outliers
    rtn = fake_quant_weight(W, cfg)
    gq = gptq_quantize(W, H, cfg)
    loss = lambda Wq: float(((X @ (Wq - W).T) ** 2).mean())  # noqa: E731
    assert loss(gq) < loss(rtn)
    # every GPTQ column group lies on a symmetric INT4 grid of its own scale
    g0 = gq[:, :32]
    d = g0.abs().amax(1, keepdim=True) / 7
    assert torch.allclose(g0 / d, torch.round(g0 / d), atol=1e-3)


@torch.no_grad()
def test_apply_atom_staircase_runs(model):
    calib = torch.randint(0, 256, (4, 32))
    x = torch.randint(0, 256, (1, 32))
    base = AtomConfig(group_size=32, keeper=4, kv_bits=4, a_clip=0.9, w_clip=0.85, use_gptq=True)
    steps = staircase_configs(base)
    assert [s for s, _ in steps][0] == "RTN W4A4" and steps[-1][1].kv_bits == 4
    fp = model(x)
    errs = []
    for _, cfg in (steps[0], steps[3], steps[-1]):
        q = apply_atom(model, calib, cfg)
        errs.append(float((q(x) - fp).abs().mean()))
    assert all(e > 0 for e in errs)
    from dataclasses import replace

    st = apply_atom(model, calib, replace(steps[4][1], static=True))
    assert torch.isfinite(st(x)).all()
