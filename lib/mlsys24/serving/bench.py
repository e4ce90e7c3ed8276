"""GPU benchmark of the serving engine: decode throughput of a Llama-2-7B-shaped model.

``python -m mlsys24.bench serving [--quick]`` builds a Llama with Llama-2-7B's shapes (d 4096, 32
layers, 32 heads, FFN 11008, vocab 32000) and random fp16 weights directly on the GPU, serves B
requests (prompt 128 random tokens, 64 new tokens each) through :class:`~.engine.Engine`, and
reports the median decode-step time and tokens/s at batch 1/8/32/64, with and without the CUDA-graph
decode path. At batch 1 the step must read every weight once: weight bytes / step time is the
achieved bandwidth, compared with a device-to-device copy measured in the same run (the practical
HBM ceiling) and with the datasheet peak. cuBLAS GEMV bandwidth at the model's projection shapes is
measured too, as the bound a model built from these matmuls can approach.
"""

from __future__ import annotations

import statistics

import torch

from ..bench import copy_bandwidth, device_peaks, measure, roofline, save_results
from ..models import pack_projections, preset, random_llama
from .engine import Engine
from .request import Request


def _decode_run(model, batch: int, prompt_len: int, new_tokens: int, graphs: bool, seed: int,
                compile_decode: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    reqs = [Request(i, torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist(), new_tokens)
            for i in range(batch)]
    bs = 16
    n_blocks = batch * (-(-(prompt_len + new_tokens) // bs)) + 4
    eng = Engine(model, "orca", n_blocks=n_blocks, block_size=bs, decode_graphs=graphs,
                 context_bucket=256, compile_decode=compile_decode)
    eng.run(reqs, progress=False)
    eng.check_invariants()
    dec = [r.duration_s for r in eng.steps if r.prefill_tokens == 0 and r.decode_rows == batch]
    dec = dec[3:]  # the first decode steps capture graphs / warm caches
    med = statistics.median(dec)
    return {"batch": batch, "graphs": graphs, "compiled": compile_decode, "decode_steps": len(dec), "step_median_ms": med * 1e3,
            "step_p90_ms": sorted(dec)[int(0.9 * (len(dec) - 1))] * 1e3, "tokens_per_s": batch / med,
            "context": prompt_len + new_tokens}


def run(args) -> str:
    if not torch.cuda.is_available():
        raise SystemExit("serving benchmark needs a CUDA GPU (the CPU path is covered by tests/serving)")
    quick = bool(getattr(args, "quick", False))
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    records: list[dict] = []

    # The practical HBM ceiling on this GPU, measured now.
    t, copy_GBps = copy_bandwidth(dev, 1 << 30, repeats=50)
    records.append({"kind": "copy", "GBps": copy_GBps, "median_us": t.median_us})

    # cuBLAS GEMV at the model's shapes (x[1,K] @ W^T with W [N,K]) — the matmul bound.
    for (N, K) in [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]:
        w = torch.randn(N, K, device=dev, dtype=torch.float16)
        x = torch.randn(1, K, device=dev, dtype=torch.float16)
        t = measure(lambda: torch.nn.functional.linear(x, w), repeats=100)
        records.append({"kind": "gemv", "N": N, "K": K, "median_us": t.median_us,
                        **roofline(t.median_s, bytes=w.nbytes + x.nbytes + 2 * N, flops=2 * N * K)})

    cfg = preset("llama2-7b")
    model = random_llama(cfg, "cuda", torch.float16)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    embed_bytes = model.embed_tokens.weight.nbytes  # one row is read per token, not the table
    read_bytes = weight_bytes - embed_bytes
    prompt_len, new_tokens = (128, 32) if quick else (128, 64)
    batches = (1, 8) if quick else (1, 8, 32, 64)
    # (graphs, compiled, packed): eager engine; CUDA-graph decode; + torch.compile; + packed q/k/v, gate/up
    variants = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    if "--no-compile" in (getattr(args, "extra", None) or []):
        variants = variants[:2]
    for graphs, comp, packed in variants:
        if packed:
            pack_projections(model)
        for b in (batches[:2] if comp else batches):  # each compiled shape costs a compilation
            try:
                r = _decode_run(model, b, prompt_len, new_tokens, graphs, seed=b, compile_decode=comp)
            except Exception as e:  # a compile failure is reported, not hidden
                records.append({"kind": "decode_error", "batch": b, "graphs": graphs, "compiled": comp, "packed": packed,
                                "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"decode batch {b} graphs={graphs} compiled={comp}: FAILED {type(e).__name__}", flush=True)
                break
            kv_bytes = b * r["context"] * cfg.kv_bytes_per_token(2) // 2  # mean context ~ half-way
            r.update(roofline(r["step_median_ms"] * 1e-3, bytes=read_bytes + kv_bytes, flops=2 * b * read_bytes / 2))
            r["pct_of_copy_bw"] = 100 * r["GBps"] / copy_GBps
            r["kind"] = "decode"
            r["packed"] = packed
            records.append(r)
            print(f"decode batch {b:3d} graphs={graphs!s:5} compiled={comp!s:5} packed={packed!s:5}: "
                  f"{r['step_median_ms']:.2f} ms/step, "
                  f"{r['tokens_per_s']:.0f} tok/s, {r['GBps']:.0f} GB/s ({r['pct_of_copy_bw']:.0f}% of copy)",
                  flush=True)
    b1 = max((r for r in records if r["kind"] == "decode" and r["batch"] == 1), key=lambda r: r["GBps"])
    headline = {"name": "batch-1 decode bandwidth, Llama-2-7B shapes", "ours": b1["pct_of_copy_bw"],
                "unit": "% of measured copy bandwidth", "paper": 60.0,
                "paper_source": "target of the serving issue (no paper number)",
                "graphs": b1["graphs"], "compiled": b1["compiled"], "packed": b1["packed"]}
    cfg_out = {"quick": quick, "model": "Llama-2-7B shapes, random fp16 weights", "weight_bytes": weight_bytes,
               "weight_bytes_read_per_step": read_bytes, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "block_size": 16, "scheduler": "orca", "copy_GBps": copy_GBps,
               "datasheet_GBps": device_peaks().hbm_GBps}
    return save_results("serving", records, headline=headline, config=cfg_out, out_dir=getattr(args, "out", None))
