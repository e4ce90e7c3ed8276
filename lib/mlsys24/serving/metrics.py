"""Serving metrics: per-request latencies and per-step records.

- TTFT: first output token time - arrival. TPOT: mean gap between output tokens after the first.
  E2E: finish - arrival. Inter-token latencies: every gap between consecutive output tokens.
- Throughput: output tokens/s and requests/s over the busy span (first arrival to last finish).
- Step records: batch rows, prefill and decode tokens, KV blocks in use, step time — the table
  Vidur fits its runtime predictors on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .request import Sequence

__all__ = ["StepRecord", "RequestMetrics", "request_metrics", "summarize"]


@dataclass(frozen=True)
class StepRecord:
    step: int
    start_s: float
    duration_s: float
    rows: int
    prefill_tokens: int
    decode_rows: int
    tokens: int
    kv_blocks_used: int
    kv_bytes_used: int
    admitted: int
    preempted: int
    context_tokens: int      # sum over rows of tokens attended (KV length after the step)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestMetrics:
    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    n_preemptions: int


def request_metrics(seq: Sequence) -> RequestMetrics:
    if seq.finish_s is None or not seq.token_times_s:
        raise ValueError(f"request {seq.rid} has not finished")
    arr = seq.request.arrival_s
    tt = seq.token_times_s
    tpot = (tt[-1] - tt[0]) / (len(tt) - 1) if len(tt) > 1 else None
    return RequestMetrics(seq.rid, arr, seq.prompt_len, len(seq.output), tt[0] - arr, tpot, seq.finish_s - arr,
                          seq.n_preemptions)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(seqs: list[Sequence]) -> dict:
    """Aggregate latency/throughput metrics over finished sequences."""
    ms = [request_metrics(s) for s in seqs]
    if not ms:
        raise ValueError("summarize: no finished requests")
    ttft = [m.ttft_s for m in ms]
    tpot = [m.tpot_s for m in ms if m.tpot_s is not None]
    e2e = [m.e2e_s for m in ms]
    itl = [b - a for s in seqs for a, b in zip(s.token_times_s, s.token_times_s[1:])]
    span = max(s.finish_s for s in seqs) - min(m.arrival_s for m in ms)
    out_tokens = sum(m.output_len for m in ms)
    return {
        "n_requests": len(ms), "output_tokens": out_tokens, "span_s": span,
        "throughput_tok_s": out_tokens / span if span > 0 else float("nan"),
        "throughput_req_s": len(ms) / span if span > 0 else float("nan"),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95), "ttft_mean_s": float(np.mean(ttft)),
        "tpot_p50_s": _pct(tpot, 50), "tpot_p95_s": _pct(tpot, 95),
        "itl_p50_s": _pct(itl, 50), "itl_p95_s": _pct(itl, 95),
        "e2e_p50_s": _pct(e2e, 50), "e2e_p95_s": _pct(e2e, 95),
        "preemptions": sum(m.n_preemptions for m in ms),
    }
