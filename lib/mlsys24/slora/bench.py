"""GPU benchmark of S-LoRA (``python -m mlsys24.slora.bench [--quick] [--out DIR]``).

Llama-2-7B-shaped layers (d 4096, 32 heads × 128, FFN 11008, vocab 32000; ``--layers`` of them, default
16, random fp16 weights), adapters of ranks {8, 16, 32, 64} on q, k, v, o. ``n`` adapter ids share at
most ``--sets`` distinct random weight sets per rank (aliased onto the ids; every id is still paged
into its own pool slots). Workload: S-LoRA's trace generator, Poisson arrivals at ``--rate`` req/s for
``--duration`` s, input/output lengths U[8, 512); the same arrivals and lengths for every system and n
(only the adapter ids differ); throughput counted over a fixed ``--window`` (no drain).

Decode steps run from CUDA graphs that hold the step's LoRA kernels (:mod:`.graph`), so the systems
differ only in those kernels and the step is not bound by host launches and syncs. Measured:

1. the LoRA work of one decode step alone (q, k, v, o of every layer, 64 requests of the n = 100
   trace's ranks): MBGMV vs padded BMM, device time from a CUDA graph, adapter bytes addressed;
2. ``--rounds`` paired rounds (order reversed every other round) of S-LoRA at n ∈ {5, 100, 1000},
   padded BMM, S-LoRA without unified pool and PEFT-style at n = 100; merged copies at n = 5 (and the
   n = 100 copies' memory, which do not fit); summaries are medians over rounds, ratios are paired
   within a round;
3. closing runs on the engine's general (eager) decode path, for comparison with earlier files.

Also records pool memory (peak adapter + KV slots in bytes) against merged copies of the full
32-layer model, per-run step-time percentiles and Triton compiles inside each window.
Results: ``data/results/slora/<gpu>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..bench import save_results
from ..models import preset, random_llama
from ..serving.lora import AdapterWeights
from . import mbgmv as mb
from .adapters import HostAdapter
from .engine import (
    MergedServer,
    SLoRABackend,
    SLoRAEngine,
    bind_lora,
    model_bytes,
    serve,
    slora_trace,
    slot_bytes,
)

SLUG = "slora"
RANKS = (8, 16, 32, 64)


def _adapter_sets(cfg, sets: int, dtype, seed: int) -> dict[int, list[HostAdapter]]:
    g = torch.Generator().manual_seed(seed)
    H, L = cfg.d_model, cfg.n_layers
    out = {}
    for r in RANKS:
        out[r] = []
        for _ in range(sets):
            A = (torch.randn(L, 4 * r, H, generator=g) / H**0.5).to(dtype)
            B = (torch.randn(L, 4 * r, H, generator=g) * 0.02).to(dtype)
            if torch.cuda.is_available():
                A, B = A.pin_memory(), B.pin_memory()
            out[r].append(HostAdapter(r, 2.0, A, B))
    return out


def _weights_for_merge(h: HostAdapter) -> AdapterWeights:
    w = AdapterWeights(h.rank, 2.0 * h.rank)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in range(h.A.shape[0]):
        for p, n in enumerate(names):
            key = f"layers.{layer}.self_attn.{n}"
            w.A[key] = h.A[layer, p * h.rank:(p + 1) * h.rank].T.float()
            w.B[key] = h.B[layer, p * h.rank:(p + 1) * h.rank].float()
    return w


def _jit_variants() -> int | None:
    """Compiled variants of the step's Triton kernels so far (a compile inside a timed window shows here)."""
    try:
        from ..kernels import decode_attention as da

        fns = [da._split_kv_sync_kernel, da._split_kv_combine_kernel, mb._mbgmv_shrink_kernel, mb._mbgmv_expand_kernel,
               mb._mbgmm_shrink_kernel, mb._mbgmm_expand_kernel]
        return int(sum(len(c[0]) for f in fns for c in getattr(f, "device_caches", {}).values()))
    except Exception:   # noqa: BLE001 - a diagnostic only
        return None


def _step_stats(eng) -> dict:
    """Step-time distribution of decode-only and prefill steps (ms)."""
    dec = np.array([r.duration_s for r in eng.steps if r.prefill_tokens == 0]) * 1e3
    pre = np.array([r.duration_s for r in eng.steps if r.prefill_tokens > 0]) * 1e3
    out = {"decode_steps": int(len(dec)), "prefill_steps": int(len(pre)),
           "prefill_time_s": float(pre.sum() / 1e3) if len(pre) else 0.0}
    if len(dec):
        out.update(decode_step_ms_p50=float(np.median(dec)), decode_step_ms_p90=float(np.percentile(dec, 90)),
                   decode_step_ms_max=float(dec.max()), decode_time_s=float(dec.sum() / 1e3),
                   mean_decode_rows=float(np.mean([r.rows for r in eng.steps if r.prefill_tokens == 0])))
    return out


MBGMV_PPS_SWEEP = (0, 4, 8, 16, 32)   # MBGMV shrink: programs per SM aimed at by its split-K (0: none)
# MBGMV tile shapes timed on the decode step (expand first, then shrink; the first is the default)
MBGMV_EXPAND_SWEEP = ({"block_r": 16, "block_n": 512, "num_warps": 2}, {"block_r": 16, "block_n": 512, "num_warps": 4},
                      {"block_r": 32, "block_n": 512, "num_warps": 4}, {"block_r": 16, "block_n": 256, "num_warps": 2},
                      {"block_r": 16, "block_n": 1024, "num_warps": 4}, {"block_r": 64, "block_n": 128, "num_warps": 4})
MBGMV_SHRINK_SWEEP = ({"block_j": 4, "block_k": 1024, "num_warps": 4}, {"block_j": 8, "block_k": 1024, "num_warps": 4},
                      {"block_j": 8, "block_k": 512, "num_warps": 4}, {"block_j": 4, "block_k": 2048, "num_warps": 8},
                      {"block_j": 16, "block_k": 256, "num_warps": 2})


def _cfg_key(c: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in c.items())


def lora_kernel_timing(H: int, L: int, ranks: list[int], dev, dtype, *, graph: bool = True, repeats: int = 50,
                       seed: int = 0) -> list[dict]:
    """Device time of one decode step's LoRA work (q, k, v, o of ``L`` layers) for a batch of requests
    with ``ranks`` (one distinct adapter each, at shuffled pool slots): MBGMV vs padded BMM, each from
    device index tensors only (as in the decode graphs). Bytes: adapter elements addressed
    (``Σ 8·H·r_b`` per layer) and copied into padded tensors (``Σ 8·H·r_max``)."""
    from ..bench import measure_graphed
    from .mbgmv import PoolTables, lora_mbgmv, lora_padded_bmm_rows

    g = torch.Generator().manual_seed(seed)
    B, R = len(ranks), max(ranks)
    n_slots = sum(4 * r for r in ranks) + 1                        # + one zero row (padding of BMM)
    gd = torch.Generator(device=dev).manual_seed(seed)
    wa = (torch.randn(L, n_slots, H, generator=gd, device=dev) / H**0.5).to(dtype)
    wb = (torch.randn(L, n_slots, H, generator=gd, device=dev) * 0.02).to(dtype)
    wa[:, -1] = 0
    wb[:, -1] = 0
    perm = torch.randperm(n_slots - 1, generator=g).numpy()
    starts = np.concatenate([[0], np.cumsum([4 * r for r in ranks])[:-1]]).astype(np.int64)
    aloc = np.zeros((B, 4 * R), np.int64)
    idx = np.full((4, B, R), n_slots - 1, np.int64)
    for b, r in enumerate(ranks):
        sl = perm[starts[b]:starts[b] + 4 * r]
        aloc[b, :4 * r] = sl
        idx[:, b, :r] = sl.reshape(4, r)
    rk = np.asarray(ranks, np.int64)
    table = torch.from_numpy(np.concatenate([np.arange(B), np.ones(B, np.int64), np.arange(B) * 4 * R, rk,
                                             aloc.reshape(-1)]).astype(np.int32)).to(dev)
    scale = torch.full((B,), 2.0, dtype=torch.float32, device=dev)
    t = PoolTables(np.arange(B), np.ones(B, np.int64), np.arange(B) * 4 * R, rk, np.full(B, 2.0, np.float32),
                   aloc.reshape(-1), table, scale, B)
    idx_d = torch.from_numpy(idx).to(dev)
    x = torch.randn(B, H, generator=gd, device=dev).to(dtype)
    y_m = lora_mbgmv(x, wa[0], wb[0], t, 0)
    y_b = lora_padded_bmm_rows(x, wa[0], wb[0], idx_d[0], scale)
    err = float((y_m.float() - y_b.float()).abs().max())
    y3m = lora_mbgmv(x, wa[0], wb[0], t, 0, n_proj=3)
    y3b = lora_padded_bmm_rows(x, wa[0], wb[0], idx_d[:3], scale)
    err_qkv = max(max(float((y3m[p].float() - lora_mbgmv(x, wa[0], wb[0], t, p).float()).abs().max()),
                      float((y3b[p].float() - lora_padded_bmm_rows(x, wa[0], wb[0], idx_d[p], scale).float()).abs().max()))
                  for p in range(3))

    def step_mbgmv():
        for layer in range(L):
            for p in range(4):
                lora_mbgmv(x, wa[layer], wb[layer], t, p)

    def step_bmm():
        for layer in range(L):
            for p in range(4):
                lora_padded_bmm_rows(x, wa[layer], wb[layer], idx_d[p], scale)

    # as the engine runs them: q, k, v (same input) in one pair of launches / one gather, o apart
    def step_mbgmv_qkv():
        for layer in range(L):
            lora_mbgmv(x, wa[layer], wb[layer], t, 0, n_proj=3)
            lora_mbgmv(x, wa[layer], wb[layer], t, 3)

    def step_bmm_qkv():
        for layer in range(L):
            lora_padded_bmm_rows(x, wa[layer], wb[layer], idx_d[:3], scale)
            lora_padded_bmm_rows(x, wa[layer], wb[layer], idx_d[3], scale)

    el = torch.finfo(dtype).bits // 8
    out = []
    def timed(fn):
        return measure_graphed(fn, graph=graph, repeats=repeats, device=dev).median_us

    def diff():
        return float((lora_mbgmv(x, wa[0], wb[0], t, 0).float() - y_m.float()).abs().max())

    # tile shapes, then the shrink's split-K: each candidate timed on this step, the fastest becomes the
    # module default for the rest of the run (the serving runs' decode graphs are captured after this)
    if graph:
        for param, table, cands in (("MBGMV_EXPAND", mb.MBGMV_EXPAND, MBGMV_EXPAND_SWEEP),
                                    ("MBGMV_SHRINK", mb.MBGMV_SHRINK, MBGMV_SHRINK_SWEEP)):
            res = {}
            for c in cands:
                table.update(c)
                res[_cfg_key(c)] = (timed(step_mbgmv), diff(), c)
            best = min(res.values(), key=lambda v: v[0])
            table.update(best[2])
            out.append({"kind": "lora_kernel_sweep", "method": "mbgmv", "param": param,
                        "step_us": {k: v[0] for k, v in res.items()},
                        "max_abs_diff_vs_first": {k: v[1] for k, v in res.items()}, "chosen": dict(table)})
    sweep = {}
    for pps in (MBGMV_PPS_SWEEP if graph else (mb.MBGMV_PROGRAMS_PER_SM,)):
        mb.MBGMV_PROGRAMS_PER_SM = pps
        sweep[pps] = (timed(step_mbgmv), diff())
    mb.MBGMV_PROGRAMS_PER_SM = min(sweep, key=lambda k: sweep[k][0])
    out.append({"kind": "lora_kernel_sweep", "method": "mbgmv", "param": "MBGMV_PROGRAMS_PER_SM",
                "step_us": {str(k): v[0] for k, v in sweep.items()},
                "max_abs_diff_vs_no_split": {str(k): v[1] for k, v in sweep.items()},
                "chosen": mb.MBGMV_PROGRAMS_PER_SM})
    for name, fn, elems in (("mbgmv", step_mbgmv, 8 * H * int(rk.sum())), ("bmm", step_bmm, 8 * H * R * B),
                            ("mbgmv_qkv", step_mbgmv_qkv, 8 * H * int(rk.sum())),
                            ("bmm_qkv", step_bmm_qkv, 8 * H * R * B)):
        tm = measure_graphed(fn, graph=graph, repeats=repeats, device=dev)
        out.append({"kind": "lora_kernel", "method": name, "batch": B, "ranks": [int(r) for r in ranks],
                    "layers": L, "H": H, "step_us": tm.median_us, "p10_us": tm.p10_s * 1e6, "p90_us": tm.p90_s * 1e6,
                    "per_layer_us": tm.median_us / L, "weight_bytes_per_layer": elems * el,
                    "weight_bytes_step": elems * el * L,
                    "GBps_weights": elems * el * L / tm.median_s / 1e9, "graph": bool(graph and dev != "cpu"),
                    "max_abs_diff_vs_other": err,
                    **({"max_abs_diff_vs_single_projection": err_qkv} if name.endswith("_qkv") else {}),
                    **({"programs_per_sm": mb.MBGMV_PROGRAMS_PER_SM} if name == "mbgmv" else {})})
    return out


def run(args) -> Path:
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    full = cuda and not quick
    layers = getattr(args, "layers", None) or (16 if full else 2)
    policy = getattr(args, "policy", None) or ("vllm" if full else "orca")
    attention = getattr(args, "attention", None) or ("paged" if cuda else "gather")
    graphs = getattr(args, "graphs", None)
    graphs = (True if graphs is None else bool(graphs)) and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    warm_s = getattr(args, "warm", None)
    warm_s = (3.0 if full else 0.0) if warm_s is None else float(warm_s)
    rounds = int(getattr(args, "rounds", None) or (3 if full else 2))
    eager_check = bool(getattr(args, "eager_check", True))
    if policy not in ("vllm", "orca"):
        raise SystemExit(f"--policy {policy!r}: expected 'vllm' or 'orca'")
    if attention not in ("paged", "gather"):
        raise SystemExit(f"--attention {attention!r}: expected 'paged' or 'gather'")
    if attention == "paged" and not cuda:
        raise SystemExit("--attention paged needs a GPU (the Triton decode kernel reads the pool in place)")
    if warm_s < 0 or rounds < 1:
        raise SystemExit(f"--warm {warm_s} / --rounds {rounds}: expected seconds >= 0 and rounds >= 1")
    if full:
        cfg = preset("llama2-7b", n_layers=layers)
        rate, duration, window = getattr(args, "rate", 100.0), getattr(args, "duration", 15.0), getattr(args, "window", 10.0)
        len_range, pool_slots, region, sets, max_batch = (8, 512), 60000, 64 * 4 * 64, getattr(args, "sets", 8), 128
        ns, bucket = [5, 100, 1000], 512
    else:  # CPU / quick: tiny shapes, same code path
        cfg = preset("tiny", n_layers=layers) if not cuda else preset("llama2-7b", n_layers=layers)
        rate, duration, window = 40.0, 1.0, 30.0
        len_range, pool_slots, region, sets, max_batch = (8, 24), 4000, 8 * 4 * 64, 2, 8
        ns, bucket = [5, 20, 50], 16
    max_context = 2 * len_range[1]
    t0 = time.perf_counter()
    time_budget = float(getattr(args, "budget", None) or 1e9)

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model = random_llama(cfg, dev, dtype, seed=0)
    # prefill attention runs SDPA with a boolean mask (prompts of a step at different offsets): cuDNN's
    # kernel builds an execution plan for every new shape, ~1.7 ms of host time per layer (measured on an
    # H200), and nearly every prefill step has a new token count; the memory-efficient kernel has no such
    # cost. The same for every system.
    sdpa_cudnn = False
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(sdpa_cudnn)
    if attention == "paged":   # decode attention over the token-granular pool in place (no K/V gather)
        from ..models.fast_decode import PagedDecodeAttention

        model.set_attention_backend(PagedDecodeAttention("sync"))
    log(f"model {cfg.n_layers} layers d={cfg.d_model} on {dev} ({model_bytes(model) / 2**30:.2f} GiB); "
        f"decode graphs {'on' if graphs else 'off'}")
    hosts = _adapter_sets(cfg, sets, dtype, seed=1)
    n_req = int(rate * duration)
    sb = slot_bytes(cfg, torch.finfo(dtype).bits // 8)
    records, runs = [], []

    def adapters_for(n):
        packed = {a: hosts[RANKS[a % len(RANKS)]][(a // len(RANKS)) % sets] for a in range(n)}
        return {a: AdapterWeights(h.rank, 2.0 * h.rank) for a, h in packed.items()}, packed

    budget = torch.cuda.get_device_properties(0).total_memory if cuda else 8 * 2**30  # device memory (bytes)

    def trace(n, seed=7):   # the same arrivals and lengths for every system and n (only adapter ids differ)
        return slora_trace(n_req, n, rate=rate, len_range=len_range, vocab=cfg.vocab_size, seed=seed)

    def build(system, n, use_graphs=True):
        ws, packed = adapters_for(n)
        if system == "merged":
            bind_lora(model, SLoRABackend())   # let go of the last engine's pool before the copies are made
            cleanup()
            fits_scaled = n * model_bytes(model) <= budget - pool_slots * sb
            srv = MergedServer(model, {a: _weights_for_merge(packed[a]) for a in ws} if fits_scaled else {},
                               budget_bytes=budget, pool_slots=pool_slots, max_batch_size=max_batch, policy=policy)
            srv.fits = fits_scaled
            srv.need_bytes = n * model_bytes(model)
            return srv
        bind_lora(model, SLoRABackend())   # let go of the last engine's pool (and graphs) before this one's
        cleanup()
        eng = SLoRAEngine(model, system, pool_slots=pool_slots, adapter_region=region, max_batch_size=max_batch,
                          policy=policy, decode_graphs=state["graphs"] and use_graphs, max_context=max_context,
                          context_bucket=bucket)
        eng.add_adapters(ws, packed)
        return eng

    state = {"graphs": graphs}

    def cleanup():
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def one(system, n, rnd, use_graphs=True, est=None):
        need = (est if est is not None else window + 8)
        if time.perf_counter() - t0 + need > time_budget:
            log(f"{system} n={n} round {rnd}: skipped (time budget {time_budget:.0f} s)")
            return None
        try:
            return _one(system, n, rnd, use_graphs)
        except Exception as e:   # noqa: BLE001 - keep the other systems' runs; the error is recorded
            import traceback

            traceback.print_exc()
            err = repr(e)
        # (outside the except block: the traceback and the failed engine it holds are gone before cleanup)
        records.append({"kind": "error", "system": system, "n_adapters": n, "round": rnd, "error": err})
        log(f"{system} n={n} round {rnd}: FAILED {err}")
        cleanup()
        return None

    def _one(system, n, rnd, use_graphs):
        srv = build(system, n, use_graphs)
        tc = time.perf_counter()
        captured = srv.capture_graphs() if isinstance(srv, SLoRAEngine) else 0
        capture_s = time.perf_counter() - tc
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        jit0 = _jit_variants()
        res = serve(srv, trace(n), window_s=window)
        jit1 = _jit_variants()
        res["jit_compiles_in_window"] = (jit1 - jit0) if jit0 is not None and jit1 is not None else None
        if system == "merged":
            full_copy = 2 * sum(int(np.prod(s)) for s in _full_7b_param_shapes())
            res.update(full7b_copies_bytes=n * full_copy, full7b_fits=n * full_copy <= budget)
            if srv.fits:
                res.update(_step_stats(next(iter(srv.engines.values()))))
        else:
            res.update(pool_bytes=pool_slots * sb, peak_adapter_bytes=res["peak_adapter_slots"] * sb,
                       peak_kv_bytes=res["peak_kv_slots"] * sb, mean_step_ms=1e3 * window / max(1, res["steps"]),
                       graph_steps=srv.graph_steps, graphs_captured=captured, capture_s=capture_s,
                       lazy_captures=srv.graphs.lazy_captures if srv.graphs is not None else 0,
                       **_step_stats(srv))
        if cuda:
            res["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        rec = {"kind": "run", "system": system, "n_adapters": n, "round": rnd,
               "decode_graphs": bool(isinstance(srv, SLoRAEngine) and srv.graphs is not None), **res}
        del srv
        cleanup()
        runs.append(rec)
        extra = (f", decode step p50 {rec['decode_step_ms_p50']:.2f} ms" if "decode_step_ms_p50" in rec else "")
        log(f"{system:9s} n={n:5d} r{rnd} {'graph' if rec['decode_graphs'] else 'eager'}: "
            f"{res['throughput_rps']:.2f} req/s, {res.get('token_throughput', 0):.0f} tok/s, finished "
            f"{res['finished']}/{n_req}{extra}, jit in window {res['jit_compiles_in_window']}"
            + ("  OOM" if res.get("oom") else ""))
        return rec

    if cuda:   # (CPU runs use the PyTorch path of the same gather)
        _warm_kernels(dev, dtype, cfg.d_model)
        log("kernels compiled (every BLOCK_R of MBGMM and MBGMV)")
    # the LoRA work of one decode step, alone: batch of max_batch requests of the n=100 trace's ranks
    kranks = [RANKS[r.adapter_id % len(RANKS)] for r in trace(ns[1])[:max_batch]]
    try:
        ktimes = lora_kernel_timing(cfg.d_model, cfg.n_layers, kranks, dev, dtype, graph=cuda,
                                    repeats=50 if cuda else 3) if cuda or os.environ.get("TRITON_INTERPRET") == "1" else []
    except Exception as e:   # noqa: BLE001
        records.append({"kind": "error", "stage": "lora_kernel_timing", "error": repr(e)})
        log(f"LoRA kernel timing FAILED {e!r}")
        ktimes = []
        cleanup()
    for rec in ktimes:
        records.append(rec)
        if rec["kind"] == "lora_kernel_sweep":
            log(f"MBGMV sweep {rec['param']} (step us): "
                + ", ".join(f"{k}: {v:.0f}" for k, v in rec["step_us"].items()) + f" -> {rec['chosen']}")
            continue
        log(f"LoRA step ({rec['method']}, {rec['batch']} rows, {rec['layers']} layers): {rec['step_us']:.0f} us, "
            f"{rec['weight_bytes_step'] / 2**20:.0f} MiB of adapter rows ({rec['GBps_weights']:.0f} GB/s)")
    if warm_s > 0:   # one unmeasured serving window: prefill shapes, allocator growth, cuBLAS heuristics
        try:
            srv = build("slora", ns[0])
            log(f"warm-up engine: {srv.capture_graphs()} decode graphs captured")
            serve(srv, trace(ns[0], seed=99), window_s=warm_s)
        except Exception as e:   # noqa: BLE001 - fall back to the eager decode path for every run
            import traceback

            traceback.print_exc()
            records.append({"kind": "error", "stage": "warm-up with decode graphs", "error": repr(e)})
            log(f"decode graphs FAILED ({e!r}): every run takes the eager path")
            state["graphs"] = False
        srv = None
        cleanup()
        log(f"warm-up window {warm_s:.0f} s done")
    order = [("slora", ns[0]), ("slora", ns[1]), ("slora", ns[2]), ("bmm", ns[1]), ("no_unify", ns[1]),
             ("peft", ns[1])]
    done_rounds = 0
    path = None
    for rnd in range(rounds):   # paired rounds, alternating order: slow drift cancels in within-round ratios
        for system, n in (order if rnd % 2 == 0 else order[::-1]):
            one(system, n, rnd)
        if all(any(r["round"] == rnd and (r["system"], r["n_adapters"]) == k for r in runs) for k in order):
            done_rounds += 1
        if rnd == 0:
            one("merged", ns[0], 0, est=window + 25)
            one("merged", ns[1], 0, est=5)
        path = _save(records, runs, order, ns, done_rounds, locals_for_config=dict(
            quick=quick or not cuda, warm_s=warm_s, policy=policy, attention=attention, layers=cfg.n_layers,
            d_model=cfg.d_model, ranks=list(RANKS), distinct_sets_per_rank=sets, rate=rate, duration_s=duration,
            window_s=window, len_range=list(len_range), pool_slots=pool_slots, adapter_region_slots=region,
            slot_bytes=sb, max_batch_size=max_batch, n_adapters=ns, dtype=str(dtype), decode_graphs=state["graphs"],
            context_bucket=bucket, max_context=max_context, rounds=rounds, rounds_completed=done_rounds,
            warm_up=True, n_requests=n_req, sdpa_cudnn=sdpa_cudnn and cuda,
            mbgmv_shrink=dict(mb.MBGMV_SHRINK), mbgmv_expand=dict(mb.MBGMV_EXPAND),
            mbgmv_programs_per_sm=mb.MBGMV_PROGRAMS_PER_SM), out=out)
    if eager_check:   # the previous engine path (no decode graphs: per-step host syncs), for the record
        for system, n in (("slora", ns[0]), ("slora", ns[1]), ("bmm", ns[1])):
            one(system, n, rounds, use_graphs=False)
        path = _save(records, runs, order, ns, done_rounds, locals_for_config=None, out=out, path=path)
    log(f"wrote {path}")
    return path


_CONFIG: dict = {}


def _save(records, runs, order, ns, done_rounds, *, locals_for_config, out, path=None) -> Path:
    """Summaries (median over the completed rounds; ratios paired within a round) + every run."""
    if locals_for_config is not None:
        _CONFIG.clear()
        _CONFIG.update(locals_for_config)
    graph_runs = [r for r in runs if r["round"] < _CONFIG.get("rounds", 1)]   # not the closing eager-path runs
    keys = list(dict.fromkeys((r["system"], r["n_adapters"]) for r in graph_runs))
    summary = []
    for k in keys:
        rs = [r for r in graph_runs if (r["system"], r["n_adapters"]) == k]
        thr = [r["throughput_rps"] for r in rs]
        med = float(np.median(thr))
        mid = min(rs, key=lambda r: abs(r["throughput_rps"] - med))
        summary.append({**mid, "kind": "summary", "throughput_rps": med, "throughput_rounds": thr,
                        "token_throughput": float(np.median([r.get("token_throughput", 0.0) for r in rs])),
                        "token_throughput_rounds": [r.get("token_throughput", 0.0) for r in rs]})
    thr = {(r["system"], r["n_adapters"], r["round"]): r["throughput_rps"] for r in graph_runs}
    tok = {(r["system"], r["n_adapters"], r["round"]): r.get("token_throughput", 0.0) for r in graph_runs}

    def paired(a, b, table=thr):
        vals = [table[(*a, k)] / table[(*b, k)] for k in range(_CONFIG.get("rounds", 1))
                if (*a, k) in table and (*b, k) in table and table[(*b, k)] > 0]
        return (float(np.median(vals)) if vals else None), vals

    pairs = {"ours": (("slora", ns[2]), ("slora", ns[0])), "vs_peft_n100": (("slora", ns[1]), ("peft", ns[1])),
             "vs_bmm_n100": (("slora", ns[1]), ("bmm", ns[1])), "no_unify_vs_bmm_n100": (("no_unify", ns[1]), ("bmm", ns[1])),
             "slora_vs_no_unify_n100": (("slora", ns[1]), ("no_unify", ns[1])),
             "n100_vs_n5": (("slora", ns[1]), ("slora", ns[0]))}
    headline = {"name": f"S-LoRA throughput n={ns[2]} / n={ns[0]}", "unit": "ratio", "paper": 0.89,
                "rounds_completed": done_rounds}
    for name, (a, b) in pairs.items():
        headline[name], headline[name + "_rounds"] = paired(a, b)
        headline[name + "_tokens"], _ = paired(a, b, tok)
    kern = {r["method"]: r for r in records if r.get("kind") == "lora_kernel"}
    if "mbgmv" in kern and "bmm" in kern:
        headline["lora_step_us"] = {m: kern[m]["step_us"] for m in kern}
        headline["lora_kernel_speedup"] = kern["bmm"]["step_us"] / kern["mbgmv"]["step_us"]
    cfg = dict(_CONFIG, rounds_completed=done_rounds)
    return save_results(SLUG, summary + records + runs, headline=headline, config=cfg, out_dir=out)


def _warm_kernels(dev, dtype, H: int) -> None:
    """Compile every kernel variant before any timed window (BLOCK_R follows the batch's largest rank)."""
    from .mbgmv import lora_mbgmm, lora_mbgmv, make_tables

    wa = torch.zeros(4 * max(RANKS) + 1, H, dtype=dtype, device=dev)
    for r in RANKS:
        loc = np.arange(4 * r)
        for T in (1, 3):
            t = make_tables([0], [T], [0], [r], [1.0], loc, T, dev)
            x = torch.zeros(T, H, dtype=dtype, device=dev)
            for proj in range(4):
                (lora_mbgmv if T == 1 else lora_mbgmm)(x, wa, wa, t, proj)
    if dev == "cuda":
        torch.cuda.synchronize()


def _full_7b_param_shapes():
    c = preset("llama2-7b")
    H, F, V, L = c.d_model, c.ffn_dim, c.vocab_size, c.n_layers
    return [(V, H), (V, H)] + [(H, H)] * 4 * L + [(H, F)] * 3 * L + [(H,)] * (2 * L + 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mlsys24.slora.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds (CPU smoke)")
    ap.add_argument("--out", type=Path, default=None, help="directory for the results JSON")
    ap.add_argument("--layers", type=int, default=None, help="7B-shaped layers (default 16 on GPU)")
    ap.add_argument("--rate", type=float, default=100.0, help="offered load (req/s): above every system's capacity")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals")
    ap.add_argument("--window", type=float, default=10.0, help="throughput window (s), no drain")
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds of every system (default 3 on GPU)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; later runs are skipped past it")
    ap.add_argument("--sets", type=int, default=8, help="distinct weight sets per rank (<= 64)")
    ap.add_argument("--policy", default=None, help="vllm (prefill steps apart, as S-LoRA/LightLLM; GPU default) or "
                                                  "orca (mixed padded steps; CPU default)")
    ap.add_argument("--attention", default=None, help="paged (decode kernel on the pool in place; GPU default) or "
                                                     "gather (K/V gathered per step)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", default=None,
                    help="decode steps eagerly (the engine's general path) instead of CUDA graphs")
    ap.add_argument("--no-eager-check", dest="eager_check", action="store_false", default=True,
                    help="skip the closing eager-path runs (S-LoRA n=5, n=100, padded BMM n=100)")
    ap.add_argument("--warm", type=float, default=None, help="seconds of one unmeasured warm-up window "
                                                            "(default 3 on GPU, 0 on CPU)")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
