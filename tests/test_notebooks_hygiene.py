"""Notebook hygiene: twins in sync, no outputs committed, one parameters cell, kernelspec python3,
metadata for the index, parameters validated; and a bad parameter fails with its name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlsys24.papers import PAPERS
from mlsys24.paths import NOTEBOOKS_DIR, REPO_ROOT

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
KNOWN = {p.notebook for p in PAPERS} | {"00_index.ipynb"}


def _cells(nb):
    return [(c["cell_type"], "".join(c["source"]).strip()) for c in nb["cells"]]


def test_there_are_notebooks():
    assert any(nb.name == "00_index.ipynb" for nb in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_hygiene(path: Path):
    jupytext = pytest.importorskip("jupytext")
    assert path.name in KNOWN, f"{path.name} is not named after a paper of mlsys24.papers"
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") for c in code), "outputs are committed: strip them (nbstripout)"
    assert not any(c.get("execution_count") for c in code), "execution counts are committed"
    params = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"needs exactly one cell tagged 'parameters', found {len(params)}"
    assert nb["cells"][params[0]]["cell_type"] == "code"
    after = "".join(nb["cells"][params[0] + 1]["source"])
    assert "validate(" in after, "the cell after 'parameters' must call mlsys24.params.validate(...)"
    meta = nb["metadata"].get("mlsys24", {})
    for key in ("paper", "slug", "status", "headline"):
        assert meta.get(key), f"metadata mlsys24.{key} missing"
    assert meta["status"] in ("reproduced", "partial")

    twin = path.with_suffix(".py")
    assert twin.exists(), f"py:percent twin {twin.name} missing (jupytext --sync)"
    from_py = jupytext.read(twin)
    assert _cells(from_py) == _cells(nb), f"{twin.name} and {path.name} differ: run jupytext --sync {path}"
    py_tags = [c.metadata.get("tags", []) for c in from_py.cells]
    assert sum("parameters" in t for t in py_tags) == 1


def test_bad_parameter_fails_naming_it(tmp_path):
    pytest.importorskip("papermill")
    out = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "00_index.ipynb"), str(tmp_path / "o.ipynb"),
         "-k", "python3", "-p", "AREA", "no such area", "-p", "INTERACTIVE", "False", "--no-progress-bar"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "ParameterError" in log and "parameter 'AREA'" in log, log[-2000:]
