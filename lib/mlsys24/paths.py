"""Where the workbench keeps things: repository root, committed data, results, figures, runs.

The package is installed editable from ``lib/``; the repository root is two levels above this
file. ``MLSYS24_ROOT`` overrides it (e.g. for a wheel install next to a checkout of ``data/``);
``MLSYS24_FIGURES_DIR`` redirects figure exports (the test suite sends them to ``runs/``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "DATA_DIR", "RESULTS_DIR", "FIGURES_DIR", "RUNS_DIR", "NOTEBOOKS_DIR",
           "figures_dir", "results_dir"]


def _find_root() -> Path:
    env = os.environ.get("MLSYS24_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


REPO_ROOT: Path = _find_root()
DATA_DIR: Path = REPO_ROOT / "data"
RESULTS_DIR: Path = DATA_DIR / "results"
FIGURES_DIR: Path = REPO_ROOT / "figures"
RUNS_DIR: Path = REPO_ROOT / "runs"
NOTEBOOKS_DIR: Path = REPO_ROOT / "notebooks"


def figures_dir(paper: str) -> Path:
    """Directory for a paper's exported figures (``figures/<slug>/`` unless redirected)."""
    base = Path(os.environ.get("MLSYS24_FIGURES_DIR", FIGURES_DIR))
    if not base.is_absolute():
        base = REPO_ROOT / base
    return base / paper


def results_dir(paper: str) -> Path:
    """Directory of a paper's committed benchmark results (``data/results/<slug>/``)."""
    return RESULTS_DIR / paper
