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
#     figure: throughput
#     headline: 'Paper: Punica 12x the tokens/s of vLLM on Distinct adapters (A100),
#       SGMV near-flat in batch. Ours: mixed-adapter batching 4-5x the same-adapter
#       baseline on CPU (tiny Llama); on an H100 (Llama-2-7B shapes) 6.8x the same-adapter
#       baseline on Distinct (593 vs 87 tok/s), SGMV 33x faster than Loop at batch 64
#       and reading rank-64 adapters at 65% of HBM peak, but not flat at h2=11008, r=16:
#       2.9x from batch 1 (8.9 us) to 64 Distinct (26.2 us), where the extra adapter
#       bytes alone set a 2.13x floor on this card (H200: 2.7x, floor 1.83)'
#     paper: '01'
#     slug: punica
#     status: partial
# ---

# %% [markdown]
# # Punica: Multi-Tenant LoRA Serving
#
# Lequn Chen, Zihao Ye, Yongji Wu, Danyang Zhuo, Luis Ceze, Arvind Krishnamurthy (University of
# Washington, Duke University) · MLSys 2024 · [arXiv 2310.18547](https://arxiv.org/abs/2310.18547) ·
# official code [punica-ai/punica](https://github.com/punica-ai/punica) (Apache-2.0); the cluster
# scheduler lives in the first author's `abcdabcd987/punica-server-experimental`.
#
# **The idea in one paragraph.** Many tenants fine-tune one base LLM with LoRA: layer `W` becomes
# `y = xW + s·(xA)B` with a rank-r pair `A ∈ R^{h1×r}`, `B ∈ R^{r×h2}` per tenant. Serving every
# adapter as its own model wastes GPUs, and requests for *different* adapters cannot share a batch, so
# when each request wants its own adapter every system runs at batch size ~1. Punica keeps one copy
# of the base weights, batches requests of different adapters for the dense part `XW`, and computes
# the per-request add-on with **SGMV** (segmented gather matrix-vector multiplication): rows grouped
# into segments that share an adapter, the adapters' weights gathered by pointer inside one kernel, so
# its latency barely grows with the number of distinct adapters. A cluster scheduler then packs
# requests onto the busiest GPU that still fits, so lightly loaded GPUs can be released.
#
# Here: Triton SGMV (split-K shrink, N-tiled expand) and BGMV kernels, the Loop and Gather-BMM
# baselines and a float32 reference (`mlsys24.lora.sgmv`); LoRA backends of the workbench's serving
# engine with an adapter registry (host → device on demand); mixed-adapter continuous batching vs the
# "same-adapter batches only" baseline; the cluster policy in an event simulator fitted on measured
# engine steps. GPU numbers come from `python -m mlsys24.bench punica`.

# %% tags=["parameters"]
DEVICE = "cpu"              # "cpu", or "cuda" to re-measure the GPU claims live (the results JSON is used otherwise)
HIDDEN = 64                 # h1 = h2 of the Triton-interpreter kernel check (CPU: keep <= 128)
RANKS = [8, 16]             # LoRA ranks of the kernel check (8 is padded to 16 inside tl.dot)
BATCH_SIZES = [1, 2, 4, 8]  # kernel check batch sizes (every popularity at the largest, one check per size)
OP_HIDDEN = 256             # CPU operator timing: h1 = h2
OP_RANK = 16                # CPU operator timing: rank
OP_BATCH_SIZES = [1, 2, 4, 8, 16, 32]  # CPU operator timing: batch sizes
NUM_REQUESTS = 24           # CPU serving: requests for Punica (card: 48; scaled down for the CPU budget)
BASELINE_REQUESTS = 12      # CPU serving: the same-adapter baseline runs the first N (its rate is stationary)
NUM_ADAPTERS = 16           # distinct adapter weight sets; request adapter ids alias onto them
E2E_RANK = 8                # LoRA rank of the serving runs (all 7 projections)
MAX_BATCH = 16              # serving: max requests per step
PROMPT_LEN = [8, 24]        # serving: prompt length range (tokens cut from validation documents)
OUTPUT_LEN = [4, 12]        # serving: output length range (card: 8..32; scaled down)
POPULARITIES = ["distinct", "uniform", "skewed", "identical"]  # adapter popularity models
MODEL_PATH = None           # HF Llama directory; None = the committed tiny Llama
ADAPTER_PATHS = None        # list of PEFT LoRA directories; None = random adapters (A ~ N(0, 1/h1), B ~ N(0, 0.02))
E2E_BACKEND = "gather_bmm"  # CPU serving backend: gather_bmm | loop | segmented (Triton ones are for GPU/tests)
NUM_GPUS_SIM = 8            # cluster simulator: GPUs
SIM_STEP_MODEL = "auto"     # "auto" (GPU step times from the results JSON when present, else CPU), "cpu", "gpu"
SIM_STEPS = 500             # cluster simulator: length of the arrival ramp, in full-batch step times
SEED = 0                    # seed of inputs, adapters, workloads
INTERACTIVE = True          # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Int, ListOf, Str, validate

validate(globals(), DEVICE=Choice("cpu", "cuda"), HIDDEN=Int(16, 8192), RANKS=ListOf(Int(1, 128), min_len=1),
         BATCH_SIZES=ListOf(Int(1, 4096), min_len=1), OP_HIDDEN=Int(16, 16384), OP_RANK=Int(1, 128),
         OP_BATCH_SIZES=ListOf(Int(1, 4096), min_len=2), NUM_REQUESTS=Int(2, 100_000),
         BASELINE_REQUESTS=Int(1, 100_000), NUM_ADAPTERS=Int(1, 10_000), E2E_RANK=Int(1, 128),
         MAX_BATCH=Int(1, 1024), PROMPT_LEN=ListOf(Int(1, 4096), min_len=2, max_len=2),
         OUTPUT_LEN=ListOf(Int(1, 4096), min_len=2, max_len=2),
         POPULARITIES=ListOf(Choice("distinct", "uniform", "skewed", "identical"), min_len=1),
         E2E_BACKEND=Choice("gather_bmm", "loop", "segmented", "bgmv", "sgmv"), NUM_GPUS_SIM=Int(1, 1024),
         SIM_STEP_MODEL=Choice("auto", "cpu", "gpu"), SIM_STEPS=Int(10, 10**7), SEED=Int(0), INTERACTIVE=Bool())
if MODEL_PATH is not None:
    validate(globals(), MODEL_PATH=Str())
if ADAPTER_PATHS is not None:
    validate(globals(), ADAPTER_PATHS=ListOf(Str(), min_len=1))
if PROMPT_LEN[0] > PROMPT_LEN[1] or OUTPUT_LEN[0] > OUTPUT_LEN[1]:
    raise ValueError("PROMPT_LEN and OUTPUT_LEN are [low, high] ranges")

# %%
import math
import os
import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.bench import device_peaks, load_results, measure
from mlsys24.lora import (
    LoRAEngine,
    PunicaScheduler,
    SameAdapterScheduler,
    load_peft_adapter,
    make_backend,
    popularity_segments,
    request_adapter_ids,
)
from mlsys24.lora.cluster import POLICIES, GPUSpec, SimRequest, StepModel, simulate
from mlsys24.lora.report import PAPER_TEXTGEN, gpu_claims, op_latency, op_records, paper_speedups, timing_mode
from mlsys24.lora.sgmv import (
    SGMVConfig,
    bgmv_ref,
    dense_ref,
    lora_bgmv,
    lora_gather_bmm,
    lora_loop,
    lora_ref,
    lora_segmented_torch,
    lora_sgmv,
    segments_from_indptr,
    segments_from_slots,
    sgmv_ref,
)
from mlsys24.lora.workload import punica_lengths, ramp_arrivals
from mlsys24.models import iter_documents, load_hf_llama, load_tiny_llama
from mlsys24.serving import LoopBackend, Request, SchedulerConfig, attach_lora, random_adapter, summarize

SLUG = "punica"
torch.manual_seed(SEED)
torch.set_num_threads(1)  # CPU timings: one thread, medians (two shared cores)
GPU = DEVICE == "cuda" and torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
T_START = time.time()
print(f"device: {DEV}; Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}")

# %% [markdown]
# ## 1. Reference: LoRA over a batch of mixed adapters
#
# Row `i` of `X` wants adapter `a(i)` (or none, −1). With the adapters stacked in a slot pool
# `A[n_slots, h1, r]`, `B[n_slots, r, h2]` and scales `s` (PEFT: α/r):
#
# `y_i = x_i W + s_a(i) · (x_i A_a(i)) B_a(i)`
#
# Punica's operator works on **segments**: runs of rows sharing an adapter (`s_0 = 0 < s_1 < … < s_n`),
# `Y[s_i:s_{i+1}] += X[s_i:s_{i+1}] · W_{idx[i]}`. LoRA is two such calls: *shrink* `v = XA` (h1 → r)
# and *expand* `Y += s·vB` (r → h2). `lora_ref` is the row-by-row float32 definition everything below
# is checked against.

# %%
g = torch.Generator().manual_seed(SEED)
h, r_demo = HIDDEN, RANKS[0]
A_demo = torch.randn(4, h, r_demo, generator=g) / h**0.5         # [n_slots, h1, r]
B_demo = torch.randn(4, r_demo, h, generator=g) * 0.5             # [n_slots, r, h2]
s_demo = torch.tensor([1.0, 2.0, 0.5, 1.5])
x_demo = torch.randn(6, h, generator=g)                           # [N, h1]
rows_adapter = [2, 2, -1, 0, 3, 3]                                # adapter slot per row (-1: base model only)
y_demo = lora_ref(x_demo, A_demo, B_demo, s_demo, rows_adapter)
print("LoRA add-on per row, ||y_i||:", [round(float(v), 3) for v in y_demo.norm(dim=1)])
print("row 2 has no adapter, its add-on is", float(y_demo[2].abs().max()))

# %% [markdown]
# ## 2. The real thing: Triton SGMV and BGMV, checked against the reference
#
# `lora_sgmv` launches the split-K shrink and the N-tiled expand. The shrink splits K = h1 over many
# programs so that even one adapter's read is spread over the GPU; the splits' fp32 partial sums are
# combined without any program waiting on another (uneven segments cannot deadlock, the bug of
# punica-ai/punica PR #35): stored to a workspace and summed by the expand, summed by the *last*
# split of a tile to arrive (a per-tile arrival counter), or added with fp32 atomics. Which of these,
# the split count, the tiles and programmatic dependent launch (the expand starts reading `B` while
# the shrink runs) are chosen per shape and number of tiles by a sweep in the GPU benchmark, and the
# table it measured is what the benchmark's timings use. The expand comes in three forms the sweep
# chooses from: one program per (tile, N tile) on tensor cores; programs that walk a run of N tiles
# (fewer, longer programs, next tile prefetched); and, for decode batches whose tiles hold one row, a
# row-by-row kernel on CUDA cores (a 16-row tensor-core tile with one live row wastes registers).
# `lora_bgmv` is the one-row-per-segment special case (a matrix-vector product per row). On CPU
# they run in Triton's interpreter, which executes every program instance in Python: shapes are
# kept tiny. The popularity models are
# Punica's: Distinct (every row its own adapter), Uniform (⌈√bs⌉ equal segments), Skewed (Zipf-like,
# α = 1.5), Identical (one segment).

# %%
POP_ALL = ["distinct", "uniform", "skewed", "identical"]
for p in POP_ALL:
    print(f"{p:9s} bs=16 segments: {popularity_segments(16, p)}")

EXPAND_FORMS = [None, SGMVConfig(programs_per_sm=1, block_k=64, block_n=16, expand_per_sm=1),
                SGMVConfig(programs_per_sm=1, block_k=64, rows_block_n=32, expand_rows=16)]
kernel_rows = []
bs_max = max(BATCH_SIZES)
cases = [(p, r, bs_max) for p in POPULARITIES for r in RANKS] + [("skewed", RANKS[-1], b) for b in BATCH_SIZES[:-1]]
for pop, r, bs in cases:
    gk = torch.Generator().manual_seed(SEED + 7 * r + bs)
    lens = popularity_segments(bs, pop)
    A = torch.randn(len(lens), HIDDEN, r, generator=gk) / HIDDEN**0.5
    B = torch.randn(len(lens), r, HIDDEN, generator=gk)
    scale = torch.rand(len(lens), generator=gk) + 0.5
    x = torch.randn(bs, HIDDEN, generator=gk)
    indptr = np.concatenate([[0], np.cumsum(lens)]).tolist()
    slots = np.repeat(np.arange(len(lens)), lens)
    ref = lora_ref(x, A, B, scale, slots)
    seg = segments_from_indptr(indptr, list(range(len(lens))))
    # the three expand forms: one N tile per program (default), runs of N tiles, row-by-row
    err_sgmv = max(float((lora_sgmv(x, A, B, scale, seg, config=cfg) - ref).abs().max()) for cfg in EXPAND_FORMS)
    err_bgmv = float((lora_bgmv(x, A, B, scale, slots) - ref).abs().max())
    err_shrink = float((lora_sgmv(x, A, torch.eye(r)[None].expand(len(lens), r, r).contiguous(), None, seg)
                        - sgmv_ref(x, A, indptr, list(range(len(lens))))).abs().max())
    err_bgmv_shrink = float((bgmv_ref(x, A, slots) - sgmv_ref(x, A, indptr, list(range(len(lens))))).abs().max())
    kernel_rows.append((pop, r, bs, len(lens), err_sgmv, err_bgmv, err_shrink, err_bgmv_shrink))
print(f"{'popularity':10s} {'r':>3s} {'bs':>3s} {'segs':>4s} {'SGMV err':>10s} {'BGMV err':>10s} {'shrink err':>10s}")
for pop, r, bs, S, e1, e2, e3, _ in kernel_rows:
    print(f"{pop:10s} {r:3d} {bs:3d} {S:4d} {e1:10.2e} {e2:10.2e} {e3:10.2e}")
print(f"kernel checks: {time.time() - T_START:.1f} s since start")

# %% [markdown]
# **Claim 1** — SGMV (shrink and expand, each of the three expand forms) and BGMV equal the float32
# reference for every popularity (max abs error ≤ 1e-4 in fp32); BGMV is SGMV with unit segments.

# %%
worst = max(max(e1, e2, e3, e4) for *_, e1, e2, e3, e4 in kernel_rows)
assert worst <= 1e-4, f"kernel vs reference: max abs error {worst:.2e}"
print(f"claim 1 holds: max abs error {worst:.2e} over {len(kernel_rows)} cases")

# %% [markdown]
# ### The kernels inside the serving engine
#
# The engine calls the LoRA backend once per projection with the adapter id of every token. Each
# backend (`loop`, `gather_bmm`, `segmented`, `bgmv`, `sgmv`) reads the adapters from a slot pool
# that the registry fills on demand. Below: the committed tiny Llama (trained in this workbench on
# CPython's standard library) serves three requests with different adapters and one without, once
# with the plain-PyTorch `LoopBackend` (the reference) and once with Triton SGMV, LoRA on `q_proj`
# and `v_proj` (the interpreter's budget; the tests run all 7 projections on a smaller model).

# %%
def load_model():
    return load_tiny_llama() if MODEL_PATH is None else load_hf_llama(MODEL_PATH)


def adapter_sets(model, n, rank, seed):
    if ADAPTER_PATHS:
        sets = [load_peft_adapter(p) for p in ADAPTER_PATHS]
        return [sets[i % len(sets)] for i in range(n)]
    return [random_adapter(model, rank=rank, seed=seed + i) for i in range(n)]


DOCS = [t.encode("utf-8") for _, (_, t) in zip(range(256), iter_documents("validation"))]
DOCS = [d for d in DOCS if len(d) > 64]


def prompt_from(i, length, rng):
    d = DOCS[i % len(DOCS)]
    s = int(rng.integers(0, len(d) - length))
    return list(d[s:s + length])


def serve_check(backend_name):
    model = load_model()
    be = LoopBackend() if backend_name == "reference" else make_backend(backend_name, model, rank=8, n_slots=4)
    ctx = attach_lora(model, be, targets=("q_proj", "v_proj"))
    for a, w in enumerate(adapter_sets(model, 3, 8, SEED)):
        be.load(a, w)
    rng = np.random.default_rng(SEED)
    reqs = [Request(i, prompt_from(i, 6, rng), 3, adapter_id=a) for i, a in enumerate([0, 2, -1, 1])]
    eng = LoRAEngine(model, PunicaScheduler(SchedulerConfig("orca", max_batch_size=8)), n_blocks=16, block_size=16,
                     lora=ctx, record_logits=True)
    out = {s.rid: s for s in eng.run(reqs, progress=False)}
    eng.check_invariants()
    return out


t0 = time.time()
served_ref = serve_check("reference")
served_sgmv = serve_check("sgmv")
engine_err = max(float((torch.stack(served_sgmv[i].logits) - torch.stack(served_ref[i].logits)).abs().max())
                 for i in served_ref)
same_tokens = all(served_sgmv[i].output == served_ref[i].output for i in served_ref)
print(f"engine, SGMV vs Loop backend: max |Δlogit| = {engine_err:.2e}, same greedy tokens: {same_tokens} "
      f"({time.time() - t0:.1f} s)")

# %% [markdown]
# **Claim 2** — the engine's logits with the SGMV backend match the Loop backend step by step
# (fp32, max abs error ≤ 1e-4), so greedy outputs agree.

# %%
assert engine_err <= 1e-4 and same_tokens, (engine_err, same_tokens)
print("claim 2 holds")

# %% [markdown]
# ## 3. Back of the envelope: why one kernel for many adapters is cheap
#
# Decoding is memory-bound: every weight is read once per step. At Llama-2-7B's `gate_proj` shape
# (h1 = 4096, h2 = 11008, fp16) the dense `XW` reads 90 MB whatever the batch; a rank-16 adapter is
# `(h1 + h2)·r·2` bytes = 0.48 MB. A batch of 64 rows with 64 distinct adapters therefore reads a
# third of the dense bytes, and Identical reads 1/187 of them. If the LoRA operator streams those
# bytes at HBM speed its latency is a few microseconds, flat in the batch; **Loop** instead issues two
# small GEMMs per segment, each bound by launch and latency (~µs), so it grows linearly with the
# number of distinct adapters.

# %%
h1, h2 = 4096, 11008
for gpu_name in ("A100", "H100", "H200"):
    pk = device_peaks(gpu_name)
    dense_bytes = h1 * h2 * 2
    for r in (16, 64):
        ad = (h1 + h2) * r * 2
        print(f"{gpu_name}: dense XW {dense_bytes / 1e6:.0f} MB -> {dense_bytes / pk.hbm_GBps / 1e3:.1f} us; "
              f"r={r}: one adapter {ad / 1e6:.2f} MB, 64 distinct {64 * ad / 1e6:.0f} MB -> "
              f"{64 * ad / pk.hbm_GBps / 1e3:.1f} us at {pk.hbm_GBps:.0f} GB/s")
flops = 2 * 64 * 16 * (h1 + h2)
print(f"arithmetic intensity of the LoRA add-on at bs=64, r=16, Distinct: "
      f"{flops / (64 * (h1 + h2) * 16 * 2):.1f} FLOP/byte (memory-bound; ridge ~{device_peaks('H100').ridge_flops_per_byte:.0f})")

# %% [markdown]
# ## 4. Operator latency vs batch size (the paper's backbone-vs-SGMV and operator figures)
#
# **GPU** (from `data/results/punica/<gpu>.json`): dense `XW` (cuBLAS), Loop, Gather-BMM, BGMV and
# SGMV at h1 = 4096, h2 = 11008, fp16, batch 1..64, for each popularity. **CPU** (live, this machine):
# the PyTorch providers only — dense, Loop, Gather-BMM and the segmented `torch.bmm` stand-in for
# SGMV; Triton-interpreter timings would measure Python, not the kernel.

# %%
gpu_files = [rf for rf in load_results(SLUG) if rf.meta.get("device_type") == "cuda"]
RES = gpu_files[0] if gpu_files else None
if RES is not None:
    MODE = timing_mode(RES.records)
    print(f"GPU results: {RES.path.name} — {RES.caption()}; operator timing mode: {MODE}")
else:
    MODE = None
    print("no GPU results committed yet: run `PYTHONPATH=lib python3 -m mlsys24.bench punica` on a GPU")

PROVIDERS_GPU = ["dense", "loop", "gather_bmm", "bgmv", "sgmv"]


def gpu_latency_figure(res, r=16, h2=11008, title_extra=""):
    fig = make_subplots(rows=1, cols=4, subplot_titles=[p.capitalize() for p in POP_ALL], shared_yaxes=True)
    for j, pop in enumerate(POP_ALL):
        for prov in PROVIDERS_GPU:
            pts = sorted((rec["bs"], rec["median_us"]) for rec in op_records(res.records, MODE)
                         if rec["provider"] == prov and rec["h2"] == h2
                         and (prov == "dense" or (rec["r"] == r and rec["popularity"] == pop)))
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=prov,
                                line=dict(color=viz.color(prov)), legendgroup=prov, showlegend=j == 0, row=1, col=j + 1)
    fig.update_xaxes(type="log", title_text="batch size")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="latency (µs)", col=1)
    fig.update_layout(legend=dict(y=1.18), margin=dict(t=120))
    viz.apply_template(fig, title=f"LoRA operators vs batch size, h1=4096, h2={h2}, r={r}, fp16{title_extra}",
                       width=1100, height=430)
    return fig


if RES is not None:
    fig_ops = gpu_latency_figure(RES, title_extra=f" · {RES.device}")
    viz.caption(fig_ops, RES.caption() + f"<br>timing mode: {MODE} (graph = CUDA-graph replay, device time; eager = "
                "called from Python, the host's launch time included).<br>Paper (A100, its README figure): dense ≈ 85 µs "
                "flat, SGMV 37→48 µs over bs 1→64, Loop > 500 µs by bs≈6.")
    viz.save(fig_ops, SLUG, "operators_gpu")
    fig_ops.show()

# %%
torch.set_num_threads(1)
op_rows = []
gc = torch.Generator().manual_seed(SEED)
nmax = max(OP_BATCH_SIZES)
A_op = torch.randn(nmax, OP_HIDDEN, OP_RANK, generator=gc) / OP_HIDDEN**0.5
B_op = torch.randn(nmax, OP_RANK, OP_HIDDEN, generator=gc) * 0.02
s_op = torch.ones(nmax)
s_host = s_op.tolist()
W_op = torch.randn(OP_HIDDEN, OP_HIDDEN, generator=gc) * 0.02
cpu_pops = [p for p in ("distinct", "identical") if p in POPULARITIES] or POPULARITIES[:1]


def op_fns(x, y, pop):
    """The three PyTorch LoRA providers on input x (batch of len(x) rows) under popularity pop."""
    lens = popularity_segments(len(x), pop)
    indptr = np.concatenate([[0], np.cumsum(lens)]).tolist()
    seg = segments_from_indptr(indptr, list(range(len(lens))))
    idx = torch.as_tensor(np.repeat(np.arange(len(lens)), lens))
    return {"loop": lambda: lora_loop(x, A_op, B_op, s_host, seg, y),
            "gather_bmm": lambda: lora_gather_bmm(x, A_op, B_op, s_op, idx, y),
            "segmented": lambda: lora_segmented_torch(x, A_op, B_op, s_op, seg, y)}


for bs in OP_BATCH_SIZES:
    x = torch.randn(bs, OP_HIDDEN, generator=gc)
    y = torch.zeros(bs, OP_HIDDEN)
    t = measure(lambda: dense_ref(x, W_op), warmup=2, repeats=15)
    op_rows.append({"provider": "dense", "bs": bs, "popularity": "any", "us": t.median_us})
    for pop in cpu_pops:
        for prov, fn in op_fns(x, y, pop).items():
            t = measure(fn, warmup=2, repeats=15)
            op_rows.append({"provider": prov, "bs": bs, "popularity": pop, "us": t.median_us})


def cpu_us(prov, bs, pop):
    return next(r["us"] for r in op_rows if r["provider"] == prov and r["bs"] == bs
                and (prov == "dense" or r["popularity"] == pop))


fig_cpu = make_subplots(rows=1, cols=len(cpu_pops), subplot_titles=[p.capitalize() for p in cpu_pops], shared_yaxes=True)
for j, pop in enumerate(cpu_pops):
    for prov in ("dense", "loop", "gather_bmm", "segmented"):
        fig_cpu.add_scatter(x=OP_BATCH_SIZES, y=[cpu_us(prov, b, pop) for b in OP_BATCH_SIZES], mode="lines+markers",
                            name=prov, line=dict(color=viz.color(prov)), legendgroup=prov, showlegend=j == 0,
                            row=1, col=j + 1)
fig_cpu.update_xaxes(type="log", title_text="batch size")
fig_cpu.update_yaxes(type="log")
fig_cpu.update_yaxes(title_text="latency (µs)", col=1)
fig_cpu.update_layout(legend=dict(y=1.18), margin=dict(t=120))
viz.apply_template(fig_cpu, title=f"CPU (live, PyTorch providers, 1 thread): h={OP_HIDDEN}, r={OP_RANK}, fp32",
                   width=900, height=420)
viz.caption(fig_cpu, "CPU numbers of this machine, median of 15; `segmented` = padded per-segment torch.bmm "
            "(SGMV's cost shape in PyTorch).<br>Not comparable to the GPU figure.")
viz.save(fig_cpu, SLUG, "operators_cpu")
fig_cpu.show()

# %% [markdown]
# **Takeaway.** The Loop baseline pays per *segment*: in Distinct it grows linearly with the batch,
# in Identical it stays flat. Gather-BMM pays per *row* (it copies an adapter for every row) but in
# one call; the segmented form pays per distinct adapter. On the GPU, SGMV and BGMV read each
# adapter once in one launch; what the figure shows about their flatness depends on the timing mode
# named in the caption (device time from a CUDA graph, or Python-launched calls whose floor is the
# launch cost). What this does not show: the paper's CUTLASS/custom-CUDA kernels on an A100.
#
# **Claim 5** (CPU, one thread, medians): Loop(bs=16) / Loop(bs=1) ≥ 6 in Distinct, and
# Gather-BMM(bs=16) ≤ 0.75 × Loop(bs=16). The segmented implementation's times are reported.

# %%
if "distinct" in cpu_pops and 16 in OP_BATCH_SIZES and 1 in OP_BATCH_SIZES:
    # the claim from paired rounds: the three timings of a round run back to back, so slow drifts of a
    # shared CPU's speed cancel in the ratios (median over rounds); the sweep above times each point once
    x1, x16 = torch.randn(1, OP_HIDDEN, generator=gc), torch.randn(16, OP_HIDDEN, generator=gc)
    f1 = op_fns(x1, torch.zeros(1, OP_HIDDEN), "distinct")
    f16 = op_fns(x16, torch.zeros(16, OP_HIDDEN), "distinct")
    rounds = []
    for _ in range(5):
        l1, l16, g16 = (measure(f, warmup=2, repeats=15).median_us
                        for f in (f1["loop"], f16["loop"], f16["gather_bmm"]))
        rounds.append((l16 / l1, g16 / l16))
    loop_ratio = float(np.median([r[0] for r in rounds]))
    gb_ratio = float(np.median([r[1] for r in rounds]))
    print(f"Loop(16)/Loop(1) = {loop_ratio:.1f}; Gather-BMM(16)/Loop(16) = {gb_ratio:.2f} (medians of 5 paired "
          f"rounds: {', '.join(f'{a:.1f}/{b:.2f}' for a, b in rounds)}); the sweep: "
          f"{cpu_us('loop', 16, 'distinct') / cpu_us('loop', 1, 'distinct'):.1f} / "
          f"{cpu_us('gather_bmm', 16, 'distinct') / cpu_us('loop', 16, 'distinct'):.2f}; "
          f"segmented(16) = {cpu_us('segmented', 16, 'distinct'):.0f} us")
    assert loop_ratio >= 6, loop_ratio
    assert gb_ratio <= 0.75, gb_ratio
    print("claim 5 holds")
else:
    print("claim 5 needs batch sizes 1 and 16 and the Distinct popularity")

# %% [markdown]
# ## 5. Serving: mixed-adapter continuous batching vs same-adapter batches
#
# Punica's serving loop keeps one running batch of requests with *any* adapters, sorted by adapter
# id each step so that the LoRA segments are contiguous. The baselines of the paper's harness (HF
# PEFT, DeepSpeed, FasterTransformer, vLLM) can only batch **consecutive requests with the same
# adapter** — not an oracle regrouping — so Distinct means batch size 1. Here both run on the same
# engine, model, backend and adapters; the baseline is static batching (a batch runs to completion),
# as the card's CPU setup says. On CPU, Punica's prefills run in their own steps (vLLM-style
# `SchedulerConfig("vllm")`) because the engine pads a mixed step to its longest row, which a CPU
# pays in full; the GPU run keeps Punica's mixed prefill+decode steps with one admission per step.
# Adapter ids of the workload are aliased onto `NUM_ADAPTERS` weight sets (each id still its own
# adapter for the schedulers). Throughput is output tokens per CPU-second of this process (one
# thread): on a CPU shared with other jobs, wall-clock rates vary by 2× from run to run; the
# process's own CPU time does not (wall-clock rates are printed too).

# %%
model = load_model()
backend = make_backend(E2E_BACKEND, model, rank=E2E_RANK, n_slots=max(NUM_ADAPTERS, MAX_BATCH), share_aliases=True)
ctx = attach_lora(model, backend)
SETS = adapter_sets(model, NUM_ADAPTERS, E2E_RANK, SEED + 100)
rng_len = np.random.default_rng(SEED)
P_LEN = rng_len.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1, NUM_REQUESTS)
O_LEN = rng_len.integers(OUTPUT_LEN[0], OUTPUT_LEN[1] + 1, NUM_REQUESTS)


def workload(pop):
    ids = request_adapter_ids(NUM_REQUESTS, pop, seed=SEED)
    rng = np.random.default_rng(SEED + 1)
    return [Request(i, prompt_from(i, int(P_LEN[i]), rng), int(O_LEN[i]), adapter_id=int(ids[i]))
            for i in range(NUM_REQUESTS)]


for a in range(NUM_REQUESTS):
    backend.load(a, SETS[a % NUM_ADAPTERS])
n_blocks = MAX_BATCH * math.ceil((PROMPT_LEN[1] + OUTPUT_LEN[1]) / 16) + 4
# One unmeasured serving run first: the first run of a process pays one-off costs (allocations, first
# shapes), which would land on whichever system is measured first.
LoRAEngine(model, PunicaScheduler(SchedulerConfig("vllm", max_batch_size=MAX_BATCH)), n_blocks=n_blocks,
           block_size=16, lora=ctx).run(workload(POPULARITIES[0])[:MAX_BATCH], progress=False)
e2e, step_log = {}, []
t0 = time.time()
for pop in POPULARITIES:
    reqs = workload(pop)
    for system in ("punica", "same_adapter"):
        if system == "punica":
            sch, rs = PunicaScheduler(SchedulerConfig("vllm", max_batch_size=MAX_BATCH)), reqs
        else:
            sch, rs = SameAdapterScheduler(SchedulerConfig("static", max_batch_size=MAX_BATCH)), reqs[:BASELINE_REQUESTS]
        eng = LoRAEngine(model, sch, n_blocks=n_blocks, block_size=16, lora=ctx)
        cpu0 = time.process_time()
        done = eng.run(rs, progress=False)
        cpu_s = time.process_time() - cpu0
        eng.check_invariants()
        m = summarize(done)
        rows = [st.rows for st in eng.steps if st.prefill_tokens == 0]
        e2e[(system, pop)] = {"tok_s": m["output_tokens"] / cpu_s, "wall_tok_s": m["throughput_tok_s"],
                              "requests": len(done), "steps": len(eng.steps),
                              "mean_decode_batch": float(np.mean(rows)) if rows else 0.0}
        if system == "punica":
            step_log += [st.as_dict() for st in eng.steps]
        print(f"{pop:9s} {system:12s}: {e2e[(system, pop)]['tok_s']:7.1f} tok per CPU-s "
              f"({m['throughput_tok_s']:6.1f} tok/s wall), {len(done)} requests, "
              f"mean decode batch {e2e[(system, pop)]['mean_decode_batch']:.1f}")
print(f"serving runs: {time.time() - t0:.1f} s; registry: {vars(backend.registry.stats)}")

# %%
speed_cpu = [e2e[("punica", p)]["tok_s"] / e2e[("same_adapter", p)]["tok_s"] for p in POPULARITIES]
speed_paper = [paper_speedups("vllm")[p] for p in POPULARITIES]
fig_e2e = viz.paper_vs_ours([p.capitalize() for p in POPULARITIES], speed_cpu, speed_paper,
                            title="Throughput of mixed-adapter batching over same-adapter batching",
                            y="Punica / baseline throughput (×)", ours_label="ours, CPU (live, tokens per CPU-s)",
                            paper_label="paper, Llama-2-7B A100 (Punica / vLLM)", text_fmt=".1f")
GPU_E2E = {}
if RES is not None:
    GPU_E2E = {(rec["system"], rec["popularity"]): rec for rec in RES.records if rec.get("kind") == "e2e"}
    if all(("punica", p) in GPU_E2E and ("same_adapter", p) in GPU_E2E for p in POPULARITIES):
        fig_e2e.add_bar(name=f"ours, 7B-shaped, {RES.device}", x=[p.capitalize() for p in POPULARITIES],
                        y=[GPU_E2E[("punica", p)]["tokens_per_s"] / GPU_E2E[("same_adapter", p)]["tokens_per_s"]
                           for p in POPULARITIES], marker_color=viz.color("sgmv"), marker_pattern_shape=".",
                        texttemplate="%{y:.1f}", textposition="outside")
fig_e2e.add_hline(y=1, line_dash="dot", line_color="#999")
MODEL_NAME = "tiny Llama" if MODEL_PATH is None else os.path.basename(str(MODEL_PATH).rstrip("/"))
viz.caption(fig_e2e, f"CPU: {MODEL_NAME} (d {model.cfg.d_model}, {model.cfg.n_layers} layers), {E2E_BACKEND} backend, rank {E2E_RANK} on all 7 projections, "
            f"{NUM_REQUESTS} requests (baseline: first {BASELINE_REQUESTS}),<br>prompts {PROMPT_LEN}, outputs {OUTPUT_LEN}, "
            f"max batch {MAX_BATCH} (card: 48 requests, outputs 8-32). Paper: vLLM serves without LoRA; A100 tokens/s "
            f"ratios<br>(Punica {PAPER_TEXTGEN['distinct']['punica']} vs vLLM {PAPER_TEXTGEN['distinct']['vllm']} "
            "tok/s in Distinct)."
            + (f"<br>GPU: {RES.caption()}" if GPU_E2E else "<br>GPU serving run: not in the results file yet"))
viz.save(fig_e2e, SLUG, "throughput")
fig_e2e.show()

# %% [markdown]
# **Takeaway.** When every request wants a different adapter, the same-adapter baseline runs one
# request at a time, while mixed-adapter batching keeps the batch full: the gap is the batching gain of
# the backbone. With one adapter for everyone (Identical) both batch fully and the gap closes — the
# paper's vLLM even wins there. On a CPU the batching gain is smaller than on a GPU (a CPU step's cost
# grows with the batch much sooner), and our `gather_bmm` backend costs the same whatever the
# popularity, so the CPU bars do not test SGMV's flatness — the GPU file does.
#
# **Claim 3** — Distinct: mixed-adapter batching ≥ 3× the same-adapter baseline (CPU); Identical: the
# two are within 0.5×–2×. (Claim 4, per-popularity tokens/s, is reported above; SGMV's flatness is a
# GPU claim below.)

# %%
if "distinct" in POPULARITIES:
    assert speed_cpu[POPULARITIES.index("distinct")] >= 3, speed_cpu
if "identical" in POPULARITIES:
    assert 0.5 <= speed_cpu[POPULARITIES.index("identical")] <= 2.0, speed_cpu
print("claim 3 holds:", {p: round(s, 2) for p, s in zip(POPULARITIES, speed_cpu)})

# %% [markdown]
# ## 6. The cluster scheduler
#
# A discrete-event simulation of `NUM_GPUS_SIM` GPUs, each running Punica's serving loop with a step
# time fitted on *measured* engine steps (the CPU runs above, or the GPU serving run of the results
# file). Requests follow Punica's lengths (LogNormal prompts, uniform totals) and arrive as a Poisson
# process whose rate ramps up and down. Policies: **punica** — the busiest GPU that fits (consolidate),
# **round_robin**, **least_loaded**; FIFO queue; eviction and re-placement under memory pressure.

# %%
gpu_steps = []
if RES is not None:
    for rec in RES.records:
        if rec.get("kind") == "e2e" and rec["system"] == "punica":
            gpu_steps += [{"rows": a, "prefill_tokens": b, "duration_s": c} for a, b, c in rec["step_samples"]]
use_gpu_model = SIM_STEP_MODEL == "gpu" or (SIM_STEP_MODEL == "auto" and len(gpu_steps) >= 20)
if SIM_STEP_MODEL == "gpu" and len(gpu_steps) < 20:
    raise ValueError("SIM_STEP_MODEL='gpu' needs the GPU serving run in the results file")
if use_gpu_model:
    STEP = StepModel.fit(gpu_steps)
    SIM_MAXLEN, SIM_BATCH = 512, 32
    SIM_GPU = GPUSpec.for_model(gpu_mem_bytes=80e9, n_params=6.74e9, kv_bytes_per_token=2 * 32 * 4096 * 2,
                                max_batch=SIM_BATCH)
    step_src = f"GPU steps of {RES.device} (7B-shaped model, SGMV backend)"
else:
    STEP = StepModel.fit(step_log)
    SIM_MAXLEN, SIM_BATCH = 128, MAX_BATCH
    SIM_GPU = GPUSpec(n_blocks=int(0.75 * SIM_BATCH * math.ceil(SIM_MAXLEN / 16)), max_batch=SIM_BATCH)
    step_src = "CPU steps of the tiny-Llama runs above"
print(f"step model ({step_src}): {STEP.base_s * 1e3:.2f} ms + {STEP.per_row_s * 1e3:.3f} ms/row + "
      f"{STEP.per_prefill_token_s * 1e3:.4f} ms/prefill token (R² = {STEP.r2 if STEP.r2 is None else round(STEP.r2, 3)}); "
      f"GPU: {SIM_GPU}")

# capacity of one GPU at full batch, in requests/s, for the rate scale
_, o_probe = punica_lengths(2000, maxlen=SIM_MAXLEN, seed=SEED)
CAP_REQ_S = SIM_BATCH / STEP(SIM_BATCH, 0) / float(np.mean(o_probe))


def sim_requests(peak_frac, seconds, shape="triangle", seed=SEED):
    peak = peak_frac * CAP_REQ_S * NUM_GPUS_SIM
    t = ramp_arrivals(seconds, peak_rate=peak, base_rate=0.05 * peak if shape == "triangle" else peak, seed=seed,
                      shape=shape)
    p, o = punica_lengths(len(t), maxlen=SIM_MAXLEN, seed=seed + 1)
    return [SimRequest(i, float(t[i]), int(p[i]), int(o[i])) for i in range(len(t))]


t0 = time.time()
sim_seconds = SIM_STEPS * STEP(SIM_BATCH, 0)
ramp = sim_requests(0.7, sim_seconds)
SIM = simulate(ramp, n_gpus=NUM_GPUS_SIM, gpu=SIM_GPU, step_model=STEP)
for pol, res in SIM.items():
    s = res.summary()
    print(f"{pol:13s}: {s['n_requests']} requests, {s['throughput_tok_s']:8.1f} tok/s, "
          f"avg busy GPUs {s['avg_busy_gpus']:.2f}, p99 latency {s['latency_p99_s']:.2f} s, migrations {s['migrations']}")
print(f"simulation: {time.time() - t0:.1f} s")

fig_cl = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
for pol, res in SIM.items():
    fig_cl.add_scatter(x=res.timeline_t, y=res.timeline_busy, mode="lines", line_shape="hv", name=pol,
                       line=dict(color={"punica": viz.color("sgmv"), "round_robin": viz.color("loop"),
                                        "least_loaded": viz.color("gather_bmm")}[pol]), row=1, col=1)
arr = np.array([r.arrival_s for r in ramp])
bins = np.linspace(0, sim_seconds, 31)
fig_cl.add_bar(x=(bins[:-1] + bins[1:]) / 2, y=np.histogram(arr, bins)[0] / np.diff(bins), name="arrivals",
               marker_color="#bbb", row=2, col=1)
fig_cl.update_yaxes(title_text="GPUs holding requests", row=1, col=1)
fig_cl.update_yaxes(title_text="arrivals (req/s)", row=2, col=1)
fig_cl.update_xaxes(title_text="time (s, simulated)", row=2, col=1)
viz.apply_template(fig_cl, title=f"Cluster of {NUM_GPUS_SIM} GPUs under a rate ramp (peak 70% of capacity)", height=520)
viz.caption(fig_cl, f"Simulated; step time fitted on {step_src}.<br>Punica's policy: busiest GPU that fits; "
            "FIFO queue; eviction + re-prefill under memory pressure. The paper's cluster numbers are not reproduced.")
viz.save(fig_cl, SLUG, "cluster_timeline")
fig_cl.show()

# %% [markdown]
# **Takeaway.** Round-robin and least-loaded spread requests over every GPU as soon as there are
# more requests than GPUs, so all GPUs stay busy at any load; Punica's policy fills the busiest GPU
# first, so at low load the others stay empty (and could be released or given to other work), and
# only at high load does it use them all. The price: a fuller batch steps more slowly, and when a
# GPU's KV memory fills, requests are evicted and re-prefilled elsewhere (migrations).
#
# **Claim 6** — at low load (a flat 15% of the cluster's capacity) Punica's policy keeps strictly
# fewer GPUs busy on average than round-robin, with throughput within 5%.

# %%
low = sim_requests(0.15, 3 * sim_seconds, shape="flat", seed=SEED + 5)
LOW = simulate(low, n_gpus=NUM_GPUS_SIM, gpu=SIM_GPU, step_model=STEP)
bp, br = LOW["punica"].avg_busy_gpus(), LOW["round_robin"].avg_busy_gpus()
tp, tr = LOW["punica"].throughput_tok_s, LOW["round_robin"].throughput_tok_s
print(f"low load ({len(low)} requests): busy GPUs punica {bp:.2f} vs round-robin {br:.2f}; "
      f"throughput {tp:.1f} vs {tr:.1f} tok/s")
assert bp < br, (bp, br)
assert abs(tp / tr - 1) <= 0.05, (tp, tr)
print("claim 6 holds")

# %% [markdown]
# ## 7. GPU claims (results file, or live with `DEVICE="cuda"`)
#
# From `data/results/punica/<gpu>.json` (`python -m mlsys24.bench punica`), at h1 = 4096, h2 = 11008,
# fp16: SGMV at bs = 64 Distinct ≤ 2× its bs = 1 latency (r = 16); Loop / SGMV at bs = 64 ≥ 5; at
# bs = 64 Distinct, r = 64, ≥ 50% of the HBM roofline (adapter bytes / time vs the datasheet
# bandwidth); serving mixed-adapter / same-adapter ≥ 5 in Distinct (claim 7); every provider within
# 2e-2 of the float32 reference. Latency claims need device time (CUDA-graph replay); a file with only
# Python-launched timings leaves them unanswered.
#
# **Claim 4 (flatness across popularities), stated where physics allows a test.** Distinct reads 64
# adapters where Identical reads one, so at batch 64 the spread over popularities cannot be below
# `floor = (63 extra adapters' bytes / measured copy bandwidth) / latency(Identical)`. When that floor
# exceeds the paper's 25% (a GPU with microsecond kernels and rank ≥ 16), the paper's form is reported
# with its floor but cannot be judged. It is tested in two forms that can pass or fail:
# (a) the paper's ≤ 25% spread at the largest batch whose byte floor is ≤ 12.5% (rank 16), and
# (b) at batch 64 and every rank, what is *not* explained by bytes —
# `(T_pop − extra bytes / copy bandwidth) / T_Identical − 1` — is ≤ 25%.

# %%
if GPU:
    from mlsys24.bench import copy_bandwidth
    from mlsys24.lora.bench import operator_bench

    live = operator_bench(device=DEV, h2s=(11008,), ranks=(16, 64), batches=(1, 8, 64), repeats=20, tune=False,
                          log=lambda m: None)
    COPY_GBPS = copy_bandwidth(DEV)[1]
    CLAIMS, claim_src = gpu_claims(live, copy_GBps=COPY_GBPS), f"live on {torch.cuda.get_device_name()}"
elif RES is not None:
    COPY_GBPS = RES.config.get("copy_GBps")
    CLAIMS, claim_src = gpu_claims(RES.records, copy_GBps=COPY_GBPS), RES.caption()
else:
    CLAIMS, claim_src = {}, None
if not CLAIMS:
    print("skipped: no GPU results; run `PYTHONPATH=lib python3 -m mlsys24.bench punica` on a GPU")
else:
    print(f"GPU claims from: {claim_src}")
    for name, c in CLAIMS.items():
        if c is None:
            print(f"  {name:26s}: not in this file (re-run `python3 -m mlsys24.bench punica`)")
        else:
            print(f"  {name:26s}: {c['value']:.3g} (target {c['target']}) -> {'OK' if c['ok'] else 'FAILS'} · {c['detail']}")
    # The paper's result rests on these: SGMV far ahead of Loop, adapter reads near HBM speed, the
    # serving speedup on Distinct, exactness. The shape claims (latency nearly flat in batch size
    # and across popularities) are reported with their numbers; where they fail, this Triton SGMV
    # does not reproduce the paper's CUDA kernel's flatness, and the run says so instead of hiding it.
    CORE = ("loop_over_sgmv_bs64", "sgmv_pct_hbm_r64", "e2e_distinct_speedup", "max_rel_err")
    flat64 = CLAIMS.get("sgmv_flatness_bs64")
    if flat64 is not None and not flat64["testable"]:
        print(f"NOT TESTABLE here: sgmv_flatness_bs64 = {flat64['value']:.3g} (paper-derived target "
              f"{flat64['target']}); the adapter bytes alone set its floor at {flat64['floor']:.2f} on this GPU, "
              "so forms (a) and (b) test the claim instead")
    untestable = {"sgmv_flatness_bs64"} if flat64 is not None and not flat64["testable"] else set()
    not_reproduced = [n for n, c in CLAIMS.items()
                      if c is not None and not c["ok"] and n not in CORE and n not in untestable]
    for n in not_reproduced:
        print(f"NOT REPRODUCED here: {n} = {CLAIMS[n]['value']:.3g} (paper-derived target {CLAIMS[n]['target']})")
    failed = [n for n in CORE if CLAIMS.get(n) is not None and not CLAIMS[n]["ok"]]
    assert not failed, f"GPU claims not met: {failed}"

# %% [markdown]
# What bounds the batch-64 / batch-1 ratio: batch 1 costs a fixed floor (two launches and a few
# dependent memory round trips), batch 64 Distinct must also stream 64 adapters. So the ratio cannot
# be below `1 + (64 adapters' bytes / measured copy bandwidth) / latency(bs=1)`: the faster the
# batch-1 floor, the harder a ratio of 2. Below, every rank and both output widths of the issue's
# shapes, with that floor, then the configs the sweep chose.

# %%
if RES is not None and MODE == "graph":
    bw = RES.config.get("copy_GBps") or device_peaks(RES.device).hbm_GBps
    for h2_ in (11008, 4096):
        for r_ in (16, 32, 64):
            s1 = op_latency(RES.records, "sgmv", h2=h2_, bs=1, popularity="distinct", r=r_, mode=MODE)
            s64 = op_latency(RES.records, "sgmv", h2=h2_, bs=64, popularity="distinct", r=r_, mode=MODE)
            if s1 and s64:
                stream_us = 64 * (4096 + h2_) * r_ * 2 / bw / 1e3
                verdict = "meets <= 2" if s64 / s1 <= 2 else ("misses 2" if 1 + stream_us / s1 <= 2 else
                                                               "misses 2 (floor above 2)")
                print(f"h2={h2_:5d} r={r_:2d}: SGMV bs=1 {s1:5.1f} us, bs=64 Distinct {s64:5.1f} us, ratio "
                      f"{s64 / s1:.2f} ({verdict}); 64 adapters at {bw:.0f} GB/s take {stream_us:4.1f} us -> "
                      f"ratio floor {1 + stream_us / s1:.2f}")
    # where batch 64 loses time: the marginal bandwidth of the expand, from the two output widths
    # (the shrink reads the same A in both, each width runs its own tuned config; h2 = 11008 reads
    # 64 x r x 6912 more B elements than 4096)
    for r_ in (16, 32, 64):
        t_wide = op_latency(RES.records, "sgmv", h2=11008, bs=64, popularity="distinct", r=r_, mode=MODE)
        t_narrow = op_latency(RES.records, "sgmv", h2=4096, bs=64, popularity="distinct", r=r_, mode=MODE)
        if t_wide and t_narrow and t_wide > t_narrow:
            extra_mb = 64 * r_ * (11008 - 4096) * 2 / 1e6
            print(f"r={r_:2d}: the expand's extra {extra_mb:.1f} MB (h2 11008 vs 4096, bs=64 Distinct) cost "
                  f"{t_wide - t_narrow:.1f} us -> marginal {extra_mb / (t_wide - t_narrow):.2f} TB/s "
                  f"(copy: {bw / 1e3:.2f} TB/s)")
    for rec in RES.records:
        if rec.get("kind") == "tuning" and rec.get("op") == "sgmv" and rec["h2"] == 11008:
            b = rec["best"]
            form = ("row-by-row" if b.get("expand_rows") else
                    f"runs of tiles ({b['expand_per_sm']:g}/SM)" if b.get("expand_per_sm") else "one tile per program")
            print(f"  tuned h2=11008 r={rec['r']:2d} bs={rec['bs']:2d}: {rec['us']:5.1f} us  reduce={b['reduce']}, "
                  f"pdl={b['pdl']}, {b['programs_per_sm']:g} shrink programs/SM, block_k={b['block_k']}, expand: "
                  f"{form}, block_n={b.get('rows_block_n') if b.get('expand_rows') else b['block_n']}, "
                  f"warps={b['num_warps']} ({len(rec['trials'])} configs tried)")

# %% [markdown]
# **Takeaway.** Batch 1 is a floor of launches and dependent memory round trips (8.9 µs on the H100,
# 8.7 µs on the H200); programmatic dependent launch (the expand reading `B` while the shrink
# runs) and a wide split-K keep it low. Batch 64 Distinct must in addition stream 64 adapters, so the
# ratio has a floor printed above: at rank 32 and 64 with h2 = 11008 it is above 2 (the bytes alone
# take longer than one more batch-1 latency). On the H200 "≤ 2×" is physically possible at rank 16,
# and there this kernel reaches about 30% of copy bandwidth (h2 = 11008: ratio ≈ 2.7 against a floor
# of ≈ 1.8; h2 = 4096: ≈ 1.9, met). On the H100, the card the issue names, it is not: batch 1 takes
# 8.9 µs and the 31 MB that 64 distinct rank-16 adapters add at h2 = 11008 take 10.1 µs at that card's
# 3.0 TB/s copy rate, so even an expand and shrink streaming at the full copy rate could not pass
# 2.13× (measured 2.94×: 26.2 µs; h2 = 4096: 2.05× against a floor of 1.61). The sweep also tried two other expand forms — programs walking runs
# of N tiles with the next tile prefetched, and a row-by-row CUDA-core kernel whose programs hold one
# weight tile instead of a 16-row tensor-core tile — and kept whichever measured fastest per shape:
# at h2 = 11008 none beat the one-tile-per-program expand (the run's `trials` list every timing), so
# what limits batch 64 there is not the expand's register footprint. The marginal bandwidth of the
# expand (printed above, from the two output widths) grows with the rank, i.e. with the bytes each
# program has in flight (a rank-16 weight tile is 16 rows of a few hundred bytes): at rank 16 the
# stream runs at about half of copy bandwidth, which is the gap between the measured ratio and its
# floor. The rank-64 read reaches ~60% of the datasheet HBM bandwidth. Flatness across popularities is bounded the same way (claim 4
# above): Distinct reads 64 adapters where Identical reads one. The paper's A100 kernel was flat
# partly because its batch-1 latency was several times higher.

# %%
if RES is not None and MODE is not None:
    x64 = {p: op_latency(RES.records, "sgmv", h2=11008, bs=64, popularity=p, r=16, mode=MODE) for p in POP_ALL}
    d64 = op_latency(RES.records, "dense", h2=11008, bs=64, popularity="any", mode=MODE)
    if d64 and x64["distinct"]:
        print(f"SGMV / dense XW at bs=64 Distinct ({MODE}): {x64['distinct'] / d64:.2f} (paper, A100: ≈ 0.5)")
    if GPU_E2E:
        for p in POP_ALL:
            a, b = GPU_E2E.get(("punica", p)), GPU_E2E.get(("same_adapter", p))
            if a and b:
                print(f"GPU serving {p:9s}: Punica {a['tokens_per_s']:.0f} tok/s ({a['finished']}/{a['n_requests']} done "
                      f"in {a['wall_s']:.0f} s), same-adapter {b['tokens_per_s']:.0f} tok/s; paper: "
                      f"{PAPER_TEXTGEN[p]['punica']} vs vLLM {PAPER_TEXTGEN[p]['vllm']}")

# %% [markdown]
# ## 8. Explore
#
# Operator latency from the results file (or the CPU table above when there is none): pick the
# popularity, the rank, the batch size and the providers. Cluster: pick the peak load and a policy.

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    if RES is not None:
        ranks_av = sorted({rec["r"] for rec in op_records(RES.records, MODE) if rec["r"] is not None})
        bs_av = sorted({rec["bs"] for rec in op_records(RES.records, MODE)})
        provs = PROVIDERS_GPU

        def lat(prov, bs, pop, r):
            return op_latency(RES.records, prov, h2=11008, bs=bs, popularity=pop, r=r, mode=MODE)
    else:
        ranks_av, bs_av, provs = [OP_RANK], OP_BATCH_SIZES, ["dense", "loop", "gather_bmm", "segmented"]

        def lat(prov, bs, pop, r):
            try:
                return cpu_us(prov, bs, pop)
            except StopIteration:
                return None

    w_pop = W.Dropdown(options=POP_ALL if RES is not None else cpu_pops, description="popularity")
    w_rank = W.SelectionSlider(options=ranks_av, description="rank")
    w_bs = W.SelectionSlider(options=bs_av, value=bs_av[-1], description="batch")
    w_prov = W.SelectMultiple(options=provs, value=tuple(provs), description="backends")
    fw = go.FigureWidget()
    viz.apply_template(fw, title="latency vs batch size", x="batch size", y="latency (µs)")
    fw.update_xaxes(type="log")
    fw.update_yaxes(type="log")
    out_txt = W.HTML()

    def redraw(*_):
        with fw.batch_update():
            fw.data = []
            for prov in w_prov.value:
                ys = [lat(prov, b, w_pop.value, w_rank.value) for b in bs_av]
                fw.add_scatter(x=bs_av, y=ys, name=prov, mode="lines+markers", line=dict(color=viz.color(prov)))
        at = {p: lat(p, w_bs.value, w_pop.value, w_rank.value) for p in w_prov.value}
        out_txt.value = f"at batch {w_bs.value}: " + ", ".join(
            f"{p} {v:.1f} µs" for p, v in at.items() if v is not None)

    for w in (w_pop, w_rank, w_bs, w_prov):
        w.observe(redraw, "value")
    redraw()
    display(W.VBox([W.HBox([w_pop, w_rank, w_bs]), w_prov, out_txt, fw]))

    # cluster: the two precomputed loads, every policy
    SIMS = {"ramp, peak 70%": SIM, "flat 15%": LOW}
    w_rate = W.ToggleButtons(options=list(SIMS), description="load")
    w_pol = W.RadioButtons(options=list(POLICIES), value="punica", description="policy")
    fc = go.FigureWidget()
    viz.apply_template(fc, title="GPUs holding requests", x="time (s, simulated)", y="GPUs")
    c_txt = W.HTML()

    def redraw_cluster(*_):
        res = SIMS[w_rate.value][w_pol.value]
        with fc.batch_update():
            fc.data = []
            fc.add_scatter(x=res.timeline_t, y=res.timeline_busy, mode="lines", line_shape="hv", name=w_pol.value)
        s = res.summary()
        c_txt.value = (f"{s['n_requests']} requests · {s['throughput_tok_s']:.1f} tok/s · avg busy GPUs "
                       f"{s['avg_busy_gpus']:.2f} · p99 latency {s['latency_p99_s']:.2f} s · migrations {s['migrations']}")

    w_rate.observe(redraw_cluster, "value")
    w_pol.observe(redraw_cluster, "value")
    redraw_cluster()
    display(W.VBox([W.HBox([w_rate, w_pol]), c_txt, fc]))

# %%
print(f"notebook ran in {time.time() - T_START:.1f} s")

# %% [markdown]
# ## 9. Going further
#
# - GPU scale: `PYTHONPATH=lib python3 -m mlsys24.bench punica` (operators at Llama-2-7B shapes, and
#   the serving runs on a 7B-shaped model; about 6 minutes on one H100/H200), then re-run this
#   notebook; or live: `papermill notebooks/01_punica.ipynb out.ipynb -p DEVICE cuda -p E2E_BACKEND sgmv`.
# - Real weights: `-p MODEL_PATH /path/to/llama-hf -p ADAPTER_PATHS '["/path/to/peft_adapter"]'`
#   (PEFT's `lora_A [r, h1]`, `lora_B [h2, r]` and α/r scaling are converted on load).
# - Workshop questions: (1) Why does Gather-BMM lose to SGMV even though both are "one call"? Count the
#   bytes each moves. (2) At what rank does the shrink stop being memory-bound on an H100? (3) Punica's
#   scheduler consolidates; what happens to p99 latency near capacity, and how would you trade it off?
#   (4) The same-adapter baseline could regroup its queue by adapter; how far would that close the gap
#   in Uniform and Skewed, and what would it cost in fairness?
