"""Streaming reads: the least any kernel must spend to read a buffer once, measured.

A memory-bound kernel (a W4A16 GEMV, a flat GEMM, decode attention) has to read its operands from
HBM at least once. The device-to-device copy rate says what the memory can do in the steady state;
it does not say what a *single launch* of a few microseconds can do, where the ramp-up (launch, first
DRAM round trip), the tail and the timing harness's fixed cost all count. This module measures that
directly: a kernel that does nothing but read a buffer (and write one word per program, so the reads
are not optimised away), swept over its tile shape and grid, timed exactly like the kernels it bounds.
No kernel that has to read the same bytes, timed the same way, can be faster than the fastest such
read, short of reading from cache; the speedup of a kernel over a baseline is bounded by the
baseline's time over this read floor.

- :func:`stream_read` — the read kernel: ``buf`` (any dtype, viewed as int32 words) is split into
  contiguous chunks, one per program; each program folds its words together by XOR and stores the result.
- :func:`stream_read_ref` — the same per-chunk XORs in plain PyTorch.
- :func:`read_floor` — the fastest read of ``nbytes`` (one call, or ``chain`` calls back to back on
  distinct buffers, each cold in L2) over a small grid of configurations and ``torch.sum``, timed by
  :func:`mlsys24.bench.measure_graphed` (CUDA-graph replay, L2 flushed, CUDA events).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_*: programmatic dependent launch)

from . import pdl_supported

__all__ = ["ReadConfig", "READ_GRID", "l2_prefetch", "l2_prefetch_supported", "stream_read", "stream_read_ref",
           "read_floor"]

_L2_PREFETCH_ASM = tl.constexpr("{ .reg .pred p0; .reg .b32 t0; mov.u32 t0, %tid.x; setp.eq.u32 p0, t0, 0; "
                    "@p0 cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")


def l2_prefetch_supported(device) -> bool:
    """Whether :func:`l2_prefetch` can run on ``device``: the bulk-copy engine's L2 prefetch is Hopper's
    (compute capability 9.0+), compiled kernels only (not the CPU interpreter)."""
    return pdl_supported(device)


@triton.jit
def l2_prefetch(ptr, nbytes):
    """Thread 0 of the calling program asks the bulk-copy engine (TMA) to bring ``[ptr, ptr + nbytes)``
    into L2 (PTX ``cp.async.bulk.prefetch.L2``, sm_90+): one instruction for a whole range, no registers
    held, nothing to wait for; later loads of the range find it in L2 or in flight. ``ptr`` 16-byte
    aligned, ``nbytes`` a positive multiple of 16."""
    p = ptr + tl.zeros((1,), dtype=tl.int32)
    n = nbytes + tl.zeros((1,), dtype=tl.int32)
    tl.inline_asm_elementwise(_L2_PREFETCH_ASM, "=r,l,r", [p, n], dtype=tl.int32, is_pure=False, pack=1)


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    block: int = 4096          # int32 words loaded per program per step (one vector load of BLOCK words)
    steps: int = 4             # steps per program: each program reads a contiguous chunk of block * steps words
    num_warps: int = 8
    l2_prefetch: bool = False  # first ask the copy engine for the program's whole chunk into L2 (sm_90+)
    pdl: str = "off"           # programmatic dependent launch in a chain: "off"; "wait_first" (launch
    #                            early, wait for the previous kernel before any read: a kernel all of whose
    #                            reads depend on it); "wait_last" (read first, wait before the store: a
    #                            kernel whose reads are all independent of the previous one)

    def __post_init__(self):
        if self.block < 128 or self.block & (self.block - 1):
            raise ValueError(f"ReadConfig.block must be a power of two >= 128 (got {self.block})")
        if self.steps < 1:
            raise ValueError(f"ReadConfig.steps must be >= 1 (got {self.steps})")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"ReadConfig.num_warps must be 1, 2, 4, 8 or 16 (got {self.num_warps})")
        if self.pdl not in ("off", "wait_first", "wait_last"):
            raise ValueError(f"ReadConfig.pdl must be 'off', 'wait_first' or 'wait_last' (got {self.pdl!r})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# (block words, steps, warps): 4-32 KB per program step, chunks of 4 KB .. 64 KB (on an H100 the best
# single read of ~24 MB took 16 KB chunks, one step: many short programs)
READ_GRID = [ReadConfig(b, s, w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8),
                                              (8192, 16)) for s in (1, 2)]


@triton.jit
def _stream_read_kernel(buf_ptr, out_ptr, n_words, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                        PDL: tl.constexpr = 0, L2PF: tl.constexpr = False):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (BLOCK * STEPS)
    offs = tl.arange(0, BLOCK)
    if PDL != 0:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
    if L2PF:
        for s in tl.static_range(STEPS):
            # whole 16-byte units inside the buffer (a tail of < 4 words is simply loaded)
            nb = (tl.minimum(n_words - (start + s * BLOCK), BLOCK) * 4) // 16 * 16
            if nb > 0:
                l2_prefetch(buf_ptr + start + s * BLOCK, nb.to(tl.int32))
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for s in tl.static_range(STEPS):
        o = start + s * BLOCK + offs
        acc ^= tl.load(buf_ptr + o, mask=o < n_words, other=0)
    if PDL == 2:
        tl.extra.cuda.gdc_wait()
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def _words(buf: torch.Tensor) -> torch.Tensor:
    if not buf.is_contiguous():
        raise ValueError("stream_read: buf must be contiguous")
    if (buf.numel() * buf.element_size()) % 4:
        raise ValueError(f"stream_read: buf must hold a whole number of 4-byte words "
                         f"(got {buf.numel() * buf.element_size()} bytes)")
    return buf.reshape(-1).view(torch.int32)


def stream_read(buf: torch.Tensor, config: ReadConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read every word of ``buf`` once: returns ``int32 [programs]``, program p's XOR of words
    ``[p * block * steps, (p + 1) * block * steps)``."""
    cfg = config or ReadConfig()
    w = _words(buf)
    n = w.numel()
    programs = max(1, triton.cdiv(n, cfg.block * cfg.steps))
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=buf.device)
    elif out.numel() < programs or out.dtype != torch.int32:
        raise ValueError(f"stream_read: out must be int32 with >= {programs} elements")
    pdl = {"off": 0, "wait_first": 1, "wait_last": 2}[cfg.pdl]
    if pdl and not pdl_supported(buf.device):
        raise ValueError(f"stream_read: pdl={cfg.pdl!r} needs a CUDA GPU of compute capability >= 9.0")
    if cfg.l2_prefetch and not l2_prefetch_supported(buf.device):
        raise ValueError("stream_read: l2_prefetch needs a CUDA GPU of compute capability >= 9.0")
    extra = {"launch_pdl": True} if pdl else {}
    _stream_read_kernel[(programs,)](w, out, n, BLOCK=cfg.block, STEPS=cfg.steps, PDL=pdl, L2PF=cfg.l2_prefetch,
                                     num_warps=cfg.num_warps, **extra)
    return out[:programs]


def stream_read_ref(buf: torch.Tensor, config: ReadConfig | None = None) -> torch.Tensor:
    """:func:`stream_read`'s per-program XORs in plain PyTorch (halving folds: XOR is associative)."""
    cfg = config or ReadConfig()
    w = _words(buf)
    chunk = cfg.block * cfg.steps
    programs = max(1, -(-w.numel() // chunk))
    w = torch.nn.functional.pad(w, (0, programs * chunk - w.numel())).view(programs, chunk)
    while w.shape[1] > 1:
        h = w.shape[1] // 2
        r = torch.bitwise_xor(w[:, :h], w[:, h:2 * h])
        if w.shape[1] % 2:
            r[:, 0] ^= w[:, -1]
        w = r
    return w[:, 0]


def read_floor(nbytes: int, device, *, chain: int = 1, repeats: int = 50, tune_repeats: int = 10,
               configs: list[ReadConfig] | None = None, pdl_modes: tuple[str, ...] = ()) -> dict:
    """The fastest measured read of ``nbytes`` on ``device``: ``chain`` reads back to back in one CUDA
    graph, each of its own buffer (cold in L2 after the flush; per-call time reported), over ``configs``
    (default :data:`READ_GRID`; single reads each also with the L2 prefetch where supported) and
    ``torch.sum``; with ``pdl_modes`` (chains only) the Triton candidates are also tried with
    programmatic dependent launch ("wait_first", "wait_last"). Every candidate is timed with
    ``tune_repeats``, the three fastest again with ``repeats``; the lowest of those medians is the floor.
    ``nbytes`` is rounded up to a multiple of 64.

    Returns ``{"nbytes", "chain", "median_us" (per call), "p10_us", "p90_us", "GBps", "provider",
    "config", "candidates": [{provider, config, median_us[, retimed_us]}, ...]}``."""
    from ..bench.timing import measure_graphed

    if nbytes < 1:
        raise ValueError(f"read_floor: nbytes must be >= 1 (got {nbytes})")
    if chain < 1:
        raise ValueError(f"read_floor: chain must be >= 1 (got {chain})")
    dev = torch.device(device)
    nbytes = -(-nbytes // 64) * 64   # whole 16-word vectors (the loads vectorize): at most 60 bytes more
    gen = torch.Generator(device="cpu").manual_seed(nbytes % (1 << 31))
    bufs = [torch.randint(-(1 << 30), 1 << 30, (nbytes // 4,), dtype=torch.int32, generator=gen).to(dev)
            for _ in range(chain)]
    cands: list[tuple[str, ReadConfig | None]] = [("torch_sum", None)]
    for c in configs or READ_GRID:
        cands.append(("triton", c))
        if chain == 1 and l2_prefetch_supported(dev):
            cands.append(("triton", dataclasses.replace(c, l2_prefetch=True)))
        for m in pdl_modes if chain > 1 and pdl_supported(dev) else ():
            cands.append(("triton", dataclasses.replace(c, pdl=m)))
    outs = {}

    def fn_for(kind, cfg):
        if kind == "torch_sum":
            return lambda: [torch.sum(b, dtype=torch.int64) for b in bufs]
        progs = max(1, -(-(nbytes // 4) // (cfg.block * cfg.steps)))
        o = outs.setdefault(progs, [torch.empty(progs, dtype=torch.int32, device=dev) for _ in bufs])
        return lambda: [stream_read(b, cfg, out=oo) for b, oo in zip(bufs, o)]

    tried = []
    refs: dict[int, torch.Tensor] = {}   # the reference depends on the chunk size alone
    for kind, cfg in cands:
        fn = fn_for(kind, cfg)
        if kind == "triton":   # the kernel is checked before it is timed
            got = fn()[0]
            chunk = cfg.block * cfg.steps
            if chunk not in refs:
                refs[chunk] = stream_read_ref(bufs[0], cfg)
            if not torch.equal(got, refs[chunk]):
                raise AssertionError(f"read_floor: stream_read {cfg} disagrees with its reference")
        t = measure_graphed(fn, repeats=tune_repeats, device=dev)
        tried.append({"provider": kind, "config": cfg.as_dict() if cfg else None,
                      "median_us": t.median_us / chain, "_cfg": cfg})
    # the three fastest timed again with ``repeats``: the floor is the lowest of those medians (a floor
    # errs low: a bound taken from it is never tighter than the measurements allow)
    best, t = None, None
    for r in sorted(tried, key=lambda r: r["median_us"])[:3]:
        tr = measure_graphed(fn_for(r["provider"], r["_cfg"]), repeats=repeats, device=dev)
        r["retimed_us"] = tr.median_us / chain
        if t is None or tr.median_s < t.median_s:
            best, t = r, tr
    for r in tried:
        r.pop("_cfg")
    per = t.median_s / chain
    return {"nbytes": nbytes, "chain": chain, "median_us": per * 1e6, "p10_us": t.p10_s / chain * 1e6,
            "p90_us": t.p90_s / chain * 1e6, "GBps": nbytes / per / 1e9, "provider": best["provider"],
            "config": best["config"], "candidates": tried}
