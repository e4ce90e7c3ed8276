"""Adapters in host memory, paged into the (unified) pool on demand, evicted when idle (S-LoRA §4).

An adapter of rank ``r`` with LoRA on q, k, v, o is packed once on the host as two
``[n_layers, 4r, H]`` tensors: row ``r·p + j`` of layer ``l`` is ``A_p[:, j]`` (goes to the pool's K
buffer) and ``B_p[j, :]`` (V buffer), ``p ∈ {q=0, k=1, v=2, o=3}`` — S-LoRA's ``a_loc`` layout.
:class:`AdapterPager` copies it into ``4r`` free slots (the same slot ids in every layer), on a side
CUDA stream on a GPU so the copy overlaps the running step; the compute stream waits on the copy's
event only when a step first uses the adapter. On CPU the same code runs with plain copies (host and
"device" are the same RAM: the byte counters say what a GPU would move).

Eviction: least recently used adapter that no running (or about-to-run) request uses, only when the
pool needs its slots; the host copy stays, so eviction costs nothing but a later reload.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..serving.lora import AdapterWeights
from .pool import ADAPTER, UnifiedAllocator, adapter_slots

__all__ = ["HostAdapter", "pack_adapter", "AdapterPager", "PROJ_INDEX", "layer_index"]

PROJ_INDEX = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3}


def layer_index(name: str) -> tuple[int, int]:
    """``"layers.3.self_attn.v_proj"`` -> ``(3, 2)``."""
    parts = name.split(".")
    layer = next(int(p) for p in parts if p.isdigit())
    return layer, PROJ_INDEX[parts[-1]]


@dataclass
class HostAdapter:
    rank: int
    scale: float
    A: torch.Tensor   # [n_layers, 4r, H]  rows A_p[:, j]
    B: torch.Tensor   # [n_layers, 4r, H]  rows B_p[j, :]

    @property
    def n_slots(self) -> int:
        return adapter_slots(self.rank)

    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes


def pack_adapter(w: AdapterWeights, n_layers: int, *, dtype=None, pin: bool = False) -> HostAdapter:
    """Pack an :class:`AdapterWeights` (q, k, v, o of every layer) into the pool's row layout."""
    r = w.rank
    names = {layer_index(n): n for n in w.A}
    H = next(iter(w.A.values())).shape[0]
    dtype = dtype or next(iter(w.A.values())).dtype
    A = torch.zeros(n_layers, 4 * r, H, dtype=dtype)
    B = torch.zeros(n_layers, 4 * r, H, dtype=dtype)
    for (layer, p), n in names.items():
        a, b = w.A[n], w.B[n]   # [H, r], [r, H]
        if a.shape != (H, r) or b.shape != (r, H):
            raise ValueError(f"{n}: the unified pool needs square projections (A {tuple(a.shape)}, B {tuple(b.shape)})")
        A[layer, p * r:(p + 1) * r] = a.T.to(dtype)
        B[layer, p * r:(p + 1) * r] = b.to(dtype)
    if len(names) != 4 * n_layers:
        raise ValueError(f"adapter has {len(names)} projections, expected q,k,v,o of {n_layers} layers")
    if pin and torch.cuda.is_available():
        A, B = A.pin_memory(), B.pin_memory()
    return HostAdapter(r, w.scale, A, B)


class AdapterPager:
    """Host store + resident set of adapters in a slot pool.

    allocator: the pool's :class:`UnifiedAllocator` (unified: the KV allocator itself; separate
    region: its own). wa/wb: ``[n_layers, n_slots(+), H]`` tensors (views of the K/V pools, or the
    separate region's buffers); slot ``s`` of layer ``l`` is ``wa[l, s]``.
    """

    def __init__(self, allocator: UnifiedAllocator, wa: torch.Tensor, wb: torch.Tensor, *, prefetch_stream: bool = True):
        self.allocator = allocator
        self.wa, self.wb = wa, wb
        self.device = wa.device
        self.host: dict[int, HostAdapter] = {}
        self.resident: OrderedDict[int, np.ndarray] = OrderedDict()   # id -> slot ids (LRU order)
        self._slots_t: dict[int, torch.Tensor] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self.stream = torch.cuda.Stream(self.device) if (prefetch_stream and self.device.type == "cuda") else None
        self.n_loads = 0
        self.n_evictions = 0
        self.h2d_bytes = 0

    def register(self, adapter_id: int, host: HostAdapter) -> None:
        self.host[adapter_id] = host

    def is_resident(self, adapter_id: int) -> bool:
        return adapter_id in self.resident

    def slots(self, adapter_id: int) -> np.ndarray:
        self.resident.move_to_end(adapter_id)
        return self.resident[adapter_id]

    def resident_slots(self) -> int:
        return int(sum(len(s) for s in self.resident.values()))

    # paging -------------------------------------------------------------------------------
    def evict(self, adapter_id: int) -> None:
        slots = self.resident.pop(adapter_id)
        self._slots_t.pop(adapter_id, None)
        self._events.pop(adapter_id, None)
        self.allocator.free(slots.tolist())
        self.n_evictions += 1

    def room_for(self, need: int, protect: set[int]) -> int:
        """Slots available to an adapter load after evicting every unprotected resident adapter."""
        return self.allocator.n_free + sum(len(s) for a, s in self.resident.items() if a not in protect)

    def load(self, adapter_id: int, protect: Iterable[int] = ()) -> bool:
        """Make ``adapter_id`` resident, evicting LRU adapters not in ``protect``; False if it cannot fit."""
        if adapter_id in self.resident:
            self.resident.move_to_end(adapter_id)
            return True
        host = self.host[adapter_id]
        need = host.n_slots
        protect = set(protect) | {adapter_id}
        if self.room_for(need, protect) < need:
            return False
        for a in [a for a in self.resident if a not in protect]:  # LRU first
            if self.allocator.n_free >= need:
                break
            self.evict(a)
        slots = np.asarray(self.allocator.alloc(need, owner=ADAPTER), dtype=np.int64)
        idx = torch.from_numpy(slots).to(self.device)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._copy(host, idx)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._events[adapter_id] = ev
        else:
            self._copy(host, idx)
        self.resident[adapter_id] = slots
        self._slots_t[adapter_id] = idx
        self.n_loads += 1
        self.h2d_bytes += host.nbytes()
        return True

    def _copy(self, host: HostAdapter, idx: torch.Tensor) -> None:
        A = host.A.to(self.device, self.wa.dtype, non_blocking=True)
        B = host.B.to(self.device, self.wb.dtype, non_blocking=True)
        for layer in range(A.shape[0]):
            self.wa[layer].index_copy_(0, idx, A[layer])
            self.wb[layer].index_copy_(0, idx, B[layer])

    def wait(self, adapter_ids: Iterable[int]) -> None:
        """Make the compute stream wait for the copies of these adapters (no-op on CPU)."""
        if self.stream is None:
            return
        cur = torch.cuda.current_stream(self.device)
        for a in adapter_ids:
            ev = self._events.pop(a, None)
            if ev is not None:
                cur.wait_event(ev)

    def check(self) -> None:
        """Resident slot lists are disjoint, owned by adapters, and account for every adapter slot."""
        allslots = np.concatenate(list(self.resident.values())) if self.resident else np.zeros(0, np.int64)
        assert len(np.unique(allslots)) == len(allslots), "two adapters share a slot"
        assert (self.allocator.owner[allslots] == ADAPTER).all(), "a resident adapter slot is not owned by adapters"
        assert self.allocator.n_used[ADAPTER] == len(allslots), "adapter slots leaked"
