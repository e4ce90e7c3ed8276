"""Unified pool: never double-allocates, never leaks (hypothesis), and the adapter pager's bookkeeping."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys24.models.kv_cache import OutOfBlocks
from mlsys24.slora.adapters import AdapterPager, HostAdapter
from mlsys24.slora.pool import ADAPTER, KV, UnifiedAllocator, kv_capacity_trace

ops = st.lists(st.tuples(st.sampled_from(["kv", "adapter", "free"]), st.integers(0, 40), st.integers(0, 10**6)),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(n_slots=st.integers(1, 200), script=ops)
def test_allocator_never_double_allocates_or_leaks(n_slots, script):
    alloc = UnifiedAllocator(n_slots)
    held: list[tuple[int, list[int]]] = []
    for kind, n, pick in script:
        if kind == "free":
            if held:
                owner, slots = held.pop(pick % len(held))
                alloc.free(slots)
            continue
        owner = KV if kind == "kv" else ADAPTER
        if n > alloc.n_free:
            with pytest.raises(OutOfBlocks):
                alloc.alloc(n, owner=owner)
            continue
        slots = alloc.alloc(n, owner=owner)
        held.append((owner, slots))
        flat = [s for _, ss in held for s in ss]
        assert len(flat) == len(set(flat)), "a slot was handed out twice"
        alloc.check()
    assert alloc.n_used[KV] == sum(len(s) for o, s in held if o == KV)
    assert alloc.n_used[ADAPTER] == sum(len(s) for o, s in held if o == ADAPTER)
    for _, slots in held:
        alloc.free(slots)
    alloc.check()
    assert alloc.n_free == n_slots, "slots leaked"
    with pytest.raises(ValueError):
        alloc.free([0])


def _host(rank, L=2, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HostAdapter(rank, 1.0, torch.randn(L, 4 * rank, H, generator=g), torch.randn(L, 4 * rank, H, generator=g))


@settings(max_examples=30, deadline=None)
@given(seq=st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=40))
def test_pager_loads_evicts_and_copies_rows(seq):
    alloc = UnifiedAllocator(64)
    wa = torch.zeros(2, 64, 8)
    pager = AdapterPager(alloc, wa, torch.zeros_like(wa))
    ranks = [1, 2, 4, 8, 1, 2, 4, 8]
    for a in range(8):
        pager.register(a, _host(ranks[a], seed=a))
    kv = alloc.alloc(10, owner=KV)   # KV tokens share the pool
    for a, protect_prev in seq:
        protect = set(list(pager.resident)[-1:]) if protect_prev and pager.resident else set()
        fits = pager.is_resident(a) or pager.room_for(0, protect | {a}) >= pager.host[a].n_slots
        ok = pager.load(a, protect=protect)
        assert ok == fits
        if not ok:
            continue
        s = pager.slots(a)
        torch.testing.assert_close(wa[:, torch.from_numpy(s)], pager.host[a].A)
        for p in protect:
            assert pager.is_resident(p)
        pager.check()
        alloc.check()
    assert alloc.n_used[KV] == len(kv)


def test_pager_refuses_when_everything_is_protected():
    alloc = UnifiedAllocator(40)
    wa = torch.zeros(2, 40, 8)
    pager = AdapterPager(alloc, wa, torch.zeros_like(wa))
    pager.register(0, _host(8))
    pager.register(1, _host(4))
    assert pager.load(0)
    assert not pager.load(1, protect={0})     # 32 + 16 > 40 and adapter 0 is in use
    assert pager.load(1)                      # adapter 0 idle: evicted (LRU)
    assert not pager.is_resident(0) and pager.n_evictions == 1


def test_capacity_trace_unified_beats_partitioned():
    batches = [[(0, 8, 10)], [(0, 8, 20), (1, 64, 5)], [(2, 16, 7), (3, 16, 9), (0, 8, 40)]]
    tr = kv_capacity_trace(batches, 2000, max_rank=64, max_adapters=4, max_len=100)
    assert (tr["unified"] >= tr["partitioned"]).all() and (tr["unified"] > tr["partitioned"]).any()
    assert list(tr["adapter_slots"]) == [32, 32 + 256, 64 + 64 + 32]
    assert np.all(tr["contiguous"] <= tr["unified"])
