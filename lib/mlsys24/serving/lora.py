"""Multi-LoRA hooks: per-token adapter ids flow through every forward to a pluggable backend.

``attach_lora(model, backend)`` wraps the model's projections (q, k, v, o, gate, up, down) in
:class:`LoRALinear`. Before each forward the engine calls ``ctx.set_adapter_ids(ids)`` with an
adapter id per token (``[B, T]``, -1 = base model only); every wrapped layer then computes

    y = x W^T + scale_a * (x A_a) B_a      for the adapter a of each token,

where the second term comes from ``backend.delta(layer_name, x[N, d_in], ids[N]) -> [N, d_out]``.
Backends (Punica's Loop / Gather-BMM / BGMV / SGMV, S-LoRA's MBGMV) only implement ``delta``; the
plain-PyTorch :class:`LoopBackend` here is the reference and the "Loop" baseline.

Adapter weights: :class:`AdapterWeights` holds, per layer name, ``A [d_in, r]`` and ``B [r, d_out]``
with ``scale = alpha / r``. ``random_adapter(...)`` makes a seeded one (B non-zero, so adapters
really change outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["AdapterWeights", "LoRABackend", "LoopBackend", "LoRALinear", "LoRAContext", "attach_lora",
           "random_adapter", "TARGETS"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterWeights:
    rank: int
    alpha: float
    A: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [d_in, r]
    B: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [r, d_out]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.A.values()) + sum(t.nbytes for t in self.B.values())

    def to(self, device=None, dtype=None) -> AdapterWeights:
        return AdapterWeights(self.rank, self.alpha, {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
                              {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()})


def random_adapter(model: nn.Module, rank: int, *, seed: int, alpha: float | None = None,
                   targets: tuple[str, ...] = TARGETS, std: float = 0.02, dtype=torch.float32) -> AdapterWeights:
    """A seeded adapter for every target linear of ``model`` (A and B both random)."""
    g = torch.Generator().manual_seed(seed)
    ad = AdapterWeights(rank, float(alpha if alpha is not None else rank))
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, LoRALinear)) and name.split(".")[-1] in targets:
            base = mod.base if isinstance(mod, LoRALinear) else mod
            d_out, d_in = base.weight.shape
            ad.A[name] = (torch.randn(d_in, rank, generator=g) * (1.0 / d_in**0.5)).to(dtype)
            ad.B[name] = (torch.randn(rank, d_out, generator=g) * std).to(dtype)
    return ad


class LoRABackend:
    """Computes the LoRA term for a batch of tokens with mixed adapters."""

    name = "abstract"

    def __init__(self):
        self.adapters: dict[int, AdapterWeights] = {}

    def load(self, adapter_id: int, weights: AdapterWeights) -> None:
        if adapter_id < 0:
            raise ValueError(f"adapter ids are >= 0 (-1 means no adapter), got {adapter_id}")
        self.adapters[adapter_id] = weights

    def unload(self, adapter_id: int) -> None:
        self.adapters.pop(adapter_id, None)

    def prepare(self, ids: torch.Tensor) -> None:
        """Called once per forward with the flat token adapter ids (backends build segment info)."""

    def delta(self, layer: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class LoopBackend(LoRABackend):
    """Reference / Punica's "Loop" baseline: one pair of matmuls per distinct adapter in the batch."""

    name = "loop"

    def delta(self, layer, x, ids):
        out = torch.zeros(x.shape[0], self._d_out(layer), dtype=x.dtype, device=x.device)
        for a in torch.unique(ids).tolist():
            if a < 0:
                continue
            ad = self.adapters[a]
            rows = (ids == a).nonzero(as_tuple=True)[0]
            A, B = ad.A[layer].to(x.dtype), ad.B[layer].to(x.dtype)
            out[rows] = (x[rows] @ A) @ B * ad.scale
        return out

    def _d_out(self, layer: str) -> int:
        for ad in self.adapters.values():
            return ad.B[layer].shape[1]
        raise KeyError("no adapter loaded")


class LoRAContext:
    """Holds the adapter ids of the current forward for every wrapped layer."""

    def __init__(self, backend: LoRABackend):
        self.backend = backend
        self.ids: torch.Tensor | None = None  # flat [N] for the current forward
        self.active = False

    def active_for(self, rows) -> bool:
        """Whether any ``(sequence, n)`` row of a step uses an adapter."""
        return any(s.request.adapter_id >= 0 for s, _ in rows)

    def set_adapter_ids(self, ids: torch.Tensor | None) -> None:
        """``ids [B, T]`` (or flat); None or all -1 disables the LoRA path for this forward."""
        if ids is None:
            self.ids, self.active = None, False
            return
        flat = ids.reshape(-1).to(torch.long)
        self.active = bool((flat >= 0).any())
        missing = set(torch.unique(flat[flat >= 0]).tolist()) - set(self.backend.adapters)
        if missing:
            raise KeyError(f"adapters {sorted(missing)} are not loaded in backend {self.backend.name!r}")
        self.ids = flat
        if self.active:
            self.backend.prepare(flat)


class LoRALinear(nn.Module):
    """``base(x) + backend.delta(name, x, ids)`` with ids from the shared :class:`LoRAContext`."""

    def __init__(self, base: nn.Linear, name: str, ctx: LoRAContext):
        super().__init__()
        self.base, self.name, self.ctx = base, name, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.ctx.active:
            return y
        ids = self.ctx.ids
        flat = x.reshape(-1, x.shape[-1])
        if ids.numel() != flat.shape[0]:
            raise ValueError(f"{self.name}: {ids.numel()} adapter ids for {flat.shape[0]} tokens")
        return y + self.ctx.backend.delta(self.name, flat, ids).view(*y.shape[:-1], -1).to(y.dtype)


def attach_lora(model: nn.Module, backend: LoRABackend, targets: tuple[str, ...] = TARGETS) -> LoRAContext:
    """Wrap every target projection of ``model`` in :class:`LoRALinear`; returns the shared context."""
    ctx = LoRAContext(backend)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(mod, child_name, LoRALinear(child, full, ctx))
    return ctx
