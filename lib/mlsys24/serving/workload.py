"""Seeded workload generators: arrivals, prompt/output lengths, adapter popularity.

- Arrivals: Poisson (exponential gaps at ``rate`` req/s), gamma (``cv`` sets burstiness: cv = 1 is
  Poisson, cv > 1 burstier), or all at t = 0 (``offline``).
- Lengths: fixed, uniform, or lognormal/Zipf-like heavy tails clipped to a range.
- Adapter popularity (Punica §5 / S-LoRA): ``distinct`` (every request its own adapter),
  ``uniform`` (n adapters, equally likely), ``skewed`` (Zipf with exponent ``alpha``), ``identical``
  (one adapter for all).

Everything is a pure function of the seed, so a notebook run is repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from .request import Request

__all__ = ["arrival_times", "sample_lengths", "adapter_ids", "WorkloadSpec", "make_requests", "POPULARITIES"]

POPULARITIES = ("distinct", "uniform", "skewed", "identical")


def arrival_times(n: int, *, rate: float | None, process: str = "poisson", cv: float = 1.0,
                  seed: int = 0) -> np.ndarray:
    """``n`` arrival times (s), starting at the first gap. ``rate=None`` or process ``offline``: all at 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if process == "offline" or rate is None:
        return np.zeros(n)
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = np.random.default_rng(seed)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif process == "gamma":
        if cv <= 0:
            raise ValueError(f"cv must be > 0, got {cv}")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    else:
        raise ValueError(f"process must be poisson, gamma or offline, got {process!r}")
    return np.cumsum(gaps)


def sample_lengths(n: int, *, dist: str = "uniform", lo: int = 8, hi: int = 64, mean: float | None = None,
                   sigma: float = 0.8, seed: int = 0) -> np.ndarray:
    """Token lengths in [lo, hi]: ``fixed`` (= hi), ``uniform``, or ``lognormal`` with the given mean."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    rng = np.random.default_rng(seed)
    if dist == "fixed":
        return np.full(n, hi, dtype=np.int64)
    if dist == "uniform":
        return rng.integers(lo, hi + 1, n)
    if dist == "lognormal":
        m = mean if mean is not None else (lo + hi) / 2
        mu = np.log(m) - sigma**2 / 2
        return np.clip(np.round(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)
    raise ValueError(f"dist must be fixed, uniform or lognormal, got {dist!r}")


def adapter_ids(n: int, popularity: str, *, n_adapters: int | None = None, alpha: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """Adapter id of each of ``n`` requests under a popularity model (Punica's four workloads)."""
    rng = np.random.default_rng(seed)
    if popularity == "distinct":
        return np.arange(n)
    if popularity == "identical":
        return np.zeros(n, dtype=np.int64)
    k = n_adapters if n_adapters is not None else max(1, int(np.ceil(np.sqrt(n))))
    if k < 1:
        raise ValueError(f"n_adapters must be >= 1, got {k}")
    if popularity == "uniform":
        return rng.integers(0, k, n)
    if popularity == "skewed":
        w = 1.0 / np.arange(1, k + 1) ** alpha
        return rng.choice(k, size=n, p=w / w.sum())
    raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")


@dataclass(frozen=True)
class WorkloadSpec:
    n_requests: int = 32
    rate: float | None = None          # req/s; None = all arrive at t=0
    process: str = "poisson"
    cv: float = 1.0
    prompt_dist: str = "uniform"
    prompt_lo: int = 16
    prompt_hi: int = 64
    output_dist: str = "uniform"
    output_lo: int = 8
    output_hi: int = 32
    popularity: str | None = None      # None = no adapters
    n_adapters: int | None = None
    alpha: float = 1.0
    seed: int = 0


def make_requests(spec: WorkloadSpec, prompts: Seq[Seq[int]] | None = None) -> list[Request]:
    """Requests of a workload. ``prompts``: token sources to cut prompts from (e.g. documents of
    the validation split); None gives random byte prompts."""
    n = spec.n_requests
    t = arrival_times(n, rate=spec.rate, process=spec.process, cv=spec.cv, seed=spec.seed)
    p_len = sample_lengths(n, dist=spec.prompt_dist, lo=spec.prompt_lo, hi=spec.prompt_hi, seed=spec.seed + 1)
    o_len = sample_lengths(n, dist=spec.output_dist, lo=spec.output_lo, hi=spec.output_hi, seed=spec.seed + 2)
    ad = (adapter_ids(n, spec.popularity, n_adapters=spec.n_adapters, alpha=spec.alpha, seed=spec.seed + 3)
          if spec.popularity else np.full(n, -1))
    rng = np.random.default_rng(spec.seed + 4)
    out = []
    for i in range(n):
        L = int(p_len[i])
        if prompts:
            src = list(prompts[i % len(prompts)])
            if len(src) < L:
                src = (src * (L // max(1, len(src)) + 1))
            start = int(rng.integers(0, len(src) - L + 1))
            toks = [int(x) for x in src[start:start + L]]
        else:
            toks = [int(x) for x in rng.integers(0, 256, L)]
        out.append(Request(rid=i, prompt=toks, max_new_tokens=int(o_len[i]), arrival_s=float(t[i]),
                           adapter_id=int(ad[i]), seed=spec.seed * 100_003 + i))
    return out
