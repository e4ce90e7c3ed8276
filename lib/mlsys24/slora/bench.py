"""GPU benchmark of S-LoRA (``python -m mlsys24.slora.bench [--quick] [--out DIR]``).

Llama-2-7B-shaped layers (d 4096, 32 heads × 128, FFN 11008, vocab 32000; ``--layers`` of them, random
fp16 weights), adapters of ranks {8, 16, 32, 64} on q, k, v, o. ``n`` adapter ids share at most
``--sets`` distinct random weight sets per rank (aliased onto the ids; every id is still paged into its
own pool slots). Workload: S-LoRA's trace generator, Poisson arrivals at ``--rate`` req/s for
``--duration`` s, input/output lengths U[8, 512); throughput counted over a fixed ``--window`` (no drain).

Systems: S-LoRA at n ∈ {5, 100, 1000}; S-LoRA-bmm, S-LoRA without unified pool and PEFT-style at
n = 100; merged copies at n = 5 (and the n = 100 copies' memory, which do not fit). Also records pool
memory (peak adapter + KV slots in bytes) against merged copies of the full 32-layer model.
Results: ``data/results/slora/<gpu>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch

from ..bench import save_results
from ..models import preset, random_llama
from ..serving.lora import AdapterWeights
from .adapters import HostAdapter
from .engine import MergedServer, SLoRAEngine, model_bytes, serve, slora_trace, slot_bytes

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


def run(args) -> Path:
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    layers = getattr(args, "layers", None) or (4 if cuda and not quick else 2)
    policy = getattr(args, "policy", None) or ("vllm" if cuda and not quick else "orca")
    attention = getattr(args, "attention", None) or ("paged" if cuda else "gather")
    warm_s = getattr(args, "warm", None)
    warm_s = (6.0 if cuda and not quick else 0.0) if warm_s is None else float(warm_s)
    if policy not in ("vllm", "orca"):
        raise SystemExit(f"--policy {policy!r}: expected 'vllm' or 'orca'")
    if attention not in ("paged", "gather"):
        raise SystemExit(f"--attention {attention!r}: expected 'paged' or 'gather'")
    if attention == "paged" and not cuda:
        raise SystemExit("--attention paged needs a GPU (the Triton decode kernel reads the pool in place)")
    if warm_s < 0:
        raise SystemExit(f"--warm {warm_s}: expected seconds >= 0")
    if cuda and not quick:
        cfg = preset("llama2-7b", n_layers=layers)
        rate, duration, window = getattr(args, "rate", 10.0), getattr(args, "duration", 20.0), getattr(args, "window", 25.0)
        len_range, pool_slots, region, sets, max_batch = (8, 512), 40000, 32 * 4 * 64, getattr(args, "sets", 16), 64
        ns = [5, 100, 1000]
    else:  # CPU / quick: tiny shapes, same code path
        cfg = preset("tiny", n_layers=layers) if not cuda else preset("llama2-7b", n_layers=layers)
        rate, duration, window = 10.0, 2.0, 30.0
        len_range, pool_slots, region, sets, max_batch = (8, 24), 4000, 8 * 4 * 64, 2, 32
        ns = [5, 20, 50]
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model = random_llama(cfg, dev, dtype, seed=0)
    if attention == "paged":   # decode attention over the token-granular pool in place (no K/V gather)
        from ..models.fast_decode import PagedDecodeAttention

        model.set_attention_backend(PagedDecodeAttention("sync"))
    log(f"model {cfg.n_layers} layers d={cfg.d_model} on {dev} ({model_bytes(model) / 2**30:.2f} GiB)")
    hosts = _adapter_sets(cfg, sets, dtype, seed=1)
    n_req = int(rate * duration)
    sb = slot_bytes(cfg, torch.finfo(dtype).bits // 8)
    records = []

    def adapters_for(n):
        packed = {a: hosts[RANKS[a % len(RANKS)]][(a // len(RANKS)) % sets] for a in range(n)}
        return {a: AdapterWeights(h.rank, 2.0 * h.rank) for a, h in packed.items()}, packed

    time_budget = float(getattr(args, "budget", None) or 1e9)

    budget = torch.cuda.get_device_properties(0).total_memory if cuda else 8 * 2**30  # device memory (bytes)

    def build(system, n):
        ws, packed = adapters_for(n)
        if system == "merged":
            fits_scaled = n * model_bytes(model) <= budget - pool_slots * sb
            srv = MergedServer(model, {a: _weights_for_merge(packed[a]) for a in ws} if fits_scaled else {},
                               budget_bytes=budget, pool_slots=pool_slots, max_batch_size=max_batch, policy=policy)
            srv.fits = fits_scaled
            srv.need_bytes = n * model_bytes(model)
            return srv
        eng = SLoRAEngine(model, system, pool_slots=pool_slots, adapter_region=region, max_batch_size=max_batch,
                          policy=policy)
        eng.add_adapters(ws, packed)
        return eng

    def one(system, n):
        if time.perf_counter() - t0 + warm_s + window + 15 > time_budget:
            log(f"{system} n={n}: skipped (time budget {time_budget:.0f} s)")
            return
        reqs = slora_trace(n_req, n, rate=rate, len_range=len_range, vocab=cfg.vocab_size, seed=7)
        srv = build(system, n)
        if warm_s > 0 and getattr(srv, "fits", True):
            # an unmeasured warm-up on the same engine's code paths (kernel compiles, allocator growth, cuBLAS
            # heuristics), on another trace; the measured run then starts from a fresh engine of the same system
            serve(srv, slora_trace(n_req, n, rate=rate, len_range=len_range, vocab=cfg.vocab_size, seed=99),
                  window_s=warm_s)
            del srv
            gc.collect()
            srv = build(system, n)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        res = serve(srv, reqs, window_s=window)
        if system == "merged":
            full_copy = 2 * sum(int(np.prod(s)) for s in _full_7b_param_shapes())
            res.update(full7b_copies_bytes=n * full_copy, full7b_fits=n * full_copy <= budget)
        else:
            res.update(pool_bytes=pool_slots * sb, peak_adapter_bytes=res["peak_adapter_slots"] * sb,
                       peak_kv_bytes=res["peak_kv_slots"] * sb, mean_step_ms=1e3 * window / max(1, res["steps"]))
        del srv
        if cuda:
            res["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        rec = {"system": system, "n_adapters": n, **res}
        records.append(rec)
        log(f"{system:9s} n={n:5d}: {res['throughput_rps']:.2f} req/s, finished {res['finished']}/{n_req}"
            + ("  OOM" if res.get("oom") else ""))
        gc.collect()

    if cuda:   # (CPU runs use the PyTorch path of the same gather)
        _warm_kernels(dev, dtype, cfg.d_model)
        log("kernels compiled (every BLOCK_R of MBGMM and MBGMV)")
    one("slora", ns[0])
    for system, n in [("slora", ns[1]), ("slora", ns[2]), ("bmm", ns[1]), ("no_unify", ns[1]), ("peft", ns[1]),
                      ("merged", ns[0]), ("merged", ns[1])]:
        one(system, n)
    by = {(r["system"], r["n_adapters"]): r for r in records}
    thr = {k: v["throughput_rps"] for k, v in by.items()}

    def ratio(a, b):
        return thr[a] / thr[b] if a in thr and b in thr and thr[b] > 0 else None

    headline = {"name": f"S-LoRA throughput n={ns[2]} / n={ns[0]}", "ours": ratio(("slora", ns[2]), ("slora", ns[0])),
                "unit": "ratio", "paper": 0.89,
                "vs_peft_n100": ratio(("slora", ns[1]), ("peft", ns[1])),
                "vs_bmm_n100": ratio(("slora", ns[1]), ("bmm", ns[1]))}
    config = {"quick": quick or not cuda, "warm_up": True, "warm_s": warm_s, "policy": policy,
              "attention": attention, "layers": cfg.n_layers, "d_model": cfg.d_model, "ranks": list(RANKS),
              "distinct_sets_per_rank": sets, "rate": rate, "duration_s": duration, "window_s": window,
              "len_range": list(len_range), "pool_slots": pool_slots, "adapter_region_slots": region,
              "slot_bytes": sb, "max_batch_size": max_batch, "n_adapters": ns, "dtype": str(dtype)}
    path = save_results(SLUG, records, headline=headline, config=config, out_dir=out)
    log(f"wrote {path}")
    return path


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
    ap.add_argument("--layers", type=int, default=None, help="7B-shaped layers (default 4 on GPU)")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    ap.add_argument("--window", type=float, default=25.0, help="throughput window (s), no drain")
    ap.add_argument("--budget", type=float, default=None, help="seconds; later runs are skipped past it")
    ap.add_argument("--sets", type=int, default=16, help="distinct weight sets per rank (<= 64)")
    ap.add_argument("--policy", default=None, help="vllm (prefill steps apart, as S-LoRA/LightLLM; GPU default) or "
                                                  "orca (mixed padded steps; CPU default)")
    ap.add_argument("--attention", default=None, help="paged (decode kernel on the pool in place; GPU default) or "
                                                     "gather (K/V gathered per step)")
    ap.add_argument("--warm", type=float, default=None, help="seconds of unmeasured warm-up serving before each run "
                                                            "(default 6 on GPU, 0 on CPU)")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
