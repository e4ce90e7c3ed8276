"""Capture of the device and software a measurement ran on (its provenance)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["environment", "device_name", "device_slug", "library_digest"]


def device_name(device: str | torch.device | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU, 'cpu (<processor>, N cores)' otherwise."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                proc = m.group(1).strip()
    except OSError:
        pass
    return f"cpu ({proc}, {os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3', CPUs -> 'cpu'."""
    if name.lower().startswith("cpu"):
        return "cpu"
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_") or "unknown"


def _command_line() -> str:
    """The command as typed (``python3 -m mlsys24.bench serving``), not the resolved script path."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and argv[0].endswith(("python", "python3")) or (argv and "python" in Path(argv[0]).name):
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def _git_rev() -> str | None:
    from ..paths import REPO_ROOT
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        rev = out.stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return None


def library_digest(root: str | Path | None = None) -> str:
    """SHA-1 (12 hex digits) of the library's Python sources (``lib/mlsys24/**/*.py``: relative paths and
    contents, in sorted order): names the code that ran even where the checkout's git metadata is
    stale or absent (a copied tree). :func:`library_digest` on a checkout of a commit gives the same value."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for f in sorted(base.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(base).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment(device: str | torch.device | None = None, command: str | None = None) -> dict:
    """Everything a reader needs to judge a number: device, versions, date, command, git revision and
    the digest of the library sources that ran (:func:`library_digest`)."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    env: dict = {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else _command_line(),
        "git": _git_rev(),
        "lib_sha1": library_digest(),
    }
    try:
        import triton  # noqa: F401  (optional)
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update({
            "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
        })
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            env["driver"] = drv[0] if drv else None
        except Exception:
            env["driver"] = None
    return env
