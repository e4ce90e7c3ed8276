"""Decode latency and throughput vs KV budget: Full cache vs Keyformer / H2O at 50 % (GPU benchmark).

A random-weight Llama-2-7B-shaped model (fp16; 32 layers, 32 heads x 128) decodes with a
:class:`~mlsys24.kvcache.compact.PolicyKVCache` after prompts of 2K / 4K / 8K tokens:

- Full: the append-only cache (capacity prompt + 512 generated tokens reserved), attention by the
  split-KV decode kernel of :mod:`mlsys24.kernels.decode_attention` (FlashDecoding, card 11);
- Keyformer-50 % / H2O-50 %: compacted cache of ``k + 1`` slots per (layer, head); attention in two
  Triton passes that write the logits the score needs (:mod:`.score_attention`), then Gumbel noise,
  score update and in-place eviction every step;
- window-50 %: the same compacted cache with card 11's fused kernel and no scoring (isolates the
  scoring overhead).

Each decode step is captured in a CUDA graph (the cache's step state lives on the device) and
replayed with :func:`mlsys24.bench.measure` (CUDA events, L2 flushed, median); eager timings are kept
too. Batches: 1, the largest that fits with the Full cache (from free memory after the weights), and
the largest that fits at 50 %. The prompt phase is not timed per config: the caches are filled with
random K/V in the steady state (timing does not depend on values); one real 8K prompt is run
through the model with chunked scoring to show the prompt path at scale (time, peak memory).

``python -m mlsys24.kvcache.bench [--quick] [--out DIR]`` (``--quick``: 2K/8K only, fewer repeats;
on a machine without CUDA it runs a tiny model on CPU to exercise the code path).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..bench import CUDAGraphed, measure, save_results
from ..models.config import preset
from ..models.loading import random_llama
from .compact import PolicyKVCache
from .evaluate import policy_backend
from .policies import KVPolicyConfig

SLUG = "keyformer"
GEN_RESERVED = 512
_TRITON_FAILED: list = []  # tokens reserved for generation in the Full cache (the card's generate-512)


def fill_steady_state(cache: PolicyKVCache, generator: torch.Generator | None = None) -> None:
    """Put ``cache`` in the state right after a prompt (random K/V, kept positions, random scores)."""
    n, kk = cache.prompt_len, (cache.k_budget if cache.evicting else cache.prompt_len)
    for layer in range(cache.n_layers):
        cache.k_buf[layer, :, :, :kk].normal_(generator=generator)
        cache.v_buf[layer, :, :, :kk].normal_(generator=generator)
    if cache.evicting:  # keep the last k positions (values do not matter for timing)
        cache.pos[..., :kk] = torch.arange(n - kk, n, device=cache.device)
        cache.free.fill_(kk)
    else:
        cache.pos[..., :kk] = torch.arange(kk, device=cache.device)
    if cache.score is not None:
        cache.score[..., :kk].uniform_(generator=generator)
    cache.n_seen, cache.n_valid = n, kk
    cache._pos_t.fill_(n)


def _step_fn(model, cache, tok):
    def step():
        return model(tok, kv_cache=cache)
    return step


def _time_decode(model, cfg, policy, batch, n, dtype, dev, repeats, graphs: bool) -> dict:
    attn = "triton" if (dev.type == "cuda" and not _TRITON_FAILED) else "torch"
    cache = PolicyKVCache(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, batch, n, GEN_RESERVED, policy,
                          dtype=dtype, device=dev, attn=attn, noise_by_position=False, rng="global")
    fill_steady_state(cache)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
    rec = {"bench": "decode", "policy": policy.label, "policy_name": policy.name, "kv_budget": policy.kv_budget,
           "prompt_len": n, "batch": batch, "kept_tokens": cache.n_valid, "capacity_slots": cache.capacity,
           "kv_bytes": cache.nbytes(), "attention": attn}
    with policy_backend(model), torch.no_grad():
        fn = _step_fn(model, cache, tok)
        try:
            t = measure(fn, warmup=2, repeats=max(3, repeats // 2))
        except Exception as e:  # the Triton decode kernel failed: fall back to PyTorch attention
            if attn != "triton":
                raise
            _TRITON_FAILED.append(repr(e)[:300])
            cache.attn = rec["attention"] = "torch"
            rec["triton_error"] = _TRITON_FAILED[-1]
            t = measure(fn, warmup=2, repeats=max(3, repeats // 2))
        rec["eager_ms"] = t.median_ms
        if graphs and dev.type == "cuda":
            try:
                g = CUDAGraphed(fn)
                tg = measure(g.replay, warmup=2, repeats=repeats)
                rec["graph_ms"] = tg.median_ms
                rec["graph_p10_ms"], rec["graph_p90_ms"] = tg.p10_s * 1e3, tg.p90_s * 1e3
            except Exception as e:  # a capture failure is reported, the eager number stands
                rec["graph_error"] = repr(e)[:200]
    rec["step_ms"] = rec.get("graph_ms", rec["eager_ms"])
    rec["tokens_per_s"] = batch / rec["step_ms"] * 1e3
    rec["decode_steps_run"] = cache.step
    del cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _prefill_check(model, cfg, n, dtype, dev, chunk) -> list[dict]:
    """One real prompt of n tokens (batch 1) through the model under Full and Keyformer-50 %."""
    out = []
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
    for pol in (KVPolicyConfig("full"), KVPolicyConfig("keyformer", kv_budget=0.5)):
        def run_once():
            c = PolicyKVCache(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, 1, n, GEN_RESERVED, pol,
                              dtype=dtype, device=dev, score_chunk=chunk, noise_by_position=False, rng="global")
            with policy_backend(model), torch.no_grad():
                model(ids, kv_cache=c)
            return c
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        c = run_once()
        c.check_invariants()
        kv = c.nbytes()
        del c
        t = measure(lambda: run_once(), warmup=1, repeats=3, flush_l2=False)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
        out.append({"bench": "prefill", "policy": pol.label, "prompt_len": n, "batch": 1, "score_chunk": chunk,
                    "prefill_ms": t.median_ms, "kv_bytes_after_prompt": kv, "peak_bytes": peak})
    return out


def run(args) -> Path:
    quick = bool(getattr(args, "quick", False))
    budget_s = float(getattr(args, "budget_s", None) or 300.0)  # stop starting new configs after this
    out_dir = getattr(args, "out", None)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    t0 = time.time()
    torch.manual_seed(0)
    if cuda:
        cfg, dtype = preset("llama2-7b"), torch.float16
        prompt_lens = [2048, 8192] if quick else [2048, 4096, 8192]
        repeats, chunk, max_batch = (10 if quick else 20), 512, 64
    else:  # code-path check on CPU: a tiny model, small prompts
        cfg = preset("llama2-7b", vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
        dtype, prompt_lens, repeats, chunk, max_batch = torch.float32, [64, 128], 3, 32, 4
    model = random_llama(cfg, dev, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_tok = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
    if cuda:
        torch.cuda.synchronize()
        free_b, total_b = torch.cuda.mem_get_info()
        reserve = 8 * 2**30  # activations, logits, the prompt-scoring blocks, allocator slack
        avail = free_b - reserve
    else:
        avail = 64 * kv_tok * 512
    print(f"model {weights / 2**30:.1f} GiB on {dev}; KV {kv_tok / 1024:.0f} KiB/token; "
          f"{avail / 2**30:.1f} GiB for KV  [{time.time() - t0:.0f} s]", flush=True)
    records: list[dict] = []
    full = KVPolicyConfig("full")
    half = {p: KVPolicyConfig(p, kv_budget=0.5) for p in ("keyformer", "h2o", "window")}
    for n in prompt_lens:
        per_full = (n + GEN_RESERVED) * kv_tok
        per_half = (math.floor(n * 0.5) + 1) * kv_tok
        b_full = max(1, min(max_batch, int(avail // per_full)))
        b_half = max(1, min(max_batch, int(avail // per_half)))
        plan = [(full, 1), (half["keyformer"], 1), (full, b_full), (half["keyformer"], b_full),
                (half["h2o"], b_full), (half["window"], b_full), (half["keyformer"], b_half)]
        if not quick:
            plan.insert(2, (half["h2o"], 1))
        if n == prompt_lens[-1]:  # latency / throughput vs budget at the Full-max batch
            plan += [(KVPolicyConfig("keyformer", kv_budget=b), b_full) for b in (0.2, 0.3, 0.7, 0.9)]
        for pol, B in plan:
            if time.time() - t0 > budget_s:
                print(f"time budget of {budget_s:.0f} s reached: skipping the rest", flush=True)
                break
            try:
                r = _time_decode(model, cfg, pol, B, n, dtype, dev, repeats, graphs=True)
            except Exception as e:  # keep the run going; the failure is recorded
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                records.append({"bench": "decode_error", "policy": pol.label, "prompt_len": n, "batch": B,
                                "error": repr(e)[:300]})
                print(f"n={n} B={B} {pol.label}: FAILED {e!r}", flush=True)
                continue
            r["batch_role"] = "1" if B == 1 else ("full_max" if B == b_full else "half_max")
            if pol.kv_budget not in (0.5, 1.0) and pol.name != "full":
                r["batch_role"] = "budget_sweep"
            r["full_max_batch"], r["half_max_batch"] = b_full, b_half
            records.append(r)
            print(f"n={n:5d} B={B:3d} {pol.label:14s} step {r['step_ms']:.2f} ms (eager {r['eager_ms']:.2f}) "
                  f"{r['tokens_per_s']:.0f} tok/s  KV {r['kv_bytes'] / 2**30:.2f} GiB  [{time.time() - t0:.0f} s]",
                  flush=True)
    try:
        records += _prefill_check(model, cfg, prompt_lens[-1], dtype, dev, chunk)
    except Exception as e:
        records.append({"bench": "prefill_error", "error": repr(e)[:300]})
        print(f"prefill check FAILED {e!r}", flush=True)
    for r in [r for r in records if r.get("bench") == "prefill"]:
        print(f"prefill n={r['prompt_len']} {r['policy']}: {r['prefill_ms']:.1f} ms, peak "
              f"{(r['peak_bytes'] or 0) / 2**30:.1f} GiB, KV after prompt {r['kv_bytes_after_prompt'] / 2**30:.2f} GiB")
    summary = summarize(records)
    records.append({"bench": "summary", **summary})
    n_top = prompt_lens[-1]
    s = summary.get(str(n_top), {})
    headline = {"name": f"Keyformer-50% vs Full: decode tokens/s at {n_top}-token prompts, Full-max batch "
                        "(random-weight Llama-2-7B shape, fp16)",
                "ours": s.get("throughput_x_full_max_batch"), "unit": "x", "paper": 2.4,
                "paper_source": "Keyformer abstract / blog Fig. 8 (A100 80GB, MPT-7B, 50% KV)",
                "latency_x_batch1": s.get("latency_x_batch1"), "paper_latency_x": 2.1,
                "throughput_x_larger_batch": s.get("throughput_x_half_max_batch")}
    config = {"quick": quick, "model": "llama2-7b shape, random weights" if cuda else "tiny CPU shape",
              "dtype": str(dtype), "prompt_lens": prompt_lens, "gen_reserved": GEN_RESERVED, "repeats": repeats,
              "weights_bytes": weights, "kv_bytes_per_token": kv_tok, "kv_bytes_available": avail,
              "timing": "CUDA-graph replay of one decode step (eager kept), L2 flushed, median",
              "wall_s": time.time() - t0}
    path = save_results(SLUG, records, headline=headline, config=config, out_dir=out_dir,
                        suffix="quick" if quick else None)
    print(f"wrote {path}  [{time.time() - t0:.0f} s]")
    return path


def summarize(records: list[dict]) -> dict:
    """Per prompt length: Keyformer-50 % vs Full latency (batch 1) and throughput (Full-max batch, and
    Keyformer at the larger batch that fits), plus the scoring overhead (Keyformer vs window, same cache)."""
    out: dict = {}
    dec = [r for r in records if r.get("bench") == "decode"]
    for n in sorted({r["prompt_len"] for r in dec}):
        def get(name, role):
            return next((r for r in dec if r["prompt_len"] == n and r["policy_name"] == name
                         and r["batch_role"] == role), None)
        f1, k1 = get("full", "1"), get("keyformer", "1")
        fb, kb, wb, hb = get("full", "full_max"), get("keyformer", "full_max"), get("window", "full_max"), \
            get("h2o", "full_max")
        kh = get("keyformer", "half_max")
        row = {}
        if f1 and k1:
            row["latency_x_batch1"] = f1["step_ms"] / k1["step_ms"]
        if fb and kb:
            row["full_max_batch"] = fb["batch"]
            row["throughput_x_full_max_batch"] = kb["tokens_per_s"] / fb["tokens_per_s"]
            row["latency_x_full_max_batch"] = fb["step_ms"] / kb["step_ms"]
        if fb and hb:
            row["h2o_throughput_x_full_max_batch"] = hb["tokens_per_s"] / fb["tokens_per_s"]
        if kb and wb:
            row["scoring_overhead_pct"] = 100 * (kb["step_ms"] - wb["step_ms"]) / kb["step_ms"]
        if fb and kh:
            row["half_max_batch"] = kh["batch"]
            row["throughput_x_half_max_batch"] = kh["tokens_per_s"] / fb["tokens_per_s"]
        out[str(n)] = row
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget-s", dest="budget_s", type=float, default=300.0)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
