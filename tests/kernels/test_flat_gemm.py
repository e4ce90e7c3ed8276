"""Flat GEMM (small-M tensor-core tiles) and GEMV (CUDA cores) vs float32 ``x @ w``."""

import pytest
import torch

import mlsys24.kernels  # noqa: F401  (interpreter compatibility fixes before any launch)
from mlsys24.kernels.flat_gemm import GemmConfig, cmr, flat_gemm, flat_gemm_ref, gemv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative to sqrt(K) (the size of a dot of K unit-variance products): fp16/bf16 round the output
# (2^-11 / 2^-8 relative); fp32 uses input_precision="ieee" dots / fp32 FMAs.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _check(y, x, w):
    ref = flat_gemm_ref(x, w)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err <= TOL[x.dtype], f"relative error {err:.3g}"


def _xw(M, K, N, dtype, weight_layout="nk", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    if weight_layout == "nk":      # nn.Linear weight [N, K], used as its transpose: K-contiguous
        w = torch.randn(N, K, generator=g).to(dtype).to(DEV).t()
    else:                          # [K, N] row-major
        w = torch.randn(K, N, generator=g).to(dtype).to(DEV)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 8, 16])
def test_flat_gemm_matches_reference(dtype, M):
    x, w = _xw(M, 127, 83, dtype)
    _check(flat_gemm(x, w, config=GemmConfig(block_m=16, block_n=32, block_k=32, num_stages=2)), x, w)


@pytest.mark.parametrize("M,block_m", [(7, 64), (33, 16), (83, 32)])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_flat_gemm_tiles_and_layouts(M, block_m, layout):
    x, w = _xw(M, 96, 50, torch.float16, weight_layout=layout)
    for stages in (1, 2):
        cfg = GemmConfig(block_m=block_m, block_n=16, block_k=64, num_stages=stages)
        _check(flat_gemm(x, w, config=cfg), x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_gemv_matches_reference(dtype, M):
    x, w = _xw(M, 127, 83, dtype)
    _check(gemv(x, w, config=GemmConfig(block_n=16, block_k=64)), x, w)


@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("M", [1, 4, 7])
def test_split_k_matches_reference_and_is_deterministic(split_k, M):
    # K = 200 over 32-wide steps: chunks of unequal length (the last one short), several N tiles
    x, w = _xw(M, 200, 70, torch.float16)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=32, split_k=split_k)
    y1 = flat_gemm(x, w, config=cfg)
    _check(y1, x, w)
    y2 = flat_gemm(x, w, config=cfg)              # the tile counters were reset by the first call
    assert torch.equal(y1, y2)                    # partials summed in a fixed order
    if M <= 4:
        gcfg = GemmConfig(block_n=16, block_k=32, split_k=split_k)
        g1 = gemv(x, w, config=gcfg)
        _check(g1, x, w)
        assert torch.equal(g1, gemv(x, w, config=gcfg))


def test_split_k_fixup_in_several_vector_loads():
    # a 16 x 128 tile with 4 warps sums its partials two at a time (fix-up chunk 2): 5 splits take
    # three loads, the last one half masked
    from mlsys24.kernels.flat_gemm import _fixup_chunk

    assert _fixup_chunk(5, 16 * 128, 4) == 2 and _fixup_chunk(5, 16 * 32, 4) == 8 and _fixup_chunk(3, 64 * 128, 4) == 1
    x, w = _xw(3, 320, 150, torch.float16)
    cfg = GemmConfig(block_m=16, block_n=128, block_k=32, split_k=5)
    y1 = flat_gemm(x, w, config=cfg)
    _check(y1, x, w)
    assert torch.equal(y1, flat_gemm(x, w, config=cfg))


def test_split_k_more_splits_than_k_steps():
    # split_k beyond the number of BLOCK_K steps collapses to one chunk per step (no empty program)
    x, w = _xw(3, 64, 40, torch.float32)
    _check(flat_gemm(x, w, config=GemmConfig(block_m=16, block_n=16, block_k=32, split_k=8)), x, w)
    _check(gemv(x, w, config=GemmConfig(block_n=8, block_k=32, split_k=8)), x, w)


def test_non_contiguous_activation_and_output_buffer():
    x_big, _ = _xw(5, 256, 40, torch.float16)
    _, w = _xw(5, 128, 40, torch.float16, seed=1)
    x = x_big[:, ::2]                                              # stride 2 along K
    assert not x.is_contiguous()
    out = torch.empty(5, 40, dtype=torch.float16, device=DEV)
    y = flat_gemm(x, w, config=GemmConfig(block_m=16, block_n=16, block_k=32), out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, w)
    _check(gemv(x[:3], w, config=GemmConfig(block_n=8, block_k=32)), x[:3], w)


def test_rejections():
    x, w = _xw(5, 32, 16, torch.float16)
    with pytest.raises(ValueError, match="M <= 4"):
        gemv(x, w)
    with pytest.raises(ValueError, match="inner"):
        flat_gemm(x, w[:16])
    with pytest.raises(ValueError, match=">= 16"):
        flat_gemm(x, w, config=GemmConfig(block_m=8))


def test_cmr_formula():
    # CMR = 2MK / (K + MK/B_N + M): grows with B_N towards 2MK/(K+M), which is ~2M for M << K
    vals = [cmr(8, 4096, bn) for bn in (8, 16, 32, 64, 128, 256)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert vals[-1] < 2 * 8 * 4096 / (4096 + 8)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16, 64, 255])
def test_gpu_llama_shapes(M):
    x, w = _xw(M, 4096, 11008, torch.float16)
    _check(flat_gemm(x, w), x, w)
    if M <= 4:
        _check(gemv(x, w), x, w)
