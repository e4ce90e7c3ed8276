"""LoRA backends for the serving engine: ``loop | gather_bmm | segmented | bgmv | sgmv``.

Each implements :class:`mlsys24.serving.lora.LoRABackend`: the engine calls ``prepare(ids)`` once
per forward with the flat adapter id of every token (-1: none), then ``delta(layer, x, ids)`` for
each wrapped projection. ``prepare`` maps ids to device slots through the
:class:`~.registry.AdapterRegistry` (loading adapters on demand) and builds what the operator needs
(slot per row, or the SGMV segment tile table) once for all layers of the forward.

Backends with ``supports_static = True`` (``gather_bmm``, ``bgmv``, ``sgmv``) can also run from
fixed-size buffers refilled before each decode step (:meth:`PooledBackend.set_static`), which is what
lets :class:`~.engine.LoRAEngine` replay a decode step with LoRA from a CUDA graph.

``make_backend(name, model, rank=..., n_slots=...)`` builds one sized for an ``attach_lora``-wrapped
model (device and dtype taken from the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..serving.lora import AdapterWeights, LoRABackend, LoRAContext, LoRALinear
from .registry import AdapterRegistry
from .sgmv import (
    Segments,
    lora_bgmv,
    lora_gather_bmm,
    lora_loop,
    lora_segmented_torch,
    lora_sgmv,
    segments_from_slots,
)

__all__ = ["PooledBackend", "LoopPoolBackend", "GatherBMMBackend", "SegmentedTorchBackend", "BGMVBackend",
           "SGMVBackend", "BACKENDS", "make_backend"]


@dataclass
class _Static:
    ids: torch.Tensor            # [B] long, what LoRAContext.ids points at
    slots: torch.Tensor          # [B] int32 slot per row (-1: none)
    seg: Segments | None = None  # SGMV tile table (capacity fixed)


class PooledBackend(LoRABackend):
    """Common part: adapters in an :class:`AdapterRegistry` slot pool, slots resolved in ``prepare``.

    registry: an existing registry, or None to create one on the first ``load`` with ``rank``
    (default: that adapter's rank), ``n_slots``, ``device``, ``dtype``.
    """

    name = "pooled"
    supports_static = False

    def __init__(self, registry: AdapterRegistry | None = None, *, n_slots: int = 16, rank: int | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32, share_aliases: bool = False):
        super().__init__()
        self.registry = registry
        self._make = dict(n_slots=n_slots, rank=rank, device=device, dtype=dtype, share_aliases=share_aliases)
        self.slot_per_row: torch.Tensor | None = None    # [N] int32 on the device
        self.host_slots: np.ndarray | None = None
        self._static: dict[int, _Static] = {}
        self._cur: _Static | None = None
        self.forward_log: list[tuple[int, int]] = []     # per forward: (rows with an adapter, distinct adapters)

    # adapters ------------------------------------------------------------------------------
    def load(self, adapter_id: int, weights: AdapterWeights) -> None:
        super().load(adapter_id, weights)
        if self.registry is None:
            self.registry = AdapterRegistry.for_adapter(weights, **self._make)
        self.registry.register(adapter_id, weights)

    def unload(self, adapter_id: int) -> None:
        super().unload(adapter_id)
        if self.registry is not None:
            self.registry.unregister(adapter_id)

    def _slots_of(self, ids_host: np.ndarray) -> np.ndarray:
        table = self.registry.slots(np.unique(ids_host[ids_host >= 0]).tolist())
        out = np.full(ids_host.shape, -1, dtype=np.int64)
        for a, s in table.items():
            out[ids_host == a] = s
        return out

    # per forward ---------------------------------------------------------------------------
    def prepare(self, ids: torch.Tensor) -> None:
        ids_host = ids.detach().reshape(-1).cpu().numpy()
        slots = self._slots_of(ids_host)
        self.host_slots = slots
        valid = slots[slots >= 0]
        self.forward_log.append((int(len(valid)), int(len(np.unique(valid)))))
        self.slot_per_row = torch.from_numpy(slots.astype(np.int32)).to(self.registry.device)
        self._prepare_slots(slots)

    def _prepare_slots(self, slots: np.ndarray) -> None:
        """Backend-specific per-forward state (segments...)."""

    def _weights(self, layer: str, x: torch.Tensor):
        A, B = self.registry.A[layer], self.registry.B[layer]
        if A.dtype != x.dtype:
            raise TypeError(f"{self.name}: activations are {x.dtype} but the adapter pool is {A.dtype} "
                            f"(build the backend with dtype={x.dtype})")
        return A, B, self.registry.scale

    def delta(self, layer: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        A, B, scale = self._weights(layer, x)
        if self._cur is not None:
            return self._delta_static(x, A, B, scale, self._cur)
        return self._delta(x, A, B, scale)

    def _delta(self, x, A, B, scale) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _delta_static(self, x, A, B, scale, st: _Static) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # static buffers (CUDA-graph decode) ------------------------------------------------------
    def _new_static(self, B: int) -> _Static:
        dev = self.registry.device
        return _Static(ids=torch.full((B,), -1, dtype=torch.long, device=dev),
                       slots=torch.full((B,), -1, dtype=torch.int32, device=dev))

    def set_static(self, ctx: LoRAContext, adapter_ids: list[int]) -> None:
        """Point ``ctx`` at fixed-size buffers of ``len(adapter_ids)`` rows, refilled with these ids."""
        if not self.supports_static:
            raise NotImplementedError(f"backend {self.name!r} has no static (CUDA-graph) mode")
        B = len(adapter_ids)
        st = self._static.get(B)
        if st is None:
            st = self._static[B] = self._new_static(B)
        ids_host = np.asarray(adapter_ids, dtype=np.int64)
        missing = set(ids_host[ids_host >= 0].tolist()) - set(self.adapters)
        if missing:
            raise KeyError(f"adapters {sorted(missing)} are not loaded in backend {self.name!r}")
        slots = self._slots_of(ids_host)
        valid = slots[slots >= 0]
        self.forward_log.append((int(len(valid)), int(len(np.unique(valid)))))
        st.ids.copy_(torch.from_numpy(ids_host), non_blocking=True)
        st.slots.copy_(torch.from_numpy(slots.astype(np.int32)), non_blocking=True)
        if st.seg is not None:
            st.seg.refill_(slots)
        ctx.ids, ctx.active = st.ids, True
        self._cur = st

    def clear_static(self, ctx: LoRAContext) -> None:
        self._cur = None
        ctx.ids, ctx.active = None, False


class LoopPoolBackend(PooledBackend):
    """Punica's "Loop" over the slot pool: two matmuls per segment (host-driven, no static mode)."""

    name = "loop"

    def _prepare_slots(self, slots):
        self.seg = segments_from_slots(slots, device=self.registry.device)

    def _delta(self, x, A, B, scale):
        return lora_loop(x, A, B, scale, self.seg)


class GatherBMMBackend(PooledBackend):
    """"Gather-BMM": per-row copies of A and B, two ``torch.bmm`` (cost independent of popularity).

    Rows without an adapter (the engine's padding of a ragged step, base-model requests) are left
    out of the gather; in static (graph) mode every row is gathered, as shapes must stay fixed."""

    name = "gather_bmm"
    supports_static = True

    def _prepare_slots(self, slots):
        valid = np.nonzero(slots >= 0)[0]
        self._rows = None if len(valid) == len(slots) else torch.from_numpy(valid).to(self.registry.device)
        self._row_slots = self.slot_per_row if self._rows is None else self.slot_per_row[self._rows]

    def _delta(self, x, A, B, scale):
        if self._rows is None:
            return lora_gather_bmm(x, A, B, scale, self.slot_per_row)
        out = torch.zeros(x.shape[0], B.shape[2], dtype=x.dtype, device=x.device)
        if len(self._rows):
            out[self._rows] = lora_gather_bmm(x[self._rows], A, B, scale, self._row_slots)
        return out

    def _delta_static(self, x, A, B, scale, st):
        return lora_gather_bmm(x, A, B, scale, st.slots)


class SegmentedTorchBackend(PooledBackend):
    """Padded per-segment ``torch.bmm`` (weights gathered once per segment): SGMV's shape in PyTorch."""

    name = "segmented"

    def _prepare_slots(self, slots):
        self.seg = segments_from_slots(slots, device=self.registry.device)

    def _delta(self, x, A, B, scale):
        return lora_segmented_torch(x, A, B, scale, self.seg)


class BGMVBackend(PooledBackend):
    """Triton BGMV: one matrix-vector product per row with its own adapter."""

    name = "bgmv"
    supports_static = True

    def _delta(self, x, A, B, scale):
        return lora_bgmv(x, A, B, scale, self.slot_per_row)

    def _delta_static(self, x, A, B, scale, st):
        return lora_bgmv(x, A, B, scale, st.slots)


class SGMVBackend(PooledBackend):
    """Triton SGMV: segments of rows sharing an adapter; split-K shrink, N-tiled expand."""

    name = "sgmv"
    supports_static = True

    def __init__(self, *args, block_m: int = 16, **kw):
        super().__init__(*args, **kw)
        self.block_m = block_m

    def _prepare_slots(self, slots):
        self.seg = segments_from_slots(slots, block_m=self.block_m, device=self.registry.device)

    def _delta(self, x, A, B, scale):
        return lora_sgmv(x, A, B, scale, self.seg)

    def _new_static(self, B):
        st = super()._new_static(B)
        # at most one tile per segment plus one per block_m rows: B + ceil(B / block_m) tiles
        cap = B + -(-B // self.block_m)
        st.seg = segments_from_slots(np.full(B, -1), block_m=self.block_m, capacity=cap,
                                     device=self.registry.device, force_rows=True)
        return st

    def _delta_static(self, x, A, B, scale, st):
        return lora_sgmv(x, A, B, scale, st.seg)


BACKENDS: dict[str, type[PooledBackend]] = {
    "loop": LoopPoolBackend, "gather_bmm": GatherBMMBackend, "segmented": SegmentedTorchBackend,
    "bgmv": BGMVBackend, "sgmv": SGMVBackend,
}


def make_backend(name: str, model: torch.nn.Module | None = None, *, rank: int, n_slots: int = 16,
                 device=None, dtype: torch.dtype | None = None, share_aliases: bool = False, **kw) -> PooledBackend:
    """A backend with a registry sized for ``model``'s LoRA-wrapped (or plain) projections.

    The registry is created now when ``model`` has :class:`LoRALinear` layers (shapes known);
    otherwise on the first ``load``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; have {sorted(BACKENDS)}")
    if model is not None:
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
    device = device if device is not None else "cpu"
    dtype = dtype or torch.float32
    registry = None
    if model is not None:
        shapes = {n: (m.base.in_features, m.base.out_features) for n, m in model.named_modules()
                  if isinstance(m, LoRALinear)}
        if shapes:
            registry = AdapterRegistry(shapes, rank=rank, n_slots=n_slots, device=device, dtype=dtype,
                                       share_aliases=share_aliases)
    return BACKENDS[name](registry, n_slots=n_slots, rank=rank, device=device, dtype=dtype,
                          share_aliases=share_aliases, **kw)

