"""GPU benchmark of Punica: the LoRA operators at Llama-2-7B shapes and multi-tenant serving.

``PYTHONPATH=lib python3 -m mlsys24.bench punica [--quick] [--budget SECONDS]``

1. **Operators** (fp16, h1 = 4096, h2 in {4096, 11008}, r in {16, 32, 64}, batch 1..64, the four
   popularities): ``dense`` (the backbone ``X @ W``, cuBLAS), ``loop``, ``gather_bmm``, ``bgmv``,
   ``sgmv`` (each LoRA provider computes ``y += s * (x A) B`` for all rows). Median of CUDA-event
   timings with the L2 flushed (``mlsys24.bench.measure``). SGMV's launch config (split-K reduction,
   programmatic dependent launch, split count, K step, the expand's form — one N tile per program,
   runs of N tiles, or row-by-row for one-row tiles —, N tile, warps) is searched per (h2, r) at
   1, 8 and 64 Distinct adapters; the table is installed (``set_sgmv_configs``) so every SGMV timing
   after it, and the serving runs, use what was measured (nearest tile count); every trial is
   checked against the float32 reference. BGMV's split-K / N tile are tuned at batch 64 Distinct. Every provider is also
   checked against the float32 reference in the same run. Each timing is taken twice: ``graph``
   (the op replayed from a CUDA graph: device time, what a captured decode step pays) and ``eager``
   (called from Python: at these sizes the host's kernel-launch time can exceed the GPU work).
2. **Serving** a Llama-2-7B-shaped model (random fp16 weights, 32 layers, d 4096, FFN 11008),
   LoRA rank 16 on all 7 projections through the ``sgmv`` backend, ``maxlen`` 512 (Punica's lengths:
   LogNormal prompts, uniform totals), batch 32, paged KV of 16-token blocks, CUDA-graph decode
   steps (the LoRA kernels captured in the graph): Punica's mixed-adapter continuous batching (admit
   at most one request per step, rows sorted by adapter) on 256 requests, vs the same-adapter
   baseline (vLLM-like continuous batching restricted to consecutive requests of one adapter) on the
   first 32, for each popularity. Adapter ids are aliased onto at most 64 distinct weight sets in
   host memory; each id is still loaded into its own device slot on demand. Each run stops at a time
   cap (recorded with the number of requests finished); throughput = output tokens / wall time.

Results: ``data/results/punica/<gpu>.json`` (or ``--out``); written after each part, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from ..bench import (
    copy_bandwidth,
    device_peaks,
    measure_graphed,
    roofline,
    save_results,
)
from ..models import preset, random_llama
from ..serving.lora import AdapterWeights, attach_lora
from ..serving.scheduler import SchedulerConfig
from .backends import make_backend
from .engine import LoRAEngine, PunicaScheduler, SameAdapterScheduler, punica_config
from .sgmv import (
    SGMVConfig,
    _default_sgmv_config,
    _shrink_split,
    bgmv_expand,
    bgmv_shrink,
    lora_bgmv,
    lora_gather_bmm,
    lora_loop,
    lora_ref,
    lora_sgmv,
    segments_from_indptr,
    set_sgmv_configs,
    sgmv_config,
    sgmv_configs,
)
from .workload import POPULARITIES, popularity_segments, punica_requests

SLUG = "punica"
PROVIDERS = ("dense", "loop", "gather_bmm", "bgmv", "sgmv")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------
# operators
# ------------------------------------------------------------------------------------------------
def _pools(n_slots, h1, h2, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    A = (torch.randn(n_slots, h1, r, generator=g, device=device) * h1**-0.5).to(dtype)
    B = (torch.randn(n_slots, r, h2, generator=g, device=device) * 0.02).to(dtype)
    scale = torch.full((n_slots,), 2.0, device=device)
    return A, B, scale


def _batch(bs, popularity):
    lens = popularity_segments(bs, popularity)
    indptr = np.concatenate([[0], np.cumsum(lens)]).tolist()
    seg_slot = list(range(len(lens)))
    rows = np.repeat(np.arange(len(lens)), lens)
    return indptr, seg_slot, rows


def _time(fn, device, repeats: int, mode: str, warmup: int = 3):
    """Median timing of ``fn``: ``eager`` = as called from Python (host launch cost included when it
    exceeds the GPU work), ``graph`` = replayed from a CUDA graph (the device time, as in a serving
    engine's captured decode step)."""
    return measure_graphed(fn, graph=mode == "graph", warmup=warmup, repeats=repeats, device=device)


def _split_for(target_programs: int, n_tiles: int, k_blocks: int) -> int:
    return max(1, min(k_blocks, math.ceil(target_programs / max(1, n_tiles))))


def _rel_err(out, ref) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _tune_sgmv(x, A, B, scale, seg, y, ref, repeats, device, mode, deadline=None) -> tuple[SGMVConfig, float, list]:
    """Coordinate search of SGMV's launch config at one (shape, batch): the split-K reduction
    (workspace / serial / atomics) x programmatic dependent launch; the expand's form (one program
    per N tile, or runs of tiles per program; the row-by-row kernel for one-row tiles), N tile and
    warps; split-K x K step; warps again. Every trial is checked against the float32 reference first
    (a wrong config is rejected)."""
    R = A.shape[2]
    trials: list[dict] = []

    def trial(cfg: SGMVConfig):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        try:
            err = _rel_err(lora_sgmv(x, A, B, scale, seg, torch.zeros_like(y), config=cfg), ref)
            if not err <= 2e-2:
                raise ValueError(f"wrong result (rel err {err:.2e})")
            us = _time(lambda: lora_sgmv(x, A, B, scale, seg, y, config=cfg), device, repeats, mode).median_s * 1e6
        except Exception as e:  # a config that fails to compile / launch / verify is skipped
            trials.append({**cfg.as_dict(), "us": None, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            return None
        trials.append({**cfg.as_dict(), "us": us})
        return us

    best_cfg = _default_sgmv_config(R)
    best = trial(best_cfg)
    best = float("inf") if best is None else best

    def consider(cfg):
        nonlocal best, best_cfg
        if cfg == best_cfg:
            return
        t = trial(cfg)
        if t is not None and t < best:
            best, best_cfg = t, cfg

    stage = best_cfg
    for red, pdl in (("workspace", True), ("serial", True), ("atomic", True), ("atomic", False)):
        consider(replace(stage, reduce=red, pdl=pdl))
    # the expand: one program per N tile, or programs walking runs of tiles (fewer, longer programs)
    stage = best_cfg
    for eps in (0.0, 2, 8):
        for bn in ((64, 128, 256) if eps == 0 else (64, 128)):
            for nw in ((4, 8) if eps == 0 else (4,)):
                consider(replace(stage, expand_per_sm=eps, block_n=bn, num_warps=nw))
    # decode batches (tiles of one row): the row-by-row expand
    if seg.max_tile_rows == 1:
        stage = best_cfg
        for bn in ((128, 256, 512) if R <= 32 else (64, 128)):
            consider(replace(stage, expand_rows=1, rows_block_n=bn))
    stage = best_cfg
    for pps in (0.5, 1, 2, 4, 8):  # 66 .. 1056 shrink programs on a 132-SM GPU
        for bk in ((64, 128, 256) if R <= 32 else (32, 64, 128)):
            consider(replace(stage, programs_per_sm=pps, block_k=bk))
    stage = best_cfg
    for nw in (4, 8):
        consider(replace(stage, num_warps=nw))
    return best_cfg, best, trials


def _tune_bgmv(x, A, B, scale, idx, y, repeats, device, mode) -> dict:
    """BGMV's split-K target and N tile at this shape (batch 64 Distinct)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    k_blocks = math.ceil(A.shape[1] / 64)
    best, trials = None, []
    for mult in (2, 8):
        for block_n in (64, 128, 256):
            split = _split_for(mult * sms, x.shape[0], k_blocks)

            def fn(split=split, block_n=block_n):
                v = torch.zeros(x.shape[0], A.shape[2], dtype=torch.float32, device=x.device)
                bgmv_shrink(v, x, A, idx, split_k=split)
                return bgmv_expand(y, v, B, idx, scale, block_n=block_n)
            t = _time(fn, device, repeats, mode).median_s
            trials.append({"programs_per_sm": mult, "block_n": block_n, "split_k": split, "us": t * 1e6})
            if best is None or t < best[0]:
                best = (t, mult, block_n)
    return {"programs_per_sm": best[1], "block_n": best[2], "us": best[0] * 1e6, "trials": trials, "sms": sms}


def operator_bench(*, device, dtype=torch.float16, h1=4096, h2s=(4096, 11008), ranks=(16, 32, 64),
                   batches=(1, 2, 4, 8, 16, 32, 64), popularities=POPULARITIES, providers=PROVIDERS,
                   repeats=50, tune=True, tune_batches=(1, 8, 64), tune_budget_s=None, modes=None,
                   eager_batches=None, log=print) -> list[dict]:
    device = torch.device(device)
    modes = modes or (("graph", "eager") if device.type == "cuda" else ("eager",))
    n_slots = max(batches)
    recs: list[dict] = []
    tune_deadline = None if tune_budget_s is None else time.perf_counter() + tune_budget_s
    gen = torch.Generator(device=device).manual_seed(1)
    for h2 in h2s:
        W = torch.randn(h1, h2, generator=gen, device=device).to(dtype) * 0.02
        for r in ranks:
            A, B, scale = _pools(n_slots, h1, h2, r, dtype, device, seed=h2 + r)
            host_scale = scale.tolist()
            bg = {"programs_per_sm": None, "block_n": None}
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            bmax = max(batches)
            if tune and "sgmv" in providers:
                # SGMV: a config per number of tiles (1, 8, 64 distinct adapters), measured now and
                # installed, so the timings below (and a serving run after) use what was measured
                table = sgmv_configs()
                table[(h1, h2, r)] = []
                for bs_t in sorted({b for b in tune_batches if b <= bmax}):
                    indptr, seg_slot, rows = _batch(bs_t, "distinct")
                    seg = segments_from_indptr(indptr, seg_slot, device=device)
                    x = torch.randn(bs_t, h1, generator=gen, device=device).to(dtype)
                    y = torch.zeros(bs_t, h2, dtype=dtype, device=device)
                    ref = lora_ref(x, A, B, scale, rows.tolist())
                    best, us, trials = _tune_sgmv(x, A, B, scale, seg, y, ref, max(5, repeats // 4), device, modes[0],
                                                  deadline=tune_deadline)
                    if not math.isfinite(us):  # out of tuning time: this shape keeps the nearest tuned / default
                        log(f"tuning sgmv h2={h2} r={r} bs={bs_t}: skipped (tuning budget spent)")
                        continue
                    table[(h1, h2, r)].append((seg.capacity, best))
                    recs.append({"kind": "tuning", "op": "sgmv", "h1": h1, "h2": h2, "r": r, "bs": bs_t,
                                 "capacity": seg.capacity, "best": best.as_dict(), "us": us, "trials": trials})
                    log(f"tuned sgmv h2={h2} r={r} bs={bs_t}: {us:.1f} us with {best} ({len(trials)} trials)")
                if not table[(h1, h2, r)]:
                    del table[(h1, h2, r)]
                set_sgmv_configs(table)
            if tune and "bgmv" in providers and (tune_deadline is None or time.perf_counter() < tune_deadline):
                indptr, seg_slot, rows = _batch(bmax, "distinct")
                x = torch.randn(bmax, h1, generator=gen, device=device).to(dtype)
                y = torch.zeros(bmax, h2, dtype=dtype, device=device)
                idx = torch.as_tensor(rows, dtype=torch.int32, device=device)
                bg = _tune_bgmv(x, A, B, scale, idx, y, max(5, repeats // 5), device, modes[0])
                recs.append({"kind": "tuning", "op": "bgmv", "h1": h1, "h2": h2, "r": r, "bs": bmax, **bg})
                log(f"tuned bgmv h2={h2} r={r}: {bg['us']:.1f} us, {bg['programs_per_sm']}/SM, block_n {bg['block_n']}")
            k_blocks = math.ceil(h1 / 64)
            for bs in batches:
                x = torch.randn(bs, h1, generator=gen, device=device).to(dtype)
                y = torch.zeros(bs, h2, dtype=dtype, device=device)
                bs_modes = [m for m in modes if m == modes[0] or eager_batches is None or bs in eager_batches]
                if "dense" in providers and r == ranks[0]:  # the backbone does not depend on r
                    for mode in bs_modes:
                        t = _time(lambda: torch.mm(x, W), device, repeats, mode)
                        recs.append({"kind": "op", "mode": mode, "provider": "dense", "h1": h1, "h2": h2, "r": None,
                                     "bs": bs, "popularity": "any", "n_segments": 0, "median_us": t.median_us,
                                     "p10_us": t.p10_s * 1e6, "p90_us": t.p90_s * 1e6,
                                     **roofline(t.median_s, bytes=(h1 * h2 + bs * (h1 + h2)) * x.element_size(),
                                                flops=2 * bs * h1 * h2, device=t.device)})
                for pop in popularities:
                    indptr, seg_slot, rows = _batch(bs, pop)
                    S = len(seg_slot)
                    seg = segments_from_indptr(indptr, seg_slot, device=device)
                    idx = torch.as_tensor(rows, dtype=torch.int32, device=device)
                    must_move = (S * (h1 * r + r * h2) + bs * h1 + 2 * bs * h2) * x.element_size()
                    flops = 2 * bs * r * (h1 + h2)
                    sg_cfg = sgmv_config(h1, h2, r, seg.capacity)
                    sg_splits = _shrink_split(h1, r, seg.block_m, seg.capacity, device, sg_cfg, None)[1]
                    sg_err = (_rel_err(lora_sgmv(x, A, B, scale, seg, torch.zeros_like(y), config=sg_cfg),
                                       lora_ref(x, A, B, scale, rows.tolist())) if "sgmv" in providers else None)
                    bg_split = (_split_for(bg["programs_per_sm"] * sms, bs, k_blocks)
                                if bg["programs_per_sm"] else None)
                    fns = {
                        "loop": lambda: lora_loop(x, A, B, host_scale, seg, y),
                        "gather_bmm": lambda: lora_gather_bmm(x, A, B, scale, idx, y),
                        "bgmv": lambda: lora_bgmv(x, A, B, scale, idx, y, split_k=bg_split),
                        "sgmv": lambda: lora_sgmv(x, A, B, scale, seg, y, config=sg_cfg),
                    }
                    for prov in providers:
                        if prov == "dense":
                            continue
                        for mode in bs_modes:
                            t = _time(fns[prov], device, repeats, mode)
                            recs.append({"kind": "op", "mode": mode, "provider": prov, "h1": h1, "h2": h2, "r": r,
                                         "bs": bs, "popularity": pop, "n_segments": S, "median_us": t.median_us,
                                         "p10_us": t.p10_s * 1e6, "p90_us": t.p90_s * 1e6,
                                         **roofline(t.median_s, bytes=must_move, flops=flops, device=t.device),
                                         **({"config": sg_cfg.as_dict(), "n_splits": sg_splits, "max_rel_err": sg_err}
                                            if prov == "sgmv" else {})})
            # correctness at the largest batch, every provider, against the float32 reference
            for pop in ("distinct", "skewed"):
                indptr, seg_slot, rows = _batch(bmax, pop)
                seg = segments_from_indptr(indptr, seg_slot, device=device)
                idx = torch.as_tensor(rows, dtype=torch.int32, device=device)
                x = torch.randn(bmax, h1, generator=gen, device=device).to(dtype)
                ref = lora_ref(x, A, B, scale, rows.tolist())
                outs = {"loop": lora_loop(x, A, B, host_scale, seg), "gather_bmm": lora_gather_bmm(x, A, B, scale, idx),
                        "bgmv": lora_bgmv(x, A, B, scale, idx), "sgmv": lora_sgmv(x, A, B, scale, seg)}
                for prov, out in outs.items():
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    recs.append({"kind": "check", "provider": prov, "h2": h2, "r": r, "bs": bmax, "popularity": pop,
                                 "max_rel_err": err})
            log(f"ops h2={h2} r={r} done")
    return recs


# ------------------------------------------------------------------------------------------------
# serving
# ------------------------------------------------------------------------------------------------
def random_adapter_sets(model, n_sets: int, rank: int, *, seed: int = 0, targets=TARGETS) -> list[AdapterWeights]:
    """``n_sets`` random adapters (A ~ N(0, 1/d_in), B ~ N(0, 0.02)), generated on the model's
    device in its dtype and kept in (pinned, when on CUDA) host memory."""
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets}
    if not shapes:  # already wrapped by attach_lora
        shapes = {n: (m.base.in_features, m.base.out_features) for n, m in model.named_modules()
                  if hasattr(m, "base") and n.split(".")[-1] in targets}
    pin = dev.type == "cuda"
    out = []
    for _ in range(n_sets):
        ad = AdapterWeights(rank, float(2 * rank))
        for n, (di, do) in shapes.items():
            a = (torch.randn(di, rank, generator=g, device=dev) * di**-0.5).to(dtype)
            b = (torch.randn(rank, do, generator=g, device=dev) * 0.02).to(dtype)
            ad.A[n] = a.cpu().pin_memory() if pin else a.cpu()
            ad.B[n] = b.cpu().pin_memory() if pin else b.cpu()
        out.append(ad)
    return out


def _serve(eng: LoRAEngine, scheduler, requests, cap_s: float, rid_offset: int) -> dict:
    """Serve ``requests`` (all at t = 0) on ``eng`` with ``scheduler`` until done or ``cap_s``."""
    from ..serving.request import Request

    eng.scheduler = scheduler
    seqs = []
    for r in requests:
        seqs.append(eng.add_request(Request(r.rid + rid_offset, r.prompt, r.max_new_tokens, adapter_id=r.adapter_id)))
    stats0 = dict(vars(eng.lora.backend.registry.stats))
    first_step = len(eng.steps)
    eng._sync()
    t0 = time.perf_counter()
    while scheduler.has_work() and time.perf_counter() - t0 < cap_s:
        eng.step()
    eng._sync()
    wall = time.perf_counter() - t0
    steps = eng.steps[first_step:]
    # release what the cap left running, so the engine can serve the next run
    for s in list(scheduler.running):
        eng.cache.free_sequence(s.rid)
    scheduler.running.clear()
    scheduler.waiting.clear()
    scheduler.swapped.clear()
    tokens = sum(len(s.output) for s in seqs)
    dec = [st for st in steps if st.prefill_tokens == 0 and st.rows > 0]
    stats1 = vars(eng.lora.backend.registry.stats)
    sample = steps[:: max(1, len(steps) // 300)]
    return {
        "n_requests": len(requests), "finished": sum(1 for s in seqs if s.finished), "output_tokens": tokens,
        "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        "decode_tokens_per_s": (sum(st.decode_rows for st in dec) / sum(st.duration_s for st in dec)) if dec else None,
        "steps": len(steps), "prefill_steps": sum(1 for st in steps if st.prefill_tokens > 0),
        "mean_decode_rows": statistics.fmean(st.rows for st in dec) if dec else 0.0,
        "decode_step_ms_median": statistics.median(st.duration_s for st in dec) * 1e3 if dec else None,
        "prefill_step_ms_median": (statistics.median(st.duration_s for st in steps if st.prefill_tokens > 0) * 1e3
                                   if any(st.prefill_tokens > 0 for st in steps) else None),
        "adapter_loads": stats1["loads"] - stats0["loads"],
        "adapter_load_s": stats1["load_seconds"] - stats0["load_seconds"],
        "capped": any(not s.finished for s in seqs),
        "step_samples": [[st.rows, st.prefill_tokens, round(st.duration_s, 6)] for st in sample],
    }


def e2e_bench(model, *, popularities=POPULARITIES, n_requests=256, n_baseline=32, maxlen=512, max_batch=32,
              rank=16, n_sets=64, n_slots=64, caps=None, backend="sgmv", graphs=True, seed=0,
              block_size=16, deadline=None, log=print, sink: list | None = None) -> list[dict]:
    """Punica vs the same-adapter baseline per popularity on one engine (graphs captured once).

    sink: a list that receives each record as soon as it exists (kept if a later run fails)."""
    caps = caps or {}
    p = next(model.parameters())
    be = make_backend(backend, model, rank=rank, n_slots=n_slots, device=p.device, dtype=p.dtype)
    ctx = attach_lora(model, be)
    sets = random_adapter_sets(model, n_sets, rank, seed=seed)
    n_blocks = max_batch * math.ceil(maxlen / block_size) + 8
    eng = LoRAEngine(model, PunicaScheduler(punica_config(max_batch)), n_blocks=n_blocks, block_size=block_size,
                     lora=ctx, decode_graphs=graphs, context_bucket=256)
    recs = sink if sink is not None else []
    offset = 0
    vocab = model.cfg.vocab_size
    for pop in popularities:
        reqs = punica_requests(n_requests, pop, maxlen=maxlen, vocab=vocab, seed=seed)
        for a in sorted({r.adapter_id for r in reqs}):
            if a not in be.adapters:
                be.load(a, sets[a % n_sets])
        runs = [("punica", PunicaScheduler(punica_config(max_batch)), reqs),
                ("same_adapter", SameAdapterScheduler(SchedulerConfig("orca", max_batch_size=max_batch), static=False),
                 reqs[:n_baseline])]
        for system, sch, rs in runs:
            cap = caps.get((system, pop), caps.get(system, 60.0))
            if deadline is not None:
                cap = min(cap, deadline - time.perf_counter())
                if cap < 5:
                    recs.append({"kind": "e2e_skipped", "system": system, "popularity": pop, "reason": "time budget"})
                    log(f"e2e {system} {pop}: skipped (time budget)")
                    continue
            r = _serve(eng, sch, rs, cap, offset)
            offset += 10 * len(reqs) + 1000
            r.update({"kind": "e2e", "system": system, "popularity": pop, "backend": backend, "graphs": graphs,
                      "max_batch": max_batch, "maxlen": maxlen, "rank": rank, "n_weight_sets": n_sets,
                      "distinct_ids": len({x.adapter_id for x in rs}), "cap_s": cap})
            recs.append(r)
            log(f"e2e {system:12s} {pop:9s}: {r['tokens_per_s']:.0f} tok/s (decode {r['decode_tokens_per_s'] or 0:.0f}), "
                f"{r['finished']}/{r['n_requests']} finished in {r['wall_s']:.1f}s, "
                f"decode step {r['decode_step_ms_median'] or 0:.1f} ms, prefill step {r['prefill_step_ms_median'] or 0:.1f} ms")
    if eng.decode_graphs is not None:
        recs.append({"kind": "graphs", "replays": eng.decode_graphs.replays, "calls": eng.decode_graphs.calls,
                     "captured": len(eng.decode_graphs._graphs)})
    return recs


# ------------------------------------------------------------------------------------------------
def _headline(records: list[dict]) -> dict | None:
    e2e = {(r["system"], r["popularity"]): r for r in records if r.get("kind") == "e2e"}
    if ("punica", "distinct") not in e2e or ("same_adapter", "distinct") not in e2e:
        return None
    p, b = e2e[("punica", "distinct")], e2e[("same_adapter", "distinct")]
    return {"name": "text-generation throughput, Distinct adapters, Llama-2-7B shapes: Punica / same-adapter batching",
            "ours": p["tokens_per_s"] / b["tokens_per_s"], "unit": "x", "paper": 1053 / 87,
            "paper_source": "Punica README textgen.png, A100 80GB: Punica 1053 vs vLLM (w/o LoRA) 87 tok/s",
            "punica_tok_s": p["tokens_per_s"], "baseline_tok_s": b["tokens_per_s"]}


def run(args) -> str:
    if not torch.cuda.is_available():
        raise SystemExit("the punica benchmark needs a CUDA GPU (CPU paths are covered by tests/lora)")
    ap = argparse.ArgumentParser(prog="mlsys24.bench punica")
    ap.add_argument("--budget", type=float, default=380.0, help="seconds for the whole benchmark")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    extra = ap.parse_args(getattr(args, "extra", None) or [])
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None)
    t_start = time.perf_counter()
    deadline = t_start + extra.budget
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    records: list[dict] = []
    config = {"quick": quick, "budget_s": extra.budget, "dtype": "float16", "h1": 4096,
              "h2s": [11008, 4096] if not quick else [11008], "ranks": [16, 64, 32] if not quick else [16, 64],
              "batches": [1, 2, 4, 8, 16, 32, 64], "repeats": 20 if quick else 50, "warmup": 3,
              "tune_budget_s": 40.0 if quick else min(140.0, 0.38 * extra.budget), "eager_batches": [1, 64],
              "datasheet_GBps": device_peaks().hbm_GBps}

    def save():
        return save_results(SLUG, records, headline=_headline(records), config=config, out_dir=out)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    config["copy_GBps"] = copy_bandwidth(dev)[1]  # the practical HBM ceiling on this GPU, measured now
    log(f"copy {config['copy_GBps']:.0f} GB/s")

    if not extra.no_ops:
        records += operator_bench(device=dev, h2s=tuple(config["h2s"]), ranks=tuple(config["ranks"]),
                                  batches=tuple(config["batches"]), repeats=config["repeats"],
                                  tune_budget_s=config["tune_budget_s"], eager_batches=tuple(config["eager_batches"]),
                                  log=log)
        config["sgmv_configs"] = {f"{k[0]}x{k[1]}x{k[2]}": [[c, cfg.as_dict()] for c, cfg in v]
                                  for k, v in sgmv_configs().items()}
        path = save()
        log(f"saved {path}")
        torch.cuda.empty_cache()

    if not extra.no_e2e:
        model = random_llama(preset("llama2-7b"), "cuda", torch.float16)
        config.update({"e2e_model": "Llama-2-7B shapes, random fp16 weights", "e2e_rank": 16, "e2e_maxlen": 512,
                       "e2e_max_batch": 32, "e2e_requests": 256, "e2e_baseline_requests": 32,
                       "e2e_weight_sets": 64})
        remaining = deadline - time.perf_counter()
        scale = max(0.2, min(1.0, remaining / 250.0))
        caps = {("punica", "distinct"): 60 * scale, ("same_adapter", "distinct"): 35 * scale,
                "punica": 25 * scale, "same_adapter": 20 * scale}
        if quick:
            caps = {"punica": 10.0, "same_adapter": 8.0}
        config["e2e_caps_s"] = {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in caps.items()}
        for graphs in (True, False):  # CUDA-graph decode first; eager decode if that path fails
            failed = None
            try:
                e2e_bench(model, caps=caps, deadline=deadline - 5, log=log, graphs=graphs, sink=records,
                          popularities=POPULARITIES if not quick else ("distinct", "identical"))
            except Exception as e:  # report, keep what was measured
                failed = f"{type(e).__name__}: {str(e)[:400]}"
            save()
            if failed is None:
                break
            records.append({"kind": "e2e_error", "graphs": graphs, "error": failed})
            log(f"e2e (graphs={graphs}) FAILED: {failed}")
            del model  # the engine of the failed run goes with it (the exception is out of scope here)
            gc.collect()
            torch.cuda.empty_cache()
            if graphs is False or deadline - time.perf_counter() < 60:
                break
            model = random_llama(preset("llama2-7b"), "cuda", torch.float16)
            caps = {k: v * 0.5 for k, v in caps.items()}
    config["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    path = save()
    log(f"saved {path}")
    from .report import gpu_claims
    for name, c in gpu_claims(records, copy_GBps=config.get("copy_GBps")).items():
        log(f"claim {name}: " + ("not measured" if c is None else
                                 f"{c['value']:.3g} (target {c['target']}) {'OK' if c['ok'] else 'MISSED'} · {c['detail']}"))
    return str(path)
