# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,mlsys24,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   mlsys24:
#     headline: 'Landing page: the 25 papers, their status and the reproduced headline
#       results'
#     paper: '00'
#     slug: index
#     status: reproduced
# ---

# %% [markdown]
# # The MLSys 2024 reproduction workbench
#
# One notebook per MLSys 2024 paper, each reproducing the paper's method and its key figures,
# all backed by one library (`lib/mlsys24`): real Triton kernels, a serving engine, simulators,
# distributed protocols. This page lists the papers, where each stands, and the headline results
# reproduced so far — every GPU number with the device, versions, date and command that made it.
#
# - Run everything headless: `make reproduce` (or `make reproduce PAPER=07`).
# - Run the tests: `make test`.
# - GPU benchmarks: `PYTHONPATH=lib python3 -m mlsys24.bench <paper>` writes `data/results/<paper>/<gpu>.json`.

# %% tags=["parameters"]
AREA = "all"          # show only papers of this area ("all", or e.g. "LLM serving")
INTERACTIVE = True    # build the ipywidgets explorer at the end (False in batch runs)

# %%
from mlsys24.papers import PAPERS
from mlsys24.params import Bool, Choice, validate

AREAS = sorted({p.area for p in PAPERS})
validate(globals(), AREA=Choice("all", *AREAS), INTERACTIVE=Bool())

# %%
import json

import plotly.graph_objects as go

from mlsys24 import viz
from mlsys24.bench import load_results
from mlsys24.papers import notebook_meta, notebook_path
from mlsys24.paths import NOTEBOOKS_DIR, RESULTS_DIR

rows = []
for p in PAPERS:
    nb = notebook_path(p)
    meta = notebook_meta(nb) if nb.exists() else {}
    gpu_files = [r for r in load_results(p.slug) if r.meta.get("device_type") == "cuda"]
    rows.append({
        "number": p.number, "slug": p.slug, "title": p.title, "area": p.area, "url": p.url,
        "notebook": p.notebook if nb.exists() else None,
        "status": meta.get("status", "planned") if nb.exists() else "planned",
        "headline": meta.get("headline", ""),
        "gpu_results": sorted({r.device for r in gpu_files}),
    })
shown = [r for r in rows if AREA == "all" or r["area"] == AREA]
print(f"{sum(r['notebook'] is not None for r in rows)} of {len(rows)} papers have a notebook")

# %% [markdown]
# ## The papers

# %%
status_colour = {"reproduced": "#d9f2d9", "partial": "#fff3cd", "planned": "#f2f2f2"}


def table_height(sel):
    """Pixels for every row to show: cells wrap at ~45 (title) and ~42 (headline) characters a line."""
    lines = [max(1, -(-len(r["title"]) // 45), -(-len(r["headline"] or "—") // 42)) for r in sel]
    return 170 + sum(16 + 17 * n for n in lines)


table = go.Figure(go.Table(
    columnwidth=[30, 300, 110, 80, 330],
    header=dict(values=["#", "paper", "area", "status", "headline (paper vs ours)"], align="left",
                fill_color="#e8e8e8"),
    cells=dict(values=[[r["number"] for r in shown], [r["title"] for r in shown], [r["area"] for r in shown],
                       [r["status"] for r in shown], [r["headline"] or "—" for r in shown]],
               align="left", fill_color=[[status_colour[r["status"]] for r in shown]] * 5),
))
viz.apply_template(table, title="MLSys 2024 papers in the workbench", height=table_height(shown), width=1000)
viz.save(table, "index", "papers")
table

# %% [markdown]
# **Takeaway.** Status comes from each notebook's own metadata (`mlsys24.status`): *reproduced*
# means the notebook runs the method for real and asserts the claims its run can check;
# *partial* says what is missing in the notebook itself; *planned* has no notebook yet.

# %% [markdown]
# ## Reproduced headline results (GPU benchmarks)
#
# Every benchmark writes `data/results/<paper>/<device>.json` with its provenance and, where it
# has one, a headline (ours vs the paper's number). The bars below are read from those files.

# %%
headlines = []
for p in PAPERS:
    for r in load_results(p.slug):
        if r.headline and r.meta.get("device_type") == "cuda":
            headlines.append((p, r))
extra = sorted(d.name for d in RESULTS_DIR.glob("*") if d.is_dir()) if RESULTS_DIR.exists() else []
for name in extra:
    if name not in {p.slug for p in PAPERS}:
        for r in load_results(name):
            if r.headline and r.meta.get("device_type") == "cuda":
                headlines.append((None, r))

if headlines:
    labels = [f"{(p.number + ' ' + p.slug) if p else r.paper}: {r.headline['name']}" for p, r in headlines]
    fig = go.Figure()
    fig.add_bar(name="paper", y=labels, x=[r.headline.get("paper") for _, r in headlines], orientation="h",
                marker_color=viz.color("paper"), marker_pattern_shape="/")
    fig.add_bar(name="ours", y=labels, x=[r.headline["ours"] for _, r in headlines], orientation="h",
                marker_color=viz.color("ours"),
                text=[f"{r.headline['ours']:.3g} {r.headline['unit']} on {r.device}" for _, r in headlines],
                textposition="auto")
    viz.apply_template(fig, title="Headline results: paper vs ours", x="value (unit per row)",
                       height=200 + 60 * len(headlines), width=1000)
    fig.update_layout(barmode="group")
    viz.caption(fig, " | ".join(sorted({r.caption() for _, r in headlines}))[:400])
    viz.save(fig, "index", "headlines")
    display(fig)  # noqa: F821 (IPython builtin)
    for _, r in headlines:
        print(f"{r.paper}: {r.headline['name']} = {r.headline['ours']:.4g} {r.headline['unit']}"
              f" (paper: {r.headline.get('paper')})\n    {r.caption()}")
else:
    print("No GPU results committed yet: run `PYTHONPATH=lib python3 -m mlsys24.bench <paper>` on a GPU.")

# %% [markdown]
# **Takeaway.** Each bar is a number measured by the command named in its caption, on the GPU
# named there; the paper's number is on the paper's hardware, so the comparison is in shape,
# not a race between machines.

# %% [markdown]
# ## Checks
# The index itself asserts that the workbench is consistent: every notebook belongs to a known
# paper and has its metadata, and every committed result carries its provenance.

# %%
known = {p.notebook for p in PAPERS} | {"00_index.ipynb"}
on_disk = sorted(nb.name for nb in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
assert set(on_disk) <= known, f"notebooks without a paper: {set(on_disk) - known}"
for r in rows:
    if r["notebook"]:
        assert r["status"] in ("reproduced", "partial"), f"{r['notebook']}: status {r['status']!r}"
        assert r["headline"], f"{r['notebook']}: metadata mlsys24.headline is empty"
for d in (RESULTS_DIR.glob("*/*.json") if RESULTS_DIR.exists() else []):
    doc = json.loads(d.read_text())
    if "schema" in doc:
        for key in ("device", "torch", "date", "command"):
            assert doc["meta"].get(key), f"{d}: provenance field {key!r} missing"
print(f"ok: {len(on_disk)} notebooks, all results carry provenance")

# %% [markdown]
# ## Explore

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    area = W.Dropdown(options=["all", *AREAS], value=AREA, description="area")
    out_table = W.Output()  # a re-displayed go.Figure: FigureWidget drops the wrapped text of Table cells

    def _filter(change=None):
        sel = [r for r in rows if area.value == "all" or r["area"] == area.value]
        fig = go.Figure(table)
        fig.update_traces(cells=dict(values=[[r["number"] for r in sel], [r["title"] for r in sel],
                                             [r["area"] for r in sel], [r["status"] for r in sel],
                                             [r["headline"] or "—" for r in sel]],
                                     fill_color=[[status_colour[r["status"]] for r in sel]] * 5))
        fig.update_layout(height=table_height(sel))
        with out_table:
            out_table.clear_output(wait=True)
            display(fig)

    area.observe(_filter, names="value")
    _filter()
    display(W.VBox([area, out_table]))

# %% [markdown]
# ## Going further
# - `make reproduce PARAMS=gpu.yaml` runs every notebook at GPU scale (each notebook's
#   "Going further" cell names its own parameters).
# - `make figures` exports every key figure to `figures/<paper>/` (PNG needs Chromium).
