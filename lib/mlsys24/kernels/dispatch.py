"""Heuristic GEMM dataflow: pick GEMV / flat GEMM / cuBLAS per (M, N, K) from a profiled table
(FlashDecoding++, section 5).

A decoder-only LLM meets only a handful of [N, K] weight shapes (QKV, O, FFN up/gate, FFN down); M is
the batch (decode) or batch x prompt length (prefill). Offline, for each GPU and [N, K], the three
implementations are profiled over M and two inflection points are stored::

    M <= M1        -> "gemv"    (ImplA: CUDA cores, :func:`mlsys24.kernels.flat_gemm.gemv`, M <= 4)
    M1 < M <= M2   -> "flat"    (ImplB: small-M tensor-core tiles, :func:`~mlsys24.kernels.flat_gemm.flat_gemm`)
    M2 < M         -> "cublas"  (ImplC: ``torch.matmul``)

The table is JSON (``data/results/flashdecoding_pp/dispatch_table.<device>.json``, written by the
benchmark) with the tuned tile configuration of each Triton implementation::

    {"kind": "fdpp_dispatch_table", "device": "NVIDIA H100 80GB HBM3",
     "default": {"M1": 2, "M2": 32},
     "shapes": [{"N": 4096, "K": 4096, "M1": 2, "M2": 32,
                 "configs": {"gemv": {"by_m": {"1": {...GemmConfig}, "4": {...}}},
                             "flat": {"by_m": {"16": {...}, "64": {...}}}}}, ...]}

(``by_m``: a config per M bucket; M uses the smallest bucket >= M; a config may carry ``split_k``.)

Without a table for the current device a built-in default is used (thresholds only);
:attr:`GemmDispatcher.source` names the table in use. Where Triton
cannot run (a CPU without ``TRITON_INTERPRET=1``) every call goes to ``torch.matmul``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["IMPLS", "GemmDispatcher", "default_table", "fit_thresholds", "table_path", "choose_from_table"]

IMPLS = ("gemv", "flat", "cublas")
GEMV_MAX_M = 4
TABLE_KIND = "fdpp_dispatch_table"
SLUG = "flashdecoding_pp"


def default_table() -> dict:
    """Thresholds used when no profiled table exists for the device: GEMV for M <= 2, flat GEMM up
    to M = 32, the library GEMM beyond (the shape the paper's Fig. 9 profiles usually take)."""
    return {"kind": TABLE_KIND, "device": None, "source": "built-in default (not profiled)",
            "default": {"M1": 2, "M2": 32}, "shapes": []}


def table_path(device_name: str, root: str | Path | None = None) -> Path:
    from ..bench.env import device_slug
    from ..paths import results_dir
    d = Path(root) if root is not None else results_dir(SLUG)
    return d / f"dispatch_table.{device_slug(device_name)}.json"


def _validate(table: Mapping) -> dict:
    if not isinstance(table, Mapping) or table.get("kind") != TABLE_KIND:
        raise ValueError(f"not a dispatch table (kind != {TABLE_KIND!r})")
    t = json.loads(json.dumps(table))
    d = t.setdefault("default", {"M1": 2, "M2": 32})
    for e in [d, *t.setdefault("shapes", [])]:
        m1, m2 = int(e["M1"]), int(e["M2"])
        if not (0 <= m1 <= GEMV_MAX_M and m1 <= m2):
            raise ValueError(f"dispatch table entry needs 0 <= M1 <= {GEMV_MAX_M} and M1 <= M2, got {e}")
    return t


def choose_from_table(table: Mapping, M: int, N: int, K: int) -> tuple[str, dict | None]:
    """The implementation the table picks for (M, N, K) and its tile config (None: defaults)."""
    entry = None
    for e in table.get("shapes", []):
        if int(e["N"]) == N and int(e["K"]) == K:
            entry = e
            break
    th = entry if entry is not None else table["default"]
    m1, m2 = int(th["M1"]), int(th["M2"])
    if M <= m1:
        impl = "gemv"
    elif M <= m2:
        impl = "flat"
    else:
        impl = "cublas"
    cfg = (entry or {}).get("configs", {}).get(impl)
    if isinstance(cfg, Mapping) and "by_m" in cfg:
        # configs tuned per M bucket: the smallest bucket >= M (the largest beyond them)
        buckets = sorted(int(b) for b in cfg["by_m"])
        pick = next((b for b in buckets if b >= M), buckets[-1])
        cfg = cfg["by_m"][str(pick)]
    return impl, cfg


def fit_thresholds(times: Mapping[str, Mapping[int, float]]) -> dict:
    """Inflection points (M1, M2) from profiled times ``{impl: {M: seconds}}``.

    Minimizes the worst relative loss vs the per-M best over the profiled M (ties: the total loss),
    subject to the table's shape (gemv up to M1 <= 4, flat up to M2, cuBLAS beyond). Returns
    ``{"M1", "M2", "max_loss", "mean_loss"}``.
    """
    ms = sorted({int(m) for t in times.values() for m in t})
    if not ms:
        raise ValueError("fit_thresholds: no timings")

    def t(impl, m):
        v = times.get(impl, {}).get(m)
        if v is None or not math.isfinite(v) or (impl == "gemv" and m > GEMV_MAX_M):
            return math.inf
        return float(v)

    best = {m: min(t(i, m) for i in IMPLS) for m in ms}
    cand1 = sorted({0} | {m for m in ms if m <= GEMV_MAX_M})
    cand2 = sorted({0} | set(ms))
    result = None
    for m1 in cand1:
        for m2 in cand2:
            if m2 < m1:
                continue
            losses = []
            for m in ms:
                impl = "gemv" if m <= m1 else ("flat" if m <= m2 else "cublas")
                losses.append(t(impl, m) / best[m] - 1.0)
            key = (max(losses), sum(losses))
            if result is None or key < result[0]:
                result = (key, m1, m2, losses)
    (mx, tot), m1, m2, losses = result
    return {"M1": m1, "M2": m2, "max_loss": mx, "mean_loss": tot / len(losses)}


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


class GemmDispatcher:
    """Pick and run GEMV / flat GEMM / cuBLAS for ``x[M, K] @ w[K, N]`` from a lookup table."""

    def __init__(self, table: Mapping | None = None, source: str | None = None):
        self.table = _validate(table if table is not None else default_table())
        # where the table came from, for logs and figure captions
        self.source = source or self.table.get("source") or "table given in code"

    @classmethod
    def for_device(cls, device_name: str | None = None, root: str | Path | None = None) -> GemmDispatcher:
        """The profiled table of this device if one is committed (``dispatch_table.<device>.json``),
        else the built-in default; :attr:`source` says which (the path, or why the default)."""
        if device_name is None:
            from ..bench.env import device_name as _dn
            device_name = _dn()
        p = table_path(device_name, root)
        if p.exists():
            return cls(json.loads(p.read_text()), source=f"profiled table {p.name} ({device_name})")
        return cls(source=f"built-in default thresholds (no {p.name} for {device_name})")

    def __repr__(self) -> str:
        return f"GemmDispatcher({self.source}; {len(self.table['shapes'])} profiled [N, K] shapes)"

    @property
    def profiled(self) -> bool:
        return bool(self.table.get("device"))

    def choose(self, M: int, N: int, K: int) -> str:
        return choose_from_table(self.table, M, N, K)[0]

    def plan(self, M: int, N: int, K: int):
        """(impl, GemmConfig or None) for a shape."""
        from .flat_gemm import GemmConfig
        impl, cfg = choose_from_table(self.table, M, N, K)
        return impl, (GemmConfig(**cfg) if isinstance(cfg, Mapping) else None)

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x[..., K] @ w[K, N]`` through the chosen implementation."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        M, K = x2.shape
        N = w.shape[1]
        impl, cfg = self.plan(M, N, K)
        if impl == "cublas" or not _triton_usable(x.device) or M == 0:
            y = x2 @ w
        else:
            from . import flat_gemm as fg
            y = fg.gemv(x2, w, config=cfg) if impl == "gemv" else fg.flat_gemm(x2, w, config=cfg)
        return y.reshape(*lead, N)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``torch.nn.functional.linear`` (weight [N, K]) through the dispatcher; the cuBLAS choice calls
        ``F.linear`` itself (the same library call as the baseline)."""
        M = x.numel() // x.shape[-1] if x.dim() else 0
        if self.choose(M, weight.shape[0], weight.shape[1]) == "cublas" or not _triton_usable(x.device):
            return torch.nn.functional.linear(x, weight, bias)
        y = self.matmul(x, weight.t())
        return y + bias if bias is not None else y

    __call__ = matmul
