"""Progress bars that behave in JupyterLab and stay quiet in batch runs.

``progress(iterable, desc=...)`` is ``tqdm.auto`` (a widget bar in JupyterLab, text in a terminal)
with ``leave=False``; it is silent when ``enabled=False``, or by default when the process runs in
batch (papermill, nbval, CI: ``MLSYS24_BATCH=1``, or ``CI`` set), so executed notebooks and logs
carry no bar noise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "progress_bar", "batch_mode"]


def batch_mode() -> bool:
    """True in batch runs (papermill via ``make reproduce``, the test suite, CI)."""
    return os.environ.get("MLSYS24_BATCH") == "1" or bool(os.environ.get("CI"))


def progress(iterable: Iterable[T], *, desc: str | None = None, total: int | None = None,
             enabled: bool | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm.auto bar unless disabled or in batch mode."""
    if enabled is None:
        enabled = not batch_mode()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, desc: str | None = None, enabled: bool | None = None):
    """A manual bar (``.update(n)``, ``.close()``), silent when disabled or in batch mode."""
    if enabled is None:
        enabled = not batch_mode()
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
