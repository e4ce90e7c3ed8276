"""The notebooks in JupyterLab, driven through a headless Chromium.

For each selected notebook: open it in JupyterLab, Run -> Run All Cells, wait until the kernel is
idle and every code cell has run, then check that

- no cell shows an error (no traceback on stderr, no widget or renderer failure),
- every plotly output rendered its SVG (``.main-svg``), and at least one did,
- every widget output rendered, and moving an ipywidgets control of the Explore cell changes the
  data of the plot it drives (for the index: choosing an area in the dropdown leaves exactly that
  area's papers in the table, in the figure's data and in its SVG).

Screenshots go to ``runs/screenshots/`` (a plot, the Explore cell before and after the change,
the page; on failure the page and its HTML). The notebooks run with ``TRITON_INTERPRET=1`` (no GPU)
and ``MLSYS24_BATCH=1`` and are never saved: autosave is off and the page's writes to the contents
API are refused (and would fail the test).

Which notebooks: ``MLSYS24_BROWSER_NOTEBOOKS`` = comma-separated numbers or file names
(``00,07``), or ``all``; by default the index and the first paper notebook (01..25) present.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from mlsys24.paths import NOTEBOOKS_DIR

INDEX = "00_index.ipynb"
# Budget per notebook for Run All on 2 shared CPU cores (defaults run in < 90 s headless).
RUN_TIMEOUT_S = float(os.environ.get("MLSYS24_BROWSER_RUN_TIMEOUT", "240"))
KERNEL_START_TIMEOUT_S = 120.0
WIDGET_TIMEOUT_S = 20.0

PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERROR_RE = re.compile(r"Traceback \(most recent call last\)|^\s*\w*(Error|Exception)\b.*?:", re.M)
RENDER_FAILURES = ("Error displaying widget", "Failed to load model class", "Error rendering output",
                   "Could not render content", "Javascript Error", "model not found")


def _paper_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb") if "01" <= p.name[:2] <= "25")


def _selected_notebooks() -> list[str]:
    spec = os.environ.get("MLSYS24_BROWSER_NOTEBOOKS", "").strip()
    papers = [p.name for p in _paper_notebooks()]
    if not spec:
        return [INDEX, *papers[:1]]
    if spec == "all":
        return [INDEX, *papers]
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [n for n in [INDEX, *papers] if n == item or n.startswith(f"{item}_") or n == f"{item}.ipynb"]
        chosen.append(hits[0] if hits else item)  # a missing one fails in the test, naming it
    return chosen


NOTEBOOKS = _selected_notebooks()

# --- page helpers (JavaScript evaluated in the page) -------------------------------------------------

_STATE_JS = """(panelSel) => {
  const panel = document.querySelector(panelSel);
  const app = window.jupyterapp;
  const nb = app && app.shell.currentWidget;
  if (!panel || !nb || !nb.sessionContext || !nb.content || !nb.content.model) return null;
  const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
  const model = [...nb.content.model.cells].filter(c => c.type === 'code');
  const prompts = [...panel.querySelectorAll('.jp-Notebook .jp-CodeCell')].map(
      c => ((c.querySelector('.jp-InputArea-prompt') || {}).textContent || '').trim());
  return {
    // what the user sees: the toolbar's execution indicator and the cell prompts
    indicator: (panel.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}}).dataset.status || null,
    prompts,
    // the kernel behind it
    ready: !!(nb.context.isReady && nb.sessionContext.isReady && kernel && kernel.connectionStatus === 'connected'),
    kernel: kernel ? kernel.status : null,
    counts: model.map(c => c.executionCount),
    sources: model.map(c => c.sharedModel.getSource().trim().length),
  };
}"""

# Per code cell: its outputs in the notebook model (type, mime types, error/stream text) and what the
# page shows for them (output texts, rendered plotly graphs, rendered widget views).
_OUTPUTS_JS = """(panelSel) => {
  const panel = document.querySelector(panelSel);
  const nb = window.jupyterapp.shell.currentWidget;
  const dom = [...panel.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const code = [...nb.content.model.cells].filter(c => c.type === 'code');
  return code.map((c, i) => {
    const outs = [];
    for (let k = 0; k < c.outputs.length; k++) {
      const o = c.outputs.get(k).toJSON();
      let text = '';
      if (o.output_type === 'error') text = o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n');
      else if (o.output_type === 'stream') text = String(o.text).slice(-3000);
      outs.push({type: o.output_type, name: o.name || null, mimes: Object.keys(o.data || {}), text});
    }
    const el = dom[i];
    return {
      outputs: outs,
      texts: el ? [...el.querySelectorAll('.jp-OutputArea-output')].map(e => (e.textContent || '').slice(0, 3000)) : [],
      plots: el ? [...el.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg')).length : 0,
      widgets: el ? el.querySelectorAll('.jupyter-widgets, .js-plotly-plot').length : 0,
      // stderr shown in the page, including inside Output widgets (widget callbacks)
      stderr: el ? [...el.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
                     .map(e => (e.textContent || '').slice(-3000)) : [],
    };
  });
}"""

# The data of every plotly graph in an element: what a control is expected to change.
_PLOT_DATA_JS = """(el) => [...el.querySelectorAll('.js-plotly-plot')].map(gd => JSON.stringify(
  (gd.data || []).map(t => ({type: t.type, x: t.x, y: t.y, z: t.z, values: t.values, labels: t.labels,
                             text: t.text, cells: t.cells && t.cells.values})),
  (k, v) => (ArrayBuffer.isView(v) ? Array.from(v) : v)))"""

_SVG_TEXTS_JS = """(el) => [...el.querySelectorAll('.js-plotly-plot .main-svg text')].map(t => t.textContent)"""


def _squash(text: str) -> str:
    """Text without whitespace: plotly wraps long table cells into several SVG lines."""
    return re.sub(r"\s+", "", text)


def _svg_texts(el) -> set[str]:
    return {_squash(t) for t in el.evaluate(_SVG_TEXTS_JS)}


def _problems(cells: list[dict]) -> list[str]:
    """Errors shown by the notebook: error outputs, tracebacks on stderr, failed renderers."""
    found = []
    for i, c in enumerate(cells):
        for o in c["outputs"]:
            if o["type"] == "error" or (o["name"] == "stderr" and ERROR_RE.search(o["text"])):
                found.append(f"code cell {i}: {ANSI_RE.sub('', o['text']).strip()[-1500:]}")
        found += [f"code cell {i} (page): {t.strip()[-1500:]}" for t in c["stderr"] if ERROR_RE.search(t)]
        found += [f"code cell {i}: {t.strip()[:300]}" for t in c["texts"] if any(f in t for f in RENDER_FAILURES)]
    return found


def _not_rendered(cells: list[dict]) -> list[str]:
    """Plotly figures and widget views in the model that the page does not show (yet)."""
    missing = []
    for i, c in enumerate(cells):
        figs = sum(PLOTLY_MIME in o["mimes"] for o in c["outputs"])
        views = sum(WIDGET_MIME in o["mimes"] for o in c["outputs"])
        if c["plots"] < figs:
            missing.append(f"code cell {i}: {figs - c['plots']} of {figs} plotly figures without SVG")
        if views and not c["widgets"]:
            missing.append(f"code cell {i}: {views} widget views not rendered")
    return missing


def _screenshot(page, locator, path: Path) -> None:
    """Screenshot of an element, the window made tall enough to hold it (JupyterLab scrolls inside)."""
    box = locator.bounding_box()
    size = page.viewport_size
    if box and size and box["height"] > size["height"] - 150:
        page.set_viewport_size({"width": size["width"], "height": min(int(box["height"]) + 300, 4000)})
        page.wait_for_timeout(500)
        try:
            locator.scroll_into_view_if_needed()
            locator.screenshot(path=str(path))
        finally:
            page.set_viewport_size(size)
    else:
        locator.screenshot(path=str(path))


def _open_notebook(page, server, name: str) -> None:
    """Open ``name`` and wait until its kernel is connected and idle and every cell is in the page."""
    page.goto(server.lab_url(name), wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector(f"{PANEL} .jp-Notebook .jp-Cell", timeout=90_000)
    deadline = time.monotonic() + KERNEL_START_TIMEOUT_S
    stable = 0
    while True:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            pytest.fail(f"{name}: JupyterLab opened a dialog: {dialog.first.inner_text()[:500]!r}")
        state = page.evaluate(_STATE_JS, PANEL)
        ok = bool(state and state["ready"] and state["kernel"] == "idle" and state["indicator"] == "idle"
                  and len(state["prompts"]) == len(state["counts"]) > 0)
        stable = stable + 1 if ok else 0
        if stable >= 3:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: kernel not ready after {KERNEL_START_TIMEOUT_S:.0f} s ({state})"
                        f"\n{server.log_tail()}")
        page.wait_for_timeout(400)


def _run_all_cells(page, name: str) -> None:
    """Run -> Run All Cells, through the menu bar as a user would; checks that the cells got queued."""
    for _attempt in range(2):
        tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current")
        if tab.count():
            tab.first.click(timeout=5_000)  # the notebook is the current document
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
        item = page.locator(".lm-Menu .lm-Menu-item:not(.lm-mod-disabled)").filter(
            has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^\s*Run All Cells\s*$")))
        item.first.click(timeout=10_000)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state = page.evaluate(_STATE_JS, PANEL) or {"prompts": []}
            if any("*" in p or re.search(r"\[\d+\]", p) for p in state["prompts"]):
                return
            page.wait_for_timeout(250)
        page.keyboard.press("Escape")
    pytest.fail(f"{name}: Run -> Run All Cells did not start any cell")


def _wait_until_executed(page, name: str) -> dict:
    """Until the kernel is idle and no cell is queued, a few polls in a row; returns the final state."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    stable = 0
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate(_STATE_JS, PANEL)
        if state is None:
            pytest.fail(f"{name}: the notebook is no longer the current document")
        busy = (state["kernel"] != "idle" or state["indicator"] != "idle"
                or any("*" in p for p in state["prompts"]))
        stable = 0 if busy else stable + 1
        if stable >= 4:
            return state
        page.wait_for_timeout(500)
    pytest.fail(f"{name}: cells still running after {RUN_TIMEOUT_S:.0f} s: prompts {state and state['prompts']}")


def _wait_changed(page, cell, before, timeout_s: float = WIDGET_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    now = before
    while time.monotonic() < deadline:
        page.wait_for_timeout(300)
        now = cell.evaluate(_PLOT_DATA_JS)
        if now and now != before and all(now):
            return now
    return now


def _move_controls(page, cell) -> tuple[str | None, list[str]]:
    """Move each control of ``cell`` in turn until the plotted data changes; (what moved it, tried)."""
    tried = []
    before = cell.evaluate(_PLOT_DATA_JS)
    for i in range(cell.locator(".widget-dropdown select").count()):
        sel = cell.locator(".widget-dropdown select").nth(i)
        current = sel.input_value()
        values = sel.evaluate("s => [...s.options].map(o => o.value)")
        for v in [v for v in values if v != current][:2]:
            sel.select_option(value=v)
            tried.append(f"dropdown {i} -> {v!r}")
            now = _wait_changed(page, cell, before)
            if now != before:
                return tried[-1], tried
    for i in range(cell.locator(".widget-slider .noUi-handle").count()):
        handle = cell.locator(".widget-slider .noUi-handle").nth(i)
        for key, times in (("ArrowRight", 1), ("ArrowLeft", 2)):
            handle.focus()
            for _ in range(times):
                handle.press(key)
            tried.append(f"slider {i} {key} x{times}")
            now = _wait_changed(page, cell, before)
            if now != before:
                return tried[-1], tried
    clickables = (".widget-toggle-buttons button:not(.mod-active)", ".widget-radio-box input:not(:checked)",
                  ".widget-checkbox input", ".widget-button:not(.widget-toggle-buttons button)")
    for css in clickables:
        for i in range(min(cell.locator(css).count(), 2)):
            cell.locator(css).nth(i).click()
            tried.append(f"click {css} #{i}")
            now = _wait_changed(page, cell, before)
            if now != before:
                return tried[-1], tried
    return None, tried


def _check_index_dropdown(page, cell, shots: Path) -> None:
    """Index: the Explore table shows the papers; choosing an area leaves exactly that area's papers
    (in the figure's data and in its SVG)."""
    from mlsys24.papers import PAPERS

    outputs = cell.locator(".jp-Cell-outputArea")
    sel = cell.locator(".widget-dropdown select").first
    sel.wait_for(timeout=30_000)
    assert sel.input_value() == "all", f"the area dropdown starts at {sel.input_value()!r}, expected 'all'"
    titles = {_squash(p.title): p for p in PAPERS}
    deadline = time.monotonic() + WIDGET_TIMEOUT_S
    while not (shown := [titles[t] for t in _svg_texts(cell) if t in titles]):
        if time.monotonic() > deadline:
            pytest.fail(f"the Explore table shows no paper title (SVG texts: {sorted(_svg_texts(cell))[:20]})")
        page.wait_for_timeout(300)
    data_before = cell.evaluate(_PLOT_DATA_JS)
    areas = sorted({p.area for p in PAPERS})
    area = max(areas, key=lambda a: (sum(p.area == a for p in PAPERS), a))  # the largest group: several rows
    expected = [p.title for p in PAPERS if p.area == area]
    others = {_squash(p.title) for p in shown if p.area != area}
    assert others, f"the unfiltered table shows only {area!r} papers"
    _screenshot(page, outputs, shots / "00_index-widget-before.png")

    sel.select_option(label=area)
    data_after = _wait_changed(page, cell, data_before)
    assert data_after != data_before, f"choosing area {area!r} did not change the table's data"
    deadline = time.monotonic() + WIDGET_TIMEOUT_S
    while True:  # the SVG redraw follows the data
        texts_after = _svg_texts(cell)
        if {_squash(t) for t in expected} <= texts_after and not (others & texts_after):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"after choosing {area!r} the table's SVG shows {sorted(texts_after)[:12]}..., "
                        f"expected exactly the titles {expected}")
        page.wait_for_timeout(300)
    rows = cell.evaluate("""(el) => [...el.querySelectorAll('.js-plotly-plot')].map(
                                gd => Array.from(gd.data[0].cells.values[1]))""")
    assert rows and list(rows[-1]) == expected, f"table rows after the change: {rows}, expected {expected}"
    page.wait_for_timeout(300)
    _screenshot(page, outputs, shots / "00_index-widget-after.png")


# --- the test ----------------------------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.timeout(RUN_TIMEOUT_S + KERNEL_START_TIMEOUT_S + 180)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.removesuffix(".ipynb") for n in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab(notebook, lab_server, browser_context, screenshots_dir):
    path = NOTEBOOKS_DIR / notebook
    assert path.exists(), f"{notebook} is not in notebooks/ (MLSYS24_BROWSER_NOTEBOOKS?)"
    stem = path.stem
    page = browser_context.new_page()
    writes: list[str] = []  # the notebooks are run, never saved: any write to the contents API is refused

    def _refuse_writes(route, request):
        url = request.url.split("?")[0]
        if request.method == "POST" and url.endswith("/checkpoints"):
            route.continue_()  # JupyterLab checkpoints a file it opens for the first time (not the file)
        elif request.method in ("PUT", "PATCH", "POST", "DELETE"):
            writes.append(f"{request.method} {request.url.split('?')[0]}")
            route.abort()
        else:
            route.continue_()

    page.route("**/api/contents/**", _refuse_writes)
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    t0 = time.monotonic()
    try:
        _open_notebook(page, lab_server, notebook)
        t_open = time.monotonic() - t0
        _run_all_cells(page, notebook)
        state = _wait_until_executed(page, notebook)
        lab_server.remember_kernels()
        t_run = time.monotonic() - t0 - t_open

        not_run = [i for i, (p, n, src) in enumerate(zip(state["prompts"], state["counts"], state["sources"]))
                   if src and not (n and re.search(rf"\[{n}\]", p))]
        cells = page.evaluate(_OUTPUTS_JS, PANEL)
        errors = _problems(cells)
        assert not errors, f"{notebook}: errors in the outputs:\n" + "\n".join(errors)
        assert not not_run, f"{notebook}: code cells {not_run} did not run (prompts {state['prompts']})"

        # Every plotly figure renders its SVG and every widget view its DOM (plotly.js loads lazily).
        deadline = time.monotonic() + 60
        while (missing := _not_rendered(cells)) and time.monotonic() < deadline:
            page.wait_for_timeout(500)
            cells = page.evaluate(_OUTPUTS_JS, PANEL)
        assert not missing, f"{notebook}: outputs not rendered after 60 s:\n" + "\n".join(missing)
        n_plots = sum(c["plots"] for c in cells)
        assert n_plots >= 1, f"{notebook}: no plotly figure in the outputs"
        first_plot = page.locator(f"{PANEL} .jp-OutputArea-output").filter(has=page.locator(".main-svg")).first
        _screenshot(page, first_plot, screenshots_dir / f"{stem}-plot.png")

        # Explore: the last cell showing widgets; moving one of its controls changes the plotted data.
        explore = [i for i, c in enumerate(cells) if any(WIDGET_MIME in o["mimes"] for o in c["outputs"])]
        assert explore, f"{notebook}: no ipywidgets output (the Explore cell, INTERACTIVE=True)"
        cell = page.locator(f"{PANEL} .jp-Notebook .jp-CodeCell").nth(explore[-1])
        cell.scroll_into_view_if_needed()
        if notebook == INDEX:
            _check_index_dropdown(page, cell, screenshots_dir)
        else:
            _screenshot(page, cell.locator(".jp-Cell-outputArea"), screenshots_dir / f"{stem}-widget-before.png")
            moved, tried = _move_controls(page, cell)
            assert moved, f"{notebook}: no control of the Explore cell changed its plot's data (tried: {tried})"
            page.wait_for_function("(el) => el.querySelector('.js-plotly-plot .main-svg')",
                                   arg=cell.element_handle(), timeout=30_000)
            page.wait_for_timeout(500)  # let the redraw settle for the screenshot
            _screenshot(page, cell.locator(".jp-Cell-outputArea"), screenshots_dir / f"{stem}-widget-after.png")
        # the change must not have raised in the kernel callback (an Output widget shows it in the page)
        cells = page.evaluate(_OUTPUTS_JS, PANEL)
        errors = _problems(cells)
        assert not errors, f"{notebook}: errors after moving a control:\n" + "\n".join(errors)
        page.screenshot(path=str(screenshots_dir / f"{stem}-page.png"))
        print(f"{notebook}: opened with its kernel ready in {t_open:.1f} s, Run All {t_run:.1f} s, "
              f"{n_plots} plotly figures, {len(explore)} widget cells; {time.monotonic() - t0:.1f} s in all")
    except BaseException:
        try:
            page.screenshot(path=str(screenshots_dir / f"{stem}-failure.png"))
            html = page.evaluate("(sel) => (document.querySelector(sel) || document.body).outerHTML", PANEL)
            (screenshots_dir / f"{stem}-failure.html").write_text(html)
        except Exception:
            pass
        raise
    finally:
        (screenshots_dir / f"{stem}-console.log").write_text("\n".join(console) + "\n")
        try:
            page.close()
        except Exception:
            pass
        lab_server.shutdown_kernels(notebook)
    assert not writes, f"JupyterLab tried to write notebooks (refused): {writes}; autosave must stay off"
