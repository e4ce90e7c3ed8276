"""``python -m mlsys24.reproduce``: run the notebooks headless with papermill into ``runs/``.

One process per notebook (a crash or a leaked thread in one paper cannot affect the next), the
defaults of each notebook's ``parameters`` cell unless ``--params file.yaml`` overrides them, and
a summary of pass/fail/time per paper at the end. The YAML either holds parameters for every
notebook (``{N_REQUESTS: 1000}``) or per paper (``{"01": {...}, awq: {...}}``).

Headless runs pass ``INTERACTIVE=False`` (unless ``--interactive`` or the YAML sets it): the Explore
sections' ipywidgets only make sense in JupyterLab, and nbclient can wait forever on a cell whose
Output widget clears and rewrites itself while being captured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .papers import PAPERS, paper
from .paths import NOTEBOOKS_DIR, RUNS_DIR
from .viz import PNG_QUEUE_ENV, chromium_path

INDEX = "00_index.ipynb"
PNG_TIMEOUT_S = 600


def _select(keys: list[str] | None) -> list[Path]:
    available = {p.name: p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")}
    if not keys:
        return [available[n] for n in sorted(available)]
    out = []
    for key in keys:
        if key.strip() in ("0", "00", "index"):
            name = INDEX
        else:
            name = paper(key).notebook
        if name not in available:
            raise SystemExit(f"--paper {key}: notebook notebooks/{name} does not exist yet")
        out.append(available[name])
    return out


def _params_for(nb: Path, params: dict, interactive: bool = False) -> dict:
    out = _user_params_for(nb, params)
    if not interactive:
        out.setdefault("INTERACTIVE", False)
    return out


def _user_params_for(nb: Path, params: dict) -> dict:
    if not params:
        return {}
    keys = {p.number for p in PAPERS} | {p.slug for p in PAPERS} | {"00", "index"}
    if all(str(k) in keys for k in params):
        number = nb.name[:2]
        slug = nb.stem[3:]
        merged: dict = {}
        for k in (number, slug):
            merged.update(params.get(k, {}) or {})
        return merged
    return dict(params)


def _load_params(path: str | None) -> dict:
    if not path:
        return {}
    import yaml
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--params {path}: file not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"--params {path}: expected a mapping of parameter names to values")
    return data


def _run(cmd: list[str], env: dict, wall_timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on ``wall_timeout`` kill the whole group (papermill,
    its kernel and anything they started) and return ``(None, log)``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=wall_timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return None, (out or "") + f"\n[reproduce] killed after {wall_timeout:.0f} s wall-clock\n"


def run_notebook(nb: Path, out_dir: Path, params: dict, timeout: int, env: dict,
                 wall_timeout: float) -> tuple[bool, float, str]:
    """Execute one notebook with papermill; a run that exceeds ``wall_timeout`` is killed and tried
    once more (the log says so). Figures queued for PNG (``MLSYS24_PNG=defer``) are rendered after
    the notebook, in a separate process with its own time limit."""
    import yaml
    out = out_dir / nb.name
    cmd = [sys.executable, "-m", "papermill", str(nb), str(out), "-k", "python3", "--cwd", str(nb.parent),
           "--no-progress-bar", "--execution-timeout", str(timeout)]
    pfile = None
    if params:
        pfile = out_dir / f".{nb.stem}.params.yaml"
        pfile.write_text(yaml.safe_dump(params))
        cmd += ["-f", str(pfile)]
    queue = None
    if env.get("MLSYS24_PNG") == "defer":
        queue = out_dir / "png-queue" / nb.stem
        shutil.rmtree(queue, ignore_errors=True)
        env = {**env, PNG_QUEUE_ENV: str(queue)}
    t0 = time.perf_counter()
    log = ""
    for attempt in (1, 2):
        rc, text = _run(cmd, env, wall_timeout)
        log += text
        if rc is not None:
            break
        log += f"[reproduce] {nb.name}: no result after {wall_timeout:.0f} s (attempt {attempt})\n"
    ok = rc == 0
    if ok and queue is not None and queue.exists():
        for _attempt in (1, 2):
            prc, text = _run([sys.executable, "-m", "mlsys24.viz", "render", str(queue)], env, PNG_TIMEOUT_S)
            log += text
            if prc == 0:
                break
        ok = prc == 0
        if not ok:
            log += f"[reproduce] {nb.name}: PNG export failed (queued figures left in {queue})\n"
    dt = time.perf_counter() - t0
    (out_dir / f"{nb.stem}.log").write_text(log)
    if pfile is not None:
        pfile.unlink(missing_ok=True)
    return ok, dt, log


def _last_error(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "assert" in ln.lower():
            return ln.strip()[:200]
    return lines[-1].strip()[:200] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlsys24.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="append", help="paper number or slug (repeatable, or comma-separated); "
                                                     "00 = the index; default: every notebook")
    ap.add_argument("--params", help="YAML file of papermill parameters (global or per paper)")
    ap.add_argument("--out", type=Path, default=RUNS_DIR, help="where executed notebooks go (default runs/)")
    ap.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds")
    ap.add_argument("--notebook-timeout", type=float, default=3 * 3600,
                    help="wall-clock limit per notebook in seconds; a run past it is killed and tried once more")
    ap.add_argument("--figures", action="store_true", help="require PNG export of every figure (needs Chromium)")
    ap.add_argument("--interactive", action="store_true",
                    help="keep INTERACTIVE=True (build the Explore widgets) in headless runs")
    args = ap.parse_args(argv)

    keys = [k for arg in (args.paper or []) for k in arg.split(",") if k.strip()]
    notebooks = _select(keys)
    params = _load_params(args.params)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    if args.notebook_timeout <= 0:
        raise SystemExit(f"--notebook-timeout {args.notebook_timeout}: expected a positive number of seconds")
    browser = chromium_path()
    if args.figures and browser is None:
        raise SystemExit("--figures: PNG export needs Chrome/Chromium for kaleido (apt-get install chromium)")
    # PNGs are rendered after each notebook in their own process (see run_notebook): with --figures
    # always, otherwise where a browser exists, unless MLSYS24_PNG says otherwise.
    default_png = "defer" if (args.figures or browser is not None) else "0"
    env["MLSYS24_PNG"] = "defer" if args.figures else env.get("MLSYS24_PNG", default_png)
    try:
        import torch
        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        env.setdefault("TRITON_INTERPRET", "1")

    rows = []
    for nb in notebooks:
        print(f"[reproduce] {nb.name} ...", flush=True)
        ok, dt, log = run_notebook(nb, args.out, _params_for(nb, params, args.interactive), args.timeout, env,
                                   args.notebook_timeout)
        rows.append((nb.stem, ok, dt, "" if ok else _last_error(log)))
        print(f"[reproduce] {nb.name}: {'PASS' if ok else 'FAIL'} in {dt:.1f} s", flush=True)

    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    print(f"{'notebook':<{width}}  result  time (s)")
    for name, ok, dt, err in rows:
        print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {dt:8.1f}" + (f"   {err}" if err else ""))
    n_fail = sum(not r[1] for r in rows)
    print(f"{len(rows) - n_fail} passed, {n_fail} failed; executed notebooks and logs in {args.out}/")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
