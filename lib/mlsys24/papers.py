"""The 25 MLSys 2024 papers of the workbench: number, slug, title, area, paper link.

The slug names the notebook (``notebooks/NN_slug.ipynb``), the results folder
(``data/results/<slug>/``) and the figures folder (``figures/<slug>/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .paths import NOTEBOOKS_DIR

__all__ = ["Paper", "PAPERS", "paper", "notebook_path", "notebook_meta"]


@dataclass(frozen=True)
class Paper:
    number: str
    slug: str
    title: str
    area: str
    arxiv: str | None = None

    @property
    def notebook(self) -> str:
        return f"{self.number}_{self.slug}.ipynb"

    @property
    def url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else None


PAPERS: tuple[Paper, ...] = (
    Paper("01", "punica", "Punica: Multi-Tenant LoRA Serving", "LLM serving", "2310.18547"),
    Paper("02", "acrobat", "ACRoBat: Optimizing Auto-batching of Dynamic Deep Learning at Compile Time",
          "compilers", "2305.10611"),
    Paper("03", "heteroswitch", "HeteroSwitch: System-Induced Data Heterogeneity in Federated Learning",
          "federated learning", "2403.04207"),
    Paper("04", "jitq", "JIT-Q: Just-in-time Quantization with Processing-In-Memory for ML Training",
          "number formats", "2311.05034"),
    Paper("05", "schrodinger_fp", "Schrödinger's FP: Training with Dynamic Floating-Point Containers",
          "number formats", "2204.13666"),
    Paper("06", "lancet", "Lancet: MoE Training via Whole-Graph Computation-Communication Overlapping",
          "distributed training"),
    Paper("07", "awq", "AWQ: Activation-aware Weight Quantization", "LLM quantization", "2306.00978"),
    Paper("08", "diffusionpipe", "DiffusionPipe: Training Large Diffusion Models with Efficient Pipelines",
          "distributed training", "2405.01248"),
    Paper("09", "keyformer", "Keyformer: KV Cache Reduction through Key Tokens Selection", "LLM inference",
          "2403.09054"),
    Paper("10", "mpc_relu", "Accelerating ReLU for MPC-Based Private Inference with Sign Estimation",
          "private inference", "2309.04875"),
    Paper("11", "flashdecoding_pp", "FlashDecoding++: Faster LLM Inference on GPUs", "LLM kernels", "2311.01282"),
    Paper("12", "hetegen", "HeteGen: Heterogeneous Parallel Inference on Resource-Constrained Devices",
          "LLM offloading", "2403.01164"),
    Paper("13", "cloudeval_yaml", "CloudEval-YAML: A Benchmark for Cloud Configuration Generation", "benchmarks"),
    Paper("14", "atom", "Atom: Low-Bit Quantization for Efficient and Accurate LLM Serving", "LLM quantization",
          "2310.19102"),
    Paper("15", "smartpaf", "SmartPAF: Low-Degree Polynomial Approximation for FHE Private Inference",
          "private inference", "2404.03216"),
    Paper("16", "sida_moe", "SiDA-MoE: Sparsity-Inspired Data-Aware Serving of MoE Models", "MoE serving",
          "2310.18859"),
    Paper("17", "mcbench", "Does Compressing Activations Help Model Parallel Training? (MCBench)",
          "distributed training", "2301.02654"),
    Paper("18", "gnn_matrix_sampling", "Distributed Matrix-Based Sampling for GNN Training", "graph learning",
          "2311.02909"),
    Paper("19", "dmt", "Disaggregated Multi-Tower: Topology-aware Recommendation Models", "recommendation",
          "2403.00877"),
    Paper("20", "vqpy", "VQPy: An Object-Oriented Approach to Video Analytics", "video analytics", "2311.01623"),
    Paper("21", "slora", "S-LoRA: Serving Thousands of LoRA Adapters", "LLM serving", "2311.03285"),
    Paper("22", "lgreco", "L-GreCo: Layerwise-adaptive Gradient Compression", "distributed training",
          "2210.17357"),
    Paper("23", "prompt_cache", "Prompt Cache: Modular Attention Reuse for Low-Latency Inference",
          "LLM inference", "2311.04934"),
    Paper("24", "formal_feedback", "Fine-Tuning LMs Using Formal Methods Feedback (autonomous systems)",
          "LLM + verification", "2310.18239"),
    Paper("25", "vidur", "Vidur: A Large-Scale Simulation Framework for LLM Inference", "LLM serving",
          "2405.05465"),
)

_BY_KEY = {p.number: p for p in PAPERS} | {p.slug: p for p in PAPERS}


def paper(key: str | int) -> Paper:
    """Look a paper up by number ('07', 7) or slug ('awq')."""
    k = f"{key:02d}" if isinstance(key, int) else str(key).strip()
    if k.isdigit():
        k = f"{int(k):02d}"
    if k not in _BY_KEY:
        raise KeyError(f"unknown paper {key!r}: give a number 01-25 or a slug such as 'punica'")
    return _BY_KEY[k]


def notebook_path(p: Paper, root: Path | None = None) -> Path:
    return (root or NOTEBOOKS_DIR) / p.notebook


def notebook_meta(path: Path) -> dict:
    """The ``mlsys24`` block of a notebook's metadata (status, headline), or {}."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(doc.get("metadata", {}).get("mlsys24", {}))


def markdown_table(root: Path | None = None) -> str:
    """The README's paper table: number, title, notebook, status, headline (from notebook metadata)."""
    lines = ["| # | paper | notebook | status | headline (paper vs ours) |", "|---|---|---|---|---|"]
    for p in PAPERS:
        nb = notebook_path(p, root)
        meta = notebook_meta(nb) if nb.exists() else {}
        title = f"[{p.title}]({p.url})" if p.url else p.title
        link = f"[{p.notebook}](notebooks/{p.notebook})" if nb.exists() else "—"
        status = meta.get("status", "planned") if nb.exists() else "planned"
        headline = (meta.get("headline") or "—").replace("|", "\\|")
        lines.append(f"| {p.number} | {title} | {link} | {status} | {headline} |")
    return "\n".join(lines)


def gallery_figure(p: Paper, root: Path | None = None) -> Path | None:
    """The figure a paper shows in the README gallery: metadata ``mlsys24.figure`` if set, else
    ``paper_vs_ours.png``, else its first PNG."""
    from .paths import REPO_ROOT

    base = (root or REPO_ROOT) / "figures" / p.slug
    nb = notebook_path(p, (root / "notebooks") if root else None)
    name = notebook_meta(nb).get("figure") if nb.exists() else None
    for cand in ([f"{name}.png"] if name else []) + ["paper_vs_ours.png"]:
        if (base / cand).exists():
            return base / cand
    pngs = sorted(base.glob("*.png"))
    return pngs[0] if pngs else None


def markdown_gallery(root: Path | None = None) -> str:
    """README gallery: one headline figure per reproduced paper, with the paper-vs-ours line and
    the GPU the committed results were measured on."""
    from .bench.results import load_results
    from .paths import REPO_ROOT

    root = root or REPO_ROOT
    out = []
    for p in PAPERS:
        nb = notebook_path(p, root / "notebooks")
        fig = gallery_figure(p, root)
        if not nb.exists() or fig is None:
            continue
        meta = notebook_meta(nb)
        gpus = sorted({r.device for r in load_results(p.slug) if r.meta.get("device_type") == "cuda"})
        where = f" GPU results measured on {', '.join(gpus)}." if gpus else " CPU results only so far."
        headline = meta.get("headline", "").rstrip()
        if headline and not headline.endswith("."):
            headline += "."
        out.append(f"**{p.number} {p.title}** — {headline}{where}\n\n"
                   f"![{p.slug}]({fig.relative_to(root).as_posix()})\n")
    return "\n".join(out) if out else "No figures exported yet: `make figures`."


README_START, README_END = "<!-- papers:start -->", "<!-- papers:end -->"
GALLERY_START, GALLERY_END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_readme(path: Path) -> bool:
    """Rewrite the paper table and the gallery between their markers in README.md; True when changed."""
    text = path.read_text()
    new = _replace_between(text, README_START, README_END, markdown_table(path.parent / "notebooks"))
    if GALLERY_START in new:
        new = _replace_between(new, GALLERY_START, GALLERY_END, markdown_gallery(path.parent))
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    import sys

    from .paths import REPO_ROOT

    if sys.argv[1:] == ["--update-readme"]:
        changed = update_readme(REPO_ROOT / "README.md")
        print("README.md updated" if changed else "README.md already up to date")
    else:
        print(markdown_table())
