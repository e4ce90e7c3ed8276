"""Adapter registry: LoRA weights live in host memory and are copied into device slots on demand.

Punica keeps one copy of the base model on a GPU and loads an adapter's low-rank pairs only when a
request for it is scheduled ("milliseconds per adapter, small against generation time"). Here:

- :meth:`AdapterRegistry.register` keeps an :class:`~mlsys24.serving.AdapterWeights` on the host
  (pinned memory on a CUDA machine). Several adapter ids may name the *same* weights object (a
  benchmark aliasing many ids onto a few weight sets): the host copy is shared, and the ids share
  one device slot too when ``share_aliases`` is set (else each id is loaded into its own slot, as
  distinct adapters would be).
- The device side is one slot pool per target layer, ``A [n_slots, d_in, r]``, ``B [n_slots, r,
  d_out]`` and ``scale [n_slots]``, allocated once (so a captured CUDA graph keeps valid pointers).
  Adapters of a smaller rank are zero-padded to the pool rank (exact: the padded columns add 0).
- :meth:`AdapterRegistry.slots` maps the adapter ids of a batch to slots, loading the missing ones
  and evicting the least recently used adapters that the batch does not need.

Also :func:`load_peft_adapter`: a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``) to :class:`AdapterWeights` (PEFT stores ``lora_A [r, d_in]`` and
``lora_B [d_out, r]``; scale ``lora_alpha / r``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..serving.lora import AdapterWeights

__all__ = ["AdapterRegistry", "RegistryStats", "load_peft_adapter", "layer_shapes"]


@dataclass
class RegistryStats:
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    hits: int = 0


def layer_shapes(weights: AdapterWeights) -> dict[str, tuple[int, int]]:
    """``{layer: (d_in, d_out)}`` of an adapter."""
    return {name: (a.shape[0], weights.B[name].shape[1]) for name, a in weights.A.items()}


class AdapterRegistry:
    """Host store + device slot pool with LRU replacement.

    shapes: ``{layer: (d_in, d_out)}`` of the target projections; rank: the pool rank (the largest
    adapter rank served); n_slots: adapters resident on the device at once.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], *, rank: int, n_slots: int, device="cpu",
                 dtype: torch.dtype = torch.float32, share_aliases: bool = False):
        if rank < 1 or n_slots < 1:
            raise ValueError(f"rank and n_slots must be >= 1 (got {rank}, {n_slots})")
        self.shapes, self.rank, self.n_slots = dict(shapes), rank, n_slots
        self.device, self.dtype = torch.device(device), dtype
        self.A = {n: torch.zeros(n_slots, di, rank, dtype=dtype, device=self.device) for n, (di, _) in self.shapes.items()}
        self.B = {n: torch.zeros(n_slots, rank, do, dtype=dtype, device=self.device) for n, (_, do) in self.shapes.items()}
        self.scale = torch.zeros(n_slots, dtype=torch.float32, device=self.device)
        self.share_aliases = share_aliases
        self.host: dict[int, AdapterWeights] = {}
        self._key_of: dict[int, tuple] = {}        # adapter id -> slot key
        self._copies: dict[int, tuple[AdapterWeights, AdapterWeights]] = {}  # id(weights) -> (original, host copy)
        self._slot_of_key: OrderedDict[tuple, int] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(n_slots - 1, -1, -1))
        self.stats = RegistryStats()

    @classmethod
    def for_adapter(cls, weights: AdapterWeights, *, n_slots: int, rank: int | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32, share_aliases: bool = False) -> AdapterRegistry:
        return cls(layer_shapes(weights), rank=rank or weights.rank, n_slots=n_slots, device=device, dtype=dtype,
                   share_aliases=share_aliases)

    # host side ------------------------------------------------------------------------------
    def register(self, adapter_id: int, weights: AdapterWeights) -> None:
        if adapter_id < 0:
            raise ValueError(f"adapter ids are >= 0, got {adapter_id}")
        if weights.rank > self.rank:
            raise ValueError(f"adapter {adapter_id} has rank {weights.rank} > pool rank {self.rank}")
        missing = set(self.shapes) - set(weights.A)
        if missing:
            raise ValueError(f"adapter {adapter_id} lacks layers {sorted(missing)[:3]}...")
        for n, (di, do) in self.shapes.items():
            if tuple(weights.A[n].shape) != (di, weights.rank) or tuple(weights.B[n].shape) != (weights.rank, do):
                raise ValueError(f"adapter {adapter_id}, layer {n}: A {tuple(weights.A[n].shape)}, "
                                 f"B {tuple(weights.B[n].shape)} do not match ({di}, {do}) at rank {weights.rank}")
        if adapter_id in self._key_of:
            self.unregister(adapter_id)
        wid = id(weights)
        if wid not in self._copies:  # keep the original alive too, so its id() is never reused
            self._copies[wid] = (weights, self._pinned(weights) if self.device.type == "cuda" else weights)
        self._key_of[adapter_id] = (wid,) if self.share_aliases else (wid, adapter_id)
        self.host[adapter_id] = weights

    @staticmethod
    def _pinned(w: AdapterWeights) -> AdapterWeights:
        if all(t.is_pinned() for t in (*w.A.values(), *w.B.values())):
            return w
        try:
            return AdapterWeights(w.rank, w.alpha, {k: v.pin_memory() for k, v in w.A.items()},
                                  {k: v.pin_memory() for k, v in w.B.items()})
        except RuntimeError:  # no pinned memory available: pageable copies work too
            return w

    def unregister(self, adapter_id: int) -> None:
        key = self._key_of.pop(adapter_id, None)
        self.host.pop(adapter_id, None)
        if key is not None and key not in self._key_of.values():
            slot = self._slot_of_key.pop(key, None)
            if slot is not None:
                self._free.append(slot)
            if not any(k[0] == key[0] for k in self._key_of.values()):
                self._copies.pop(key[0], None)

    def __contains__(self, adapter_id: int) -> bool:
        return adapter_id in self._key_of

    # device side ----------------------------------------------------------------------------
    def resident(self) -> list[int]:
        """Adapter ids whose weights are in a device slot now."""
        return [a for a, k in self._key_of.items() if k in self._slot_of_key]

    def _load(self, key: tuple, slot: int) -> None:
        w = self._copies[key[0]][1]
        t0 = time.perf_counter()
        r = w.rank
        for n in self.shapes:
            a, b = self.A[n][slot], self.B[n][slot]
            a[:, :r].copy_(w.A[n], non_blocking=True)
            b[:r].copy_(w.B[n], non_blocking=True)
            if r < self.rank:
                a[:, r:].zero_()
                b[r:].zero_()
        self.scale[slot] = float(w.scale)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.stats.load_seconds += time.perf_counter() - t0
        self.stats.loads += 1
        self.stats.bytes_loaded += w.nbytes()

    def slots(self, adapter_ids: Iterable[int]) -> dict[int, int]:
        """Slot of each (non-negative) adapter id, loading missing adapters into free or LRU slots."""
        want = [a for a in dict.fromkeys(int(a) for a in adapter_ids) if a >= 0]
        unknown = [a for a in want if a not in self._key_of]
        if unknown:
            raise KeyError(f"adapters {unknown[:5]} are not registered")
        keys = list(dict.fromkeys(self._key_of[a] for a in want))
        if len(keys) > self.n_slots:
            raise RuntimeError(f"a batch needs {len(keys)} adapters resident but the pool has {self.n_slots} slots")
        needed = set(keys)
        for k in keys:
            if k in self._slot_of_key:
                self._slot_of_key.move_to_end(k)
                self.stats.hits += 1
                continue
            if not self._free:
                victim = next(v for v in self._slot_of_key if v not in needed)
                self._free.append(self._slot_of_key.pop(victim))
                self.stats.evictions += 1
            slot = self._free.pop()
            self._load(k, slot)
            self._slot_of_key[k] = slot
        return {a: self._slot_of_key[self._key_of[a]] for a in want}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.A.values()) + sum(t.nbytes for t in self.B.values())


# ------------------------------------------------------------------------------------------------
_PEFT_TARGET = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load_peft_adapter(path: str | Path, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """A PEFT LoRA directory as :class:`AdapterWeights` keyed by our module names
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``layers.0.self_attn.q_proj``)."""
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "adapter_config.json").read_text())
    r = int(conf["r"])
    alpha = float(conf.get("lora_alpha", r))
    if conf.get("use_rslora"):
        raise NotImplementedError("rsLoRA scaling (alpha / sqrt(r)) is not supported")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    ad = AdapterWeights(r, alpha)
    for k, t in tensors.items():
        for part, store in ((".lora_A.", ad.A), (".lora_B.", ad.B)):
            if part not in k:
                continue
            name = k.split(part)[0]
            for prefix in ("base_model.model.model.", "base_model.model.", "model."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            if name.split(".")[-1] not in _PEFT_TARGET:
                continue
            store[name] = t.to(dtype).t().contiguous()  # lora_A [r, d_in] -> A [d_in, r]; lora_B [d_out, r] -> B [r, d_out]
    if not ad.A or set(ad.A) != set(ad.B):
        raise ValueError(f"{path}: no matching lora_A / lora_B pairs for {sorted(_PEFT_TARGET)}")
    return ad
