"""Triton W4A16 GEMM/GEMV (AWQ layout) vs the float32 dequantize-then-matmul reference.

On CPU this runs under TRITON_INTERPRET=1 (tests/conftest.py): dims <= 130, few programs.
"""

import pytest
import torch

from mlsys24.quant.pack import awq_pack, gemv_repack
from mlsys24.quant.w4a16 import (
    GemvConfig,
    W4A16Config,
    default_config,
    default_gemv_config,
    w4a16_gemm,
    w4a16_gemv,
    w4a16_gemv_ref,
    w4a16_ref,
    weight_bytes,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative to max |ref|: fp16 rounds the dequantized weight and the output (2^-11), bf16 (2^-8);
# fp32 uses exact fp32 products (input_precision="ieee") and only reorders the sums.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _case(M, N, K, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    p = {k: v.to(DEV) for k, v in awq_pack(w, 4, G).items()}
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    return x, p


def _check(y, x, p, N):
    ref = w4a16_ref(x, p["qweight"], p["qzeros"], p["scales"], N)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err <= TOL[x.dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,G", [(1, 128, 256, 64), (7, 83, 127, 64), (17, 130, 128, 128), (83, 8, 130, 128)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemm_tensor_core_path(dtype, M, N, K, G, split_k):
    x, p = _case(M, N, K, G, dtype)
    cfg = W4A16Config(block_m=16, block_n=128, block_k=64, split_k=split_k, use_dot=True, num_stages=2)
    _check(w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], N, config=cfg), x, p, N)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dequant", [0, 1])
def test_dequant_variants_and_atomic_output(dtype, dequant):
    # 0: int -> float conversion, 1: via fp32 (2, the magic-number default, runs in every other test);
    # atomic_out: split-K partial sums added in the output dtype
    x, p = _case(5, 72, 256, 128, dtype, seed=3)
    cfg = W4A16Config(block_m=16, block_n=256, block_k=64, split_k=4, dequant=dequant, atomic_out=True,
                      num_stages=2)
    _check(w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], 72, config=cfg), x, p, 72)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,G,split_k", [(1, 127, 128, 64, 1), (1, 64, 130, 64, 3), (2, 24, 64, 64, 2)])
def test_gemv_path(dtype, M, N, K, G, split_k):
    x, p = _case(M, N, K, G, dtype, seed=1)
    cfg = W4A16Config(block_m=1, block_n=64, block_k=32, split_k=split_k, use_dot=False, num_stages=1)
    _check(w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], N, config=cfg), x, p, N)


def test_fp32_exact_and_noncontiguous_input():
    # x as a strided view (every other column of a wider tensor) and with a leading batch dim
    g = torch.Generator().manual_seed(2)
    w = torch.randn(83, 64, generator=g)
    p = {k: v.to(DEV) for k, v in awq_pack(w, 4, 64).items()}
    wide = torch.randn(2, 3, 128, generator=g).to(DEV)
    x = wide[..., ::2]
    assert not x.is_contiguous()
    y = w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], 83,
                   config=W4A16Config(block_m=16, block_n=128, block_k=64, split_k=1, num_stages=2))
    assert y.shape == (2, 3, 83)
    _check(y.reshape(6, 83), x.reshape(6, 64), p, 83)
    bias = torch.randn(83).to(DEV)
    yb = w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], 83, bias=bias,
                    config=W4A16Config(block_m=16, block_n=128, block_k=64, num_stages=2))
    assert torch.allclose(yb, y + bias, atol=1e-5)


def test_default_config_and_bytes():
    cfg = default_config(1, 11008, 4096, 128)
    assert cfg.split_k == 8 and not cfg.use_dot and 128 % cfg.block_k == 0      # the H200 tuning's pick
    big = default_config(1, 28672, 8192, 128)
    assert big.use_dot and big.split_k == 4 and big.block_n == 256
    assert default_config(2048, 4096, 4096, 128).split_k == 1
    # 4 bits + an fp16 scale and a 4-bit zero per 128 weights = 4.156 bits per weight
    assert weight_bytes(4096, 4096, 128) * 8 / (4096 * 4096) == pytest.approx(4 + 20 / 128)


def test_bad_config_rejected():
    x, p = _case(1, 64, 128, 64, torch.float16)
    with pytest.raises(ValueError, match="block_k"):
        w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], 64, config=W4A16Config(block_k=48))
    with pytest.raises(ValueError, match="use_dot"):
        w4a16_gemm(x, p["qweight"], p["qzeros"], p["scales"], 64, config=W4A16Config(block_m=16, block_n=64))


# --- GEMV on the K-major layout (decode: M = 1 .. 8, more rows in blocks of 8) -------------------------

def _gemv_case(M, N, K, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    p = awq_pack(w, 4, G)
    t = {k: v.to(DEV) for k, v in gemv_repack(p["qweight"], p["qzeros"], p["scales"], N).items()}
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    return x, {k: v.to(DEV) for k, v in p.items()}, t


# the GEMV layout holds the same integers, steps and zero points as the AWQ layout: both references
# agree exactly, the kernel differs by the sums' order and the output rounding (fp16 2^-11, bf16 2^-8)
GEMV_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K,G,cfg", [
    (1, 128, 256, 64, GemvConfig(block_n=64, unroll=2, split_k=2)),
    (1, 83, 127, 32, GemvConfig(block_n=32, unroll=1, split_k=3)),     # K, N not multiples of anything
    (2, 7, 130, 128, GemvConfig(block_n=32, unroll=2, split_k=1)),
    (5, 130, 128, 128, GemvConfig(block_n=64, unroll=1, split_k=1)),
    (8, 40, 256, 64, GemvConfig(block_n=32, unroll=1, split_k=4)),
    (11, 24, 64, 32, GemvConfig(block_n=32, unroll=2, split_k=2)),      # M > 8: two row blocks
])
def test_gemv_matches_references(dtype, M, N, K, G, cfg):
    x, p, t = _gemv_case(M, N, K, G, dtype)
    y = w4a16_gemv(x, **t, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = w4a16_ref(x, p["qweight"], p["qzeros"], p["scales"], N)
    assert torch.allclose(w4a16_gemv_ref(x, **t), ref, rtol=1e-5, atol=1e-4)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err <= GEMV_TOL[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,G,cfg", [
    (1, 128, 256, 64, GemvConfig(block_n=64, unroll=2, split_k=2)),
    (1, 83, 127, 32, GemvConfig(block_n=32, unroll=1, split_k=3)),
    (3, 40, 256, 128, GemvConfig(block_n=32, unroll=1, split_k=1)),
])
def test_gemv_group_major_layout(dtype, M, N, K, G, cfg):
    # the same words stored group-major (a strided view with the row-major shapes): same result
    x, p, t = _gemv_case(M, N, K, G, dtype)
    tg = {k: v.to(DEV) for k, v in gemv_repack(p["qweight"].cpu(), p["qzeros"].cpu(), p["scales"].cpu(), N,
                                                layout="group").items()}
    assert tg["qweight_t"].dim() == 3 and tg["qweight_t"].stride(0) == G // 8 and tg["scales_t"].stride(0) == 1
    assert torch.equal(w4a16_gemv_ref(x, **tg), w4a16_gemv_ref(x, **t))
    y_row, y_grp = w4a16_gemv(x, **t, config=cfg), w4a16_gemv(x, **tg, config=cfg)
    assert torch.allclose(y_grp.float(), y_row.float(), rtol=1e-5, atol=1e-5 * y_row.abs().max().item())


@pytest.mark.parametrize("M,N,K,G,cfg", [
    (1, 64, 512, 64, GemvConfig(block_n=32, unroll=2, split_k=2, prefetch=True)),    # full tiles: no masks
    (1, 83, 320, 64, GemvConfig(block_n=32, unroll=2, split_k=2, prefetch=True)),    # 5 groups: a half step
    (2, 64, 256, 32, GemvConfig(block_n=64, unroll=1, split_k=3, prefetch=True)),
    (1, 64, 256, 64, GemvConfig(block_n=32, unroll=1, split_k=1, prefetch=True, quad=True)),
])
def test_gemv_prefetch_and_unmasked_paths(M, N, K, G, cfg):
    # the register-prefetch loop (and the mask-free loads of full tiles) give the reference result
    x, p, t = _gemv_case(M, N, K, G, torch.float32, seed=11)
    ref = w4a16_ref(x, p["qweight"], p["qzeros"], p["scales"], N)
    y = w4a16_gemv(x, **t, config=cfg)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= GEMV_TOL[torch.float32]


def test_gemv_split_k_tickets_reset_and_noncontiguous_input():
    # the split-K fix-up leaves its tickets at 0, so back-to-back launches (and CUDA-graph replays) agree
    x, p, t = _gemv_case(1, 64, 256, 64, torch.float16, seed=5)
    cfg = GemvConfig(block_n=32, unroll=1, split_k=4)
    y1 = w4a16_gemv(x, **t, config=cfg)
    y2 = w4a16_gemv(x, **t, config=cfg)
    assert torch.equal(y1, y2)
    from mlsys24.quant.w4a16 import _GEMV_WORKSPACE

    cnt, _ = _GEMV_WORKSPACE[(x.device.type, x.device.index)]
    assert int(cnt.abs().sum()) == 0
    wide = torch.randn(3, 512, generator=torch.Generator().manual_seed(6)).half().to(DEV)
    xs = wide[:, ::2]                                            # [3, 256], stride 2
    ys = w4a16_gemv(xs, **t, config=cfg)
    assert torch.allclose(ys.float(), w4a16_gemv_ref(xs, **t), atol=2e-3 * w4a16_gemv_ref(xs, **t).abs().max().item())
    bias = torch.randn(64).to(DEV)
    assert torch.allclose(w4a16_gemv(x, **t, config=cfg, bias=bias).float(), y1.float() + bias, atol=5e-2)  # fp16 output rounding


def test_default_gemv_config_fills_the_gpu():
    from mlsys24.quant.w4a16 import GEMV_TABLE_M1

    for (N, K), (bn, u, split, w, pf) in GEMV_TABLE_M1.items():     # the measured shapes: the sweep's choice
        c = default_gemv_config(1, N, K, 128)
        assert (c.block_n, c.unroll, c.split_k, c.num_warps, c.prefetch) == (bn, u, split, w, pf) and c.quad
    for N, K in ((5120, 5120), (13824, 5120), (5120, 13824), (8192, 8192), (1024, 4096)):   # others: the rule
        c = default_gemv_config(1, N, K, 128)
        programs = -(-N // c.block_n) * c.split_k
        assert programs >= 7.5 * 132 or c.split_k == -(-K // 128) // 4, (N, K, c)
        assert -(-K // 128) // c.split_k >= 4
    with pytest.raises(ValueError, match="power of two"):
        x, _, t = _gemv_case(1, 8, 96, 96, torch.float32)
        w4a16_gemv(x, **t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16x2 loop is inline PTX: GPU only")
@pytest.mark.parametrize("M,N,K,G", [(1, 4096, 4096, 128), (1, 83, 130, 64), (3, 130, 256, 32), (8, 64, 512, 128)])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("quad,prefetch", [(False, False), (True, False), (True, True)])
def test_gemv_half2_matches_reference(M, N, K, G, split_k, quad, prefetch):
    x, p, t = _gemv_case(M, N, K, G, torch.float16, seed=7)
    y = w4a16_gemv(x, **t, config=GemvConfig(block_n=64, unroll=2, split_k=split_k, half2=True, quad=quad,
                                             prefetch=prefetch))
    ref = w4a16_ref(x, p["qweight"], p["qzeros"], p["scales"], N)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err <= 3e-3, f"relative error {err:.3g}"   # fp16 partial sums of 8 products, then fp32


@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_pdl_chain_of_dependent_calls(prefetch):
    # programmatic dependent launch: each GEMV may start (and read its weights) before the previous one
    # ends, but reads x -- the previous output -- only after it; a chain y_i = W_i y_{i-1} must equal the
    # reference, eagerly and replayed from a CUDA graph (on a CPU the flag is accepted and has no effect)
    N = K = 256
    G = 64
    cfg = GemvConfig(block_n=32, unroll=2, split_k=4, prefetch=prefetch, pdl=True,
                     half2=torch.cuda.is_available(), quad=torch.cuda.is_available())
    x, _, _ = _gemv_case(1, N, K, G, torch.float16, seed=3)
    layers = [_gemv_case(1, N, K, G, torch.float16, seed=20 + i)[2] for i in range(3)]

    def chain(x0):
        y = x0
        for t in layers:
            y = w4a16_gemv(y, **t, config=cfg) * 0.05      # keep the activations in fp16's range
        return y

    ref = x.float()
    for t in layers:
        ref = (w4a16_gemv_ref(ref, **t) * 0.05).half().float()
    y = chain(x)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() <= 1e-2
    if torch.cuda.is_available():
        from mlsys24.bench import CUDAGraphed

        g = CUDAGraphed(lambda: chain(x))
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        assert torch.equal(g.out, y)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,G", [(1, 4096, 4096, 128), (1, 83, 130, 64), (1, 1000, 512, 32), (4, 130, 256, 128)])
@pytest.mark.parametrize("split_k,prefetch,pdl", [(1, False, False), (4, True, False), (3, False, True)])
def test_gpu_gemv_l2_prefetch_matches_reference(M, N, K, G, split_k, prefetch, pdl):
    # the copy engine's L2 prefetch of each program's tiles changes where the bytes come from, not
    # what is computed: same result as without it (partial last tiles, odd K, steps/zeros too)
    from mlsys24.kernels.stream import l2_prefetch_supported

    if not l2_prefetch_supported(torch.device("cuda")):
        pytest.skip("cp.async.bulk.prefetch needs compute capability >= 9.0")
    x, p, _ = _gemv_case(M, N, K, G, torch.float16, seed=11)
    t = {k: v.to(DEV) for k, v in gemv_repack(p["qweight"].cpu(), p["qzeros"].cpu(), p["scales"].cpu(), N,
                                              layout="group").items()}
    base = GemvConfig(block_n=64, unroll=2, split_k=split_k, half2=True, quad=True, prefetch=prefetch, pdl=pdl)
    y0 = w4a16_gemv(x, **t, config=base)
    y1 = w4a16_gemv(x, **t, config=GemvConfig(**{**base.as_dict(), "l2_prefetch": True}))
    assert torch.equal(y0, y1)
    ref = w4a16_ref(x, p["qweight"], p["qzeros"], p["scales"], N)
    assert ((y1.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item() <= 3e-3


def test_gemv_l2_prefetch_rejected_where_it_cannot_run():
    x, _, t = _gemv_case(1, 64, 128, 64, torch.float16)
    cfg = GemvConfig(block_n=32, unroll=1, split_k=1, l2_prefetch=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="l2_prefetch needs a CUDA GPU"):
            w4a16_gemv(x, **t, config=cfg)
    elif torch.cuda.get_device_capability()[0] >= 9:
        with pytest.raises(ValueError, match="group-major"):
            w4a16_gemv(x, **t, config=cfg)        # the row-major layout: a tile's rows are not contiguous
