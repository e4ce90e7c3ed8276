"""Punica's workload generators (``benchmarks/benchmark_utils.py``, ``bench_textgen_lora.py``).

Adapter popularity of a batch of ``bs`` requests, as segment lengths (one segment per adapter):

- ``distinct``  — ``bs`` segments of 1 (every request its own adapter);
- ``uniform``   — ``ceil(sqrt(bs))`` segments of near-equal size;
- ``skewed``    — Zipf-like with alpha = 1.5: sizes ``floor(alpha^i)`` = 1, 1, 2, 3, 5, 7, ... until
  the next would overflow ``bs``; the last segment takes the remainder; sorted descending;
- ``identical`` — one segment of ``bs``.

Request lengths: prompt ~ LogNormal(s=0.8, loc=-1, scale=18) clipped to ``[1, maxlen - 2]``;
total length ~ U[0, maxlen) raised to at least prompt + 2; output = total - prompt.

Arrivals for the cluster experiment: a Poisson process whose rate ramps from ``base`` up to
``peak`` and back (thinning), so one run sweeps low and high load.
"""

from __future__ import annotations

import math

import numpy as np

from ..serving.request import Request

__all__ = ["POPULARITIES", "popularity_segments", "request_adapter_ids", "punica_lengths", "ramp_arrivals",
           "punica_requests"]

POPULARITIES = ("distinct", "uniform", "skewed", "identical")


def popularity_segments(bs: int, popularity: str, *, alpha: float = 1.5) -> list[int]:
    """Segment lengths (sum = ``bs``) of a batch under one of Punica's popularity models."""
    if bs < 1:
        raise ValueError(f"bs must be >= 1, got {bs}")
    if popularity == "distinct":
        return [1] * bs
    if popularity == "identical":
        return [bs]
    if popularity == "uniform":
        n = math.ceil(math.sqrt(bs))
        base, extra = divmod(bs, n)
        return [base + (1 if i < extra else 0) for i in range(n)]
    if popularity == "skewed":
        if alpha <= 1:
            raise ValueError(f"skewed popularity needs alpha > 1, got {alpha}")
        out, total, k = [], 0, 0
        while True:
            size = int(math.floor(alpha**k))
            if total + size > bs:
                break
            out.append(size)
            total += size
            k += 1
        if total < bs:
            out.append(bs - total)
        return sorted(out, reverse=True)
    raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")


def request_adapter_ids(n: int, popularity: str, *, seed: int = 0, alpha: float = 1.5) -> np.ndarray:
    """Adapter id of each of ``n`` requests: the popularity's segments over all ``n`` requests,
    shuffled with ``seed`` (arrival order is random, as in Punica's harness)."""
    lens = popularity_segments(n, popularity, alpha=alpha)
    ids = np.repeat(np.arange(len(lens)), lens)
    np.random.default_rng(seed).shuffle(ids)
    return ids


def punica_lengths(n: int, *, maxlen: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_len, output_len) of ``n`` requests (Punica's text-generation benchmark)."""
    if maxlen < 4:
        raise ValueError(f"maxlen must be >= 4, got {maxlen}")
    rng = np.random.default_rng(seed)
    prompt = -1.0 + 18.0 * np.exp(0.8 * rng.standard_normal(n))
    prompt = np.clip(np.round(prompt), 1, maxlen - 2).astype(np.int64)
    total = rng.integers(0, maxlen, n)
    total = np.maximum(total, prompt + 2)
    return prompt, (total - prompt).astype(np.int64)


def ramp_arrivals(duration_s: float, *, peak_rate: float, base_rate: float = 0.0, seed: int = 0,
                  shape: str = "triangle") -> np.ndarray:
    """Arrival times of a Poisson process over ``[0, duration_s)`` whose rate goes ``base -> peak
    -> base`` (``triangle``) or stays at ``peak`` (``flat``)."""
    if duration_s <= 0 or peak_rate <= 0 or base_rate < 0 or base_rate > peak_rate:
        raise ValueError("need duration_s > 0 and 0 <= base_rate <= peak_rate, peak_rate > 0")
    rng = np.random.default_rng(seed)
    n = rng.poisson(peak_rate * duration_s)
    t = np.sort(rng.uniform(0, duration_s, n))
    if shape == "flat":
        return t
    if shape != "triangle":
        raise ValueError(f"shape must be triangle or flat, got {shape!r}")
    rate = base_rate + (peak_rate - base_rate) * (1 - np.abs(2 * t / duration_s - 1))
    keep = rng.uniform(0, peak_rate, n) < rate
    return t[keep]


def punica_requests(n: int, popularity: str, *, maxlen: int = 512, vocab: int = 256, seed: int = 0,
                    arrivals: np.ndarray | None = None, prompts: list[list[int]] | None = None) -> list[Request]:
    """Requests with Punica's lengths and popularity (greedy; all at t=0 unless ``arrivals``).

    prompts: token sources to cut prompts from (e.g. validation documents); None = random tokens."""
    p_len, o_len = punica_lengths(n, maxlen=maxlen, seed=seed)
    ids = request_adapter_ids(n, popularity, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    out = []
    for i in range(n):
        L = int(p_len[i])
        if prompts:
            src = list(prompts[i % len(prompts)])
            while len(src) < L:
                src = src + src
            s = int(rng.integers(0, len(src) - L + 1))
            toks = [int(t) for t in src[s:s + L]]
        else:
            toks = [int(t) for t in rng.integers(0, vocab, L)]
        out.append(Request(rid=i, prompt=toks, max_new_tokens=int(o_len[i]),
                           arrival_s=float(arrivals[i]) if arrivals is not None else 0.0,
                           adapter_id=int(ids[i])))
    return out
