"""S-LoRA serving on the shared engine, and the paper's baselines in the same engine.

Systems (:data:`SYSTEMS`):

- ``slora`` — unified pool (KV tokens and adapter rows share one slot pool, page = 1 token = H
  elements), adapters paged in on demand (prefetched for the head of the queue while the running batch
  computes), heterogeneous-rank MBGMM/MBGMV over the pool's slots, mixed-adapter continuous batching.
- ``no_unify`` — S-LoRA without unified paging: the same kernels, adapters in a separate region reserved
  up front for ``max_adapters`` adapters of the largest rank; KV gets the rest of the memory.
- ``bmm`` — S-LoRA-bmm: separate region, and per step every request's adapter copied into contiguous
  tensors padded to the batch's largest rank, then ``torch.bmm``.
- ``peft`` — PEFT-style: a batch holds requests of one adapter only (consecutive requests of the FIFO
  queue, static batching as in ``peft_req_queue.py``), adapters swapped between batches.
- ``merged`` — vLLM-packed-like: one copy of the model with the adapter merged into W per adapter
  (:class:`MergedServer`); runs only if the copies fit the memory budget, otherwise reported as OOM.

Memory is counted in *slots* (one slot = H elements in the K buffer + H in the V buffer, per layer), so a
CPU run can emulate a GPU's memory pressure with ``pool_slots``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..serving.engine import Engine
from ..serving.kv_policy import KVPolicy
from ..serving.lora import AdapterWeights, LoRABackend, LoRAContext, LoRALinear, attach_lora
from ..serving.request import Request
from ..serving.scheduler import Scheduler, SchedulerConfig, StepPlan
from ..serving.workload import arrival_times
from .adapters import AdapterPager, layer_index, pack_adapter
from .mbgmv import (
    gathered_elements,
    lora_mbgmm,
    lora_mbgmv,
    lora_padded_bmm,
    lora_padded_bmm_rows,
    lora_pool_torch,
    make_tables,
)
from .pool import UnifiedAllocator

__all__ = ["SYSTEMS", "SystemSpec", "SLoRABackend", "SLoRAContext", "SLoRAScheduler", "SLoRAEngine",
           "MergedServer", "merge_adapter", "slora_trace", "serve", "model_bytes", "slot_bytes", "ATTN_TARGETS"]

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class SystemSpec:
    unified: bool          # adapters inside the KV pool (True) or in a separate reserved region
    compute: str           # mbgmv (Triton on GPU, rank-grouped gather on CPU) | bmm | loop
    same_adapter: bool     # PEFT-style batches of one adapter


SYSTEMS: dict[str, SystemSpec] = {
    "slora": SystemSpec(True, "mbgmv", False),
    "no_unify": SystemSpec(False, "mbgmv", False),
    "bmm": SystemSpec(False, "bmm", False),
    "peft": SystemSpec(False, "loop", True),
}


# ------------------------------------------------------------------------------------------------
# LoRA backend over the pool
# ------------------------------------------------------------------------------------------------
class SLoRAContext(LoRAContext):
    """The shared context, also telling the backend the ``[B, T]`` shape of the step (one adapter per row)."""

    def set_adapter_ids(self, ids):
        self.backend.batch_shape = tuple(ids.shape) if ids is not None and ids.dim() == 2 else None
        super().set_adapter_ids(ids)


class SLoRABackend(LoRABackend):
    """LoRA term from adapter rows in a slot pool (``compute``: ``mbgmv`` | ``bmm`` | ``loop``).

    ``use_triton``: None = Triton MBGMM/MBGMV on CUDA, the rank-grouped PyTorch gather on CPU.
    ``gathered`` counts adapter weight elements read (from the index tensors) over all forwards.
    """

    name = "slora"

    def __init__(self, compute: str = "mbgmv", use_triton: bool | None = None):
        super().__init__()
        if compute not in ("mbgmv", "bmm", "loop"):
            raise ValueError(f"compute must be mbgmv, bmm or loop, got {compute!r}")
        self.compute, self.use_triton = compute, use_triton
        self.pager: AdapterPager | None = None
        self.n_layers = 0
        self.batch_shape: tuple[int, int] | None = None
        self.tables = None
        self.static = None        # set while a decode graph is captured: LoRA from static device buffers
        self._qkv_stash = None    # (layer, x) -> the k and v terms computed with q's (decode)
        self.qkv_shared = 0       # k / v terms served from q's launch
        self.gathered = 0
        self.gathered_bmm = 0

    def load(self, adapter_id: int, weights: AdapterWeights) -> None:
        super().load(adapter_id, weights)
        self.pager.register(adapter_id, pack_adapter(weights, self.n_layers, dtype=self.pager.wa.dtype,
                                                     pin=self.pager.device.type == "cuda"))

    def register_packed(self, adapter_id: int, weights: AdapterWeights, host) -> None:
        """Register an already packed host copy (aliased weight sets share one)."""
        LoRABackend.load(self, adapter_id, weights)
        self.pager.register(adapter_id, host)

    def prepare(self, ids: torch.Tensor) -> None:
        B, T = self.batch_shape if self.batch_shape is not None else (ids.numel(), 1)
        host = ids.detach().cpu().numpy().reshape(B, T)
        lens = (host >= 0).sum(axis=1)
        rows = np.nonzero(lens > 0)[0]
        ads = host[rows, 0]
        order, astart, loc, off = {}, [], [], 0
        for a in ads.tolist():
            if a not in order:
                if not self.pager.is_resident(a) and not self.pager.load(a, protect=set(ads.tolist())):
                    raise RuntimeError(f"adapter {a} does not fit the pool")
                order[a] = off
                s = self.pager.slots(a)
                loc.append(s)
                off += len(s)
            astart.append(order[a])
        self.pager.wait(order)
        ranks = [self.pager.host[a].rank for a in ads.tolist()]
        scales = [self.pager.host[a].scale for a in ads.tolist()]
        self.tables = make_tables(rows * T, lens[rows], astart, ranks, scales,
                                  np.concatenate(loc) if loc else np.zeros(0, np.int64), B * T, self.pager.device)
        H = self.pager.wa.shape[-1]
        self.gathered += gathered_elements(self.tables, H, "mbgmv") * self.n_layers
        self.gathered_bmm += gathered_elements(self.tables, H, "bmm") * self.n_layers

    def _triton(self, x) -> bool:
        return self.use_triton if self.use_triton is not None else x.is_cuda

    def _qkv(self, l: int, p: int, x: torch.Tensor, compute3):
        """q, k and v read the same ``x`` (the model calls their projections one after the other): the
        q call computes all three LoRA terms in one pair of launches (``compute3() -> [3, N, H]``) and
        keeps k's and v's for the next two calls, which must see the same layer and the same ``x``."""
        key = (l, x.data_ptr(), tuple(x.shape), x.dtype)
        if p == 0:
            d = compute3()
            self._qkv_stash = (key, d)
            return d[0]
        stash, self._qkv_stash = self._qkv_stash, (self._qkv_stash if p == 1 else None)
        if stash is None or stash[0] != key:
            return None
        self.qkv_shared += 1
        return stash[1][p]

    def delta(self, layer: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        l, p = layer_index(layer)
        wa, wb, t = self.pager.wa[l], self.pager.wb[l], self.tables
        st = self.static
        if st is not None:   # decode graph: index tensors already on the device, no host work
            if self.compute in ("mbgmv", "bmm") and p < 3:
                fn3 = ((lambda: lora_mbgmv(x, wa, wb, st.tables, 0, n_proj=3)) if self.compute == "mbgmv"
                       else (lambda: lora_padded_bmm_rows(x, wa, wb, st.idx[:3], st.scale)))
                d = self._qkv(l, p, x, fn3)
                if d is not None:
                    return d
            if self.compute == "mbgmv":
                return lora_mbgmv(x, wa, wb, st.tables, p)
            if self.compute == "bmm":
                return lora_padded_bmm_rows(x, wa, wb, st.idx[p], st.scale)
            rows = st.idx[p, 0]   # PEFT-style: one adapter for the whole batch, read once
            return (x @ wa[rows].T) @ wb[rows] * st.scale[0].to(x.dtype)
        if self.compute == "bmm":
            return lora_padded_bmm(x, wa, wb, t, p)
        if self.compute == "loop":
            y = torch.zeros(x.shape[0], wb.shape[1], dtype=x.dtype, device=x.device)
            for s in range(t.n_seg):   # one pair of matmuls per request, as a one-adapter server does
                rows = torch.from_numpy(t.rows_of(s, p)).to(x.device)
                a, n = int(t.seg_start[s]), int(t.seg_len[s])
                y[a:a + n] = (x[a:a + n] @ wa[rows].T) @ wb[rows] * float(t.seg_scale[s])
            return y
        if self._triton(x):
            if t.max_len == 1 and p < 3:
                d = self._qkv(l, p, x, lambda: lora_mbgmv(x, wa, wb, t, 0, n_proj=3))
                if d is not None:
                    return d
            return lora_mbgmv(x, wa, wb, t, p) if t.max_len == 1 else lora_mbgmm(x, wa, wb, t, p)
        return lora_pool_torch(x, wa, wb, t, p)


def bind_lora(model: nn.Module, backend: LoRABackend) -> SLoRAContext:
    """Wrap q, k, v, o of ``model`` (or re-point already wrapped layers) at ``backend``."""
    ctx = SLoRAContext(backend)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if wrapped:
        for m in wrapped:
            m.ctx = ctx
    else:
        tmp = attach_lora(model, backend, targets=ATTN_TARGETS)
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.ctx is tmp:
                m.ctx = ctx
    return ctx


# ------------------------------------------------------------------------------------------------
# scheduler: FCFS continuous batching + adapter prefetch + admission that counts adapter slots
# ------------------------------------------------------------------------------------------------
class SLoRAScheduler(Scheduler):
    """FCFS continuous batching; before each plan it pages in the adapters of the queue's head.

    Only the longest prefix of the waiting queue whose adapters fit (beside the prompt tokens of those
    requests) is visible to the shared policy, so admission never over-commits the pool that adapters
    and KV share. ``same_adapter``: PEFT-style, only the run of waiting requests with the adapter of the
    running batch (or of the queue head) is visible, and batches are static.
    """

    def __init__(self, config: SchedulerConfig | str = "orca", *, same_adapter: bool = False, **overrides):
        super().__init__(config, **overrides)
        self.same_adapter = same_adapter
        if same_adapter and self.config.policy != "static":
            from dataclasses import replace

            self.config = replace(self.config, policy="static")
        self.pager: AdapterPager | None = None

    def schedule(self, ledger) -> StepPlan:
        pager = self.pager
        protect = {s.request.adapter_id for s in self.running} | {s.request.adapter_id for s in self.swapped}
        key = None
        if self.same_adapter:
            head = self.running or list(self.swapped) or list(self.waiting)
            key = head[0].request.adapter_id if head else None
        room = self.config.max_batch_size - len(self.running)
        unified = pager.allocator is getattr(getattr(ledger, "cache", None), "allocator", None)
        reserved = 0   # prompt slots of the requests made visible so far
        visible = 0
        for s in list(self.waiting)[:max(room, 0)]:
            a = s.request.adapter_id
            if key is not None and a != key:
                break
            need_kv = s.prompt_len + 1
            if unified:   # KV and adapters draw on the same free slots (+ idle adapters we may evict)
                extra = 0 if (a < 0 or a in protect or pager.is_resident(a)) else pager.host[a].n_slots
                if need_kv + extra > pager.room_for(0, protect | {a}) - reserved:
                    break
            elif need_kv + reserved > ledger.n_free():
                break
            if a >= 0 and not pager.load(a, protect=protect):
                break
            protect.add(a)
            reserved += need_kv
            visible += 1
        with self.only_visible(visible):
            return super().schedule(ledger)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
def slot_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes of one slot over all layers: H elements in K and in V per layer."""
    return 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim_ * dtype_bytes


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class SLoRAEngine(Engine):
    """The shared :class:`~mlsys24.serving.Engine` with token-granular slots and adapter paging.

    pool_slots: the memory budget in slots (KV tokens + adapter rows). adapter_region: slots reserved
    for adapters by the non-unified systems (ignored by ``slora``). ``occupancy`` records per step
    ``(kv, adapter, free, reserved_idle)`` slot counts.

    decode_graphs: run decode steps through :class:`~.graph.LoRADecodeGraphs` (CUDA graphs holding the
    step's LoRA kernels on a GPU; the same static buffers eagerly on CPU, where MBGMV then needs the
    Triton interpreter); ``max_context`` (default: the model's ``max_seq_len``) and ``context_bucket``
    size its buckets. Prefill steps always take the general path.
    """

    def __init__(self, model, system: str = "slora", *, pool_slots: int, adapter_region: int = 0,
                 max_batch_size: int = 32, record_logits: bool = False, use_triton: bool | None = None,
                 policy: str = "orca", decode_graphs: bool = False, max_context: int | None = None,
                 context_bucket: int = 512, use_graphs: bool | None = None):
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; have {sorted(SYSTEMS)} (merged: MergedServer)")
        spec = self.spec = SYSTEMS[system]
        self.system = system
        cfg = model.cfg
        if cfg.n_kv_heads != cfg.n_heads or cfg.n_heads * cfg.head_dim_ != cfg.d_model:
            raise ValueError("the unified pool stores q,k,v,o adapter rows as KV slots: needs n_kv_heads == "
                             "n_heads and n_heads·head_dim == d_model (GQA/MLP targets need separate pools)")
        self.H = cfg.d_model
        self.zero_row = None
        kv_slots = pool_slots if spec.unified else pool_slots - adapter_region
        if kv_slots < 1:
            raise ValueError(f"adapter_region {adapter_region} leaves no KV slots of {pool_slots}")
        backend = SLoRABackend(spec.compute, use_triton)
        backend.n_layers = cfg.n_layers
        ctx = bind_lora(model, backend)
        sched = SLoRAScheduler(SchedulerConfig(policy, max_batch_size=max_batch_size), same_adapter=spec.same_adapter)
        super().__init__(model, sched, n_blocks=kv_slots, block_size=1, lora=ctx, record_logits=record_logits)
        self.cache.allocator = UnifiedAllocator(kv_slots)
        L = cfg.n_layers
        if spec.unified:
            wa = self.cache.k_pool.view(L, -1, self.H)
            wb = self.cache.v_pool.view(L, -1, self.H)
            pager = AdapterPager(self.cache.allocator, wa, wb)
        else:
            if adapter_region < 1:
                raise ValueError(f"system {system!r} needs adapter_region > 0 slots")
            # one row past the region's slots is never allocated: it stays zero (padding of padded BMM)
            wa = torch.zeros(L, adapter_region + 1, self.H, dtype=self.dtype, device=self.device)
            pager = AdapterPager(UnifiedAllocator(adapter_region), wa, torch.zeros_like(wa))
            self.zero_row = adapter_region
        backend.pager = sched.pager = pager
        self.pager, self.backend = pager, backend
        self.pool_slots, self.adapter_region = pool_slots, adapter_region
        self.occupancy: list[tuple[int, int, int, int]] = []
        self.batches: list[list[tuple[int, int, int]]] = []   # per step: (adapter, rank, context) of running
        self.graph_steps = 0
        self.graphs = None
        if decode_graphs:
            from .graph import LoRADecodeGraphs

            self.graphs = LoRADecodeGraphs(self, max_context=max_context or cfg.max_seq_len,
                                           context_bucket=context_bucket, use_graphs=use_graphs)

    def capture_graphs(self) -> int:
        """Capture every decode bucket for the ranks of the registered adapters (before serving)."""
        if self.graphs is None:
            return 0
        return self.graphs.capture_all({h.rank for h in self.pager.host.values()})

    def _forward(self, rows) -> None:
        if (self.graphs is not None and type(self.kv_policy) is KVPolicy
                and all(n == 1 and s.pending == 1 for s, n in rows)):
            logits = self.graphs.run(rows)
            if logits is not None:
                for s, n in rows:
                    s.num_computed += n
                self.graph_steps += 1
                self._emit(rows, list(range(len(rows))), logits.float())
                return
        super()._forward(rows)

    def add_adapters(self, adapters: dict[int, AdapterWeights], packed: dict | None = None) -> None:
        """Register adapters in host memory (``packed``: id -> shared packed host copy, for aliasing)."""
        for a, w in adapters.items():
            if packed is not None and a in packed:
                self.backend.register_packed(a, w, packed[a])
            else:
                self.backend.load(a, w)

    def step(self):
        rec = super().step()
        host = self.pager.host
        self.batches.append([(s.request.adapter_id, host[s.request.adapter_id].rank if s.request.adapter_id >= 0 else 0,
                              s.num_computed) for s in self.scheduler.running])
        kv = self.cache.allocator.n_used[1]
        ad = self.pager.resident_slots()
        if self.spec.unified:
            self.occupancy.append((kv, ad, self.cache.allocator.n_free, 0))
        else:
            self.occupancy.append((kv, ad, self.cache.allocator.n_free, self.pager.allocator.n_free))
        return rec

    def check_invariants(self) -> None:
        alloc = self.cache.allocator
        alloc.check()
        self.pager.check()
        kv = sorted(b for blocks in self.cache.blocks.values() for b in blocks)
        assert alloc.n_used[1] == len(set(kv)), "KV slot tags disagree with the block tables"
        assert (alloc.owner[kv] == 1).all() if kv else True, "a KV slot is tagged as something else"
        done = {s.rid for s in self.finished}
        for s in self.finished:
            assert s.rid not in self.cache.blocks, f"finished request {s.rid} still holds slots"
        assert len(done) == len(self.finished), "a request finished twice"


# ------------------------------------------------------------------------------------------------
# merged copies (vLLM-packed-like)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_adapter(model: nn.Module, w: AdapterWeights) -> nn.Module:
    """A copy of ``model`` (plain Linear layers) with ``W += s · (A B)^T`` for every adapted projection."""
    memo = {id(x.ctx): None for x in model.modules() if isinstance(x, LoRALinear)}  # do not copy the pools
    m = copy.deepcopy(model, memo)
    for mod in list(m.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, cname, child.base)
    mods = dict(m.named_modules())
    for name in w.A:
        lin = mods[name]
        lin.weight += (w.scale * (w.A[name].to(lin.weight) @ w.B[name].to(lin.weight))).T
    return m


class MergedServer:
    """One merged model copy (and its own engine) per adapter, stepped round-robin (the paper runs the
    copies side by side under MPS; here they time-share one device). ``fits`` is False when the copies do
    not fit ``budget_bytes``; then nothing runs (OOM)."""

    def __init__(self, model, adapters: dict[int, AdapterWeights], *, budget_bytes: int, pool_slots: int,
                 max_batch_size: int = 32, policy: str = "orca"):
        self.copies = len(adapters)
        self.copy_bytes = model_bytes(model)
        self.need_bytes = self.copies * self.copy_bytes
        self.fits = self.need_bytes <= budget_bytes
        self.engines: dict[int, Engine] = {}
        if not self.fits:
            return
        per = max(1, pool_slots // max(1, self.copies))
        for a, w in adapters.items():
            m = merge_adapter(model, w)
            self.engines[a] = Engine(m, SchedulerConfig(policy, max_batch_size=max_batch_size), n_blocks=per,
                                     block_size=1)


# ------------------------------------------------------------------------------------------------
# workload and driver
# ------------------------------------------------------------------------------------------------
def slora_trace(n_requests: int, n_adapters: int, *, alpha: float = 1.0, rate: float | None = None, cv: float = 1.0,
                len_range: tuple[int, int] = (8, 48), vocab: int = 256, seed: int = 0) -> list[Request]:
    """S-LoRA's ``benchmarks/trace.py``: adapter = floor(n·U), U ~ power(alpha) (alpha = 1: uniform);
    Gamma arrivals (shape 1/cv², rate R; cv = 1: Poisson; ``rate=None``: all at t = 0); input and
    output lengths U[lo, hi)."""
    rng = np.random.default_rng(seed)
    ads = np.minimum((n_adapters * rng.power(alpha, n_requests)).astype(int), n_adapters - 1)
    lo, hi = len_range
    ins = rng.integers(lo, hi, n_requests)
    outs = rng.integers(lo, hi, n_requests)
    arr = arrival_times(n_requests, rate=rate, process="gamma" if rate else "offline", cv=cv, seed=seed + 1)
    return [Request(i, rng.integers(0, vocab, int(ins[i])).tolist(), int(outs[i]), arrival_s=float(arr[i]),
                    adapter_id=int(ads[i])) for i in range(n_requests)]


def _metrics(finished, n_total: int, elapsed: float, window: float | None, slo_s: float) -> dict:
    done = [s for s in finished if window is None or s.finish_s <= window]
    lat = [s.finish_s - s.request.arrival_s for s in done]
    ttft = [s.token_times_s[0] - s.request.arrival_s for s in done if s.token_times_s]
    att = [max(0.0, 1 - (t / slo_s) ** 2) if t < slo_s else 0.0 for t in ttft]
    span = window if window is not None else elapsed
    return {"finished": len(done), "n_requests": n_total, "elapsed_s": elapsed,
            "throughput_rps": len(done) / span if span > 0 else float("nan"),
            "avg_latency_s": float(np.mean(lat)) if lat else float("nan"),
            "avg_ttft_s": float(np.mean(ttft)) if ttft else float("nan"),
            "slo_attainment": float(np.mean(att)) if att else 0.0}


def _tokens(seqs, window: float | None, elapsed: float) -> dict:
    """Generated tokens inside the window (finished or not) and their rate: a finer capacity measure
    than finished requests, which move in steps of whole requests."""
    n = sum(1 for s in seqs for t in s.token_times_s if window is None or t <= window)
    span = window if window is not None else elapsed
    return {"tokens_in_window": n, "token_throughput": n / span if span > 0 else float("nan")}


def _drive(engines: list[Engine], requests: list[Request], route, window_s: float | None):
    todo = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    t0 = time.perf_counter()
    offset = 0.0
    for e in engines:
        e._t0, e._offset = t0, 0.0

    def now():
        return time.perf_counter() - t0 + offset

    i = 0
    while True:
        t = now()
        if window_s is not None and t >= window_s:
            break
        while i < len(todo) and todo[i].arrival_s <= t:
            route(todo[i]).add_request(todo[i])
            i += 1
        busy = [e for e in engines if e.scheduler.has_work()]
        if not busy:
            if i >= len(todo):
                break
            offset += todo[i].arrival_s - t   # idle: jump the clock to the next arrival
            for e in engines:
                e._offset = offset
            continue
        for e in busy:
            e.step()
    for e in engines:
        e._sync()
    return now()


def serve(engine, requests: list[Request], *, window_s: float | None = None, slo_s: float = 6.0) -> dict:
    """Run ``requests`` (arriving at their ``arrival_s``) on an :class:`SLoRAEngine` or :class:`MergedServer`.

    ``window_s``: stop at that clock time and count requests finished inside it (no drain); None: serve
    all of them. Returns throughput (req/s), average latency / first-token latency, SLO attainment
    (S-LoRA's ``1 − (t/6)²``) and, for pool engines, adapter loads/evictions/H2D bytes and gathered elements.
    """
    if isinstance(engine, MergedServer):
        if not engine.fits:
            return {"oom": True, "finished": 0, "n_requests": len(requests), "throughput_rps": 0.0,
                    "need_bytes": engine.need_bytes}
        engs = list(engine.engines.values())
        base = [dataclasses.replace(r, adapter_id=-1) for r in requests]     # the adapter is in the weights
        which = {r.rid: r.adapter_id for r in requests}
        elapsed = _drive(engs, base, lambda r: engine.engines[which[r.rid]], window_s)
        fin = [s for e in engs for s in e.finished]
        out = _metrics(fin, len(requests), elapsed, window_s, slo_s)
        out.update(_tokens([s for e in engs for s in e.sequences.values()], window_s, elapsed))
        out.update(oom=False, need_bytes=engine.need_bytes)
        return out
    elapsed = _drive([engine], requests, lambda r: engine, window_s)
    out = _metrics(engine.finished, len(requests), elapsed, window_s, slo_s)
    out.update(_tokens(engine.sequences.values(), window_s, elapsed))
    p = engine.pager
    out.update(oom=False, adapter_loads=p.n_loads, adapter_evictions=p.n_evictions, h2d_bytes=p.h2d_bytes,
               gathered_elements=engine.backend.gathered, gathered_elements_if_padded=engine.backend.gathered_bmm,
               steps=len(engine.steps),
               peak_kv_slots=max((o[0] for o in engine.occupancy), default=0),
               peak_adapter_slots=max((o[1] for o in engine.occupancy), default=0))
    return out

