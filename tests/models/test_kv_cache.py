"""KV caches: incremental decoding equals the full forward; paged equals contiguous (ragged batches)."""

import pytest
import torch

from mlsys24.models import BlockAllocator, ContiguousKVCache, OutOfBlocks, PagedKVCache

from ._util import small_model

ATOL = 2e-5  # fp32: the cached path sums the same products in a different order


def _decode_incrementally(model, x, cache, prefill):
    outs = [model(x[:, :prefill], kv_cache=cache)]
    for t in range(prefill, x.shape[1]):
        outs.append(model(x[:, t: t + 1], kv_cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_incremental_equals_full(kind, n_kv_heads, backend):
    model = small_model(n_kv_heads=n_kv_heads)
    model.set_attention_backend(backend)
    x = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(kind, batch=2, max_len=64, block_size=16)
        if kind == "paged":
            cache.new_batch(2)
        inc = _decode_incrementally(model, x, cache, prefill=13)
    assert torch.allclose(inc, full, atol=ATOL), (inc - full).abs().max()


def test_paged_equals_contiguous_ragged_batch():
    """3 sequences, block 16, odd prompt lengths, prefill in one ragged forward, then decode steps."""
    model = small_model(n_kv_heads=2)
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([7, 23, 41])
    n_dec = 11
    seqs = [torch.randint(0, 256, (int(n) + n_dec,), generator=g) for n in lens]
    x = torch.zeros(3, int(lens.max()), dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, : lens[b]] = s[: lens[b]]
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]  # each sequence alone, no cache
        cont = ContiguousKVCache.for_model(model.cfg, batch=3, max_len=64)
        paged = PagedKVCache.for_model(model.cfg, n_blocks=12, block_size=16)
        # interleave other sequences' allocations so block tables are not contiguous ranges
        ids = [paged.add_sequence() for _ in range(3)]
        paged.set_batch(ids[::-1])  # rows in a different order than ids
        perm = [2, 1, 0]
        lc = model(x, kv_cache=cont, input_lens=lens)
        lp = model(x[perm], kv_cache=paged, input_lens=lens[perm])[perm]
        for b in range(3):
            n = int(lens[b])
            assert torch.allclose(lc[b, :n], refs[b][:n], atol=ATOL)
            assert torch.allclose(lp[b, :n], refs[b][:n], atol=ATOL)
        for t in range(n_dec):
            tok = torch.stack([s[lens[b] + t] for b, s in enumerate(seqs)])[:, None]
            lc = model(tok, kv_cache=cont)[:, 0]
            lp = model(tok[perm], kv_cache=paged)[perm][:, 0]
            for b in range(3):
                assert torch.allclose(lc[b], refs[b][lens[b] + t], atol=ATOL)
                assert torch.allclose(lp[b], lc[b], atol=ATOL)
    used = [paged.blocks[s] for s in ids]
    assert [len(u) for u in used] == [-(-(int(n) + n_dec) // 16) for n in lens]
    assert len({b for u in used for b in u}) == sum(len(u) for u in used)  # no block shared
    assert any(u != list(range(u[0], u[0] + len(u))) for u in used)  # and not contiguous ranges


def test_mixed_prefill_and_decode_in_one_forward():
    model = small_model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 256, (20,), generator=g), torch.randint(0, 256, (9,), generator=g)
    cache = model.new_cache("paged", n_blocks=8, block_size=4)
    with torch.no_grad():
        ra, rb = model(a[None])[0], model(b[None])[0]
        sa = cache.add_sequence()
        cache.set_batch([sa])
        model(a[None, :19], kv_cache=cache)  # a is decoding, b arrives
        sb = cache.add_sequence()
        cache.set_batch([sa, sb])
        x = torch.zeros(2, 9, dtype=torch.long)
        x[0, 0], x[1] = a[19], b
        out = model(x, kv_cache=cache, input_lens=torch.tensor([1, 9]))
    assert torch.allclose(out[0, 0], ra[19], atol=ATOL)
    assert torch.allclose(out[1], rb, atol=ATOL)
    assert cache.length(sa) == 20 and cache.length(sb) == 9


def test_block_size_one_and_export_import():
    """Token-granular pages; K/V exported from one sequence and imported into another continue exactly."""
    model = small_model(n_kv_heads=2)
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache("paged", n_blocks=64, block_size=1)
        s0 = cache.add_sequence()
        cache.set_batch([s0])
        model(x[:, :18], kv_cache=cache)
        kvs = cache.export_kv(s0)
        assert len(kvs) == 2 and kvs[0][0].shape == (18, 2, 16)
        s1 = cache.add_sequence()
        cache.append_kv(s1, kvs)
        cache.set_batch([s1])
        out = model(x[:, 18:], kv_cache=cache)
        cont = model.new_cache("contiguous", batch=1, max_len=40)
        cont.append_kv(0, kvs)
        out_c = model(x[:, 18:], kv_cache=cont)
    assert torch.allclose(out, full[:, 18:], atol=ATOL)
    assert torch.allclose(out_c, full[:, 18:], atol=ATOL)
    assert torch.equal(cont.export_kv(0, 0, 18)[1][0], kvs[1][0])


def test_allocator_refcounts_and_exhaustion():
    al = BlockAllocator(4)
    a = al.alloc(3)
    assert a == [0, 1, 2] and al.n_free == 1
    al.incref(a[:2])
    al.free(a)
    assert al.n_free == 2  # blocks 0, 1 still referenced
    with pytest.raises(OutOfBlocks):
        al.alloc(3)
    al.free(a[:2])
    assert al.alloc(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        al.free([0, 0])


def test_share_prefix_and_free():
    model = small_model()
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache("paged", n_blocks=10, block_size=8)
    with torch.no_grad():
        full = model(x)
        s0 = cache.add_sequence()
        cache.set_batch([s0])
        model(x[:, :32], kv_cache=cache)
        s1 = cache.add_sequence()
        cache.share_prefix(s0, s1, 32)
        cache.set_batch([s1])
        out = model(x[:, 32:], kv_cache=cache)
    assert torch.allclose(out, full[:, 32:], atol=ATOL)
    assert cache.blocks[s1][:4] == cache.blocks[s0]
    cache.free_sequence(s0)
    assert cache.allocator.n_free == 10 - 5
    cache.free_sequence(s1)
    assert cache.allocator.n_free == 10


def test_contiguous_overflow_raises():
    model = small_model()
    cache = model.new_cache("contiguous", batch=1, max_len=8)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
