"""Synthetic request traces shaped like Vidur's processed traces (lengths from the repo's CSV
statistics, quoted on the paper card; the CSVs themselves are not copied).

Prompt and output lengths are lognormal with the traces' P50 and P90 (``sigma = ln(P90/P50) / 1.2816``),
clipped to ``[lo, max]`` and multiplied by ``length_scale`` (to fit small models / CPU budgets).
Arrivals: Poisson at ``qps``; :func:`make_trace` draws the unit-rate arrival times once per seed,
so changing ``qps`` only rescales time (the capacity search relies on that).
"""

from __future__ import annotations

import numpy as np

from ..serving.request import Request

__all__ = ["TRACE_STATS", "make_trace", "scale_arrivals"]

# name: (prefill P50, P90, decode P50, P90) — Vidur data/processed_traces statistics
TRACE_STATS = {
    "chat": (1020, 2734, 129, 424),      # splitwise_conv
    "arxiv": (2730, 3702, 167, 372),     # arxiv_summarization (<= 4K)
    "code": (1469, 5186, 13, 55),        # splitwise_code
}


def _lognormal(rng, p50, p90, n):
    sigma = np.log(p90 / p50) / 1.2816
    return rng.lognormal(np.log(p50), sigma, n)


def make_trace(kind: str = "chat", n: int = 100, qps: float | None = 1.0, *, seed: int = 0,
               length_scale: float = 1.0, max_prompt: int = 4096, max_output: int = 1024, min_len: int = 2,
               token_ids: bool = False, vocab: int = 256) -> list[Request]:
    """``n`` requests of a trace shape (``chat`` | ``arxiv`` | ``code``) arriving at ``qps`` (None: all at 0).

    token_ids: draw random prompt tokens in [0, vocab) (engine runs); False uses zeros (simulation)."""
    if kind not in TRACE_STATS:
        raise ValueError(f"trace kind must be one of {sorted(TRACE_STATS)}, got {kind!r}")
    p50, p90, d50, d90 = TRACE_STATS[kind]
    rng = np.random.default_rng(seed)
    pl = np.clip(np.round(_lognormal(rng, p50, p90, n) * length_scale), min_len, max_prompt).astype(int)
    ol = np.clip(np.round(_lognormal(rng, d50, d90, n) * length_scale), 1, max_output).astype(int)
    unit = np.cumsum(np.random.default_rng(seed + 7).exponential(1.0, n))
    arr = np.zeros(n) if qps is None else unit / qps
    trng = np.random.default_rng(seed + 11)
    out = []
    for i in range(n):
        prompt = trng.integers(0, vocab, int(pl[i])).tolist() if token_ids else [0] * int(pl[i])
        out.append(Request(rid=i, prompt=prompt, max_new_tokens=int(ol[i]), arrival_s=float(arr[i])))
    return out


def scale_arrivals(requests: list[Request], factor: float) -> list[Request]:
    """The same requests with arrival times multiplied by ``factor`` (fresh Request objects)."""
    return [Request(rid=r.rid, prompt=r.prompt, max_new_tokens=r.max_new_tokens, arrival_s=r.arrival_s * factor,
                    seed=r.seed) for r in requests]
