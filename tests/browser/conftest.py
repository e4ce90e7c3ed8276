"""JupyterLab in a real browser: a private JupyterLab server and a headless Chromium (Playwright).

The server listens on 127.0.0.1 on a free port, with a random token, and keeps its runtime,
config, settings, workspaces and IPython dirs in a temporary folder, so a user's own JupyterLab is
neither read nor touched. Network look-ups (news, update check, extension manager) are off, autosave
is off (the executed notebooks are never written back), and the kernels get ``TRITON_INTERPRET=1``
(on machines without a GPU) and ``MLSYS24_BATCH=1``. Teardown stops every kernel and the server.

Chromium is the system's (Debian's ``chromium``): Playwright's own browser download is not used.
Everything skips, saying why, where Playwright, JupyterLab or Chromium is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlsys24.paths import NOTEBOOKS_DIR, RUNS_DIR

SCREENSHOTS_DIR = RUNS_DIR / "screenshots"
SERVER_START_TIMEOUT_S = float(os.environ.get("MLSYS24_BROWSER_START_TIMEOUT", "120"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-default-browser-check",
]
VIEWPORT = {"width": 1400, "height": 1000}


def chromium_executable() -> str | None:
    """The system Chromium/Chrome (``CHROMIUM`` overrides), or None."""
    for cand in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome"), "/usr/bin/chromium"):
        if cand and Path(cand).exists() and os.access(cand, os.X_OK):
            return cand
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class LabServer:
    """A running JupyterLab: base URL, token, process, log file."""

    url: str
    token: str
    proc: subprocess.Popen
    log: Path
    root_dir: Path
    kernel_pids: set[int] = field(default_factory=set)

    def api(self, method: str, path: str, timeout: float = 10.0):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        # `reset` starts from a clean workspace; the token logs the browser in (cookie).
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def remember_kernels(self) -> None:
        """Note the server's child processes (the kernels) so teardown can make sure they end."""
        self.kernel_pids.update(_children(self.proc.pid))

    def shutdown_kernels(self, path: str | None = None) -> None:
        """Stop the kernels of the sessions open on ``path`` (all sessions when None)."""
        self.remember_kernels()
        try:
            sessions = self.api("GET", "/api/sessions")
        except (OSError, urllib.error.URLError, ValueError):
            return
        for s in sessions or []:
            if path is None or s.get("path") == path:
                try:
                    self.api("DELETE", f"/api/sessions/{s['id']}", timeout=30)
                except (OSError, urllib.error.URLError, ValueError):
                    pass


def _write_lab_config(tmp: Path) -> dict[str, str]:
    """Private Jupyter dirs with the settings the test needs; returns the env entries."""
    dirs = {name: tmp / name for name in ("config", "runtime", "settings", "workspaces", "ipython", "data")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # Plugins that would reach the network or pop up over the page.
    (dirs["config"] / "labconfig").mkdir(exist_ok=True)
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": {
        "@jupyterlab/extensionmanager-extension": True,
        "@jupyterlab/apputils-extension:announcements": True,
    }}))
    settings = {
        # The executed notebooks must never be written back (jupytext would rewrite the .py twin).
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"checkForUpdates": False, "fetchNews": "false"},
    }
    for rel, value in settings.items():
        p = dirs["settings"] / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(value))
    return {
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),  # kernelspecs and lab extensions still come from sys.prefix
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS_DIR


@pytest.fixture(scope="session")
def chromium_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[dev]')")
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no Chromium executable found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    return exe


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, chromium_path, screenshots_dir):
    """A private JupyterLab on 127.0.0.1:<free port> serving notebooks/, killed at the end."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[lab]')")
    tmp = tmp_path_factory.mktemp("jupyterlab")
    env = dict(os.environ)
    env.update(_write_lab_config(tmp))
    env.update({
        "MLSYS24_BATCH": "1",  # no progress bars; batch-quiet like the other notebook tests
        "MLSYS24_FIGURES_DIR": str(tmp / "figures"),  # never overwrite the committed figures/
        "MLSYS24_PNG": "0",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if not _has_cuda():
        env["TRITON_INTERPRET"] = "1"
    env.pop("JUPYTER_TOKEN", None)
    token = secrets.token_hex(24)
    port = _free_port()
    log = screenshots_dir / "jupyterlab-server.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False", f"--IdentityProvider.token={token}",
        "--ServerApp.allow_root=True",  # CI containers run as root
        f"--ServerApp.root_dir={NOTEBOOKS_DIR}", "--ServerApp.terminals_enabled=False",
        "--ServerApp.shutdown_no_activity_timeout=900",  # last resort if teardown never ran
        "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
        # Plain contents manager: jupytext's would read a paired .py that a fresh checkout left newer
        # than its .ipynb and re-sync on open; the test must see the committed .ipynb as it is.
        "--ServerApp.jpserver_extensions=jupyterlab_jupytext=False",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the test reads the kernel's state
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=NOTEBOOKS_DIR, start_new_session=True)
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, proc=proc, log=log, root_dir=NOTEBOOKS_DIR)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} while starting:\n{server.log_tail()}")
            try:
                server.api("GET", "/api/status", timeout=5)
                break
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop_server(server)


def _stop_server(server: LabServer) -> None:
    proc = server.proc
    if proc.poll() is None:
        server.shutdown_kernels()
        server.remember_kernels()
        proc.send_signal(signal.SIGTERM)  # jupyter_server stops its kernels and exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    for pid in server.kernel_pids:  # kernels run in their own sessions: end any that outlived the server
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def browser_context(chromium_path, tmp_path_factory):
    """One headless Chromium with a fresh profile for the whole session."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, timeout=60_000,
        )
        ctx.set_default_timeout(30_000)
        try:
            yield ctx
        finally:
            ctx.close()
