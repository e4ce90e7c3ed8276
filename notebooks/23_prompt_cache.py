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
#     figure: ttft_gpu_headline
#     headline: 'Paper: TTFT 8x on GPU, 60x on CPU, accuracy kept. Ours: H200, 7B-shaped
#       fp16, q=32: modules in GPU memory 8.9x at 4K and 14.3x at 8K cached tokens (CUDA
#       graphs; 3.4x / 4.8x eager), host memory 2.4x / 2.8x; 1B-shaped on the H200 box
#       CPU 17.6x at 2K; tiny Llama KL vs full recompute 0.014 (scaffold) vs 0.27 naive
#       reuse'
#     paper: '23'
#     slug: prompt_cache
#     status: reproduced
# ---

# %% [markdown]
# # Prompt Cache: Modular Attention Reuse for Low-Latency Inference
#
# In Gim, Guojun Chen, Seung-seob Lee, Nikhil Sarda, Anurag Khandelwal, Lin Zhong (Yale, Google)
# · MLSys 2024 · [arXiv 2311.04934](https://arxiv.org/abs/2311.04934)
# · official code [yale-sys/prompt-cache](https://github.com/yale-sys/prompt-cache) (MIT)
#
# **The idea in one paragraph.** Prompts repeat long segments — system messages, templates, the
# documents of document QA — yet every request recomputes their attention states (K/V) in the
# prefill, which dominates time-to-first-token (TTFT). Prefix caching helps only when the shared text
# is an exact prefix. Prompt Cache lets a developer declare reusable *prompt modules* in a schema
# written in PML (Prompt Markup Language); each module gets **fixed position ids** from the schema
# (members of a `<union>` share theirs, a `<parameter>` reserves a slot), its K/V are computed once,
# and a request only concatenates the cached K/V of the modules it imports and prefills its new
# tokens. Because LLMs tolerate gaps in position ids, modules combine freely without recomputation;
# keys are stored after RoPE, so each module's positions travel with it.
#
# Here: a PML parser with located errors, the position layout, module encoding in both modes
# (the official code's *scaffold* mode and the paper's *independent* mode), host/device tiers with a
# staging buffer, all in `mlsys24.promptcache` on the workbench's shared Llama; accuracy on the
# trained tiny Llama (documents from the corpus's validation split), TTFT on CPU here and on an H200
# from `python -m mlsys24.bench prompt_cache`.

# %% tags=["parameters"]
DEVICE = "cpu"                               # where the live runs go ("cpu" or "cuda")
MODEL_PATH = None                            # HF Llama directory (config.json, *.safetensors, tokenizer.json) for the accuracy part; None = the tiny Llama
TINY_DIM = 256                               # d_model of the random-weight model of the CPU TTFT sweep
TINY_LAYERS = 4                              # its layers
CONTEXT_LENGTHS = [128, 256, 512, 1024, 2048]  # cached tokens N of the CPU TTFT sweep (multiples of 128)
QUESTION_LEN = 16                            # uncached tokens q per request in the sweep
MODULE_LEN = [48, 80]                        # min/max bytes of each document module (accuracy schema)
NUM_PROMPTS = 24                             # accuracy prompts (each selects 2-3 of 4 documents)
N_DOCS = 4                                   # document modules in the accuracy schema
ANSWER_LEN = 8                               # greedy answer tokens scored after the question
ENCODE_MODE = "scaffold"                     # Prompt Cache mode used by the explorer: "scaffold" or "independent"
CACHE_TIER = "host"                          # tier of the CPU sweep's modules: "host" or "device"
REPEATS = 5                                  # timed repeats per point (median)
THREADS = 1                                  # torch CPU threads for every timing (fixed, see claims)
BENCH = "auto"                               # GPU numbers: "auto" (results JSON, live if a GPU), "json", "skip"
SEED = 0                                     # documents, prompts, random weights
INTERACTIVE = True                           # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Int, ListOf, Str, validate

validate(globals(), DEVICE=Choice("cpu", "cuda"), TINY_DIM=Int(64, 8192), TINY_LAYERS=Int(1, 80),
         CONTEXT_LENGTHS=ListOf(Int(128, 65536), min_len=3), QUESTION_LEN=Int(1, 4096),
         MODULE_LEN=ListOf(Int(16, 400), min_len=2), NUM_PROMPTS=Int(2, 10_000), N_DOCS=Int(3, 8),
         ANSWER_LEN=Int(1, 64), ENCODE_MODE=Choice("scaffold", "independent"), CACHE_TIER=Choice("host", "device"),
         REPEATS=Int(1, 1000), THREADS=Int(1, 256), BENCH=Choice("auto", "json", "skip"), SEED=Int(0),
         INTERACTIVE=Bool())
if MODEL_PATH is not None:
    validate(globals(), MODEL_PATH=Str())
if any(n % 128 for n in CONTEXT_LENGTHS):
    raise ValueError(f"CONTEXT_LENGTHS must be multiples of 128, got {CONTEXT_LENGTHS}")

# %%
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.models import ByteTokenizer, LlamaConfig, load_hf_llama, load_tiny_llama, random_llama
from mlsys24.promptcache import (
    ROOT,
    ParseError,
    PromptCache,
    escape,
    full_prefill,
    layout,
    parse_schema,
)
from mlsys24.promptcache.accuracy import VARIANTS, codeqa_documents, codeqa_prompts, codeqa_schema, compare_variants
from mlsys24.promptcache.bench import PAPER, copy_vs_recompute, memory_rows, ttft_sweep

SLUG = "prompt_cache"
torch.manual_seed(SEED)
torch.set_num_threads(THREADS)
DEV = torch.device(DEVICE if DEVICE == "cpu" or torch.cuda.is_available() else "cpu")
T_START = time.time()
print(f"device {DEV}, torch threads {torch.get_num_threads()}")

# %% [markdown]
# ## 1. PML and the position layout
#
# The accuracy schema of this notebook, built from the committed **validation** split: a system
# line, a `<union>` of three personas (one is chosen per prompt), four document modules (one Python
# function each, 48–80 bytes) and a task module with an 8-token `<parameter>`. The layout gives every
# segment its position ids in one pass; union members share their start, the union takes the
# longest member's length, the parameter reserves its slot, and a prompt's own text starts at
# `len(schema)`.

# %%
class HFTokenizer:
    """``tokenizer.json`` of a HF model directory, with the two methods the layout needs."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids))


if MODEL_PATH is None:
    acc_model, tok = load_tiny_llama(device=DEV), ByteTokenizer()
    MODEL_NAME = "tiny Llama (4 layers, d 256, bytes, trained context 512)"
else:
    acc_model, tok = load_hf_llama(MODEL_PATH, device=DEV), HFTokenizer(MODEL_PATH)
    MODEL_NAME = Path(MODEL_PATH).name
acc_model.eval()

docs = codeqa_documents(N_DOCS, MODULE_LEN[0], MODULE_LEN[1], seed=SEED)
SCHEMA = codeqa_schema(docs)
lay = layout(parse_schema(SCHEMA), tok)
PROMPTS = codeqa_prompts(docs, NUM_PROMPTS, seed=SEED)
print(SCHEMA[:400] + " ...")
print(f"\nlen(schema) = {lay.length} positions; documents from: " + ", ".join(d["path"] for d in docs))
print(f"{'module':10s} {'union':>5s} {'kind':5s} {'start':>5s} {'end':>5s}  text")
for r in lay.table():
    print(f"{r['module']:10s} {str(r['union'] if r['union'] is not None else ''):>5s} {r['kind']:5s} "
          f"{r['start']:5d} {r['end']:5d}  {r['text']}")

# %%
# Claim 1: layout rules
m_ = lay.modules
members = lay.unions[0][0]
assert len({m_[m].start for m in members}) == 1                                       # shared start
after_union = min(s.start for s in lay.segments if s.start >= m_[members[0]].start and s.module not in members)
assert after_union == m_[members[0]].start + max(m_[m].length for m in members)        # union length = max
slot = next(s for s in lay.segments if s.kind == "param")
assert slot.length == 8 and slot.end - slot.start == 8                                # slot = length positions
sel0 = lay.resolve(PROMPTS[0])
assert sel0.uncached_pos[-sel0.n_user] == lay.length                                  # user text at len(schema)
longest = max(len(lay.resolve(p).full_sequence(lay)[0]) for p in PROMPTS)
max_pos = max(lay.resolve(p).uncached_pos[-1] for p in PROMPTS) + ANSWER_LEN
print(f"longest prompt {longest} tokens, largest position id {max_pos} (trained context 512)")
if MODEL_PATH is None:
    assert max_pos < 512, "accuracy prompts must stay inside the tiny model's trained context"

for bad in ('<prompt schema="codeqa"><persona0/><persona1/>q</prompt>',
            '<prompt schema="codeqa">\n  <doc0/><task style="far too long an argument"/>q</prompt>'):
    try:
        lay.resolve(bad)
        raise AssertionError("accepted an invalid prompt")
    except ParseError as e:
        print("ParseError:", e)
try:
    parse_schema('<schema name="x">\n  <module name="a">text</modul>\n</schema>')
except ParseError as e:
    print("ParseError:", e)

# %% [markdown]
# **Takeaway.** The schema fixes every module's position ids before any request arrives; a prompt
# picks modules and supplies arguments and text, and malformed input fails with a line, a column
# and what was expected (the parser is fuzzed with hypothesis in `tests/promptcache`).
#
# ## 2. Reference and the real thing
#
# The reference is a plain full recompute of the selected tokens *at their schema positions*
# (`full_prefill(model, ids, pos)`): when the prompt selects exactly the scaffold (every module
# before the question, each union's scaffold member), scaffold-mode Prompt Cache must give the same
# logits, since its cached K/V were computed over that very sequence. And when a single module is the
# prompt's prefix, reuse must equal an ordinary prefill (claim 2).

# %%
def prompt_cache_ref(model, lay, sel):
    """Plain recompute of every selected token at its schema position; logits of the user text."""
    ids, pos = sel.full_sequence(lay)
    return full_prefill(model, ids, pos)[0, -sel.n_user:]


sc_mods = [m for m in lay.modules if m not in (ROOT, "task")                   # every module before the task,
           and (lay.modules[m].union is None or m == lay.unions[0][1])]           # the union's scaffold member
sel_sc = lay.resolve('<prompt schema="codeqa">' + "".join(f"<{m}/>" for m in sc_mods) + "# Q: what?</prompt>")
pc_sc = PromptCache(acc_model, lay, encode_mode="scaffold")
err_sc = (pc_sc.prefill(sel_sc).logits[0] - prompt_cache_ref(acc_model, lay, sel_sc)).abs().max().item()
print(f"scaffold selection {sel_sc.modules[1:]}: max |Prompt Cache - reference| = {err_sc:.2e}")

doc_lay = layout(f'<schema name="one"><module name="d">{escape(docs[0]["text"])}</module></schema>', tok)
sel_1 = doc_lay.resolve('<prompt schema="one"><d/># Q: what does it return?</prompt>')
ids_1, _ = sel_1.full_sequence(doc_lay)
full_1 = full_prefill(acc_model, ids_1)[0, -sel_1.n_user:]                  # ordinary prefill, positions 0..n-1
err_prefix = {m: (PromptCache(acc_model, doc_lay, encode_mode=m).prefill(sel_1).logits[0] - full_1).abs().max().item()
              for m in ("scaffold", "independent")}
print(f"single cached prefix module ({len(ids_1) - sel_1.n_user} tokens): max |Δ logits| = {err_prefix}")
assert err_sc <= 1e-4
assert max(err_prefix.values()) <= 1e-4                                    # claim 2

# %% [markdown]
# **Takeaway.** With the same attention context, reused states are exact (fp32 round-off): the
# positions are carried by the post-RoPE keys, and the new tokens attend to every cached slot and
# causally to each other. What reuse changes is only *which context each module saw when it was
# encoded* — that is what section 5 measures.
#
# ## 3. Back-of-envelope: what a cached token costs
#
# A cached token stores K and V in every layer: 2 · layers · kv_heads · head_dim · bytes
# (claim 6 checks that the stored tensors hold exactly that). Recomputing it costs ≈ 2 · params
# FLOPs plus attention; reusing it costs one copy of those bytes (device-to-device if the module
# lives in GPU memory, host-to-device otherwise).

# %%
MEM = memory_rows()
for r in MEM:
    print(f"{r['model']:14s} {r['bytes_per_token'] / 1024:8.1f} KiB/token (formula {r['formula'] / 1024:.1f} KiB)")
    assert r["bytes_per_token"] == r["formula"]                             # claim 6 (shapes of real models)
store_acc = pc_sc.store
per_tok = store_acc.nbytes / store_acc.n_tokens
assert per_tok == 2 * acc_model.cfg.n_layers * acc_model.cfg.n_kv_heads * acc_model.cfg.head_dim_ * 4  # claim 6 (live)
print(f"live store ({MODEL_NAME}, fp32): {store_acc.n_tokens} tokens, {store_acc.nbytes / 1024:.0f} KiB, "
      f"{per_tok:.0f} B/token")
P7 = 6.74e9
for n in (4096, 8192):
    flops = 2 * P7 * n
    by = n * 512 * 1024
    print(f"7B, N={n}: recompute {flops / 1e12:.0f} TFLOP ≈ {flops / 989e12 * 1e3:.0f} ms at H100/H200 dense fp16 peak; "
          f"copy {by / 2**30:.1f} GiB ≈ {2 * by / 4.8e12 * 1e3:.1f} ms D2D (read+write at 4.8 TB/s) "
          f"or ≈ {by / 55e9 * 1e3:.0f} ms H2D at ~55 GB/s")

# %% [markdown]
# **Takeaway.** At 7B, recomputing a token costs ~13 GFLOP while copying it moves 0.5 MiB: at
# datasheet rates a device-resident module is ~50× cheaper to reuse than to recompute, a host-resident
# one only ~1.5× (PCIe is the limit) — the ordering the paper reports, and what section 4 measures.
#
# ## 4. TTFT vs cached length
#
# ### CPU, here
# A random-weight model of the tiny Llama's shape (weights do not change the time), a schema of
# 128-token modules; each request imports the first N/128 of them plus q fresh tokens. Baseline: a
# full prefill of all N + q tokens into a KV cache. Prompt Cache: copy the modules from their tier
# into the staging cache (no reuse of a previously staged prefix between repeats) + prefill of the q
# new tokens. Medians of `REPEATS` runs, `THREADS` fixed; wall times are inflated by other processes
# sharing this machine's cores.

# %%
sweep_model = random_llama(LlamaConfig(d_model=TINY_DIM, n_layers=TINY_LAYERS, n_heads=max(1, TINY_DIM // 64),
                                       n_kv_heads=max(1, TINY_DIM // 64), ffn_dim=3 * TINY_DIM), DEV, seed=SEED)
CPU_SWEEP = ttft_sweep(sweep_model, sorted(CONTEXT_LENGTHS), q=QUESTION_LEN, module_len=128, tiers=(CACHE_TIER,),
                       warmup=1, repeats=REPEATS, seed=SEED)
Ns = sorted(CONTEXT_LENGTHS)
t_base = np.array([next(r["median_ms"] for r in CPU_SWEEP if r["N"] == n and r["method"] == "baseline") for n in Ns])
t_pc = np.array([next(r["median_ms"] for r in CPU_SWEEP if r["N"] == n and r["method"] == CACHE_TIER) for n in Ns])
speed = t_base / t_pc
for n, b, c, s in zip(Ns, t_base, t_pc, speed):
    print(f"N={n:5d}: baseline {b:8.2f} ms   Prompt Cache ({CACHE_TIER}) {c:7.2f} ms   speedup {s:5.2f}x")

fig_cpu = make_subplots(rows=1, cols=2, subplot_titles=("TTFT", "speedup"))
fig_cpu.add_scatter(x=Ns, y=t_base, name="baseline (full prefill, KV cache)", line_color=viz.color("baseline"), row=1, col=1)
fig_cpu.add_scatter(x=Ns, y=t_pc, name=f"Prompt Cache ({CACHE_TIER} tier)", line_color=viz.color("ours"), row=1, col=1)
fig_cpu.add_scatter(x=Ns, y=speed, name="speedup", line_color=viz.color("ours"), line_dash="dot", showlegend=False,
                    row=1, col=2)
fig_cpu.update_xaxes(type="log", title_text="cached tokens N")
fig_cpu.update_yaxes(title_text="TTFT (ms)", type="log", row=1, col=1)
fig_cpu.update_yaxes(title_text="baseline / Prompt Cache (×)", row=1, col=2)
viz.apply_template(fig_cpu, title=f"CPU TTFT vs cached length (q = {QUESTION_LEN})", width=900)
viz.caption(fig_cpu, f"random-weight Llama d={TINY_DIM}, {TINY_LAYERS} layers, fp32, {THREADS} thread(s), median of "
            f"{REPEATS}; shared 2-core machine (times inflated by other load, ratios less so)")
viz.save(fig_cpu, SLUG, "ttft_cpu")
fig_cpu

# %%
i1024 = Ns.index(1024) if 1024 in Ns else None
slope_b = np.polyfit(Ns, t_base, 1)[0]
slope_c = np.polyfit(Ns, t_pc, 1)[0]
print(f"slope: baseline {slope_b * 1e3:.2f} µs/token, Prompt Cache {slope_c * 1e3:.3f} µs/token "
      f"(ratio {slope_c / slope_b:.3f})")
if i1024 is not None:
    assert speed[i1024] >= 3.0, f"speedup at N=1024 is {speed[i1024]:.2f}x < 3x"      # claim 3
if 256 in Ns and 2048 in Ns:
    assert speed[Ns.index(2048)] > speed[Ns.index(256)]                               # claim 3
assert slope_c <= 0.25 * slope_b                                                      # claim 4

# %% [markdown]
# **Takeaway.** The baseline's TTFT grows with N (linear layers over every token, attention
# quadratically); Prompt Cache pays only a copy per cached token, so its TTFT is almost flat and the
# speedup grows with N — the paper's "especially for longer prompts". The ratio depends on q: with
# fewer new tokens it grows further.
#
# ### GPU (H200), from the benchmark
# `python -m mlsys24.bench prompt_cache`: Llama-2-7B shapes with random fp16 weights, 512-token
# modules, q = 32, the SDPA baseline in the same run (with a KV cache, and the faster flash-kernel
# prefill without one — speedups are against the faster), modules in GPU memory (D2D staging) or
# pinned host memory (H2D), each timed eagerly and as one CUDA graph (staging copies included).

# %%
from mlsys24.bench import gpu_results

GPU_RES = gpu_results(SLUG, BENCH)   # live (quick plan) on a GPU, else the committed JSON
if GPU_RES is None:
    print("no GPU results: run `PYTHONPATH=lib python -m mlsys24.bench prompt_cache` on a GPU machine")
else:
    print(GPU_RES.caption())
    GREC = GPU_RES.records


def gpu_pts(method, where="gpu"):
    pts = sorted((r["N"], r) for r in GREC if r.get("bench") == "ttft" and r.get("where") == where
                 and r["method"] == method)
    return [p[0] for p in pts], [p[1] for p in pts]


# %%
if GPU_RES is not None:
    fig_gpu = make_subplots(rows=1, cols=2, subplot_titles=("TTFT (H200, 7B-shaped fp16)", "speedup vs fastest baseline"))
    series = [("baseline_flash_graph", "baseline: full prefill (SDPA flash, graph)", "baseline", "solid"),
              ("host", "Prompt Cache, host memory (eager)", "host", "dot"),
              ("host_graph", "Prompt Cache, host memory (graph)", "host", "solid"),
              ("device", "Prompt Cache, GPU memory (eager)", "ours", "dot"),
              ("device_graph", "Prompt Cache, GPU memory (graph)", "ours", "solid")]
    for meth, label, col, dash in series:
        xs, rs = gpu_pts(meth)
        if not xs:
            continue
        fig_gpu.add_scatter(x=xs, y=[r["median_ms"] for r in rs], name=label, line_color=viz.color(col),
                            line_dash=dash, row=1, col=1)
        if not meth.startswith("baseline"):
            fig_gpu.add_scatter(x=xs, y=[r["speedup"] for r in rs], name=label, line_color=viz.color(col),
                                line_dash=dash, showlegend=False, row=1, col=2)
    fig_gpu.add_hline(y=PAPER["gpu_speedup"], line_dash="dash", line_color=viz.color("paper"), row=1, col=2,
                      annotation_text="paper: 8× (GPU)", annotation_position="top left")
    fig_gpu.update_xaxes(type="log", title_text="cached tokens N")
    fig_gpu.update_yaxes(title_text="TTFT (ms)", type="log", row=1, col=1)
    fig_gpu.update_yaxes(title_text="×", row=1, col=2)
    viz.apply_template(fig_gpu, title="Headline: TTFT vs cached length, baseline vs host vs device reuse", width=1000,
                       height=460)
    viz.caption(fig_gpu, GPU_RES.caption() + "<br>random weights, q = 32 new tokens, 512-token modules; speedups vs the "
                "fastest of 4 baselines (KV-cache / flash prefill, eager / graph); paper: Llama2-7B etc. on RTX 4090, A40, A100, "
                "HF eager")
    viz.save(fig_gpu, SLUG, "ttft_gpu_headline")
    fig_gpu

# %%
if GPU_RES is not None:
    def sp(method, n, where="gpu"):
        return next((r["speedup"] for r in GREC if r.get("bench") == "ttft" and r.get("where") == where
                     and r["method"] == method and r["N"] == n), None)

    cpu_n = GPU_RES.config.get("cpu_N")
    cats = ["GPU, modules in GPU memory<br>(N=8K, graph)", "GPU, modules in GPU memory<br>(N=8K, eager)",
            "GPU, host memory<br>(N=8K, graph)", f"CPU of the GPU box<br>(1B, N={cpu_n})", "this machine's CPU<br>(tiny, N=2K)"]
    ours = [sp("device_graph", 8192), sp("device", 8192), sp("host_graph", 8192), sp("host", cpu_n, "cpu"),
            float(speed[Ns.index(2048)]) if 2048 in Ns else None]
    paper = [PAPER["gpu_speedup"], PAPER["gpu_speedup"], None, PAPER["cpu_speedup"], PAPER["cpu_speedup"]]
    fig_pv = viz.paper_vs_ours(cats, ours, paper, title="Prompt Cache TTFT speedup: paper vs ours", y="speedup (×)")
    viz.caption(fig_pv, GPU_RES.caption() + "<br>paper: 8× GPU / 60× CPU (abstract); README demo 3.7× GPU (RTX 4090), "
                "35× CPU (i9-13900K); our CPU q = 16")
    viz.save(fig_pv, SLUG, "paper_vs_ours")
    fig_pv

# %% [markdown]
# **Takeaway.** With modules resident in GPU memory, a 7B-shaped model's TTFT stays near the cost of
# one 32-token forward pass while the baseline grows to 270 ms at 8K: 8.9× at 4K and 14.3× at 8K
# cached tokens when the request runs as one CUDA graph — above the paper's 8×. Eagerly, our Python
# model's launch overhead (~35 ms for 32 layers) is a floor that caps the gain at 3.4× / 4.8×, below
# the card's targets (the official code runs patched HF models eagerly, so it pays a floor of
# this kind too). The host-memory tier is bound by PCIe (~55 GB/s measured): 2.4–2.8×, always below the device
# tier, as in the paper. The CPU speedup (17.6× for a 1B-shaped model at 2K, q = 16, on the H200 box's
# 16 cores) is well below the paper's 60×; it depends on N/q and the CPU's matmul rate, not on
# hardware alone.

# %%
CLAIMS = []
if GPU_RES is not None:
    def claim(name, value, target, ok):
        CLAIMS.append((name, value, target, ok))
        print(("" if ok else "NOT REPRODUCED: ") + f"{name}: {value:.2f}× (target {target})")

    claim("GPU-memory reuse at N=4096, CUDA graph", sp("device_graph", 4096), ">= 5×", sp("device_graph", 4096) >= 5)
    claim("GPU-memory reuse at N=8192, CUDA graph", sp("device_graph", 8192), ">= 8×", sp("device_graph", 8192) >= 8)
    claim("GPU-memory reuse at N=4096, eager", sp("device", 4096), ">= 5×", sp("device", 4096) >= 5)
    claim("GPU-memory reuse at N=8192, eager", sp("device", 8192), ">= 8×", sp("device", 8192) >= 8)
    claim("host-memory reuse at N=8192, graph (> 1, < device)", sp("host_graph", 8192), "> 1×",
          1 < sp("host_graph", 8192) < sp("device_graph", 8192))
    claim(f"CPU of the GPU box, 1B-shaped, N={cpu_n}", sp("host", cpu_n, "cpu"), "paper 60×", sp("host", cpu_n, "cpu") >= 60)
    # asserted (claim 7): what this run supports
    assert sp("device_graph", 4096) >= 5 and sp("device_graph", 8192) >= 8
    for n in (4096, 8192):
        assert 1 < sp("host_graph", n) <= sp("device_graph", n) and sp("host", n) <= sp("device", n)
    assert sp("host", cpu_n, "cpu") > 3

# %% [markdown]
# ## 5. Accuracy: correct positions vs naive reuse
#
# `NUM_PROMPTS` prompts on the trained tiny Llama; each selects a persona, 2–3 of the 4 documents
# and the task (with an argument) and asks about one function. Every variant scores the question
# tokens and the full recompute's `ANSWER_LEN` greedy answer tokens (teacher-forced): KL to the full
# recompute's next-token distribution and top-1 agreement. *naive* caches each module at positions
# 0..n−1 and concatenates them as is; *full at schema positions* recomputes everything but keeps the
# schema's gaps, isolating the position effect from the missing cross-module attention.

# %%
ACC = compare_variants(acc_model, lay, PROMPTS, answer_len=ANSWER_LEN)
LABEL = {"scaffold": "Prompt Cache (scaffold)", "independent": "Prompt Cache (independent)",
         "naive": "naive reuse (positions 0..n-1)", "full_schema_pos": "full recompute, schema positions"}
MEAN = {v: (float(np.mean([r["kl"] for r in ACC if r["variant"] == v])),
            float(np.mean([r["top1"] for r in ACC if r["variant"] == v]))) for v in VARIANTS}
for v, (kl, t1) in MEAN.items():
    print(f"{LABEL[v]:36s} mean KL {kl:.4f} nats   top-1 agreement {100 * t1:.1f} %")

fig_acc = make_subplots(rows=1, cols=2, subplot_titles=("KL(variant ‖ full recompute) per prompt", "top-1 agreement"))
for v in VARIANTS:
    kls = [r["kl"] for r in ACC if r["variant"] == v]
    fig_acc.add_box(y=kls, name=LABEL[v], boxpoints="all", jitter=0.4, marker_color=viz.color(v), row=1, col=1)
    fig_acc.add_bar(x=[LABEL[v]], y=[100 * MEAN[v][1]], marker_color=viz.color(v), showlegend=False, row=1, col=2)
fig_acc.update_yaxes(title_text="KL (nats, log)", type="log", row=1, col=1)
fig_acc.update_yaxes(title_text="% of positions", range=[0, 100], row=1, col=2)
fig_acc.update_xaxes(showticklabels=False, row=1, col=1)
viz.apply_template(fig_acc, title="Accuracy of reuse vs full recompute", width=1000, height=460)
viz.caption(fig_acc, f"{MODEL_NAME}; {NUM_PROMPTS} prompts, {N_DOCS} documents of {MODULE_LEN[0]}-{MODULE_LEN[1]} "
            f"bytes from the validation split; question + {ANSWER_LEN} answer tokens scored. Paper: LongBench scores "
            "'maintained' (Llama2/MPT/Falcon).")
viz.save(fig_acc, SLUG, "accuracy")
fig_acc

# %%
for mode in ("scaffold", "independent"):
    assert MEAN[mode][0] < MEAN["naive"][0]                                       # claim 5
    assert MEAN[mode][1] >= MEAN["naive"][1]                                      # claim 5
wins = sum(a["kl"] < b["kl"] for a, b in zip([r for r in ACC if r["variant"] == "scaffold"],
                                              [r for r in ACC if r["variant"] == "naive"]))
print(f"scaffold beats naive reuse on {wins}/{NUM_PROMPTS} prompts")

# %% [markdown]
# **Takeaway.** Giving each module its schema positions keeps the model's predictions close to a
# full recompute (top-1 agreement ≈ 95 %, KL ≈ 0.01–0.02 nats) while naive reuse, whose modules all
# start at position 0, is ~10–20× further off. The remaining gap comes mostly from the position gaps
# themselves — a full recompute at schema positions, which has all the cross-module attention, is as
# far from the contiguous recompute as scaffold mode — and less from missing attention between
# modules: independent mode, where no module saw another, is only a little further. Scaffold mode
# (modules encoded in the context of the schema text before them) is a little
# closer than independent mode. This is a 4-layer byte model on code, not LongBench on Llama-2; the
# paper's claim is about task scores, ours about distributions.
#
# ## 6. Copy or recompute?
#
# The time to recompute n tokens (a prefill of n tokens) against the time to copy their K/V from
# each tier. On the GPU a prefill has a fixed floor (every weight is read once), so copying wins from
# the first token; the crossover matters for the host tier when it is slow and for tiny models.

# %%
CROSS_N = [1, 4, 16, 64, 256, 1024]
CPU_CROSS = copy_vs_recompute(sweep_model, CROSS_N, tiers=("host",), warmup=1, repeats=max(3, REPEATS))
fig_x = go.Figure()
for meth, label, col in (("recompute", "recompute (CPU, tiny)", "baseline"), ("copy_host", "copy (CPU, tiny)", "host")):
    pts = sorted((r["n"], r["median_ms"]) for r in CPU_CROSS if r["method"] == meth)
    fig_x.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label, line_color=viz.color(col), line_dash="dot")
if GPU_RES is not None:
    for meth, label, col in (("recompute", "recompute (H200, 7B)", "baseline"), ("copy_host", "H2D copy (H200, 7B)", "host"),
                             ("copy_device", "D2D copy (H200, 7B)", "ours")):
        pts = sorted((r["n"], r["median_ms"]) for r in GREC if r.get("bench") == "crossover" and r["method"] == meth)
        fig_x.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label, line_color=viz.color(col))
fig_x.update_xaxes(type="log")
fig_x.update_yaxes(type="log")
viz.apply_template(fig_x, title="Recompute n tokens vs copy their K/V", x="tokens n", y="time (ms)")
viz.caption(fig_x, "dotted: this CPU, tiny random Llama fp32; solid: " + (GPU_RES.caption() if GPU_RES else "no GPU file")
            + "<br>paper (RTX 4090, 13B layer, 5000 tokens): H2D 5.34 ms, D2D 0.23 ms per layer")
viz.save(fig_x, SLUG, "crossover")
fig_x

# %%
rec_cpu = {r["n"]: r["median_ms"] for r in CPU_CROSS if r["method"] == "recompute"}
cp_cpu = {r["n"]: r["median_ms"] for r in CPU_CROSS if r["method"] == "copy_host"}
cross_cpu = next((n for n in CROSS_N if cp_cpu[n] < rec_cpu[n]), None)
print(f"CPU tiny model: copying beats recomputing from n = {cross_cpu}")
assert cp_cpu[max(CROSS_N)] < rec_cpu[max(CROSS_N)]
if GPU_RES is not None:
    g_rec = {r["n"]: r["median_ms"] for r in GREC if r.get("bench") == "crossover" and r["method"] == "recompute"}
    for meth in ("copy_device", "copy_host"):
        g_cp = {r["n"]: r["median_ms"] for r in GREC if r.get("bench") == "crossover" and r["method"] == meth}
        print(f"H200 7B {meth}: faster than recompute for every n in {sorted(g_cp)}: "
              f"{all(g_cp[n] < g_rec[n] for n in g_cp)}; at n=1024 {g_rec[1024] / g_cp[1024]:.0f}× faster")
        assert all(g_cp[n] < g_rec[n] for n in g_cp)

# %% [markdown]
# **Takeaway.** For a 7B model on an H200, copying a module from either tier beats recomputing it
# at every length we tried (the recompute's floor is a full weight read); D2D is ~40× faster than
# H2D. On the tiny CPU model copying wins from the first token as well (a forward pass has a fixed
# per-call cost); the gap then grows with n. The card's "crossover" is therefore at n ≤ 1 in every
# setting we measured — reuse never loses to recompute here.
#
# ## 7. Explore
#
# Pick a persona and documents: the layout shows which positions the prompt uses (gaps included);
# the precomputed per-prompt accuracy of the prompts with exactly that document choice is listed; the
# slider and radio show the TTFT records of the CPU sweep and the GPU file.

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W

    persona = W.Dropdown(options=lay.unions[0][0], description="persona")
    doc_boxes = [W.Checkbox(value=i < 2, description=f"doc{i}: {d['name']}") for i, d in enumerate(docs)]
    out_lay = W.HTML()

    def show_layout(*_):
        chosen = [f"doc{i}" for i, b in enumerate(doc_boxes) if b.value]
        src = f'<prompt schema="codeqa"><{persona.value}/>' + "".join(f"<{d}/>" for d in chosen) + \
            '<task style="short"/># Q: ?</prompt>'
        sel = lay.resolve(src)
        rows = [f"<tr><td>{m}</td><td>{lay.modules[m].start}</td><td>{lay.modules[m].end}</td></tr>"
                for m in sel.modules if m != ROOT]
        key = ",".join(sel.modules[1:])
        acc = [r for r in ACC if r["modules"].split(",")[1:-1] == chosen]
        accs = "".join(f"<li>prompt {r['prompt']} ({r['modules']}): {LABEL[r['variant']]} KL {r['kl']:.4f}, "
                       f"top-1 {100 * r['top1']:.0f} %</li>" for r in acc[:8]) or "<li>no precomputed prompt selects "\
            "exactly these documents</li>"
        out_lay.value = (f"<b>{key}</b>: {len(sel.cached)} cached modules, user text at position {lay.length}"
                         f"<table><tr><th>module</th><th>start</th><th>end</th></tr>{''.join(rows)}</table><ul>{accs}</ul>")

    for w_ in [persona, *doc_boxes]:
        w_.observe(show_layout, names="value")
    n_slider = W.SelectionSlider(options=Ns, value=Ns[-1], description="N (CPU)")
    tier = W.RadioButtons(options=["host", "device"], value="device", description="GPU tier")
    out_t = W.HTML()

    def show_ttft(*_):
        c = next(r for r in CPU_SWEEP if r["N"] == n_slider.value and r["method"] == CACHE_TIER)
        b = next(r for r in CPU_SWEEP if r["N"] == n_slider.value and r["method"] == "baseline")
        txt = f"CPU N={n_slider.value}: baseline {b['median_ms']:.1f} ms, Prompt Cache {c['median_ms']:.1f} ms"
        if GPU_RES is not None:
            xs, rs = gpu_pts(tier.value + "_graph")
            txt += "<br>GPU (" + tier.value + ", graph): " + ", ".join(
                f"N={x}: {r['median_ms']:.1f} ms ({r['speedup']:.1f}×)" for x, r in zip(xs, rs))
        out_t.value = txt

    n_slider.observe(show_ttft, names="value")
    tier.observe(show_ttft, names="value")
    show_layout()
    show_ttft()
    display(W.VBox([W.HTML("<b>Module choice</b>"), persona, W.HBox(doc_boxes), out_lay,  # noqa: F821
                    W.HTML("<b>TTFT</b>"), W.HBox([n_slider, tier]), out_t]))

# %%
print(f"notebook body ran in {time.time() - T_START:.1f} s")

# %% [markdown]
# ## Going further
#
# - GPU scale: `PYTHONPATH=lib python -m mlsys24.bench prompt_cache` (≈ 2 min on an H200: 7B-shaped
#   sweep N = 512…8K, crossover, 1B-shaped CPU run), then re-run this notebook; on the GPU machine
#   `papermill notebooks/23_prompt_cache.ipynb runs/23.ipynb -p DEVICE cuda -p MODEL_PATH /path/to/Llama-2-7b-hf`
#   measures accuracy with real weights (the schema is still the byte-sized code schema: lengthen
#   `MODULE_LEN` for a long-context model).
# - Workshop questions:
#   1. Scaffold mode encodes a module in the context of the schema text before it, independent mode
#      alone. Which prompts would make scaffold mode *worse* than independent mode?
#   2. The staging buffer sorts modules by use count so that a popular prefix is not copied again.
#      What would a paged KV cache with shared read-only blocks (refcounts) save on top of that?
#   3. Keys are stored after RoPE. What has to change to let a module move to another position at
#      request time (store pre-RoPE and rotate on load) — and what does it cost per token?
#   4. Our eager path has a ~35 ms floor from kernel launches; the CUDA-graph path removes it. How
#      would you capture graphs for variable N and q in a server (buckets? piecewise graphs)?
#   5. The CPU speedup depends on q: predict the speedup at q = 1 and q = 128 from the sweep's slopes.
