"""One timing harness for the whole workbench.

On a CUDA device: CUDA events around each call, warm-up first, the L2 cache flushed before each
timed call (a read over a buffer twice the L2 size, so every run reads its inputs from HBM; a read,
not a write, so no dirty lines are left for the timed call to write back), median and spread. On CPU: ``time.perf_counter`` around each call, warm-up, median.

``measure(fn)`` times ``fn()``; the caller builds inputs outside the timed region.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["Timing", "measure", "measure_graphed", "copy_bandwidth", "graph_floor", "l2_flush_bytes", "CUDAGraphed"]


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in seconds."""

    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    min_s: float
    n: int
    device: str

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the repeats."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["median_us"] = self.median_us
        return d


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _summarize(xs: list[float], device: str) -> Timing:
    s = sorted(xs)
    return Timing(median_s=statistics.median(s), p10_s=_quantile(s, 0.1), p90_s=_quantile(s, 0.9),
                  mean_s=statistics.fmean(s), min_s=s[0], n=len(s), device=device)


_FLUSH_BUFFERS: dict[int, torch.Tensor] = {}


def l2_flush_bytes(device: torch.device) -> int:
    """Bytes written to evict L2: twice the device's L2 size (at least 64 MiB, default 256 MiB)."""
    try:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
    except Exception:
        l2 = 0
    return max(2 * int(l2), 64 << 20) if l2 else 256 << 20


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLUSH_BUFFERS.get(idx)
    if buf is None:
        buf = torch.empty(l2_flush_bytes(device) // 4, dtype=torch.int32, device=device)
        _FLUSH_BUFFERS[idx] = buf
    return buf


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, flush_l2: bool = True,
            device: str | torch.device | None = None, min_time_s: float | None = None,
            max_repeats: int = 10_000) -> Timing:
    """Time ``fn()`` and return the median and spread of ``repeats`` calls.

    device: where ``fn`` runs; ``None`` means CUDA when available, else CPU. Pass "cpu" to time
    CPU work on a GPU machine.
    min_time_s: if set, raise the number of repeats until the timed calls add up to at least
    this much (capped by ``max_repeats``), for very short functions.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure: warmup must be >= 0 and repeats >= 1 (got {warmup}, {repeats})")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        return _measure_cuda(fn, warmup, repeats, flush_l2, dev, min_time_s, max_repeats)
    return _measure_cpu(fn, warmup, repeats, min_time_s, max_repeats)


def _measure_cpu(fn, warmup, repeats, min_time_s, max_repeats) -> Timing:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    target = repeats
    while len(times) < target:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if min_time_s is not None and len(times) == target and sum(times) < min_time_s:
            target = min(max_repeats, max(target + 1, int(target * min_time_s / max(sum(times), 1e-9))))
    return _summarize(times, "cpu")


def _measure_cuda(fn, warmup, repeats, flush_l2, dev, min_time_s, max_repeats) -> Timing:
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev) if flush_l2 else None
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times: list[float] = []
        target = repeats
        while len(times) < target:
            n = target - len(times)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                if flush is not None:
                    # Evict L2 by *reading* a buffer twice its size: a write would leave dirty lines
                    # whose write-back the timed call would pay for.
                    torch.sum(flush, dtype=torch.int64)
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
            if min_time_s is not None and len(times) == target and sum(times) < min_time_s:
                target = min(max_repeats, max(target + 1, int(target * min_time_s / max(sum(times), 1e-9))))
        return _summarize(times, torch.cuda.get_device_name(dev))


class CUDAGraphed:
    """``fn`` captured in a CUDA graph after ``warmup`` calls on a side stream (kernel compiles,
    allocations and library handles happen there, outside the graph).

    ``measure(g.replay)`` then times the device work alone, without the host's launch cost (as in
    a serving engine's captured decode step). ``out`` is the captured call's output tensor(s).
    ``pool``: a ``torch.cuda.graph_pool_handle()`` shared by several graphs (the decode engines
    capture one graph per batch bucket into one pool); ``sync``: wait for the capture to finish.
    """

    def __init__(self, fn: Callable[[], object], *, warmup: int = 2, pool=None, sync: bool = True):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()
        if sync:
            torch.cuda.synchronize()

    def replay(self) -> None:
        self.graph.replay()


def measure_graphed(fn: Callable[[], object], *, graph: bool = True, warmup: int = 3, repeats: int = 20,
                    flush_l2: bool = True, device: str | torch.device | None = None) -> Timing:
    """:func:`measure` of ``fn`` replayed from a CUDA graph when ``graph`` and ``device`` is CUDA (the
    device time alone, as in a serving engine's captured step); otherwise ``fn`` as called."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if graph and dev.type == "cuda":
        g = CUDAGraphed(fn)
        try:
            return measure(g.replay, warmup=warmup, repeats=repeats, flush_l2=flush_l2, device=dev)
        finally:
            del g
    return measure(fn, warmup=warmup, repeats=repeats, flush_l2=flush_l2, device=dev)


def copy_bandwidth(device: str | torch.device | None = None, nbytes: int = 1 << 30, *, warmup: int = 3,
                   repeats: int = 30) -> tuple[Timing, float]:
    """A device-to-device copy of ``nbytes``: the practical memory-bandwidth ceiling, measured now.
    Returns the timing and GB/s counting bytes read + written (``2 * nbytes``)."""
    if nbytes < 1:
        raise ValueError(f"copy_bandwidth: nbytes must be >= 1 (got {nbytes})")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=warmup, repeats=repeats, flush_l2=False, device=src.device)
    return t, 2 * nbytes / t.median_s / 1e9


def graph_floor(device: str | torch.device | None = None, *, repeats: int = 100) -> Timing:
    """The fixed cost of one timed call: a 1-element kernel timed exactly like the kernels of a benchmark
    (:func:`measure_graphed`: CUDA-graph replay, L2 flushed, CUDA events), after a short warm-up of its
    own. No kernel timed this way can take less; a ratio of two timed kernels is bounded by it. On CPU,
    the same tiny op timed by :func:`measure`."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    tiny = torch.zeros(1, device=dev)
    measure_graphed(lambda: tiny.add_(1.0), repeats=10, device=dev)      # warm the device and the allocator
    return measure_graphed(lambda: tiny.add_(1.0), repeats=repeats, device=dev)
