"""MBGMM / MBGMV (heterogeneous ranks, scattered pool slots) against the float32 reference."""

import numpy as np
import pytest
import torch

from mlsys24.slora.mbgmv import (
    gathered_elements,
    lora_mbgmm,
    lora_mbgmv,
    lora_padded_bmm,
    lora_padded_bmm_rows,
    lora_pool_torch,
    make_tables,
    mbgmm_ref,
    mbgmv_expand,
    mbgmv_shrink,
    mbgmv_split,
)

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # fp16/bf16: inputs rounded to 10/7 bits


def _pool_batch(H, ranks, lens, dtype, seed=0, n_slots=None, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    need = sum(4 * r for r in ranks)
    n_slots = n_slots or need + 37
    wa = torch.randn(n_slots, H, generator=g) / H**0.5
    wb = torch.randn(n_slots, H, generator=g) * 0.1
    if noncontig:  # every other column of a wider buffer
        wa = (torch.randn(n_slots, 2 * H, generator=g) / H**0.5)[:, ::2]
    perm = torch.randperm(n_slots, generator=g).numpy()[:need]      # shuffled, scattered slots
    starts = np.concatenate([[0], np.cumsum([4 * r for r in ranks])[:-1]])
    seg_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    N = int(sum(lens))
    x = torch.randn(N, H, generator=g)
    scale = np.array([2.0 / r for r in ranks])
    t = make_tables(seg_start, lens, starts, ranks, scale, perm, N, "cpu")
    return x.to(dtype), wa.to(dtype), wb.to(dtype), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,ranks,lens", [(64, [4, 8, 16], [7, 1, 20]), (83, [8, 1, 16, 4], [1, 3, 2, 17]),
                                          (127, [16, 8], [5, 1])])
def test_mbgmm_matches_reference(dtype, H, ranks, lens):
    x, wa, wb, t = _pool_batch(H, ranks, lens, dtype)
    ref = mbgmm_ref(x, wa, wb, t, proj=2)
    out = lora_mbgmm(x, wa, wb, t, proj=2)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    tor = lora_pool_torch(x.float(), wa.float(), wb.float(), t, proj=2)
    torch.testing.assert_close(tor, ref, atol=1e-4, rtol=1e-4)
    bmm = lora_padded_bmm(x.float(), wa.float(), wb.float(), t, proj=2)
    torch.testing.assert_close(bmm, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,ranks", [(64, [4, 16, 8, 16, 1]), (7, [2, 3]), (127, [32, 8, 64])])
def test_mbgmv_matches_reference(dtype, H, ranks):
    x, wa, wb, t = _pool_batch(H, ranks, [1] * len(ranks), dtype, seed=3)
    for proj in (0, 3):
        ref = mbgmm_ref(x, wa, wb, t, proj=proj)
        out = lora_mbgmv(x, wa, wb, t, proj=proj)
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("split_k", [2, 3, 5, 8, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mbgmv_split_k_matches_reference(split_k, dtype):
    # K = 127 in tiles of 16: 8 tiles, split into uneven slices (the last one ragged); more splits than
    # tiles are clamped; each split stores its own plane of v, the expand adds them
    H, ranks = 127, [32, 8, 1, 16]
    x, wa, wb, t = _pool_batch(H, ranks, [1] * len(ranks), dtype, seed=5)
    valid = torch.arange(32)[None, :] < torch.tensor(ranks)[:, None]           # entries j < r are defined
    for proj in (1, 2):
        ref = mbgmm_ref(x, wa, wb, t, proj=proj)
        v = mbgmv_shrink(x, wa, t, proj, block_k=16, split_k=split_k)
        v1 = mbgmv_shrink(x, wa, t, proj, block_k=16, split_k=1)
        n_planes = -(-8 // -(-8 // min(split_k, 8)))                               # whole tiles per split
        assert v.shape == (n_planes, len(ranks), 32) and v1.shape == (1, len(ranks), 32)
        torch.testing.assert_close(v.sum(0)[valid], v1[0][valid], atol=1e-4, rtol=1e-4)
        out = mbgmv_expand(torch.zeros(len(ranks), H, dtype=dtype), v, wb, t, proj)
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        fresh = mbgmv_expand(None, v, wb, t, proj)             # every row one request: stored, no zero fill
        assert t.rows_once()
        torch.testing.assert_close(fresh.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(ValueError, match="split_k"):
        mbgmv_shrink(x, wa, t, 0, split_k=0)


def test_mbgmv_rows_without_adapter_and_accumulate():
    # rows 1 and 3 of 4 have no adapter (no segment): their LoRA term is 0, not whatever memory held;
    # with y given, the term is added to it
    H, ranks = 64, [8, 16]
    x, wa, wb, t0 = _pool_batch(H, ranks, [1, 1], torch.float32, seed=9)
    x4 = torch.randn(4, H)
    x4[[0, 2]] = x
    t = make_tables([0, 2], [1, 1], t0.seg_astart, ranks, t0.seg_scale, t0.a_loc, 4, "cpu")
    assert not t.rows_once() and t0.rows_once()
    ref = mbgmm_ref(x4, wa, wb, t, proj=1)
    out = lora_mbgmv(x4, wa, wb, t, proj=1)
    assert out[[1, 3]].abs().sum() == 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    base = torch.randn(4, H)
    torch.testing.assert_close(lora_mbgmv(x4, wa, wb, t, proj=1, y=base.clone()), base + ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mbgmv_projections_in_one_launch(dtype):
    # q, k, v of the same x in one shrink and one expand launch equal three single-projection calls,
    # and the padded-BMM baseline batches them the same way
    H, ranks = 83, [16, 4, 8, 1, 32]
    x, wa, wb, t = _pool_batch(H, ranks, [1] * len(ranks), dtype, seed=11)
    multi = lora_mbgmv(x, wa, wb, t, 1, n_proj=3)
    assert multi.shape == (3, len(ranks), H)
    for i, p in enumerate((1, 2, 3)):
        torch.testing.assert_close(multi[i].float(), mbgmm_ref(x, wa, wb, t, proj=p), atol=TOL[dtype], rtol=TOL[dtype])
    R = max(ranks)
    zero = wa.shape[0]
    wa0, wb0 = torch.cat([wa, torch.zeros(1, H, dtype=dtype)]), torch.cat([wb, torch.zeros(1, H, dtype=dtype)])
    idx = torch.full((4, len(ranks), R), zero)
    for s_, r in enumerate(ranks):
        for p in range(4):
            idx[p, s_, :r] = torch.from_numpy(t.rows_of(s_, p))
    sc = torch.from_numpy(t.seg_scale)
    b3 = lora_padded_bmm_rows(x.float(), wa0.float(), wb0.float(), idx[:3], sc)
    for p in range(3):
        torch.testing.assert_close(b3[p], lora_padded_bmm_rows(x.float(), wa0.float(), wb0.float(), idx[p], sc))
        torch.testing.assert_close(b3[p], mbgmm_ref(x, wa, wb, t, proj=p), atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(ValueError, match="projections"):
        lora_mbgmv(x, wa, wb, t, 2, n_proj=3)


def test_mbgmv_split_choice():
    dev = torch.device("cpu")                                   # 4 "SMs" off the GPU
    assert mbgmv_split(128, 4, 16, dev, programs_per_sm=0) == 1  # 0: no split
    assert mbgmv_split(2, 1, 16, dev, programs_per_sm=16) == 16  # few programs: up to one tile each
    assert mbgmv_split(2, 1, 3, dev, programs_per_sm=16) == 3    # never more than the K tiles
    assert mbgmv_split(64, 4, 16, dev, programs_per_sm=16) == 1  # already enough programs
    with pytest.raises(ValueError, match="programs_per_sm"):
        mbgmv_split(8, 1, 16, dev, programs_per_sm=-1)


def test_noncontiguous_pool_and_empty_batch():
    x, wa, wb, t = _pool_batch(64, [8, 4], [3, 1], torch.float32, noncontig=True)
    assert not wa.is_contiguous()
    torch.testing.assert_close(lora_mbgmm(x, wa, wb, t, 1), mbgmm_ref(x, wa, wb, t, 1), atol=1e-4, rtol=1e-4)
    e = make_tables([], [], [], [], [], [], 5, "cpu")
    assert lora_mbgmm(torch.ones(5, 64), wa, wb, e, 0).abs().sum() == 0


def test_gathered_elements_counts():
    _, _, _, t = _pool_batch(64, [8, 64, 16], [1, 1, 1], torch.float32)
    assert gathered_elements(t, 64, "mbgmv") == 8 * 64 * (8 + 64 + 16)
    assert gathered_elements(t, 64, "bmm") == 8 * 64 * 64 * 3


def test_tables_reject_bad_segments():
    with pytest.raises(ValueError):
        make_tables([0], [4], [0], [8], [1.0], np.arange(8), 4, "cpu")   # needs 32 slot ids
