"""The results registry: ``data/results/<paper>/<device>.json``.

A benchmark writes its records with :func:`save_results`; notebooks read them back with
:func:`load_results` and print :meth:`ResultFile.caption` under every plot of GPU numbers, so a
reader always sees which GPU, which versions, when, and which command produced a number.

File format (JSON)::

    {"paper": "punica", "schema": 1,
     "meta": {device, torch, triton, cuda, date, command, git, ...},
     "config": {...},            # the benchmark's knobs (quick or full, sizes)
     "headline": {"name": ..., "ours": ..., "paper": ..., "unit": ..., "baseline": ...} | null,
     "records": [{"provider": "sgmv", "batch": 8, "median_us": 41.0, ...}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import results_dir
from .env import device_slug, environment

__all__ = ["ResultFile", "save_results", "load_results", "latest_results", "gpu_results"]

SCHEMA = 1


def _clean(x):
    """JSON-safe copy: tensors/numpy scalars to Python numbers, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class ResultFile:
    path: Path
    paper: str
    meta: dict
    records: list[dict]
    config: dict = field(default_factory=dict)
    headline: dict | None = None

    @property
    def device(self) -> str:
        return self.meta.get("device", "unknown device")

    def caption(self) -> str:
        """One line of provenance to print under a plot of these numbers."""
        m = self.meta
        parts = [f"Measured on {self.device}"]
        vers = [f"torch {m['torch']}" if m.get("torch") else None,
                f"triton {m['triton']}" if m.get("triton") else None,
                f"CUDA {m['cuda']}" if m.get("cuda") else None]
        parts.append(", ".join(v for v in vers if v))
        if m.get("date"):
            parts.append(m["date"][:10])
        if m.get("command"):
            parts.append(f"`{m['command']}`")
        if self.config.get("quick"):
            parts.append("quick mode")
        return " · ".join(p for p in parts if p)

    def where(self, **match) -> list[dict]:
        """Records whose fields equal every keyword given."""
        return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]


def save_results(paper: str, records: list[dict], *, headline: dict | None = None, config: dict | None = None,
                 out_dir: str | Path | None = None, meta: dict | None = None, device=None,
                 suffix: str | None = None) -> Path:
    """Write ``records`` with their provenance to ``<out_dir or data/results/<paper>>/<device>.json``.

    suffix: appended to the file name ('quick' -> h100_80gb_hbm3.quick.json) so a quick run never
    overwrites a full one.
    """
    if not records:
        raise ValueError(f"save_results({paper!r}): no records to save")
    if headline is not None:
        missing = {"name", "ours", "unit"} - set(headline)
        if missing:
            raise ValueError(f"save_results: headline lacks {sorted(missing)}")
    meta = {**environment(device), **(meta or {})}
    cfg = dict(config or {})
    if suffix is None and cfg.get("quick"):
        suffix = "quick"
    d = Path(out_dir) if out_dir is not None else results_dir(paper)
    d.mkdir(parents=True, exist_ok=True)
    name = device_slug(meta["device"]) + (f".{suffix}" if suffix else "") + ".json"
    path = d / name
    doc = {"paper": paper, "schema": SCHEMA, "meta": meta, "config": cfg, "headline": headline,
           "records": records}
    path.write_text(json.dumps(_clean(doc), indent=1, sort_keys=False) + "\n")
    return path


def _read(path: Path) -> ResultFile:
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA or "records" not in doc or "meta" not in doc:
        raise ValueError(f"{path}: not a results file of schema {SCHEMA}")
    return ResultFile(path=path, paper=doc.get("paper", path.parent.name), meta=doc["meta"],
                      records=doc["records"], config=doc.get("config") or {}, headline=doc.get("headline"))


def load_results(paper: str, *, include_quick: bool = False, root: str | Path | None = None) -> list[ResultFile]:
    """Every results file of a paper (full runs first, newest first). Files that are not results
    (e.g. a dispatcher table) are skipped only if they lack the schema; malformed results raise."""
    d = Path(root) / paper if root is not None else results_dir(paper)
    out = []
    for p in sorted(d.glob("*.json")):
        if not include_quick and p.name.endswith(".quick.json"):
            continue
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e})") from e
        if not isinstance(doc, dict) or "schema" not in doc:
            continue
        out.append(_read(p))
    out.sort(key=lambda r: r.meta.get("date", ""), reverse=True)
    out.sort(key=lambda r: bool(r.config.get("quick")))
    return out


def latest_results(paper: str, *, gpu_only: bool = True, include_quick: bool = True) -> ResultFile | None:
    """The newest results file of a paper (GPU runs only by default), or None."""
    for r in load_results(paper, include_quick=include_quick):
        if not gpu_only or r.meta.get("device_type") == "cuda":
            return r
    return None


def gpu_results(paper: str, mode: str = "auto", *, bench: str | None = None, quick: bool = True,
                extra: tuple[str, ...] | list[str] = (), where=None) -> ResultFile | None:
    """The GPU results a notebook plots and asserts from.

    mode: ``"auto"``: re-measure live when a CUDA GPU is visible (the registered benchmark ``bench``,
    default ``paper``, with ``quick``/``extra``, into a temporary directory), else the committed
    ``data/results/<paper>/`` file; ``"json"``: the committed file only; ``"skip"``: None.
    where: which committed files qualify (default: measured on a CUDA device); the first one is
    returned, None when there is none (the notebook says which command makes it).
    """
    if mode not in ("auto", "json", "skip"):
        raise ValueError(f"gpu_results: mode must be 'auto', 'json' or 'skip', got {mode!r}")
    if mode == "skip":
        return None
    import torch

    if mode == "auto" and torch.cuda.is_available():
        import argparse
        import tempfile

        from .registry import resolve

        root = Path(tempfile.mkdtemp())
        resolve(bench or paper)(argparse.Namespace(quick=quick, out=root / paper, extra=list(extra)))
        files = load_results(paper, include_quick=True, root=root)
        return files[0] if files else None
    keep = where or (lambda f: f.meta.get("device_type") == "cuda")
    files = [f for f in load_results(paper) if keep(f)]
    return files[0] if files else None
