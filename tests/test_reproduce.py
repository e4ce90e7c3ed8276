"""``mlsys24.reproduce`` limits and deferred PNG export (``viz.save`` with ``MLSYS24_PNG=defer``)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import pytest

from mlsys24 import reproduce, viz


def test_wall_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child.pid"
    # the parent starts a grandchild and both sleep: a hung kernel under papermill looks like this
    cmd = [sys.executable, "-c",
           "import subprocess, sys, time\n"
           f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
           f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
           "time.sleep(60)\n"]
    t0 = time.perf_counter()
    rc, log = reproduce._run(cmd, dict(os.environ), wall_timeout=3)
    assert rc is None and "killed after 3 s" in log
    assert time.perf_counter() - t0 < 30
    pid = int(marker.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    if status.exists():  # killed but not yet reaped by whoever adopted it: a zombie
        state = next(ln for ln in status.read_text().splitlines() if ln.startswith("State:"))
        assert "Z" in state.split()[1], state


def test_run_returns_exit_status_and_output():
    rc, log = reproduce._run([sys.executable, "-c", "print('hi'); raise SystemExit(3)"], dict(os.environ), 30)
    assert rc == 3 and "hi" in log


def test_bad_notebook_timeout_is_rejected():
    with pytest.raises(SystemExit, match="--notebook-timeout"):
        reproduce.main(["--paper", "00", "--notebook-timeout", "0"])


def test_deferred_png_is_queued_not_rendered(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSYS24_FIGURES_DIR", str(tmp_path / "figs"))
    monkeypatch.setenv("MLSYS24_PNG", "defer")
    monkeypatch.setenv(viz.PNG_QUEUE_ENV, str(tmp_path / "queue"))
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    written = viz.save(fig, "demo", "bars")
    assert [p.suffix for p in written] == [".html"]
    (job,) = (tmp_path / "queue").glob("*.json")
    spec = json.loads(job.read_text())
    assert spec["out"].endswith("demo/bars.png") and spec["figure"]["data"][0]["y"] == [1, 2]


@pytest.mark.skipif(viz.chromium_path() is None, reason="PNG export needs Chromium (apt-get install chromium)")
def test_render_pending_writes_png_in_its_own_process(tmp_path):
    env = {**os.environ, "MLSYS24_FIGURES_DIR": str(tmp_path / "figs"), "MLSYS24_PNG": "defer",
           viz.PNG_QUEUE_ENV: str(tmp_path / "queue")}
    code = ("import plotly.graph_objects as go; from mlsys24 import viz; "
            "viz.save(go.Figure(go.Scatter(y=[3, 1, 2])), 'demo', 'line')")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    rc, log = reproduce._run([sys.executable, "-m", "mlsys24.viz", "render", str(tmp_path / "queue")], env, 300)
    assert rc == 0, log
    png = tmp_path / "figs" / "demo" / "line.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "queue").glob("*.json"))


def test_headless_runs_skip_the_widgets_unless_asked(tmp_path):
    nb = tmp_path / "07_awq.ipynb"
    assert reproduce._params_for(nb, {}) == {"INTERACTIVE": False}
    assert reproduce._params_for(nb, {}, interactive=True) == {}
    assert reproduce._params_for(nb, {"INTERACTIVE": True, "SEED": 3}) == {"INTERACTIVE": True, "SEED": 3}
    per_paper = {"07": {"SEED": 1}, "awq": {"N_GRID": 5}, "01": {"SEED": 9}}
    assert reproduce._params_for(nb, per_paper) == {"SEED": 1, "N_GRID": 5, "INTERACTIVE": False}
