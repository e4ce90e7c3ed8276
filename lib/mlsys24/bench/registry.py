"""The registered GPU benchmarks: ``python -m mlsys24.bench <name>`` runs one.

Each entry maps a name (the paper's slug, as in ``data/results/<slug>/``) to ``"module:function"``
and a line of help. The function takes the parsed CLI arguments (``.quick``, ``.out``, ``.extra``)
and returns the path of the results file it wrote. Modules are imported only when run, so listing
the benchmarks costs nothing and a benchmark's optional imports never break the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["BENCHMARKS", "resolve"]

BENCHMARKS: dict[str, tuple[str, str]] = {
    "anchors": ("mlsys24.bench.anchors:run",
                "harness check: HBM copy, cuBLAS fp16 GEMV/GEMM, SDPA decode vs the shared H100 anchors"),
    "flashdecoding_pp": ("mlsys24.kernels.bench_fdpp:run",
                         "FlashDecoding++: split-KV decode attention sync vs async, flat GEMM/GEMV vs cuBLAS, "
                         "GEMM dispatcher (~2 min on an H100)"),
    "flashdecoding_pp_e2e": ("mlsys24.serving.bench_fdpp:run",
                             "FlashDecoding++ end to end: Llama-2-7B-shaped decode in the serving engine, plain "
                             "PyTorch / SDPA / FlashDecoding / FlashDecoding++ kernels + GEMM dispatcher"),
    "gnn_matrix_sampling": ("mlsys24.graph.bench:run",
                            "bulk matrix GraphSAGE/LADIES sampling vs per-minibatch loop (and PyG where its fast "
                            "path imports) vs bulk size k, 1 GPU"),
    "gnn_matrix_sampling_dist": ("mlsys24.graph.bench:run_dist",
                                 "1.5D distributed bulk sampling on all visible GPUs (NCCL): time + bytes per "
                                 "process, p in {2,4}, c in {1,2}"),
    "prompt_cache": ("mlsys24.promptcache.bench:run",
                     "Prompt Cache: TTFT vs cached length (7B-shaped fp16, N 512-8K, q=32), GPU/host module tiers "
                     "eager + CUDA graph, copy-vs-recompute, 1B-shaped CPU run (~2 min on an H200)"),
    "punica": ("mlsys24.lora.bench:run", "Punica: SGMV/BGMV vs Loop/Gather-BMM at Llama-7B shapes; multi-LoRA serving vs same-adapter batching"),
    "lgreco": ("mlsys24.compress.bench:run",
               "L-GreCo: DDP step time + bytes, uncompressed / uniform PowerSGD / L-GreCo, GPT-2-small (r0=32) + "
               "ResNet-18, 2 GPUs NCCL over loopback sockets and default transport"),
    "serving": ("mlsys24.serving.bench:run",
                "serving engine: Llama-2-7B-shaped decode throughput at batch 1/8/32/64, eager vs CUDA graphs"),
    "keyformer": ("mlsys24.kvcache.bench:run",
                  "Keyformer: decode step time / tokens/s vs KV budget, Full (split-KV kernel) vs compacted "
                  "Keyformer/H2O/window 50%, Llama-2-7B shape, 2K-8K prompts, CUDA graphs (~1 min on an H200)"),
    "slora": ("mlsys24.slora.bench:run",
              "S-LoRA: unified KV/adapter pool + MBGMV serving vs PEFT/bmm/merged, 7B-shaped layers, n in {5,100,1000}"),
    "smartpaf": ("mlsys24.privacy.bench:run",
                 "SmartPAF: VGG-11-bn (32x32 upsampled digits) technique ablation, all 13 ReLU/MaxPool replaced, "
                 "PAFs 2f12g1/f1g2/a7 at DS+SS, seeds within a 220 s budget (~3 min on an H200)"),
    "vidur": ("mlsys24.sim.bench:run",
              "Vidur: 7B operator profile + random forests, real engine vs simulator (vLLM/Sarathi), simulator speed"),
    "atom": ("mlsys24.quant.atom_bench:run",
             "Atom: served decode throughput at equal memory (4 Llama-7B-shaped layers, FP16 vs W4A4-KV4), "
             "KV4 decode attention, W4A4 (INT8-MMA) GEMM vs cuBLAS fp16 / torch._int_mm (~2 min on an H200)"),
    "awq": ("mlsys24.quant.bench:run", "AWQ W4A16 Triton GEMM/GEMV vs cuBLAS fp16, Llama-7B shapes, M=1..64"),
}


def resolve(name: str) -> Callable:
    """The benchmark function registered under ``name`` (KeyError naming the known ones)."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(sorted(BENCHMARKS))}")
    target = BENCHMARKS[name][0]
    mod_name, fn_name = target.split(":")
    return getattr(importlib.import_module(mod_name), fn_name)
