"""Prompt Cache: precompute each schema module's attention states once, reuse them in any prompt.

Encoding (server start), ``encode_mode``:

- ``"scaffold"`` (the official code's behaviour): one forward over the *scaffold* sequence — every
  segment of the schema in order, each union represented by its scaffold member — with the schema's
  position ids and causal attention; each module's K/V are sliced out. For every other union member
  one more forward substitutes it. A module's states are conditioned on the schema text before it.
- ``"independent"`` (the paper's description): each module alone (its text plus its parameter slots'
  fillers) at its schema positions; it attends only within itself.
- ``"naive"`` (the strawman the paper argues against): each module alone at positions ``0..n-1``;
  at serve time cached modules are concatenated and the new tokens continue at ``n_cached``.

K is stored after RoPE (positions baked in), V as is: per module one ``[n_layers, n_tokens, n_kv_heads,
head_dim]`` tensor each, in the ``"host"`` tier (CPU memory, pinned when CUDA is present) or the
``"device"`` tier (the model's device). Bytes per cached token: ``2 * n_layers * n_kv_heads *
head_dim * dtype_bytes``.

Serving (:meth:`PromptCache.prefill`): the selected modules' K/V are copied into a staging
:class:`~mlsys24.models.ContiguousKVCache` (modules sorted by use count; the longest prefix of
modules already staged by the previous request is not copied again), then only the uncached tokens
run through the model with their explicit position ids; they attend to every cached slot and
causally to each other (the cache's masking is by insertion order, not by position id). Decoding
continues after the largest position id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..models import ContiguousKVCache
from .layout import ROOT, SchemaLayout, Selection
from .pml import Prompt

__all__ = ["ModuleKV", "ModuleStore", "PromptCache", "encode_modules", "run_kv", "bytes_per_token",
           "ENCODE_MODES", "TIERS"]

ENCODE_MODES = ("scaffold", "independent", "naive")
TIERS = ("host", "device")


def bytes_per_token(cfg, dtype_bytes: int) -> int:
    """K and V bytes of one cached token: ``2 * n_layers * n_kv_heads * head_dim * dtype_bytes``."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim_ * dtype_bytes


class StagingKVCache(ContiguousKVCache):
    """A batch-1 :class:`~mlsys24.models.ContiguousKVCache` whose length lives on the host.

    The shared cache reads its lengths back from the device (``int(kv_lens.max())``) in every layer;
    here the slot count is a Python int, so a forward issues no device-to-host sync — the host can
    run ahead of the GPU, and the whole prefill can be captured in a CUDA graph.
    """

    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int, *, dtype=torch.float32,
                 device="cpu"):
        super().__init__(n_layers, 1, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.n = 0
        self._start = self._T = 0

    @classmethod
    def for_model(cls, cfg, max_len: int, *, dtype=torch.float32, device="cpu") -> StagingKVCache:
        return cls(cfg.n_layers, max_len, cfg.n_kv_heads, cfg.head_dim_, dtype=dtype, device=device)

    def set_length(self, n: int) -> None:
        if not 0 <= n <= self.max_len:
            raise ValueError(f"length {n} outside [0, {self.max_len}]")
        self.n = n

    def begin(self, input_lens: torch.Tensor) -> None:
        if input_lens.shape != (1,):
            raise ValueError("StagingKVCache holds one sequence")
        T = int(input_lens[0])  # Llama.forward passes a CPU tensor: no device sync
        if self.n + T > self.max_len:
            raise ValueError(f"cache overflow: {self.n + T} > max_len {self.max_len}")
        self._start, self._T = self.n, T
        dev = self.k.device
        self.q_offsets = torch.full((1,), self.n, dtype=torch.long, device=dev)
        self.kv_lens = torch.full((1,), self.n + T, dtype=torch.long, device=dev)
        self.input_lens = torch.full((1,), T, dtype=torch.long, device=dev)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s, T = self._start, self._T
        self.k[layer, 0, s:s + T] = k[0, :T].to(self.k.dtype)
        self.v[layer, 0, s:s + T] = v[0, :T].to(self.v.dtype)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = self._start + self._T
        return self.k[layer, :, :S], self.v[layer, :, :S]

    def end(self) -> None:
        self.n = self._start + self._T

    def length(self, seq: int = 0) -> int:
        return self.n

    def reset(self, seq: int | None = None) -> None:
        self.n = 0


@dataclass
class ModuleKV:
    name: str
    positions: torch.Tensor  # [n] position ids baked into k
    k: torch.Tensor  # [n_layers, n, n_kv_heads, head_dim], post-RoPE
    v: torch.Tensor  # [n_layers, n, n_kv_heads, head_dim]

    @property
    def n_tokens(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def to(self, device, pin: bool = False) -> ModuleKV:
        k, v = self.k.to(device), self.v.to(device)
        if pin and k.device.type == "cpu":
            k, v = k.pin_memory(), v.pin_memory()
        return ModuleKV(self.name, self.positions, k, v)


@torch.no_grad()
def run_kv(model, ids: list[int], pos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``ids`` at ``pos`` with causal attention; K, V ``[n_layers, n, n_kv_heads, head_dim]``."""
    p = next(model.parameters())
    cache = StagingKVCache.for_model(model.cfg, max(len(ids), 1), dtype=p.dtype, device=p.device)
    x = torch.tensor([ids], dtype=torch.long, device=p.device)
    px = torch.tensor([pos], dtype=torch.long, device=p.device)
    model(x, px, kv_cache=cache, return_hidden=True)
    n = len(ids)
    return cache.k[:, 0, :n].clone(), cache.v[:, 0, :n].clone()


class ModuleStore:
    """Cached K/V of every cacheable module of a schema, in one memory tier."""

    def __init__(self, modules: dict[str, ModuleKV], mode: str, tier: str):
        self.modules, self.mode, self.tier = modules, mode, tier

    def __getitem__(self, name: str) -> ModuleKV:
        return self.modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    @property
    def n_tokens(self) -> int:
        return sum(m.n_tokens for m in self.modules.values())

    def to_tier(self, tier: str, device) -> ModuleStore:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        dev = torch.device("cpu") if tier == "host" else torch.device(device)
        pin = tier == "host" and torch.cuda.is_available()
        return ModuleStore({n: m.to(dev, pin) for n, m in self.modules.items()}, self.mode, tier)


def _scaffold_runs(lay: SchemaLayout) -> list[tuple[set[str], set[str]]]:
    """(modules present in the run, modules whose K/V this run defines) per scaffold forward."""
    def present(sub: dict[int, str]) -> set[str]:
        out = set()
        for name in lay.modules:
            chain = [name] + lay.ancestors(name)
            ok = True
            for m in chain:
                u = lay.modules[m].union
                if u is not None and m != sub.get(u, lay.unions[u][1]):
                    ok = False
                    break
            if ok:
                out.add(name)
        return out

    runs = [(present({}), present({}))]
    for ui, (members, default) in enumerate(lay.unions):
        for m in members:
            if m == default:
                continue
            p = present({ui: m})
            own = {n for n in p if n == m or m in lay.ancestors(n)}
            if own:
                runs.append((p, own))
    return runs


@torch.no_grad()
def encode_modules(model, lay: SchemaLayout, mode: str = "scaffold", tier: str = "host") -> ModuleStore:
    """Precompute the K/V of every cacheable module of ``lay`` (see the module docstring)."""
    if mode not in ENCODE_MODES:
        raise ValueError(f"encode_mode must be one of {ENCODE_MODES}, got {mode!r}")
    dev = next(model.parameters()).device
    out: dict[str, ModuleKV] = {}
    cacheable = [n for n, s in lay.modules.items() if s.cache and lay.module_tokens(n)[0]]
    if mode == "scaffold":
        for present, own in _scaffold_runs(lay):
            ids, pos, where = [], [], []  # where: (segment index, offset in the run)
            for si, seg in enumerate(lay.segments):
                if seg.module in present:
                    where.append((si, len(ids)))
                    ids += seg.ids
                    pos += list(range(seg.start, seg.end))
            k, v = run_kv(model, ids, pos)
            for name in cacheable:
                if name not in own or name in out:
                    continue
                idx = []
                for si, off in where:
                    seg = lay.segments[si]
                    if seg.module == name and seg.kind == "text":
                        idx += range(off, off + seg.length)
                ix = torch.tensor(idx, dtype=torch.long, device=k.device)
                out[name] = ModuleKV(name, torch.tensor(lay.module_tokens(name)[1]), k[:, ix].contiguous(),
                                     v[:, ix].contiguous())
    else:
        for name in cacheable:
            span = lay.modules[name]
            ids, pos, keep = [], [], []
            for si in span.segments:
                seg = lay.segments[si]
                if seg.kind == "text":
                    keep += range(len(ids), len(ids) + seg.length)
                ids += seg.ids
                pos += list(range(seg.start, seg.end))
            if mode == "naive":
                pos = list(range(len(ids)))
            k, v = run_kv(model, ids, pos)
            ix = torch.tensor(keep, dtype=torch.long, device=k.device)
            kept_pos = torch.tensor(pos)[torch.tensor(keep, dtype=torch.long)]
            out[name] = ModuleKV(name, kept_pos, k[:, ix].contiguous(), v[:, ix].contiguous())
    return ModuleStore(out, mode, "device").to_tier(tier, dev)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [1, m, vocab] for the uncached tokens (m = 1 with last_only)
    n_cached: int  # cached slots used
    n_copied: int  # slots copied for this request (the rest were already staged)
    next_position: int  # position id of the first generated token


class PromptCache:
    """A model, a schema layout, its precomputed modules and a staging KV buffer (batch 1)."""

    def __init__(self, model, lay: SchemaLayout, *, encode_mode: str = "scaffold", tier: str = "host",
                 max_ctx: int | None = None, store: ModuleStore | None = None):
        self.model, self.layout = model, lay
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.store = store if store is not None else encode_modules(model, lay, encode_mode, tier)
        self.encode_mode, self.tier = self.store.mode, self.store.tier
        self.max_ctx = max_ctx or (self.store.n_tokens + lay.length + 1024)
        self.staging = StagingKVCache.for_model(model.cfg, self.max_ctx, dtype=p.dtype, device=p.device)
        self._inputs: dict[int, tuple] = {}  # id(selection) -> (selection, device ids, device positions)
        self.use_count: Counter = Counter()
        self.staged: list[str] = []  # modules in the staging buffer, in slot order
        self.staged_len = 0

    # ------------------------------------------------------------------------------------------
    def select(self, prompt: Prompt | str | Selection) -> Selection:
        return prompt if isinstance(prompt, Selection) else self.layout.resolve(prompt)

    def stage(self, modules: list[str], reuse_staged: bool = True) -> tuple[int, int]:
        """Copy the modules' K/V into the staging buffer; returns (cached slots, slots copied)."""
        for m in modules:
            self.use_count[m] += 1
        order = {n: i for i, n in enumerate(self.layout.modules)}
        want = sorted(modules, key=lambda m: (-self.use_count[m], order[m]))
        keep = 0
        if reuse_staged:
            while keep < min(len(want), len(self.staged)) and want[keep] == self.staged[keep]:
                keep += 1
        start = sum(self.store[m].n_tokens for m in want[:keep])
        copied = 0
        k_buf, v_buf = self.staging.k, self.staging.v  # [L, 1, max_len, KV, d]
        nb = self.tier == "host" and self.device.type == "cuda"
        for m in want[keep:]:
            kv = self.store[m]
            n = kv.n_tokens
            if start + n > self.max_ctx:
                raise ValueError(f"staging overflow: {start + n} > max_ctx {self.max_ctx}")
            k_buf[:, 0, start:start + n].copy_(kv.k, non_blocking=nb)
            v_buf[:, 0, start:start + n].copy_(kv.v, non_blocking=nb)
            start += n
            copied += n
        self.staged, self.staged_len = want, start
        self.staging.set_length(start)
        return start, copied

    @torch.no_grad()
    def prefill(self, prompt: Prompt | str | Selection, *, reuse_staged: bool = True,
                last_only: bool = False) -> PrefillResult:
        """TTFT path: stage the cached modules, prefill the uncached tokens at their positions."""
        sel = self.select(prompt)
        mods = [m for m in sel.cached if m in self.store]
        n_cached, copied = self.stage(mods, reuse_staged)
        ids, pos = sel.uncached_ids, sel.uncached_pos
        if self.encode_mode == "naive":
            pos = list(range(n_cached, n_cached + len(ids)))
        if not ids:
            raise ValueError("prompt has no uncached tokens to prefill (add user text)")
        key = (id(sel), n_cached)
        hit = self._inputs.get(key)
        if hit is None or hit[0] is not sel:  # device copies of the inputs, built once per selection
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            px = torch.tensor([pos], dtype=torch.long, device=self.device)
            if len(self._inputs) > 64:
                self._inputs.clear()
            self._inputs[key] = hit = (sel, x, px)
        x, px = hit[1], hit[2]
        h = self.model(x, px, kv_cache=self.staging, return_hidden=True)
        logits = self.model.lm_head(h[:, -1:] if last_only else h)
        return PrefillResult(logits, n_cached, copied, max(pos) + 1)

    @torch.no_grad()
    def generate(self, prompt: Prompt | str | Selection, max_new_tokens: int = 16) -> list[int]:
        """Greedy decoding after a Prompt-Cache prefill (positions continue after the prompt)."""
        res = self.prefill(prompt, last_only=True)
        out = [int(res.logits[0, -1].argmax())]
        p = res.next_position
        for _ in range(max_new_tokens - 1):
            x = torch.tensor([[out[-1]]], dtype=torch.long, device=self.device)
            px = torch.tensor([[p]], dtype=torch.long, device=self.device)
            logits = self.model(x, px, kv_cache=self.staging)
            out.append(int(logits[0, -1].argmax()))
            p += 1
        return out  # decode slots lie after the staged modules: the next request may reuse them


def full_prefill(model, ids: list[int] | torch.Tensor, pos: list[int] | torch.Tensor | None = None, *,
                 last_only: bool = False, cache: StagingKVCache | None = None) -> torch.Tensor:
    """Baseline: prefill every token (positions ``pos`` or ``0..n-1``) into a KV cache; logits.

    ``ids``/``pos`` may be ``[1, n]`` device tensors (built once, outside a timed region)."""
    p = next(model.parameters())
    n = ids.shape[-1] if isinstance(ids, torch.Tensor) else len(ids)
    if cache is None:
        cache = StagingKVCache.for_model(model.cfg, n, dtype=p.dtype, device=p.device)
    else:
        cache.reset()
    x = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids], dtype=torch.long, device=p.device)
    if pos is None:
        px = torch.arange(n, device=p.device)[None]
    else:
        px = pos if isinstance(pos, torch.Tensor) else torch.tensor([pos], dtype=torch.long, device=p.device)
    with torch.no_grad():
        h = model(x, px, kv_cache=cache, return_hidden=True)
        return model.lm_head(h[:, -1:] if last_only else h)


__all__ += ["full_prefill", "PrefillResult", "ROOT", "StagingKVCache"]
