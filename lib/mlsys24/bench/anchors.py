"""Harness check: re-measure the shared anchors (HBM copy, cuBLAS fp16 matmul, SDPA decode).

This benchmark measures plain PyTorch operations with :func:`mlsys24.bench.measure` so the
workbench's own harness can be compared with independently measured anchors
(``shared/anchors/h100_torch_baselines.json``: CUDA events, median of 200, L2 flushed). On a CPU it
runs the same operations at small sizes, which checks the code path, not the hardware.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .results import save_results
from .roofline import roofline
from .timing import copy_bandwidth, measure

MM_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096),
             (1, 4096, 11008), (16, 4096, 11008), (1, 11008, 4096)]
SDPA_SHAPES = [(1, 8192), (8, 8192), (32, 4096), (1, 32768)]
HEADS, HEAD_DIM = 32, 128


def _records(device: torch.device, quick: bool) -> list[dict]:
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    repeats = (50 if quick else 200) if gpu else 5
    recs: list[dict] = []

    # Device-to-device copy: bytes read + bytes written.
    n = (1 << 30) if gpu else (16 << 20)
    t, _ = copy_bandwidth(device, n, repeats=repeats)
    recs.append({"op": "copy", "bytes": 2 * n, "median_us": t.median_us, "spread": t.spread,
                 **roofline(t.median_s, bytes=2 * n, device=t.device)})

    shapes = MM_SHAPES if gpu else [(1, 512, 512), (16, 512, 512), (256, 512, 512)]
    for m, k, nn in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(k, nn, device=device, dtype=dtype)
        t = measure(lambda: x @ w, repeats=repeats, device=device)
        b = (m * k + k * nn + m * nn) * x.element_size()
        recs.append({"op": "mm", "M": m, "K": k, "N": nn, "dtype": str(dtype).removeprefix("torch."),
                     "median_us": t.median_us, "spread": t.spread,
                     **roofline(t.median_s, bytes=b, flops=2 * m * k * nn, device=t.device)})

    sdpa = SDPA_SHAPES if gpu else [(1, 1024), (4, 512)]
    heads, hd = (HEADS, HEAD_DIM) if gpu else (4, 64)
    for b_, length in sdpa:
        q = torch.randn(b_, heads, 1, hd, device=device, dtype=dtype)
        k = torch.randn(b_, heads, length, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        t = measure(lambda: F.scaled_dot_product_attention(q, k, v), repeats=repeats, device=device)
        kv_bytes = 2 * k.numel() * k.element_size()
        recs.append({"op": "sdpa_decode", "B": b_, "L": length, "heads": heads, "head_dim": hd,
                     "median_us": t.median_us, "spread": t.spread,
                     **roofline(t.median_s, bytes=kv_bytes, device=t.device)})
    return recs


def run(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recs = _records(device, bool(getattr(args, "quick", False)))
    copy = next(r for r in recs if r["op"] == "copy")
    headline = {"name": "device-to-device copy bandwidth", "ours": copy["GBps"], "unit": "GB/s",
                "paper": 3006.9, "paper_source": "shared/anchors H100 copy_GBps (not a paper number)"}
    return save_results("anchors", recs, headline=headline, out_dir=getattr(args, "out", None),
                        config={"quick": bool(getattr(args, "quick", False))})
