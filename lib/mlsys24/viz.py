"""Plotting helpers shared by every notebook (plotly).

One template (``plotly_white`` with the workbench's fonts), one colour per method across all
notebooks, "paper" vs "ours" overlays (paper hatched, ours solid), and :func:`save`, which writes
``figures/<paper>/<name>.html`` (plotly.js from the CDN, a fixed div id, so the file only changes
when the figure does) plus ``.png`` when a Chrome/Chromium is present for kaleido.

Only notebooks and figure scripts import this module: the library itself never imports plotly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import plotly
import plotly.graph_objects as go
import plotly.io as pio

from .paths import figures_dir

__all__ = ["COLORS", "color", "apply_template", "paper_vs_ours", "caption", "save", "chromium_path",
           "TEMPLATE"]

# One colour per method, the same in every notebook. Baselines are greys/blues, ours warm.
COLORS: dict[str, str] = {
    "paper": "#7f7f7f",
    "ours": "#d62728",
    "reference": "#9467bd",
    "torch": "#1f77b4", "cublas": "#1f77b4", "sdpa": "#1f77b4", "dense": "#1f77b4", "fp16": "#1f77b4",
    "loop": "#8c564b", "gather_bmm": "#17becf", "bgmv": "#bcbd22", "sgmv": "#d62728",
    "rtn": "#8c564b", "awq": "#d62728", "gptq": "#ff7f0e", "atom": "#d62728",
    "full": "#1f77b4", "window": "#8c564b", "streamingllm": "#17becf", "h2o": "#ff7f0e", "keyformer": "#d62728",
    "sync": "#ff7f0e", "async": "#d62728", "flashdecoding": "#ff7f0e", "flashdecoding++": "#d62728",
    "uncompressed": "#1f77b4", "uniform": "#ff7f0e", "lgreco": "#d62728",
    "loop_sampler": "#8c564b", "matrix": "#d62728", "pyg": "#1f77b4",
    "simulated": "#ff7f0e", "measured": "#1f77b4",
    "slora": "#d62728", "no_unify": "#9467bd", "bmm": "#bcbd22", "peft": "#2ca02c", "merged": "#17becf",
    "ladies": "#2ca02c",
}
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]


def color(method: str) -> str:
    """The colour of a method: from the shared table, else a stable pick from the palette."""
    key = method.lower().strip()
    if key in COLORS:
        return COLORS[key]
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return _PALETTE[h % len(_PALETTE)]


TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.font = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)
# Title at the very top, the legend in its own band between title and plot (long titles never collide).
TEMPLATE.layout.title = dict(x=0.02, xanchor="left", y=0.985, yanchor="top")
TEMPLATE.layout.legend = dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0)
TEMPLATE.layout.margin = dict(l=70, r=30, t=120, b=70)
pio.templates["mlsys24"] = TEMPLATE


def apply_template(fig: go.Figure, *, title: str | None = None, x: str | None = None, y: str | None = None,
                   height: int = 420, width: int | None = 760) -> go.Figure:
    """Apply the workbench template and (optionally) the title and axis titles (with units)."""
    fig.update_layout(template="mlsys24", height=height, width=width)
    if _has_subplot_titles(fig):
        # subplot titles sit just above each plot: lift the legend band above them
        t = max(fig.layout.margin.t or 0, 160)
        plot_h = max(height - t - 110, 120)
        fig.update_layout(margin=dict(t=t), legend=dict(y=1.0 + 30 / plot_h))
    if title is not None:
        fig.update_layout(title=title)
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def _has_subplot_titles(fig: go.Figure) -> bool:
    return any(a.yref == "paper" and a.y is not None and a.y >= 1.0 and a.yanchor == "bottom"
               for a in fig.layout.annotations or ())


def paper_vs_ours(categories: Sequence[str], ours: Sequence[float | None], paper: Sequence[float | None], *,
                  title: str, y: str, x: str = "", ours_label: str = "ours", paper_label: str = "paper",
                  text_fmt: str = ".2f") -> go.Figure:
    """Grouped bars: the paper's numbers (hatched grey) beside ours (solid) for each category."""
    fig = go.Figure()
    fig.add_bar(name=paper_label, x=list(categories), y=list(paper), marker_color=color("paper"),
                marker_pattern_shape="/", texttemplate=f"%{{y:{text_fmt}}}", textposition="outside")
    fig.add_bar(name=ours_label, x=list(categories), y=list(ours), marker_color=color("ours"),
                texttemplate=f"%{{y:{text_fmt}}}", textposition="outside")
    fig.update_layout(barmode="group")
    return apply_template(fig, title=title, x=x, y=y)


def caption(fig: go.Figure, text: str) -> go.Figure:
    """Put a caption (scale-downs, provenance) under the plot area; lines longer than the figure is
    wide are wrapped (at ``<br>`` first)."""
    chars = max(60, int((fig.layout.width or 760) / 6.3))
    lines = [w for part in text.split("<br>") for w in (textwrap.wrap(part, chars) or [""])]
    text = "<br>".join(lines)
    # below the tick labels and the x-axis title (~75 px), in paper units of the final plot height
    b = fig.layout.margin.b if fig.layout.margin and fig.layout.margin.b else 70
    b = max(b, 85 + 14 * len(lines))
    t = fig.layout.margin.t if fig.layout.margin and fig.layout.margin.t is not None else 120
    plot_h = max((fig.layout.height or 420) - t - b, 80)
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0, y=-75 / plot_h, xanchor="left", yanchor="top",
                       showarrow=False, font=dict(size=10, color="#555"), align="left")
    fig.update_layout(margin=dict(b=b))
    return fig


def chromium_path() -> str | None:
    """A Chrome/Chromium executable for kaleido 1.x, or None."""
    for cand in (os.environ.get("BROWSER_PATH"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome"), "/usr/bin/chromium"):
        if cand and Path(cand).exists():
            return cand
    return None


_KALEIDO_SERVER = False
PNG_QUEUE_ENV = "MLSYS24_PNG_QUEUE"


def _png_mode(png: bool | None, browser: str | None) -> str:
    """``off`` | ``inline`` (render now, in this process) | ``defer`` (queue for ``render_pending``)."""
    if png is not None:
        return "inline" if png else "off"
    mode = os.environ.get("MLSYS24_PNG", "0").lower()
    if mode == "defer":
        return "defer" if os.environ.get(PNG_QUEUE_ENV) else "off"
    if mode == "require":
        return "inline"
    return "inline" if mode in ("1", "auto") and browser is not None else "off"


def save(fig: go.Figure, paper: str, name: str, *, png: bool | None = None, scale: float = 2.0) -> list[Path]:
    """Write ``figures/<paper>/<name>.html`` and, when asked, ``.png``.

    png: True = required now (raises without Chromium); False = HTML only; None (default) =
    decided by the environment variable ``MLSYS24_PNG``: ``defer`` (``make figures``/``make
    reproduce``: the figure is queued as JSON in ``$MLSYS24_PNG_QUEUE`` and rendered after the
    notebook by ``python -m mlsys24.viz render`` in its own process, so a stuck headless browser
    can never stall a notebook kernel), ``require``/``auto`` (render in this process; ``auto`` only
    when Chromium exists), unset/0 (interactive use and the test suite: HTML only). Returns the
    paths written (a deferred PNG is not among them until rendered).
    """
    global _KALEIDO_SERVER
    if not name or "/" in name:
        raise ValueError(f"save: name must be a plain file stem, got {name!r}")
    d = figures_dir(paper)
    d.mkdir(parents=True, exist_ok=True)
    html = d / f"{name}.html"
    fig.write_html(html, include_plotlyjs="cdn", full_html=True, div_id=f"{paper}-{name}",
                   config={"displaylogo": False})
    written = [html]
    browser = chromium_path()
    mode = _png_mode(png, browser)
    out = d / f"{name}.png"
    width, height = fig.layout.width or 760, fig.layout.height or 420
    if mode == "defer":
        queue = Path(os.environ[PNG_QUEUE_ENV])
        queue.mkdir(parents=True, exist_ok=True)
        job = {"figure": fig.to_plotly_json(), "out": str(out.resolve()), "width": width, "height": height,
               "scale": scale}
        (queue / f"{paper}--{name}.json").write_text(json.dumps(job, cls=plotly.utils.PlotlyJSONEncoder))
    elif mode == "inline":
        if browser is None:
            raise RuntimeError("save: PNG export needs Chrome/Chromium for kaleido (apt-get install chromium)")
        os.environ.setdefault("BROWSER_PATH", browser)
        if not _KALEIDO_SERVER:  # one browser for every PNG of this process
            try:
                import kaleido

                kaleido.start_sync_server(silence_warnings=True)
                _KALEIDO_SERVER = True
            except Exception:
                pass
        with warnings.catch_warnings():  # plotly passes browser options the shared server ignores
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            fig.write_image(out, format="png", scale=scale, width=width, height=height)
        written.append(out)
    return written


def render_pending(queue: Path) -> list[Path]:
    """Render every figure queued by ``save`` in ``queue`` to PNG with one headless browser; the
    queue entries are removed once their PNG exists. Returns the PNGs written."""
    browser = chromium_path()
    if browser is None:
        raise RuntimeError("render_pending: PNG export needs Chrome/Chromium for kaleido (apt-get install chromium)")
    os.environ.setdefault("BROWSER_PATH", browser)
    jobs = sorted(Path(queue).glob("*.json"))
    if not jobs:
        return []
    specs = [json.loads(j.read_text()) for j in jobs]
    figs = [go.Figure(s["figure"]) for s in specs]
    outs = [Path(s["out"]) for s in specs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        pio.write_images(figs, outs, format="png", scale=[s["scale"] for s in specs],
                         width=[s["width"] for s in specs], height=[s["height"] for s in specs])
    for j, o in zip(jobs, outs):
        if o.exists():
            j.unlink()
    return outs


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mlsys24.viz", description="Render queued figures to PNG.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render the figures queued by viz.save (MLSYS24_PNG=defer) to PNG")
    r.add_argument("queue", type=Path, help="the queue directory ($MLSYS24_PNG_QUEUE)")
    args = ap.parse_args(argv)
    outs = render_pending(args.queue)
    print(f"rendered {len(outs)} PNG(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
