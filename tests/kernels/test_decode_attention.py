"""Split-KV decode attention (sync FlashDecoding, async unified-max FlashDecoding++) vs float32 reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py):
dims stay small, a few splits per sequence so that the split/combine and atomic paths are exercised.
"""

import math

import pytest
import torch

import mlsys24.kernels  # noqa: F401  (interpreter compatibility fixes before any launch)
from mlsys24.kernels.decode_attention import (
    DecodeConfig,
    as_paged,
    attention_logits_ref,
    calibrate_phi,
    decode_attention,
    decode_attention_async,
    decode_attention_ref,
    decode_attention_sync,
    safe_band,
    unified_softmax_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerance on outputs of magnitude ~1 (weighted averages of randn values): the output is rounded
# to the input dtype (fp16: 2^-11 relative, bf16: 2^-8), and on the tensor-core path P is rounded
# too; fp32 runs the whole computation in fp32 (dots with input_precision="ieee").
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}
CFG = DecodeConfig(block_n=32, num_splits=3)       # several splits per sequence, small tiles


def _inputs(B, H, Hkv, D, L, dtype, lens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(DEV)
    if lens is None:
        lens = [L] + [max(1, (L * (i + 2)) // (B + 2)) for i in range(B - 1)]
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEV)


def _phi_for(q, k, lens, **kw):
    x = attention_logits_ref(q, k, lens, **kw)
    return calibrate_phi(x, p_dtype=q.dtype if q.dtype == torch.float16 else torch.float32).phi


def _close(out, ref, dtype):
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]:.1g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("L", [1, 7, 83, 127])
def test_mha_sync_and_async_match_reference(dtype, L):
    q, k, v, lens = _inputs(2, 2, 2, 32, L, dtype)
    ref = decode_attention_ref(q, k, v, lens)
    out_s = decode_attention_sync(q, k, v, lens, config=CFG)
    out_a, flags = decode_attention_async(q, k, v, lens, phi=_phi_for(q, k, lens), config=CFG,
                                          return_flags=True)
    _close(out_s, ref, dtype)
    _close(out_a, ref, dtype)
    assert flags.sum() == 0                      # calibrated phi: no row needed the fallback
    assert (out_a.float() - out_s.float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,L", [(4, 1, 83), (8, 2, 7), (6, 2, 127)])
def test_gqa_tensor_core_path(dtype, H, Hkv, L):
    q, k, v, lens = _inputs(2, H, Hkv, 32, L, dtype)
    ref = decode_attention_ref(q, k, v, lens)
    for mode in ("sync", "async"):
        out = decode_attention(q, k, v, lens, mode=mode, phi=_phi_for(q, k, lens), config=CFG)
        _close(out, ref, dtype)


@pytest.mark.parametrize("use_dot", [True, False])
def test_both_score_paths_on_gqa_and_mha(use_dot):
    # tensor cores forced on for MHA (rows padded to 16) and off for GQA (CUDA-core broadcast)
    for H, Hkv in ((2, 2), (4, 2)):
        q, k, v, lens = _inputs(1, H, Hkv, 32, 40, torch.float16)
        cfg = DecodeConfig(block_n=16, num_splits=2, use_dot=use_dot)
        ref = decode_attention_ref(q, k, v, lens)
        _close(decode_attention_sync(q, k, v, lens, config=cfg), ref, torch.float16)
        _close(decode_attention_async(q, k, v, lens, phi=_phi_for(q, k, lens), config=cfg), ref, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1)])
def test_paged_scattered_block_table(dtype, H, Hkv):
    B, D, page, max_pages = 3, 32, 8, 12
    lens = torch.tensor([83, 7, 1], dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(1)
    n_pages = B * max_pages + 5
    k_pages = torch.randn(n_pages, page, Hkv, D, generator=g).to(dtype).to(DEV)
    v_pages = torch.randn(n_pages, page, Hkv, D, generator=g).to(dtype).to(DEV)
    perm = torch.randperm(n_pages, generator=g)[: B * max_pages]
    table = perm.reshape(B, max_pages).to(torch.int32).to(DEV)   # pages scattered over the pool
    q = torch.randn(B, H, D, generator=g).to(dtype).to(DEV)
    ref = decode_attention_ref(q, k_pages, v_pages, lens, block_table=table)
    phi = _phi_for(q, k_pages, lens, block_table=table)
    cfg = DecodeConfig(block_n=32, num_splits=3)                  # a tile spans four pages
    _close(decode_attention_sync(q, k_pages, v_pages, lens, block_table=table, config=cfg), ref, dtype)
    _close(decode_attention_async(q, k_pages, v_pages, lens, block_table=table, phi=phi, config=cfg), ref, dtype)


def test_contiguous_equals_trivial_block_table():
    q, k, v, lens = _inputs(2, 4, 2, 32, 48, torch.float16)
    k_blhd = k.transpose(1, 2).contiguous()                       # [B, L, H_kv, D]
    v_blhd = v.transpose(1, 2).contiguous()
    kp, table = as_paged(k_blhd, 16)
    vp, _ = as_paged(v_blhd, 16)
    phi = _phi_for(q, k, lens)
    a = decode_attention_async(q, k, v, lens, phi=phi, config=CFG)                      # bhld
    b = decode_attention_async(q, k_blhd, v_blhd, lens, phi=phi, config=CFG, layout="blhd")
    c = decode_attention_async(q, kp, vp, lens, phi=phi, config=CFG, block_table=table)
    s = decode_attention_sync(q, kp, vp, lens, config=CFG, block_table=table)
    assert torch.allclose(a.float(), b.float(), atol=1e-3)
    assert torch.allclose(a.float(), c.float(), atol=1e-3)
    _close(s, decode_attention_ref(q, k, v, lens), torch.float16)


def test_non_contiguous_inputs():
    q, k, v, lens = _inputs(2, 2, 2, 32, 50, torch.float16)
    q_big = torch.randn(2, 2, 64, device=DEV).half()
    q_big[..., :32] = q
    q_nc = q_big[..., :32]                                        # non-contiguous q
    k_nc = k.transpose(1, 2).contiguous().transpose(1, 2)         # bhld view of a blhd buffer
    v_nc = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    ref = decode_attention_ref(q, k, v, lens)
    _close(decode_attention_sync(q_nc, k_nc, v_nc, lens, config=CFG), ref, torch.float16)
    _close(decode_attention_async(q_nc, k_nc, v_nc, lens, phi=_phi_for(q, k, lens), config=CFG), ref,
           torch.float16)


@pytest.mark.parametrize("dtype,use_dot", [(torch.float16, True), (torch.float32, False), (torch.bfloat16, False)])
def test_forced_phi_triggers_fallback_and_stays_exact(dtype, use_dot):
    q, k, v, lens = _inputs(2, 4, 2, 32, 83, dtype)
    cfg = DecodeConfig(block_n=32, num_splits=3, use_dot=use_dot)
    ref = decode_attention_ref(q, k, v, lens)
    x = attention_logits_ref(q, k, lens)
    rowmax = x.max(-1).values                                     # [B, H]
    lo, hi = safe_band(dtype if use_dot else torch.float32)
    phi = float(rowmax.min()) - hi - 30.0                         # far below every row's max: overflow
    out, flags = decode_attention_async(q, k, v, lens, phi=phi, config=cfg, return_flags=True)
    assert flags.bool().all()
    _close(out, ref, dtype)
    # the same phi without the fallback: the unified-max result is wrong or not finite
    bad = decode_attention_async(q, k, v, lens, phi=phi, config=cfg, fallback=False)
    assert not torch.isfinite(bad.float()).all() or (bad.float() - ref).abs().max() > 10 * TOL[dtype]


def test_flags_exactly_rows_outside_band():
    dtype = torch.float16
    q, k, v, lens = _inputs(3, 4, 2, 32, 60, dtype)
    q[0, 1] *= 12.0                                                # inject large logits on two rows
    q[2, 3] *= 12.0
    x = attention_logits_ref(q, k, lens)
    phi = calibrate_phi(attention_logits_ref(*_inputs(3, 4, 2, 32, 60, dtype, seed=5)[:2],
                                             torch.tensor([60] * 3, device=DEV))).phi
    lo, hi = safe_band(torch.float16)
    d = x.max(-1).values - phi
    expect = (d > hi) | (d < lo)
    assert expect[0, 1] and expect[2, 3] and expect.sum() < expect.numel()
    out, flags = decode_attention_async(q, k, v, lens, phi=phi, config=CFG, return_flags=True)
    assert torch.equal(flags.bool().cpu(), expect.cpu())
    _close(out, decode_attention_ref(q, k, v, lens), dtype)


def test_workspace_is_clean_between_calls():
    q, k, v, lens = _inputs(2, 2, 2, 32, 40, torch.float16)
    phi = _phi_for(q, k, lens)
    a = decode_attention_async(q, k, v, lens, phi=phi, config=CFG)
    b = decode_attention_async(q, k, v, lens, phi=phi, config=CFG)
    q2 = torch.randn_like(q)
    c = decode_attention_async(q2, k, v, lens, phi=_phi_for(q2, k, lens), config=CFG)
    assert torch.allclose(a.float(), b.float(), atol=1e-3)
    _close(c, decode_attention_ref(q2, k, v, lens), torch.float16)
    from mlsys24.kernels.decode_attention import _WORKSPACES
    for acc, l_, mx, cnt in _WORKSPACES.values():
        assert acc.abs().sum() == 0 and l_.abs().sum() == 0 and cnt.abs().sum() == 0
        assert torch.isneginf(mx).all()


def test_async_requires_phi_and_checks_shapes():
    q, k, v, lens = _inputs(1, 2, 2, 32, 8, torch.float16)
    with pytest.raises(ValueError, match="phi"):
        decode_attention_async(q, k, v, lens, phi=None)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_sync(q[:, :1].expand(1, 3, 32).contiguous(), k, v, lens)
    with pytest.raises(ValueError, match="mode"):
        decode_attention(q, k, v, lens, mode="fast")


def test_calibrate_phi_centres_rowmax_in_band():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 256, generator=g) * 2.0 + 3.0
    cal = calibrate_phi(x, quantile=0.999, p_dtype=torch.float16)
    lo, hi = cal.band
    assert (lo, hi) == safe_band(torch.float16)
    r_lo, r_hi = cal.rowmax_range
    assert lo < r_lo - cal.phi and r_hi - cal.phi < hi
    assert cal.recompute_rate <= 0.01 and cal.x_range[0] < cal.x_range[1]
    # a distribution of row maxima wider than the band: some rows must be recomputed
    wide = torch.randn(500, 64, generator=g) + torch.linspace(-40, 40, 500)[:, None]
    assert calibrate_phi(wide, quantile=0.999, p_dtype=torch.float16).recompute_rate > 0.2


def test_unified_softmax_identity_and_fp16_overflow():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=g, dtype=torch.float64) * 2
    ref = torch.softmax(x, -1)
    for phi in (-3.0, 0.0, 5.0):
        assert (unified_softmax_ref(x, phi) - ref).abs().max() < 1e-6
        assert (unified_softmax_ref(x, phi, p_dtype=torch.float16) - ref).abs().max() < 2e-3
    row = torch.tensor([[0.0, 1.0, 20.0]])
    phi = 20.0 - math.log(65504.0) - 1.0                          # e^{x - phi} > fp16 max
    assert not torch.isfinite(unified_softmax_ref(row, phi, p_dtype=torch.float16)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_shapes(dtype):
    q, k, v, lens = _inputs(4, 32, 32, 128, 1823, dtype)
    ref = decode_attention_ref(q, k, v, lens)
    phi = _phi_for(q, k, lens)
    for cfg in (DecodeConfig(), DecodeConfig(use_dot=True), DecodeConfig(block_n=32, num_warps=8)):
        _close(decode_attention_sync(q, k, v, lens, config=cfg), ref, dtype)
        _close(decode_attention_async(q, k, v, lens, phi=phi, config=cfg), ref, dtype)
    q, k, v, lens = _inputs(2, 32, 8, 128, 1000, dtype)
    ref = decode_attention_ref(q, k, v, lens)
    _close(decode_attention_async(q, k, v, lens, phi=_phi_for(q, k, lens)), ref, dtype)
