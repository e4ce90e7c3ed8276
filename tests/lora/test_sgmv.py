"""SGMV / BGMV Triton kernels (interpreter on CPU) and the PyTorch baselines against float32 references.

Odd shapes (1, 7, 83, 127), ranks 8/16 (padded to 16 inside the kernels) and 64, uneven, empty and
adapter-less (-1) segments, unsorted rows, split-K with fp32 atomics, non-contiguous inputs.
"""

import numpy as np
import pytest
import torch

from mlsys24.lora.sgmv import (
    bgmv_expand,
    bgmv_ref,
    bgmv_shrink,
    lora_bgmv,
    lora_gather_bmm,
    lora_loop,
    lora_ref,
    lora_segmented_torch,
    lora_sgmv,
    segments_from_indptr,
    segments_from_slots,
    sgmv,
    sgmv_expand,
    sgmv_ref,
    sgmv_shrink,
)
from mlsys24.lora.workload import popularity_segments

# Error relative to max |reference|. fp32: summation order only. fp16/bf16: inputs are rounded the
# same way for the reference, the kernels accumulate in fp32, so what remains is the final rounding
# of y to 11 (fp16) or 8 (bf16) significant bits.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def pools(n_slots, K, R, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(n_slots, K, R, generator=g) / K**0.5).to(dtype)
    B = torch.randn(n_slots, R, H, generator=g).to(dtype)
    scale = torch.rand(n_slots, generator=g) + 0.5
    return A, B, scale


def slots_for(popularity, n, n_slots, seed=0):
    lens = popularity_segments(n, popularity)
    ids = np.repeat(np.arange(len(lens)) % n_slots, lens)
    return np.random.default_rng(seed).permutation(ids)  # unsorted rows: the kernels gather by index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,R,H", [(1, 7, 8, 83), (7, 127, 16, 7), (13, 83, 8, 127)])
def test_lora_sgmv_bgmv_match_reference(dtype, N, K, R, H):
    A, B, scale = pools(5, K, R, H, dtype, seed=N)
    slots = np.random.default_rng(N).integers(-1, 5, N)  # mixed, unsorted, some rows without adapter
    x = torch.randn(N, K).to(dtype)
    ref = lora_ref(x, A, B, scale, slots)
    seg = segments_from_slots(slots)
    assert rel_err(lora_sgmv(x, A, B, scale, seg), ref) <= TOL[dtype]
    assert rel_err(lora_bgmv(x, A, B, scale, slots), ref) <= TOL[dtype]
    # rows without an adapter stay exactly zero
    none = torch.as_tensor(slots < 0)
    if none.any():
        assert lora_sgmv(x, A, B, scale, seg)[none].abs().max() == 0


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "skewed", "identical"])
def test_popularities_all_operators_agree(popularity):
    N, K, R, H = 23, 64, 16, 48
    A, B, scale = pools(23, K, R, H, torch.float32)
    slots = slots_for(popularity, N, 23)
    x = torch.randn(N, K)
    ref = lora_ref(x, A, B, scale, slots)
    seg = segments_from_slots(slots)
    for name, out in [("sgmv", lora_sgmv(x, A, B, scale, seg)), ("bgmv", lora_bgmv(x, A, B, scale, slots)),
                      ("loop", lora_loop(x, A, B, scale, seg)), ("gather_bmm", lora_gather_bmm(x, A, B, scale, slots)),
                      ("segmented", lora_segmented_torch(x, A, B, scale, seg))]:
        assert (out - ref).abs().max() <= 1e-4, name


def test_split_k_atomics_and_rank_64():
    """Split-K shrink (fp32 atomics across programs) at rank 64, uneven segments."""
    N, K, R, H = 9, 127, 64, 33
    A, B, scale = pools(3, K, R, H, torch.float32)
    indptr, seg_slot = [0, 1, 1, 6, 9], [2, 0, 1, -1]  # an empty segment and an adapter-less one
    seg = segments_from_indptr(indptr, seg_slot)
    x = torch.randn(N, K)
    v = torch.zeros(N, R)
    sgmv_shrink(v, x, A, seg, split_k=3, block_k=16)
    v_ref = sgmv_ref(x, A, indptr, seg_slot)
    assert (v - v_ref).abs().max() <= 1e-4
    y = torch.zeros(N, H)
    sgmv_expand(y, v, B, seg, scale, block_n=16)
    slots = [2, 1, 1, 1, 1, 1, -1, -1, -1]
    assert (y - lora_ref(x, A, B, scale, slots)).abs().max() <= 1e-4
    vb = bgmv_shrink(torch.zeros(N, R), x, A, slots, split_k=4, block_k=16)
    assert (vb - bgmv_ref(x, A, slots)).abs().max() <= 1e-4
    yb = bgmv_expand(torch.zeros(N, H), vb, B, slots, scale, block_n=16)
    assert (yb - y).abs().max() <= 1e-4


def test_sgmv_accumulates_and_generic_op():
    """``sgmv(y, x, w, seg)`` adds to y (Punica's ``y += x @ W_i`` per segment), shrink and expand shapes."""
    N, K, H = 7, 83, 67
    w_narrow = torch.randn(2, K, 16)
    w_wide = torch.randn(2, 16, H)
    indptr, seg_slot = [0, 3, 7], [1, 0]
    seg = segments_from_indptr(indptr, seg_slot)
    x = torch.randn(N, K)
    y0 = torch.randn(N, 16)
    out = sgmv(y0.clone(), x, w_narrow, seg)
    assert (out - (y0 + sgmv_ref(x, w_narrow, indptr, seg_slot))).abs().max() <= 1e-4
    v = torch.randn(N, 16)
    y1 = torch.randn(N, H)
    out = sgmv(y1.clone(), v, w_wide, seg)
    assert (out - (y1 + sgmv_ref(v, w_wide, indptr, seg_slot))).abs().max() <= 1e-4


def test_non_contiguous_inputs():
    N, K, R, H = 7, 83, 8, 31
    A, B, scale = pools(3, K, R, H, torch.float32)
    base = torch.randn(K, 2 * N)
    x = base[:, ::2].t()  # [N, K] with strides (2, 2N)
    assert not x.is_contiguous()
    slots = [0, 2, 2, -1, 1, 0, 2]
    ref = lora_ref(x, A, B, scale, slots)
    assert (lora_sgmv(x, A, B, scale, segments_from_slots(slots)) - ref).abs().max() <= 1e-4
    assert (lora_bgmv(x, A, B, scale, slots) - ref).abs().max() <= 1e-4
    y = torch.zeros(H, N).t()  # non-contiguous output, accumulated into
    lora_sgmv(x, A, B, scale, segments_from_slots(slots), y=y)
    assert (y - ref).abs().max() <= 1e-4


def test_segments_tables():
    seg = segments_from_slots([3, -1, 0, 3, 0, 0])
    assert seg.has_rows and seg.seg_slot.tolist() == [0, 3] and seg.seg_indptr.tolist() == [0, 3, 5]
    assert seg.order.tolist() == [2, 4, 5, 0, 3]
    assert seg.slot_per_row().tolist() == [3, -1, 0, 3, 0, 0]
    sorted_seg = segments_from_slots([0, 0, 1, 1, 1])
    assert not sorted_seg.has_rows and sorted_seg.n_tiles == 2
    tiles = segments_from_slots([0] * 40, block_m=16)
    assert tiles.n_tiles == 3
    assert tiles.tile_end.tolist() == [16, 32, 40] and tiles.tile_start.tolist() == [0, 16, 32]
    # a fixed-capacity table refilled in place keeps its storage (what a CUDA graph needs)
    st = segments_from_slots([-1] * 8, capacity=9, force_rows=True)
    ptr = st.table.data_ptr()
    st.refill_([1, 1, 0, -1, 2, 2, 2, 0])
    assert st.table.data_ptr() == ptr and st.n_tiles == 3
    fresh = segments_from_slots([1, 1, 0, -1, 2, 2, 2, 0], capacity=9, force_rows=True)
    assert torch.equal(st.table, fresh.table)
    with pytest.raises(ValueError, match="capacity"):
        segments_from_slots(list(range(5)), capacity=4)
    with pytest.raises(ValueError, match="seg_indptr"):
        segments_from_indptr([1, 2], [0])


def test_empty_and_adapterless_batches():
    A, B, scale = pools(2, 16, 8, 16, torch.float32)
    x = torch.randn(4, 16)
    seg = segments_from_slots([-1, -1, -1, -1])
    assert seg.n_tiles == 0
    assert lora_sgmv(x, A, B, scale, seg).abs().max() == 0
    assert lora_bgmv(x, A, B, scale, [-1] * 4).abs().max() == 0
    assert lora_gather_bmm(x, A, B, scale, [-1] * 4).abs().max() == 0


def test_shape_errors():
    A, B, scale = pools(2, 16, 8, 16, torch.float32)
    x = torch.randn(3, 16)
    seg = segments_from_slots([0, 1, 0])
    with pytest.raises(ValueError, match="fp32"):
        sgmv_shrink(torch.zeros(3, 8, dtype=torch.float16), x, A, seg)
    with pytest.raises(ValueError, match="do not agree"):
        sgmv_shrink(torch.zeros(3, 8), torch.randn(3, 17), A, seg)
    with pytest.raises(ValueError, match="weights"):
        sgmv_shrink(torch.zeros(3, 8), x.half(), A, seg)


@pytest.mark.parametrize("reduce,R,popularity", [
    ("workspace", 8, "distinct"), ("workspace", 64, "skewed"), ("serial", 32, "distinct"), ("serial", 64, "uniform"),
    ("atomic", 16, "skewed"), ("atomic", 64, "identical")])
def test_lora_sgmv_split_k_reductions(reduce, R, popularity):
    """The three split-K reductions of ``lora_sgmv`` (split partials summed by the expand kernel, by
    the last split of each tile to arrive, or fp32 atomics into a zeroed v) over ranks 8-64, with
    more splits than one chunk of the sum; the arrival counters are left at zero for the next call."""
    from mlsys24.lora.sgmv import SGMVConfig

    N, K, H = 7, 83, 41
    A, B, scale = pools(9, K, R, H, torch.float32, seed=R)
    slots = slots_for(popularity, N, 9, seed=R)
    x = torch.randn(N, K)
    ref = lora_ref(x, A, B, scale, slots)
    seg = segments_from_slots(slots)
    cfg = SGMVConfig(block_k=16, block_n=16, reduce=reduce)
    for split in (1, 6):
        got = lora_sgmv(x, A, B, scale, seg, config=cfg, split_k=split)
        assert (got - ref).abs().max() <= 1e-4, (split, reduce)
    y0 = torch.randn(N, H)
    got = lora_sgmv(x, A, B, scale, seg, y=y0.clone(), config=cfg, split_k=6)
    assert (got - (y0 + ref)).abs().max() <= 1e-4
    if reduce == "serial":
        from mlsys24.lora.sgmv import _arrival_counters
        assert int(_arrival_counters(x.device, seg.capacity).abs().sum()) == 0


def test_expand_sums_split_partials():
    """``sgmv_expand`` with ``v [splits, N, R]`` adds up the splits (fewer per chunk than splits)."""
    N, R, H = 5, 64, 19
    _, B, scale = pools(2, 16, R, H, torch.float32)
    parts = torch.randn(7, N, R)
    seg = segments_from_indptr([0, 2, 5], [1, 0])
    y = sgmv_expand(torch.zeros(N, H), parts, B, seg, scale)
    assert (y - lora_ref(parts.sum(0), torch.eye(R)[None].repeat(2, 1, 1), B, scale, [1, 1, 0, 0, 0])).abs().max() <= 1e-4


def test_sgmv_config_table():
    from mlsys24.lora.sgmv import SGMVConfig, set_sgmv_configs, sgmv_config

    try:
        a, b = SGMVConfig(block_n=64), SGMVConfig(block_n=256, pdl=True)
        set_sgmv_configs({(64, 48, 16): [(1, a), (64, b.as_dict())]})
        assert sgmv_config(64, 48, 16, 1) == a and sgmv_config(64, 48, 16, 40) == b
        assert sgmv_config(64, 96, 16, 2) == a          # nearest tuned shape of the same rank
        assert sgmv_config(64, 48, 32, 2) != a           # another rank: the default
        # the tuned configs give the same result as the default
        A, B, scale = pools(4, 64, 16, 48, torch.float32)
        x = torch.randn(3, 64)
        seg = segments_from_slots([2, 0, 3])
        assert (lora_sgmv(x, A, B, scale, seg) - lora_ref(x, A, B, scale, [2, 0, 3])).abs().max() <= 1e-4
    finally:
        set_sgmv_configs(None)


@pytest.mark.parametrize("variant,reduce,R,popularity", [
    ({"expand_per_sm": 20.0}, "workspace", 16, "distinct"), ({"expand_per_sm": 3.0}, "atomic", 64, "skewed"),
    ({"expand_per_sm": 0.5}, "serial", 8, "identical"), ({"expand_rows": 1}, "workspace", 32, "distinct"),
    ({"expand_rows": 1}, "atomic", 64, "distinct"), ({"expand_rows": 16}, "serial", 16, "skewed"),
    ({"expand_rows": 16}, "workspace", 8, "uniform")])
def test_lora_sgmv_expand_variants(variant, reduce, R, popularity):
    """The expand's two other forms: programs walking a run of N tiles (``expand_per_sm``; runs that
    end inside a tile and a last, shorter run) and the row-by-row kernel (``expand_rows``; tiles of
    one row and of many), over unsorted rows, split-K reductions and rows without an adapter."""
    from mlsys24.lora.sgmv import SGMVConfig

    N, K, H = 9, 40, 83
    A, B, scale = pools(9, K, R, H, torch.float32, seed=R + 1)
    slots = slots_for(popularity, N, 9, seed=R)
    slots[2] = -1
    x = torch.randn(N, K)
    ref = lora_ref(x, A, B, scale, slots)
    seg = segments_from_slots(slots)
    cfg = SGMVConfig(block_k=16, block_n=16, rows_block_n=32, reduce=reduce, **variant)
    y0 = torch.randn(N, H)
    for split in (1, 5):
        got = lora_sgmv(x, A, B, scale, seg, y=y0.clone(), config=cfg, split_k=split)
        assert (got - (y0 + ref)).abs().max() <= 1e-4, (split, variant, reduce)
    # fp16 weights and output (the GPU's case): fp32 v, TF32 / fp32 products
    A16, B16, x16 = A.half(), B.half(), x.half()
    ref16 = lora_ref(x16, A16, B16, scale, slots)
    got = lora_sgmv(x16, A16, B16, scale, seg, config=cfg, split_k=3)
    assert rel_err(got, ref16) <= TOL[torch.float16]
    # rows already grouped by adapter (no row index), Punica's indptr form
    lens = popularity_segments(N, popularity)
    indptr = np.concatenate([[0], np.cumsum(lens)]).tolist()
    seg_c = segments_from_indptr(indptr, list(range(len(lens))))
    ref_c = lora_ref(x, A, B, scale, np.repeat(np.arange(len(lens)), lens))
    got = lora_sgmv(x, A, B, scale, seg_c, config=cfg, split_k=2)
    assert not seg_c.has_rows and (got - ref_c).abs().max() <= 1e-4


def test_expand_split_covers_n():
    """Runs of N tiles: every column in exactly one program, each run a whole number of tiles."""
    from mlsys24.lora.sgmv import _expand_split

    for H, bn, cap, eps in [(83, 16, 3, 2.0), (11008, 128, 64, 4.0), (4096, 256, 1, 8.0), (7, 16, 5, 1.0)]:
        grid, per = _expand_split(H, bn, cap, torch.device("cpu"), eps)
        assert per % bn == 0 and grid * per >= H > (grid - 1) * per
    assert _expand_split(83, 16, 3, torch.device("cpu"), 0.0) == (6, 16)
