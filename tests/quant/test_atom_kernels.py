"""Atom's Triton kernels vs their integer/float32 references (TRITON_INTERPRET=1 on CPU).

Tolerances: the quantize kernel must reproduce codes and scales exactly (same fp32 operations in the
same order; with the fused RMSNorm the row statistic is summed in another order, so scales may differ
in the last ulp and a code may flip at a rounding tie: bounded below). The GEMM equals the exact
integer reference scaled in fp32 up to accumulation order (rtol 1e-5).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from mlsys24.quant.atom import AtomConfig, AtomPackedLinear, fake_quant_act, fake_quant_weight  # noqa: E402
from mlsys24.quant.w4a4 import (  # noqa: E402
    W4A4Config,
    append_kv4,
    decode_attention_kv4,
    decode_attention_kv4_ref,
    pack_int4_halves,
    pack_int4_pairs,
    pack_kv4,
    pack_weight_w4a4,
    quantize_act_w4a4,
    quantize_act_w4a4_ref,
    unpack_int4_halves,
    unpack_int4_pairs,
    w4a4_gemm,
    w4a4_gemm_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_pack_roundtrip():
    q = torch.randint(-8, 8, (7, 34))
    assert torch.equal(unpack_int4_pairs(pack_int4_pairs(q)).long(), q)
    q = torch.randint(-8, 8, (5, 3 * 64))
    p = pack_int4_halves(q, 64)
    assert p.shape == (5, 96) and torch.equal(unpack_int4_halves(p, 64).long(), q)
    # byte j of a group: channel j in the low nibble, channel j + G/2 in the high nibble
    assert int(p[0, 33]) & 0xF == int(q[0, 64 + 1]) & 0xF and (int(p[0, 33]) >> 4) & 0xF == int(q[0, 64 + 33]) & 0xF


def test_nibble_x16_unpack_identity():
    """The kernel's unpack: low nibble -> (b << 4) as int8 = 16 lo, high -> b & 0xF0 = 16 hi (exact)."""
    b = torch.arange(-128, 128, dtype=torch.int32)
    lo, hi = (b << 28) >> 28, b >> 4
    assert torch.equal(((b << 4) & 0xFF).to(torch.uint8).view(torch.int8).int(), 16 * lo)
    assert torch.equal((b & -16).to(torch.int8).int(), 16 * hi)


@pytest.mark.parametrize("M,C,G,keep", [(1, 256, 64, 8), (7, 256, 64, 8), (16, 128, 32, 0), (5, 96, 64, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("a_layout", ["packed", "int8"])
def test_reorder_quant_kernel_exact(M, C, G, keep, dtype, a_layout):
    g = torch.Generator().manual_seed(M * C)
    x = (torch.randn(M, 2 * C, generator=g) * 3)[:, ::2].to(dtype).to(DEV)    # non-contiguous
    x[:, :2] *= 25
    idx = torch.randperm(C, generator=g).to(DEV)
    ref = quantize_act_w4a4_ref(x, G, keep, index=idx, clip=0.9, a_layout=a_layout)
    out = quantize_act_w4a4(x, G, keep, index=idx, clip=0.9, a_layout=a_layout)
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        assert torch.equal(r, o), (r - o).abs().max()


def test_reorder_quant_kernel_fused_rmsnorm():
    g = torch.Generator().manual_seed(5)
    M, C, G, keep = 9, 256, 64, 8
    x = torch.randn(M, C, generator=g).to(DEV)
    nw = (torch.rand(C, generator=g) + 0.5).to(DEV)
    nw[:8] *= 20
    idx = torch.randperm(C, generator=g).to(DEV)
    ref = quantize_act_w4a4_ref(x, G, keep, index=idx, norm_weight=nw)
    out = quantize_act_w4a4(x, G, keep, index=idx, norm_weight=nw)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-5, atol=0)
    codes_r, codes_o = unpack_int4_halves(ref[0], G).int(), unpack_int4_halves(out[0], G).int()
    assert (codes_r - codes_o).abs().max() <= 1 and (codes_r != codes_o).float().mean() < 0.01
    assert (ref[2].int() - out[2].int()).abs().max() <= 1


@pytest.mark.parametrize("M,N,C,G,keep", [(16, 64, 256, 64, 8), (1, 83, 256, 64, 8), (7, 127, 128, 32, 0),
                                         (33, 64, 200, 64, 8)])
@pytest.mark.parametrize("a_layout", ["packed", "int8"])
def test_w4a4_gemm_equals_integer_reference(M, N, C, G, keep, a_layout):
    g = torch.Generator().manual_seed(M + N + C)
    x = torch.randn(M, C, generator=g).to(DEV)
    w = torch.randn(N, C, generator=g).to(DEV)
    p = pack_weight_w4a4(w, G, keep, clip=0.85)
    qa, sa, qa8, sa8 = quantize_act_w4a4_ref(x, G, keep, a_layout=a_layout)
    ref = w4a4_gemm_ref(qa, sa, qa8, sa8, p["qw"], p["sw"], p["qw8"], p["sw8"], G)
    out = w4a4_gemm(qa, sa, qa8, sa8, p["qw"], p["sw"], p["qw8"], p["sw8"], G)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the plain int32 -> fp32 conversion gives the same numbers as the magic-number one
    for cfg in (W4A4Config(16, 32, fast_cvt=False), W4A4Config(32, 16, swap_ab=True)):
        out2 = w4a4_gemm(qa, sa, qa8, sa8, p["qw"], p["sw"], p["qw8"], p["sw8"], G, config=cfg)
        torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and the packed path computes the fake-quant model's matmul
    cfg = AtomConfig(group_size=G, keeper=keep, w_clip=0.85)
    fq = fake_quant_act(x, cfg) @ fake_quant_weight(w, cfg).t()
    torch.testing.assert_close(ref, fq, rtol=1e-4, atol=1e-4 * float(fq.abs().max()))


def test_w4a4_gemm_kernel_quant_chain_and_extremes():
    """Kernel-quantized activations (group-major scale buffer) feed the GEMM; extreme codes (-8 and 7
    everywhere, the int32 group sum's largest magnitude) stay exact through the x16/x256 unpack."""
    g = torch.Generator().manual_seed(3)
    M, N, C, G, keep = 9, 40, 136, 64, 8
    x = torch.randn(M, C, generator=g).to(DEV)
    w = torch.randn(N, C, generator=g).to(DEV)
    p = pack_weight_w4a4(w, G, keep)
    for lay, swap in (("packed", False), ("int8", False), ("packed", True), ("int8", True)):
        qa, sa, qa8, sa8 = quantize_act_w4a4(x, G, keep, a_layout=lay)
        assert sa.stride(0) == 1                                    # [M, ng] view of a group-major buffer
        ref = w4a4_gemm_ref(qa, sa, qa8, sa8, p["qw"], p["sw"], p["qw8"], p["sw8"], G)
        out = w4a4_gemm(qa, sa, qa8, sa8, p["qw"], p["sw"], p["qw8"], p["sw8"], G,
                        config=W4A4Config(16, 32, swap_ab=swap))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    ng = 2
    qa = torch.full((M, ng * G), -8, dtype=torch.int8, device=DEV)
    qw = pack_int4_halves(torch.full((N, ng * G), -8, dtype=torch.int8), G).to(DEV)
    ones = torch.ones(M, ng, device=DEV)
    y = w4a4_gemm(qa, ones, qa[:, :0], ones[:, 0], qw, torch.ones(ng, N, device=DEV), qw[:, :0],
                  torch.ones(N, device=DEV), G)
    assert torch.equal(y, torch.full_like(y, 64.0 * ng * G))
    qa7 = pack_int4_halves(torch.full((M, ng * G), 7, dtype=torch.int8), G).to(DEV)
    y = w4a4_gemm(qa7, ones, qa[:, :0], ones[:, 0], qw, torch.ones(ng, N, device=DEV), qw[:, :0],
                  torch.ones(N, device=DEV), G)
    assert torch.equal(y, torch.full_like(y, -56.0 * ng * G))


def test_packed_linear_kernel_vs_reference_path():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 256, generator=g)
    idx = torch.randperm(256, generator=g)
    lin = AtomPackedLinear(w, AtomConfig(group_size=64, keeper=8), in_index=idx).to(DEV)
    x = torch.randn(2, 5, 256, generator=g).to(DEV)
    lin.use_kernel = False
    y_ref = lin(x)
    lin.use_kernel = True
    y = lin(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,S,H,KV,D", [(2, 40, 4, 2, 64), (1, 7, 2, 2, 32), (3, 83, 2, 1, 64)])
def test_decode_attention_kv4(B, S, H, KV, D):
    g = torch.Generator().manual_seed(B * S)
    q = torch.randn(B, H, D, generator=g).to(DEV)
    k = torch.randn(B, S, KV, D, generator=g).to(DEV)
    v = torch.randn(B, S, KV, D, generator=g).to(DEV)
    k4, kd, kz = pack_kv4(k)
    v4, vd, vz = pack_kv4(v)
    lens = torch.randint(1, S + 1, (B,), generator=g).to(DEV)
    ref = decode_attention_kv4_ref(q, k4, kd, kz, v4, vd, vz, lens)
    out = decode_attention_kv4(q, k4, kd, kz, v4, vd, vz, lens, block_s=16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a head-major cache ([B, KV, S, .] storage seen as [B, S, KV, .]) gives the same result
    hm = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k4, kd, kz, v4, vd, vz)]
    out_hm = decode_attention_kv4(q, *hm[:3], *hm[3:], lens, block_s=32)
    torch.testing.assert_close(out_hm, ref, rtol=1e-4, atol=1e-5)


# tolerance per arithmetic path: fp32 everywhere (only the summation order differs from the reference), or
# the GPU's tensor-core path, which rounds q and the weights p * delta to fp16 (~1e-3 relative each)
ATTN_TOL = {"fp32": dict(rtol=1e-4, atol=1e-5), "fp16_dot": dict(rtol=0.0, atol=5e-3)}


@pytest.mark.parametrize("kw,path", [(dict(impl="simple"), "fp32"), (dict(num_splits=3), "fp32"),
                                     (dict(use_dot=True), "fp16_dot"),
                                     (dict(use_dot=True, magic=True, num_splits=2), "fp16_dot")])
@pytest.mark.parametrize("B,S,H,KV,D", [(2, 40, 4, 2, 64), (3, 83, 2, 1, 32)])
def test_decode_attention_kv4_variants(B, S, H, KV, D, kw, path):
    """Split-KV (empty splits included: row 0 has one token), tensor-core and exponent-trick paths."""
    g = torch.Generator().manual_seed(B + S)
    q = torch.randn(B, H, D, generator=g).to(DEV)
    k4, kd, kz = pack_kv4(torch.randn(B, S, KV, D, generator=g).to(DEV))
    v4, vd, vz = pack_kv4(torch.randn(B, S, KV, D, generator=g).to(DEV))
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[0] = 1
    lens = lens.to(DEV)
    ref = decode_attention_kv4_ref(q, k4, kd, kz, v4, vd, vz, lens)
    out = decode_attention_kv4(q, k4, kd, kz, v4, vd, vz, lens, block_s=16, **kw)
    tol = dict(ATTN_TOL[path])
    tol["atol"] = tol["atol"] * float(ref.abs().max()) if path == "fp16_dot" else tol["atol"]
    torch.testing.assert_close(out, ref, **tol)


def test_decode_attention_kv4_fp16_head_major_cache():
    """The serving layout: head-major storage, fp16 step/zero, fp16 output."""
    g = torch.Generator().manual_seed(11)
    B, S, H, D = 2, 50, 2, 64
    q = torch.randn(B, H, D, generator=g).to(DEV)
    c = [*pack_kv4(torch.randn(B, S, H, D, generator=g)), *pack_kv4(torch.randn(B, S, H, D, generator=g))]
    c = [t.to(torch.float16) if t.is_floating_point() else t for t in c]
    c = [t.transpose(1, 2).contiguous().transpose(1, 2).to(DEV) for t in c]        # [B, H, S, .] storage
    lens = torch.tensor([50, 9], dtype=torch.int32, device=DEV)
    ref = decode_attention_kv4_ref(q, *c, lens)
    for kw in (dict(), dict(use_dot=True, magic=True)):
        out = decode_attention_kv4(q.half(), *c, lens, block_s=16, out_dtype=torch.float16, **kw)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), ref, rtol=0.0, atol=5e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16])
def test_append_kv4_matches_reference_quantizer(meta_dtype):
    g = torch.Generator().manual_seed(5)
    B, S, KV, D = 3, 12, 2, 64
    k, v = torch.randn(B, KV, D, generator=g).to(DEV), (3 * torch.randn(B, KV, D, generator=g) + 1).to(DEV)
    k4 = torch.zeros(B, KV, S, D // 2, dtype=torch.uint8, device=DEV).transpose(1, 2)    # head-major storage
    v4 = torch.zeros_like(k4)
    kd, kz, vd, vz = (torch.zeros(B, KV, S, dtype=meta_dtype, device=DEV).transpose(1, 2) for _ in range(4))
    pos = torch.tensor([0, 7, S - 1], dtype=torch.int32, device=DEV)
    append_kv4(k, v, pos, k4, kd, kz, v4, vd, vz)
    for x, c4, cd, cz in ((k, k4, kd, kz), (v, v4, vd, vz)):
        r4, rd, rz = pack_kv4(x[:, None])                                               # [B, 1, KV, .]
        for b in range(B):
            p = int(pos[b])
            assert torch.equal(c4[b, p], r4[b, 0])
            torch.testing.assert_close(cd[b, p], rd[b, 0].to(meta_dtype), rtol=0, atol=0)
            torch.testing.assert_close(cz[b, p], rz[b, 0].to(meta_dtype), rtol=0, atol=0)
        untouched = torch.ones(B, S, dtype=torch.bool)
        untouched[torch.arange(B), pos.cpu().long()] = False
        assert int(c4.cpu()[untouched].abs().sum()) == 0, "append wrote outside its slots"


def test_no_dequant_diagnostic_is_the_unscaled_integer_sum():
    """The timing diagnostic (no per-group scales) returns the plain integer dot over all groups."""
    g = torch.Generator().manual_seed(4)
    M, N, C, G = 5, 24, 128, 32
    qa = torch.randint(-8, 8, (M, C), generator=g, dtype=torch.int8)
    qwc = torch.randint(-8, 8, (N, C), generator=g, dtype=torch.int8)
    ones = torch.ones(M, C // G)
    y = w4a4_gemm(qa.to(DEV), ones.to(DEV), qa[:, :0].to(DEV), ones[:, 0].to(DEV),
                  pack_int4_halves(qwc, G).to(DEV), torch.full((C // G, N), 3.0, device=DEV), qwc[:, :0].to(DEV),
                  torch.ones(N, device=DEV), G, config=W4A4Config(16, 32, no_dequant=True))
    assert torch.equal(y.cpu(), (qa.double() @ qwc.double().t()).float())
