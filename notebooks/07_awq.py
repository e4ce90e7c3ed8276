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
#     headline: 'Paper: Llama-2-7B WikiText-2 PPL FP16 5.47 -> AWQ INT4-g128 5.60, >3x
#       decode speed-up. Ours (tiny Llama, CPython bytes): AWQ beats RTN at INT3 and
#       INT4 (see the headline cell); our Triton W4A16 GEMV at M=1 on the 7B MLP shapes
#       is 2.3-2.5x cuBLAS fp16 per call on an H100 (not 3x: a kernel that only reads
#       the packed bytes bounds it at 2.94-3.12x there; 2.8-3.0x back to back with PDL)
#       and 2.0-2.3x on an H200, 86% / 77% of copy bandwidth on a 70B layer (3.5x /
#       3.2x cuBLAS); fused batch-1 decode of a 7B-shaped model 2.4x (H100) / 2.1x (H200)
#       fp16 tokens/s (TinyChat 2.6-2.7x)'
#     paper: '07'
#     slug: awq
#     status: partial
# ---

# %% [markdown]
# # AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration
#
# Ji Lin, Jiaming Tang, Haotian Tang, Shang Yang, Wei-Ming Chen, Wei-Chen Wang, Guangxuan Xiao,
# Xingyu Dang, Chuang Gan, Song Han (MIT, SJTU, Tsinghua, NVIDIA, UMass Amherst) · MLSys 2024 (best paper)
# · [arXiv 2306.00978](https://arxiv.org/abs/2306.00978) · official code
# [mit-han-lab/llm-awq](https://github.com/mit-han-lab/llm-awq) (search: `awq/quantize/auto_scale.py`,
# `auto_clip.py`; int4 format: `awq/quantize/qmodule.py`; runtime: `tinychat/`).
#
# **The idea in one paragraph.** Decoding one token streams every weight from memory, so storing weights
# in 3-4 bits makes single-batch generation up to ~4x faster, if accuracy survives. Plain round-to-nearest
# (RTN) group quantization loses a lot at 3 bits. AWQ observes that ~1 % of *input channels* matter most,
# and that they are found by the **activation** magnitude, not by the weights. Instead of keeping them in
# FP16 (mixed precision, hardware-unfriendly) it multiplies each input channel of W by
# s = s_X^α (s_X = mean |x| of that channel) and divides the previous operator's output by s, which
# changes nothing in full precision but shrinks the *relative* rounding error of the salient channels.
# α is picked per layer group by a 20-point grid search on a few calibration tokens; then each weight
# group is clipped to the error-minimising range. The result is a plain uniform INT4/INT3 model that a
# fused dequantize-GEMM kernel (W4A16) serves.
#
# Here: the full method in `mlsys24.quant` (group quantizer, AWQ scale search with folding, clip search,
# the paper's saliency probes, AWQ int4 packing, `QuantLinear`, checkpoints, a Triton W4A16 kernel)
# applied to the workbench's tiny Llama (4 layers, d=256, byte-level, trained on the committed
# CPython-stdlib corpus) and to MiniLM; GPU kernel numbers from `python -m mlsys24.bench awq`.

# %% tags=["parameters"]
W_BITS = [3, 4]               # weight bit widths of the headline table
GROUP_SIZES = [64, 128]       # quantization group sizes (input channels per group) of the headline table
N_GRID = 20                   # alpha grid {0, 1/N, ..., (N-1)/N} (official: 20)
MAX_SHRINK = 0.5              # clip search: candidates absmax * (1 - i/N_GRID) for i < N_GRID * MAX_SHRINK
CALIB_BLOCKS = 16             # calibration: this many byte windows of the *train* split...
CALIB_SEQLEN = 128            # ...of this many bytes (official: 128 x 512 tokens of the Pile)
LOSS_ROWS = 4                 # alpha-search loss on the first LOSS_ROWS windows (s_X uses all of them)
CLIP_TOKENS = 512             # clip search: at most this many calibration tokens (official: 512)
EVAL_TOKENS = 4096            # perplexity on the first EVAL_TOKENS bytes of the *validation* split
EVAL_WINDOW = 256             # perplexity sequence length (bytes)
PROBE_BITS = 3                # Table 1/2 analogues: bit width...
PROBE_GROUP = 64              # ...and group size
SALIENT_PCTS = [1.0]          # Table 1: % of input channels kept in FP (paper: 0.1, 1, 3)
SCALES_T2 = [1.0, 1.25, 1.5, 2.0, 4.0]   # Table 2: fixed scale s of the 1 % salient channels
RANDOM_SEEDS = 1              # Table 1: seeds of the "random channels" rule
USE_MINILM = True             # MiniLM sentence-embedding fidelity (a real pretrained model)
MINILM_DOCS = 64              # validation-split docstrings embedded
MINILM_BITS = 3               # MiniLM quantization: bits...
MINILM_GROUP = 64             # ...and group size
MINILM_CALIB_BLOCKS = 2       # MiniLM calibration: blocks of 128 tokens of train-split docstrings
RUN_KERNEL_CHECK = True       # run the Triton W4A16 kernel (interpreter on CPU) against the reference
MODEL_PATH = None             # an HF Llama directory (config.json + safetensors + tokenizer.json) instead of the tiny Llama
EVAL_TEXT_PATH = None         # a text file to evaluate perplexity on instead of the validation split
DEVICE = "cpu"                # "cpu" or "cuda"
BENCH = "auto"                # GPU numbers: "auto" (live quick bench on a GPU, else the results JSON), "json", "skip"
THREADS = 2                   # torch CPU threads
SEED = 0                      # seed of the calibration windows and the random-channel rule
INTERACTIVE = True            # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, ListOf, Str, validate

validate(globals(), W_BITS=ListOf(Int(2, 8), min_len=1), GROUP_SIZES=ListOf(Int(8, 4096), min_len=1),
         N_GRID=Int(1, 200), MAX_SHRINK=Float(0, 1), CALIB_BLOCKS=Int(1, 4096), CALIB_SEQLEN=Int(8, 8192),
         LOSS_ROWS=Int(0, 4096), CLIP_TOKENS=Int(16, 10**6), EVAL_TOKENS=Int(512, 10**9),
         EVAL_WINDOW=Int(16, 8192), PROBE_BITS=Int(2, 8), PROBE_GROUP=Int(8, 4096),
         SALIENT_PCTS=ListOf(Float(0, 100, lo_open=True), min_len=1), SCALES_T2=ListOf(Float(1, 64), min_len=1),
         RANDOM_SEEDS=Int(1, 100), USE_MINILM=Bool(), MINILM_DOCS=Int(4, 10_000), MINILM_BITS=Int(2, 8),
         MINILM_GROUP=Int(8, 1536), MINILM_CALIB_BLOCKS=Int(1, 256), RUN_KERNEL_CHECK=Bool(),
         DEVICE=Choice("cpu", "cuda"), BENCH=Choice("auto", "json", "skip"), THREADS=Int(1, 256), SEED=Int(0),
         INTERACTIVE=Bool())
if MODEL_PATH is not None:
    validate(globals(), MODEL_PATH=Str())
if EVAL_TEXT_PATH is not None:
    validate(globals(), EVAL_TEXT_PATH=Str())
assert 1.0 in SCALES_T2, "SCALES_T2 must contain 1 (plain RTN, the Table 2 baseline)"

# %%
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.models import load_hf_llama, load_tiny_llama, named_linears, sliding_window_nll, validation_ids
from mlsys24.quant import fake_quant, pack_int4, unpack_int4
from mlsys24.quant.awq import (
    AwqResult,
    apply_awq,
    awq_llama,
    awq_minilm,
    fake_quantize_linears,
    keep_salient_fp,
    linear_input_stats,
    scale_salient,
    scales_for_alpha,
    search_scale,
)
from mlsys24.quant.calib import calibration_ids, docstrings
from mlsys24.quant.qlinear import QuantLinear, load_awq_checkpoint, quantize_linears, save_awq_checkpoint

SLUG = "awq"
T_START = time.time()
torch.manual_seed(SEED)
torch.set_num_threads(THREADS)
GPU = torch.cuda.is_available()
if DEVICE == "cuda" and not GPU:
    raise RuntimeError("DEVICE='cuda' but no CUDA device is visible")
print(f"device: {DEVICE}; GPU visible: {GPU}; Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}")

# %% [markdown]
# ## 1. Reference: RTN and the AWQ scale search, in plain PyTorch
#
# Group quantization (asymmetric, zero point, G consecutive input channels per output row), exactly the
# official `pseudo_quantize_tensor`: Δ = (max−min)/(2^N−1), z = round(−min/Δ),
# Q(w) = (clamp(round(w/Δ)+z, 0, 2^N−1) − z)·Δ. The AWQ search for one linear that inspects its own
# output, in ten lines; the library's `search_scale` (used for every scale group below, with the
# attention or the MLP as the inspected module) must agree with it.

# %%
def rtn_ref(w, bits, group):
    """Round-to-nearest group quantize-dequantize, written out."""
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    delta = (mx - mn).clamp(min=1e-5) / (2**bits - 1)
    zero = torch.round(-mn / delta).clamp(0, 2**bits - 1)
    return ((torch.clamp(torch.round(wg / delta) + zero, 0, 2**bits - 1) - zero) * delta).reshape(rows, cols)


def awq_search_ref(w, x, bits, group, n_grid=20):
    """alpha* = argmin over the grid of ||Q(W diag(s)) diag(s)^-1 x - W x||^2 with s = s_x^alpha (normalised)."""
    s_x = x.abs().mean(0)
    losses = []
    for i in range(n_grid):
        s = s_x.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        losses.append(((x @ (rtn_ref(w * s, bits, group) / s).T - x @ w.T) ** 2).mean().item())
    return int(np.argmin(losses)) / n_grid, losses


g = torch.Generator().manual_seed(SEED)
w_demo = torch.randn(64, 128, generator=g) * 0.05
x_demo = torch.randn(512, 128, generator=g) * torch.where(torch.arange(128) < 2, 20.0, 1.0)  # 2 outlier channels
assert torch.equal(rtn_ref(w_demo, 3, 64), fake_quant(w_demo, 3, 64))
lin_demo = torch.nn.Linear(128, 64, bias=False)
lin_demo.weight.data = w_demo.clone()
a_ref, l_ref = awq_search_ref(w_demo, x_demo, 3, 64)
out = search_scale([lin_demo], x_demo, lin_demo, 3, 64)
print(f"reference alpha* = {a_ref:.2f}, library alpha* = {out['best_alpha']:.2f}; "
      f"loss RTN {l_ref[0]:.3e} -> AWQ {min(l_ref):.3e}")
assert out["best_alpha"] == a_ref and np.allclose(out["losses"], l_ref, rtol=1e-4)
assert torch.equal(lin_demo.weight.data, w_demo)                      # the search restores the weights

# %% [markdown]
# ## 2. The model, calibration and evaluation data
#
# Calibration: `CALIB_BLOCKS` windows of `CALIB_SEQLEN` bytes at seeded random offsets of the corpus's
# **train** split. Perplexity: the first `EVAL_TOKENS` bytes of the **validation** split, cut into
# `EVAL_WINDOW`-byte windows that overlap by one byte (`sliding_window_nll(window=W, stride=W-1)`), i.e.
# the paper's protocol of non-overlapping sequences (WikiText-2 at 2048 tokens there). Byte-level
# perplexities of Python source are not comparable with WikiText-2 token perplexities: compare *orderings
# and relative gaps*, never absolute values.

# %%
if MODEL_PATH is None:
    model = load_tiny_llama(device=DEVICE).eval()
    calib = calibration_ids(CALIB_BLOCKS, CALIB_SEQLEN, seed=SEED).to(DEVICE)

    def encode(data: bytes) -> torch.Tensor:
        return torch.tensor(list(data), dtype=torch.long)
else:                                                   # a user checkpoint (GPU-scale run through papermill)
    from tokenizers import Tokenizer

    from mlsys24.models import load_split_bytes

    model = load_hf_llama(MODEL_PATH, device=DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.float32)
    model.eval()
    _tok = Tokenizer.from_file(str(Path(MODEL_PATH) / "tokenizer.json"))

    def encode(data: bytes) -> torch.Tensor:
        return torch.tensor(_tok.encode(data.decode("utf-8", "replace")).ids, dtype=torch.long)

    _train = encode(load_split_bytes("train")[: CALIB_BLOCKS * CALIB_SEQLEN * 8])
    calib = _train[: CALIB_BLOCKS * CALIB_SEQLEN].reshape(CALIB_BLOCKS, CALIB_SEQLEN).to(DEVICE)
if EVAL_TEXT_PATH is not None:
    eval_ids = encode(Path(EVAL_TEXT_PATH).read_bytes())[:EVAL_TOKENS]
elif MODEL_PATH is None:
    eval_ids = validation_ids(EVAL_TOKENS)
else:
    from mlsys24.models import load_split_bytes

    eval_ids = encode(load_split_bytes("validation"))[:EVAL_TOKENS]
LINEARS = list(named_linears(model))


def ppl(m) -> float:
    return sliding_window_nll(m, eval_ids, window=EVAL_WINDOW, stride=EVAL_WINDOW - 1, batch_size=16)["ppl"]


t0 = time.time()
PPL_FP = ppl(model)
print(f"{model.cfg.n_layers} layers, d={model.cfg.d_model}, {len(LINEARS)} linears quantized "
      f"({sum(m.weight.numel() for m in named_linears(model).values()) / 1e6:.2f} M weights; embeddings and "
      f"lm_head stay FP as in the paper); calibration {tuple(calib.shape)}; eval {eval_ids.numel()} tokens")
print(f"FP perplexity: {PPL_FP:.4f}  ({time.time() - t0:.1f} s per evaluation)")

# %% [markdown]
# ## 3. Is the tiny model like an LLM? Activation outliers
#
# AWQ's premise is that a few input channels carry much larger activations. The paper's LLMs have
# outlier channels 10-100x the median. The statistic below (mean |x| of the top 1 % channels over the
# median channel, per linear's input, on the calibration data) tells how much room AWQ has here.

# %%
STATS = linear_input_stats(model, calib, LINEARS)


def outlier_ratio(s_x: torch.Tensor, pct: float = 1.0) -> float:
    k = max(1, round(pct / 100 * s_x.numel()))
    return float(torch.topk(s_x, k).values.mean() / s_x.median())


ratios = {n: outlier_ratio(s) for n, s in STATS.items()}
fig = go.Figure(go.Bar(x=[n.replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "").replace("_proj", "")
                          for n in ratios], y=list(ratios.values()), marker_color=viz.color("awq")))
viz.apply_template(fig, title="Activation outliers: top-1 % channels vs the median channel (tiny Llama)",
                   x="linear (layer.projection)", y="mean |x| ratio (top 1 % / median)", width=900)
fig.update_yaxes(type="log")
fig.update_xaxes(tickangle=-45)
viz.caption(fig, "Calibration inputs of every linear (train split); q/k/v share an input, as do gate/up. "
            "The paper's LLMs: outlier channels 10-100x the median.")
viz.save(fig, SLUG, "activation_outliers")
fig.show()
print(f"top-1 % / median ratio: min {min(ratios.values()):.1f}, max {max(ratios.values()):.1f}")

# %% [markdown]
# **Takeaway.** The trained tiny Llama has only *weak* outliers: its top-1 % input channels are a few times
# the median (range printed above; largest at some `o_proj`/`down_proj` inputs), far from the 10-100x of
# 7B-70B models. The mechanism AWQ exploits exists here, but with less room: expect smaller gains than the
# paper's, and differences between the saliency rules below that are real but small.
#
# ## 4. Table 1 analogue: keep 1 % of the channels in FP — chosen by activation, by weight, or at random
#
# The paper's motivating experiment (OPT, INT3-g128): RTN everything but keep 0.1-3 % of the input
# channels of every linear in FP16. Chosen by activation magnitude it recovers most of the loss; by
# weight norm or at random it barely helps.

# %%
RTN_CACHE: dict = {}


def rtn_model(bits: int, group: int):
    m = copy.deepcopy(model)
    fake_quantize_linears(m, bits, group)
    return m


def rtn_ppl(bits: int, group: int) -> float:
    if (bits, group) not in RTN_CACHE:
        RTN_CACHE[(bits, group)] = ppl(rtn_model(bits, group))
    return RTN_CACHE[(bits, group)]


T1 = {"RTN": rtn_ppl(PROBE_BITS, PROBE_GROUP)}
for pct in SALIENT_PCTS:
    for rule in ("activation", "weight", "random"):
        vals = []
        for seed in range(RANDOM_SEEDS if rule == "random" else 1):
            m = copy.deepcopy(model)
            keep_salient_fp(m, STATS, rule, pct / 100, PROBE_BITS, PROBE_GROUP, seed=SEED + 1000 * seed)
            vals.append(ppl(m))
        T1[(pct, rule)] = float(np.mean(vals))
# paper, OPT-6.7B INT3-g128 WikiText-2: RTN 23.54, keep-1 % by activation ~11.4, by weight / random >= 22 (as
# quoted in the project's paper card); FP16 10.86 (OPT-6.7B's WikiText-2 FP16 perplexity as recalled; verify)
T1_PAPER = {"FP16": 10.86, "RTN": 23.54, (1.0, "activation"): 11.4, (1.0, "weight"): 22.0, (1.0, "random"): 22.0}
print(f"tiny Llama INT{PROBE_BITS}-g{PROBE_GROUP}: FP {PPL_FP:.4f}, RTN {T1['RTN']:.4f}")
for pct in SALIENT_PCTS:
    print(f"  keep {pct:.1f} %: " + ", ".join(f"by {r} {T1[(pct, r)]:.4f}" for r in ("activation", "weight", "random")))

# %%
def gap_left(p, fp, rtn):
    """Share of RTN's perplexity gap still left (RTN = 100 %, FP = 0 %): comparable across models."""
    return 100 * (p - fp) / (rtn - fp)


pct0 = SALIENT_PCTS[0]
cats = ["RTN"] + [f"keep {pct0:g}% by {r}" for r in ("activation", "weight", "random")]
ours_gap = [100.0] + [gap_left(T1[(pct0, r)], PPL_FP, T1["RTN"]) for r in ("activation", "weight", "random")]
paper_gap = [100.0] + [gap_left(T1_PAPER[(1.0, r)], T1_PAPER["FP16"], T1_PAPER["RTN"]) if pct0 == 1.0 else None
                       for r in ("activation", "weight", "random")]
fig = viz.paper_vs_ours(cats, ours_gap, paper_gap, title="Table 1 analogue: which 1 % of channels to keep in FP",
                        y="RTN's perplexity gap left (%)", ours_label=f"ours: tiny Llama INT{PROBE_BITS}-g{PROBE_GROUP}",
                        paper_label="paper: OPT-6.7B INT3-g128", text_fmt=".0f")
viz.caption(fig, f"Gap left = (PPL − PPL_FP) / (PPL_RTN − PPL_FP). Ours: byte-level tiny Llama (4 layers, d=256), "
            f"{eval_ids.numel()} validation bytes,<br>windows of {EVAL_WINDOW}; RTN/FP = {T1['RTN']:.4f}/{PPL_FP:.4f}. "
            "Paper (WikiText-2): RTN 23.54, act. ≈11.4, weight/random ≈22 (as quoted in the card), FP16 10.86 (recalled).")
viz.save(fig, SLUG, "table1_salient_channels")
fig.show()

# %% [markdown]
# **Takeaway.** Keeping the channels with the largest *activations* in FP removes more of RTN's loss than
# keeping the channels with the largest weights or random ones, as in the paper — but only a fraction of it,
# where on OPT-6.7B it removes nearly all: the tiny model's outliers are far weaker (section 3). Mixed precision is only the
# probe: AWQ gets the same protection with a uniform format.
#
# ## 5. Table 2 analogue: scale the 1 % salient channels by a fixed s
#
# Multiply the salient input channels of W by s before quantizing and divide after (what folding s into
# the previous op does). The salient weights' relative error shrinks ~1/s as long as the group's step Δ
# does not grow; too large an s enlarges Δ for the whole group and hurts the other 99 %.

# %%
T2 = []
for s in SCALES_T2:
    m = copy.deepcopy(model)
    st = scale_salient(m, STATS, s, 0.01, PROBE_BITS, PROBE_GROUP)
    if s == 1.0:                                          # s = 1 is plain RTN, bit for bit
        r = rtn_model(PROBE_BITS, PROBE_GROUP)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), r.parameters()))
        st["ppl"] = rtn_ppl(PROBE_BITS, PROBE_GROUP)
    else:
        st["ppl"] = ppl(m)
    T2.append(st)
T2_PAPER = {1.0: 23.54, 2.0: 11.92, 4.0: 12.36}   # OPT-6.7B INT3-g128 (as quoted in the card; verify)
print(f"{'s':>5} {'Δ changed':>10} {'mean Δ′/Δ':>10} {'Δ′/(Δ s)':>9} {'PPL':>8}   paper PPL")
for st in T2:
    print(f"{st['s']:5.2f} {100 * st['frac_delta_changed']:9.1f}% {st['mean_delta_ratio']:10.3f} "
          f"{st['mean_salient_error_ratio']:9.3f} {st['ppl']:8.4f}   {T2_PAPER.get(st['s'], '')}")

# %%
fig = make_subplots(specs=[[{"secondary_y": True}]])
xs = [f"s={st['s']:g}" for st in T2]
fig.add_bar(x=xs, y=[gap_left(st["ppl"], PPL_FP, T2[0]["ppl"]) for st in T2], name="ours: RTN gap left (%)",
            marker_color=viz.color("awq"), texttemplate="%{y:.0f}", textposition="outside")
_pv = [gap_left(T2_PAPER[st["s"]], 10.86, 23.54) if st["s"] in T2_PAPER else None for st in T2]
fig.add_bar(x=xs, y=_pv, name="paper OPT-6.7B: RTN gap left (%)", marker_color=viz.color("paper"),
            marker_pattern_shape="/", text=[f"{v:.0f}" if v is not None else "" for v in _pv], textposition="outside")
fig.add_scatter(x=xs, y=[100 * st["frac_delta_changed"] for st in T2], name="ours: groups with Δ′ ≠ Δ (%)",
                mode="lines+markers", line_color="#1f77b4", secondary_y=True)
viz.apply_template(fig, title="Table 2 analogue: scale the 1 % salient channels by s", x="scale s of the salient channels")
fig.update_yaxes(title_text="RTN's perplexity gap left (%)", rangemode="tozero", secondary_y=False)
fig.update_yaxes(title_text="groups whose step Δ changed (%)", rangemode="tozero", showgrid=False, secondary_y=True)
fig.update_layout(barmode="group", legend=dict(y=1.12))
viz.caption(fig, f"Gap left = (PPL(s) − PPL_FP) / (PPL(s=1) − PPL_FP); s = 1 is RTN. Ours: tiny Llama INT{PROBE_BITS}-g{PROBE_GROUP}, "
            "salient = top 1 % by activation per linear.<br>Paper: OPT-6.7B INT3-g128, PPL 23.54 / 11.92 / 12.36 at "
            "s = 1 / 2 / 4 (as quoted in the card), FP16 10.86 (recalled).")
viz.save(fig, SLUG, "table2_scaling")
fig.show()

# %% [markdown]
# **Takeaway.** A moderate s can lower the perplexity below RTN while the share of groups whose Δ changes
# grows with s — the trade-off of the paper's Table 2. Where the optimum lies depends on the model (on the
# tiny Llama it sits at a smaller s than OPT-6.7B's s = 2, see the table), which is why AWQ searches
# s = s_X^α per layer group instead of fixing one s.
#
# ## 6. AWQ on the tiny Llama: search, fold, clip — and the headline table
#
# The layer-by-layer driver (official `run_awq`): block inputs from the unmodified FP block; for each of
# the four scale groups of a block (input_layernorm→q,k,v inspecting the attention; v→o; post-attention
# norm→gate,up inspecting the MLP; up→down) a 20-point α search, then folding, then the clip search on every
# linear but q/k. Every (bits, group) gets its own search.

# %%
RESULTS: dict = {}
for bits in W_BITS:
    for group in GROUP_SIZES:
        if model.cfg.d_model % group or model.cfg.ffn_dim % group:
            continue
        a = copy.deepcopy(model)
        res = awq_llama(a, calib, bits, group, n_grid=N_GRID, max_shrink=MAX_SHRINK, loss_rows=LOSS_ROWS or None,
                        clip_tokens=CLIP_TOKENS)
        fake_quantize_linears(a, bits, group)
        r = {"rtn": rtn_ppl(bits, group), "awq": ppl(a), "awq_scale_only": None, "search": res}
        if (bits, group) == (PROBE_BITS, PROBE_GROUP):     # ablation: the scale search alone, no clipping
            scale_only = apply_awq(copy.deepcopy(model), AwqResult(bits, group, N_GRID, MAX_SHRINK, res.searches))
            fake_quantize_linears(scale_only, bits, group)
            r["awq_scale_only"] = ppl(scale_only)
        RESULTS[(bits, group)] = r
        better, total = res.improved_count()
        so = f"  AWQ(scale only) {r['awq_scale_only']:.4f}" if r["awq_scale_only"] is not None else ""
        print(f"INT{bits}-g{group}: RTN {r['rtn']:.4f}{so}  AWQ(scale+clip) {r['awq']:.4f}"
              f"   alpha* beats alpha=0 in {better}/{total} groups; search {res.seconds:.1f} s")

# %% [markdown]
# Two exactness checks on the searched INT3-g64 (or first) configuration: (1) folding the scales (no
# clipping, no quantization) leaves the FP model's logits unchanged; (2) a search restricted to α = 0 gives
# exactly the RTN weights.

# %%
KEY = (PROBE_BITS, PROBE_GROUP) if (PROBE_BITS, PROBE_GROUP) in RESULTS else next(iter(RESULTS))
res = RESULTS[KEY]["search"]
folded = apply_awq(copy.deepcopy(model), AwqResult(*KEY, N_GRID, MAX_SHRINK, res.searches))
with torch.no_grad():
    FOLD_ERR = float((folded(calib[:2]) - model(calib[:2])).abs().max())
zero = copy.deepcopy(model)
awq_llama(zero, calib, *KEY, alphas=[0.0], clip=False, loss_rows=1)
fake_quantize_linears(zero, *KEY)
ALPHA0_IS_RTN = all(torch.equal(a, b) for a, b in zip(zero.parameters(), rtn_model(*KEY).parameters()))
print(f"max |logit change| from folding: {FOLD_ERR:.2e};  alpha = 0 == RTN bit for bit: {ALPHA0_IS_RTN}")

# %%
# paper, Llama-2-7B WikiText-2 (Table 4): FP16 5.47 and AWQ INT4-g128 5.60 (confirmed in llm-awq#109);
# INT3-g128 RTN 6.66 / AWQ 6.24 as recalled in the card (verify against the PDF); INT4 RTN not quoted here
PAPER = {"FP16": 5.47, (4, 128): {"awq": 5.60}, (3, 128): {"rtn": 6.66, "awq": 6.24}}
rows = []
for (bits, group), r in RESULTS.items():
    p = PAPER.get((bits, group), {})
    rows.append({"config": f"INT{bits}-g{group}", "FP": PPL_FP, "RTN": r["rtn"], "AWQ scale": r["awq_scale_only"],
                 "AWQ": r["awq"], "recovered": (r["rtn"] - r["awq"]) / (r["rtn"] - PPL_FP) if r["rtn"] > PPL_FP else 0,
                 "paper RTN": p.get("rtn"), "paper AWQ": p.get("awq")})
print(f"{'config':<11} {'FP':>7} {'RTN':>7} {'AWQ':>7} {'gap recovered':>14}   paper (Llama-2-7B, FP16 5.47)")
for r in rows:
    pr = "  ".join(f"{k} {r[k]:.2f}" for k in ("paper RTN", "paper AWQ") if r[k] is not None)
    print(f"{r['config']:<11} {r['FP']:7.4f} {r['RTN']:7.4f} {r['AWQ']:7.4f} {100 * r['recovered']:13.0f}%   {pr}")

# %%
cfgs = [r["config"] for r in rows]
fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
                    subplot_titles=("ours: tiny Llama (byte-level, 3.4 M weights)", "paper: Llama-2-7B, WikiText-2"))
for name, key in (("RTN", "RTN"), ("AWQ", "AWQ")):
    fig.add_bar(x=cfgs, y=[100 * (r[key] / PPL_FP - 1) for r in rows], name=name, marker_color=viz.color(name.lower()),
                texttemplate="%{y:.2f}", textposition="outside", row=1, col=1)
pcfg = [c for c in ("INT3-g128", "INT4-g128")]
for name, key in (("RTN", "rtn"), ("AWQ", "awq")):
    vals = [100 * (v / PAPER["FP16"] - 1) if v else None for v in (PAPER.get((int(c[3]), 128), {}).get(key)
                                                                    for c in pcfg)]
    fig.add_bar(x=pcfg, y=vals, name=f"{name} (paper)", marker_color=viz.color(name.lower()),
                marker_pattern_shape="/", showlegend=False, text=[f"{v:.1f}" if v is not None else "n/q" for v in vals],
                textposition="outside", row=1, col=2)
viz.apply_template(fig, title="Headline: perplexity increase over FP, RTN vs AWQ", width=980, height=460)
fig.update_yaxes(title_text="perplexity increase over FP (%)", row=1, col=1)
fig.update_yaxes(title_text="perplexity increase over FP16 (%)", row=1, col=2)
fig.update_xaxes(title_text="weight format", row=1, col=1)
fig.update_layout(barmode="group", legend=dict(y=1.14))
viz.caption(fig, f"Ours: {eval_ids.numel()} validation bytes in {EVAL_WINDOW}-byte windows, calibration {CALIB_BLOCKS}x"
            f"{CALIB_SEQLEN} train bytes; FP perplexity {PPL_FP:.4f}; d=256 gives only 2 groups per row at g128."
            "<br>Paper: FP16 5.47, INT3-g128 RTN 6.66 / AWQ 6.24 (as recalled in the card), INT4-g128 AWQ 5.60 "
            "(INT4 RTN not quoted: n/q). Different models and metrics: compare orderings, not heights.")
viz.save(fig, SLUG, "headline_ppl")
fig.show()

# %% [markdown]
# **Takeaway.** On the tiny Llama, AWQ closes a large part of RTN's INT3 gap and is at least as good as RTN
# at INT4, the paper's ordering (AWQ < RTN, the gap largest at INT3). The clip search adds to the scale
# search. What this does *not* show: the absolute numbers of a 7B model (byte perplexity of Python source,
# 3.4 M parameters, a 4096-byte evaluation by default), nor GPTQ, which this workbench does not implement.
#
# ## 7. The real int4 model: packed weights, `QuantLinear`, an AWQ-format checkpoint
#
# The AWQ ("GEMM") layout: `qweight` int32 [in, out/8], `qzeros` int32 [in/G, out/8], `scales` fp16
# [in/G, out]; eight nibbles per int32 in the interleaved order (0, 2, 4, 6, 1, 3, 5, 7): nibble i holds
# output column 8c + order[i]. INT4 only (3-bit values would sit in nibbles unchanged).

# %%
q_demo = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
word = int(pack_int4(q_demo[:1], "awq")[0, 0]) & 0xFFFFFFFF
print(f"columns 0..7 holding values 0..7 pack to 0x{word:08X} (nibbles low to high: "
      f"{[(word >> 4 * i) & 15 for i in range(8)]})")
assert torch.equal(unpack_int4(pack_int4(q_demo)), q_demo)
INT4_KEY = (4, min(g for (b, g) in RESULTS if b == 4)) if any(b == 4 for b, _ in RESULTS) else None
if INT4_KEY is not None:
    real = apply_awq(copy.deepcopy(model), RESULTS[INT4_KEY]["search"])   # scaled + clipped FP weights
    fake = apply_awq(copy.deepcopy(model), RESULTS[INT4_KEY]["search"])
    fake_quantize_linears(fake, *INT4_KEY)
    quantize_linears(real, *INT4_KEY)                                     # -> packed int4 QuantLinear
    _small = eval_ids[:1024]                                              # a cheap PPL on 1024 validation bytes
    _pr, _pf = (sliding_window_nll(m_, _small, window=EVAL_WINDOW, stride=EVAL_WINDOW - 1)["ppl"] for m_ in (real, fake))
    REAL_VS_FAKE = abs(_pr / _pf - 1)
    with tempfile.TemporaryDirectory() as d:
        save_awq_checkpoint(real, Path(d) / "ckpt")
        size = sum(f.stat().st_size for f in (Path(d) / "ckpt").iterdir())
        reloaded = load_awq_checkpoint(load_tiny_llama() if MODEL_PATH is None else copy.deepcopy(model),
                                       Path(d) / "ckpt")
    with torch.no_grad():
        CKPT_SAME = bool(torch.equal(reloaded(calib[:2]), real(calib[:2])))
    n_q = sum(isinstance(m, QuantLinear) for m in real.modules())
    print(f"INT{INT4_KEY[0]}-g{INT4_KEY[1]} real int4 model: {n_q} QuantLinear; PPL {_pr:.4f} vs fake-quant {_pf:.4f} "
          f"(relative {REAL_VS_FAKE:.1e}: the stored steps are fp16-rounded); checkpoint {size / 1e6:.2f} MB "
          f"(FP32 model: {4 * model.num_parameters / 1e6:.1f} MB), reload identical: {CKPT_SAME}")

# %% [markdown]
# ## 8. The W4A16 kernels: reference check, back-of-envelope, GPU numbers
#
# Two Triton kernels share the packed weights. `w4a16_gemm` reads the AWQ layout directly (tensor cores,
# for many rows). `w4a16_gemv` is the decode kernel (M = 1..8): like TinyChat, it runs on a copy of the
# integers repacked once at load time (`gemv_repack`; nibbles i and i+4 of a word hold two adjacent input
# channels), splits K across programs and combines the partial sums inside the same launch (the last
# program of a tile, by an atomic ticket, adds them: no zero-fill kernel, no second pass). Its inner loop
# never converts int→float: in fp32, nibble i moved to bits 19..22 and OR-ed with the bits of 1.0 *is*
# 1 + q/16; for fp16 activations on a GPU, one LOP3 turns two nibbles into the fp16 pair
# (1024 + q, 1024 + q'), and fp16x2 subtract/FMA finish (q − z)·x (inline PTX). Three things decide its
# speed, each a choice of the GPU sweep:
#
# - **layout**: row-major (one channel's words contiguous) or **group-major** (the words of one group of
#   consecutive channels contiguous, their steps and zeros one coalesced row): a program's step reads one
#   contiguous block instead of 64-byte pieces of many rows;
# - **quad**: the fp16x2 sums of the 4 words a thread holds stay in one register, converted and scaled once
#   (offline SASS, sm_90: 364 → 286 instructions per 64-channel x 2-group step, with the mask-free loads of
#   full tiles);
# - **prefetch**: the next step's words are requested before this step is computed (a software pipeline in
#   registers), so each program keeps bytes in flight while it computes — a stream at the copy rate needs
#   ~copy rate x DRAM latency in flight per SM (Little's law).
#
# First the check against the float32 reference on this model's own packed weights, in both layouts and
# with the prefetching loop (interpreter on CPU: K=256, N=128, G=64; the fp32 loop).

# %%
if RUN_KERNEL_CHECK:
    from mlsys24.quant.pack import awq_pack, gemv_repack
    from mlsys24.quant.w4a16 import GemvConfig, W4A16Config, w4a16_gemm, w4a16_gemv, w4a16_ref

    dev = "cuda" if GPU else "cpu"
    w_k = named_linears(model)["layers.0.self_attn.q_proj"].weight.detach()[:128].float()   # [N=128, K=256]
    pk = {k: v.to(dev) for k, v in awq_pack(w_k, 4, 64).items()}
    pts = {lay: gemv_repack(pk["qweight"], pk["qzeros"], pk["scales"], 128, layout=lay)   # K-major copies
           for lay in ("row", "group")}
    KERNEL_ERR = {}
    for M in (1, 4, 16):
        for dtype in (torch.float16, torch.float32):
            x_k = model.embed_tokens(calib[0, :M]).detach().to(dtype).to(dev)     # [M, 256] real activations
            ref = w4a16_ref(x_k, pk["qweight"], pk["qzeros"], pk["scales"], 128)
            if M == 16:
                y = w4a16_gemm(x_k, pk["qweight"], pk["qzeros"], pk["scales"], 128,
                               config=W4A16Config(block_m=16, block_n=128, block_k=64, split_k=2, num_stages=2))
                KERNEL_ERR[(M, str(dtype), "awq")] = float((y.float() - ref).abs().max())
                continue
            for lay, pt in pts.items():
                y = w4a16_gemv(x_k, **pt, config=GemvConfig(block_n=64, unroll=2, split_k=2, prefetch=True,
                                                             quad=True, half2=True))
                KERNEL_ERR[(M, str(dtype), lay)] = float((y.float() - ref).abs().max())
    print("max |kernel - reference| (M=1, 4: GEMV, row/group layout; M=16: tensor-core GEMM):",
          {f"M={m} {d.removeprefix('torch.')} {lay}": f"{e:.1e}" for (m, d, lay), e in KERNEL_ERR.items()})

# %% [markdown]
# **Back-of-envelope.** A decode-time matmul (M = 1..8 rows) reads each weight once and does 2 FLOPs per
# weight per row: ~1-8 FLOP/byte at fp16, far below an H100/H200's ridge point (~200-300 FLOP/byte), so
# time ≈ bytes / bandwidth. The GEMV layout stores 4 bits + an fp16 step and an 8-bit zero per group of 128:
# 4.19 bits per weight, an ideal **3.82x** over fp16 — *if* unpacking fits under the memory time. That is
# the catch: at 4.2 TB/s an H200 streams the 45 M weights of 11008 x 4096 in ~5.6 µs, while its 132 SMs
# issue ~1 T warp-instructions/s (32 T thread-instructions/s): ~4 instructions per weight at most before
# the kernel becomes issue-bound instead of memory-bound. Offline SASS (ptxas for sm_90, main loop of a
# 64-row tile): the fp32 loop costs ~7.5 instructions per weight, the fp16x2 loop ~2.8, its 4-word
# variant ~2.2. A second fixed cost is the harness floor: one tiny kernel replayed from a CUDA graph
# already measures 4.6-4.8 µs (the committed runs), which bounds single-call speed-ups at 7B shapes:
# with cuBLAS at t_fp16 and the packed bytes at the copy rate, the best possible single-call ratio is
# t_fp16 / (floor + bytes / copy rate)
# (printed per shape below as "max 1-call"); back-to-back calls in one graph (the decode situation) do
# not pay the floor per call ("max chained"). The copy rate is a steady-state figure; the bench also
# measures the **read floor**: the fastest kernel it finds that does nothing but read as many bytes as the
# GEMV's weights (`mlsys24.kernels.stream`: a Triton streaming read swept over tile, grid, PDL mode and an
# L2 bulk prefetch, plus `torch.sum`), timed exactly like the GEMV. A W4A16 kernel has to read those bytes
# too, so cuBLAS's time over the read floor bounds its speed-up in that run, measured rather than derived.

# %%
from mlsys24.bench import gpu_results
from mlsys24.quant.bench import gemv_bytes

for (name, (N, K)) in {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008),
                       "mlp_70b": (28672, 8192)}.items():
    fp16, w4 = 2 * N * K, gemv_bytes(N, K, 128)
    print(f"{name:8s} [{N} x {K}]: fp16 {fp16 / 1e6:6.1f} MB, W4A16 {w4 / 1e6:6.1f} MB -> ideal {fp16 / w4:.2f}x")

# live (quick plan) on a GPU, else the committed results of `python -m mlsys24.bench awq`
GPU_RES = gpu_results(SLUG, BENCH)
if GPU_RES is None:
    print("no GPU results: run `PYTHONPATH=lib python3 -m mlsys24.bench awq` on a GPU machine")
else:
    print(GPU_RES.caption())

# %%
SPEEDUP_M1, CHAIN_M1, PCT_COPY_M1, DECODE, DECODE_MODULE, CROSSOVER, BOUND = {}, {}, {}, None, None, {}, {}
SPEEDUP_KN_M1, PDL_M1 = {}, {}   # vs torch.matmul with W [K, N]; back-to-back with programmatic dependent launch
READ_FLOOR = {}                  # per shape: the bench's read-floor record
if GPU_RES is not None:
    recs = [r for r in GPU_RES.records if r.get("provider") in ("w4a16", "cublas_fp16") and "median_us" in r]
    shapes = [s for s in ("qkvo", "gate_up", "down") if any(r["shape"] == s for r in recs)]
    fig = make_subplots(rows=1, cols=len(shapes), subplot_titles=[
        f"{s} [N={next(r['N'] for r in recs if r['shape'] == s)} x K={next(r['K'] for r in recs if r['shape'] == s)}]"
        for s in shapes], shared_yaxes=True)
    for i, s in enumerate(shapes, 1):
        for prov, label, col in (("cublas_fp16", "cuBLAS fp16 (torch F.linear)", viz.color("cublas")),
                                 ("w4a16", "ours: best W4A16 kernel (GEMV or tensor-core)", viz.color("awq"))):
            pts = sorted((r["M"], r["median_us"], r.get("kernel", "")) for r in recs
                         if r["shape"] == s and r["provider"] == prov)
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=label,
                            text=[p[2] for p in pts], line_color=col, showlegend=i == 1, row=1, col=i)
        rf_ = next((r for r in GPU_RES.records if r.get("shape") == s and r.get("provider") == "read_floor"
                    and "median_us" in r), None)
        if rf_ is not None:   # no kernel that reads the packed weights can be faster (same timing)
            fig.add_scatter(x=[1], y=[rf_["median_us"]], mode="markers", marker=dict(symbol="line-ew", size=18,
                            line=dict(width=3, color="black")), name="read floor: a pure read of the packed bytes",
                            showlegend=i == 1, row=1, col=i)
        fig.update_xaxes(type="log", title_text="M (rows = batch)", tickvals=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                         row=1, col=i)
    viz.apply_template(fig, title="W4A16 vs fp16 matmul latency, Llama-2-7B shapes", width=980, height=460)
    fig.update_layout(legend=dict(y=1.16))
    fig.update_yaxes(type="log", tickvals=[5, 10, 20, 50, 100, 200, 500])   # every panel: the y axes are shared
    fig.update_yaxes(title_text="median latency (µs)", row=1, col=1)
    viz.caption(fig, GPU_RES.caption() + "<br>One call per CUDA-graph replay, L2 flushed before each call, G=128, "
                "fp16 activations; ours: the best validated configuration of the sweep at each point. Read floor "
                "(M=1): the fastest kernel found that only reads the packed weight bytes, timed the same way.")
    viz.save(fig, SLUG, "kernel_latency")
    fig.show()

    def _rec(shape, M, prov):
        return next((r for r in GPU_RES.records if r.get("shape") == shape and r.get("M") == M
                     and r.get("provider") == prov and "median_us" in r), None)

    floor = next((r["median_us"] for r in GPU_RES.records if r.get("op") == "graph_floor"), None)
    copy_bw = next(r["GBps"] for r in GPU_RES.records if r.get("op") == "copy")
    print(f"copy bandwidth {copy_bw:.0f} GB/s; graph floor (1-element kernel): "
          f"{'not in this file' if floor is None else f'{floor:.1f} µs'}")
    print(f"{'shape':13s} {'cuBLAS µs':>10} {'W4A16 µs':>9} {'speed-up':>9} {'weights GB/s':>13} {'% copy':>7} "
          f"{'eager x':>8} {'chained x':>10} {'max 1-call':>11} {'max chained':>12}  layout / config")
    BOUND = {r["shape"]: dict(r) for r in GPU_RES.records if r.get("provider") == "bound"}
    # The floor is a fixed cost of every timed call, so it cannot exceed the fastest timed call of the
    # run; where the recorded one does (a disturbed measurement), the bounds drop it (pure byte bound).
    fastest = min((r["median_us"] for r in GPU_RES.records if r.get("M") == 1 and "median_us" in r
                   and r.get("provider") in ("w4a16", "cublas_fp16")), default=None)
    if floor is not None and fastest is not None and floor > fastest:
        print(f"  the recorded graph floor ({floor:.1f} µs) exceeds the fastest timed call of this run "
              f"({fastest:.1f} µs): not a fixed cost of every call, so the bounds below leave it out")
        for s_, b_ in BOUND.items():
            cb_ = _rec(s_, 1, "cublas_fp16")
            b_["graph_floor_us"] = 0.0
            if cb_ is not None:
                b_["max_speedup_single"] = cb_["median_us"] / b_["copy_rate_us"]
    for s in shapes + ["mlp_70b", "qkv_fused", "gate_up_fused"]:
        r, cb = _rec(s, 1, "w4a16"), _rec(s, 1, "cublas_fp16")
        if r is None or cb is None:
            continue
        SPEEDUP_M1[s] = cb["median_us"] / r["median_us"]
        PCT_COPY_M1[s] = 100 * r["weight_GBps"] / copy_bw
        e, e_cb = _rec(s, 1, "w4a16_eager"), _rec(s, 1, "cublas_fp16_eager")
        c, c_cb = _rec(s, 1, "w4a16_chain"), _rec(s, 1, "cublas_fp16_chain")
        if c and c_cb:
            CHAIN_M1[s] = c_cb["median_us"] / c["median_us"]
        cfg, b = r.get("config", {}), BOUND.get(s, {})
        print(f"{s:13s} {cb['median_us']:10.1f} {r['median_us']:9.1f} {SPEEDUP_M1[s]:8.2f}x {r['weight_GBps']:13.0f} "
              f"{PCT_COPY_M1[s]:6.0f}% {(e_cb['median_us'] / e['median_us']) if e and e_cb else float('nan'):7.2f}x "
              f"{CHAIN_M1.get(s, float('nan')):9.2f}x {b.get('max_speedup_single', float('nan')):10.2f}x "
              f"{b.get('max_speedup_chain', float('nan')):11.2f}x  {r.get('layout', 'row')} "
              f"BN={cfg.get('block_n')} unroll={cfg.get('unroll')} split={cfg.get('split_k')} "
              f"warps={cfg.get('num_warps')} quad={cfg.get('quad', False)} prefetch={cfg.get('prefetch', False)}")
    # the baseline form, torch.matmul(x, W) with W stored [K, N], timed in the same run; and the
    # back-to-back chains (8 calls on 8 weight copies in one graph, as in decode), ours with programmatic
    # dependent launch (each GEMV streams its first weights while the previous one drains)
    print(f"\n{'shape':13s} {'matmul[K,N] µs':>15} {'ours x':>7} | back-to-back per call: {'F.linear':>9} "
          f"{'matmul[K,N]':>12} {'ours':>6} {'ours+PDL':>9} {'x (faster fp16)':>16}")
    for s in shapes + ["mlp_70b"]:
        r, kn, cp = _rec(s, 1, "w4a16"), _rec(s, 1, "matmul_kn_fp16"), _rec(s, 1, "w4a16_chain_pdl")
        if r is None or kn is None:
            continue
        SPEEDUP_KN_M1[s] = kn["median_us"] / r["median_us"]
        c = _rec(s, 1, "w4a16_chain")
        if cp is not None and "matmul_kn_chain_us" in cp:
            PDL_M1[s] = cp
        print(f"{s:13s} {kn['median_us']:15.1f} {SPEEDUP_KN_M1[s]:6.2f}x | {'':22s}"
              + (f"{cp['cublas_chain_us']:9.1f} {cp['matmul_kn_chain_us']:12.1f} "
                 f"{c['median_us'] if c else float('nan'):6.1f} {cp['median_us']:9.1f} "
                 f"{cp['speedup_vs_best_fp16']:15.2f}x" if s in PDL_M1 else ""))
    # the read floor: the fastest pure read of the packed bytes, timed like every provider (bench docstring)
    READ_FLOOR = {s: _rec(s, 1, "read_floor") for s in shapes + ["mlp_70b"] if _rec(s, 1, "read_floor")}
    if READ_FLOOR:
        print(f"\n{'shape':13s} {'read floor µs':>14} {'ours / floor':>13} {'max x F.linear':>15} "
              f"{'max x matmul[K,N]':>18} | back-to-back read µs: {'plain':>6} {'PDL wait first':>15} "
              f"{'wait last':>10} {'max x chain':>12} | cuBLAS / fp16 read")
    for s, rf in READ_FLOOR.items():
        m = rf["chain_best_by_pdl_mode_us"]
        print(f"{s:13s} {rf['median_us']:14.2f} {rf['w4a16_over_read_floor']:12.2f}x "
              f"{rf['max_speedup_single_vs_cublas']:14.2f}x {rf.get('max_speedup_single_vs_matmul_kn', float('nan')):17.2f}x"
              f" | {'':21s}{m.get('off', float('nan')):6.2f} {m.get('wait_first', float('nan')):15.2f} "
              f"{m.get('wait_last', float('nan')):10.2f} {rf['max_speedup_chain_vs_best_fp16']:11.2f}x | "
              f"{100 * rf['cublas_vs_fp16_read']:.0f}%")
    for s in shapes + ["mlp_70b"]:       # what the layout alone is worth: each layout's best candidate
        r = _rec(s, 1, "w4a16")
        if r is None:
            continue
        best_lay = {lay: min((c["median_us"] for c in r.get("candidates", [])
                              if c.get("layout", "row") == lay and "median_us" in c), default=float("nan"))
                    for lay in ("row", "group")}
        print(f"  {s}: best row-major {best_lay['row']:.1f} µs, best group-major {best_lay['group']:.1f} µs "
              f"({r.get('n_candidates', 0)} configurations validated and timed)")
    for r in GPU_RES.records:
        if r.get("op") == "crossover":
            CROSSOVER = {k: v for k, v in r["crossover_M"].items() if k in shapes}
        if r.get("op") == "decode" and "speedup" in r:
            DECODE = r if DECODE is None or r.get("path") == "fused" else DECODE
    print("crossover (smallest measured M where cuBLAS fp16 beats our best kernel):", CROSSOVER)
    DECODE_MODULE = next((r for r in GPU_RES.records if r.get("op") == "decode" and r.get("path") == "module"
                          and "speedup" in r), None)
    if DECODE is not None:
        print(f"decode, {DECODE['model']}, {DECODE['n_layers']} layers, batch 1, context {DECODE['context']}, "
              f"CUDA graphs: fp16 {DECODE['fp16_ms']:.2f} ms ({DECODE['fp16_tok_s']:.0f} tok/s), W4A16 "
              f"{DECODE['w4a16_ms']:.2f} ms ({DECODE['w4a16_tok_s']:.0f} tok/s): {DECODE['speedup']:.2f}x")
        if "fp16_linears_ms" in DECODE:   # the fused step, profiled by parts (each part its own graph)
            print(f"  profile of the fused step: projections + lm_head alone fp16 {DECODE['fp16_linears_ms']:.2f} ms "
                  f"vs W4A16 {DECODE['w4a16_linears_ms']:.2f} ms ({DECODE['linears_speedup']:.2f}x); everything else "
                  f"(embedding, add+RMSNorm, RoPE+KV write, attention, silu*mul) {DECODE['fp16_others_ms']:.2f} / "
                  f"{DECODE['w4a16_others_ms']:.2f} ms, the same kernels on both sides")
        if DECODE_MODULE is not None:
            print(f"  the module-by-module step (separate q/k/v and gate/up, ~40 small kernels per layer), same run: "
                  f"fp16 {DECODE_MODULE['fp16_ms']:.2f} ms, W4A16 {DECODE_MODULE['w4a16_ms']:.2f} ms: "
                  f"{DECODE_MODULE['speedup']:.2f}x")
        names = ["A6000 (paper)", "RTX 4090 (paper)", "Jetson Orin (paper)"]
        ours = [None, None, None]
        if DECODE_MODULE is not None:
            names.append(f"{GPU_RES.device}, module-by-module step (ours)")
            ours.append(DECODE_MODULE["speedup"])
        names.append(f"{GPU_RES.device}, fused step (ours)")
        ours.append(DECODE["speedup"])
        fig2 = viz.paper_vs_ours(names, ours, [2.61, 2.68, 2.70] + [None] * (len(names) - 3),
                                 title="Batch-1 decode speed-up of W4A16 over fp16 (tokens/s ratio)",
                                 y="speed-up over fp16 (x)", paper_label="TinyChat, Llama-2-7B (paper)",
                                 ours_label="ours: random-weight Llama-2-7B shape, CUDA graphs")
        viz.caption(fig2, GPU_RES.caption() + f"<br>Ours: {DECODE['n_layers']} layers, all 7 projections per layer "
                    "W4A16 (G=128), embeddings/norms/attention/lm_head fp16, one decode step at a 512-token context "
                    "replayed from a CUDA graph; fused: concatenated q/k/v and gate/up, fused norms/RoPE/silu, the "
                    "same kernels on both sides. Paper: TinyChat README per-token latency, real Llama-2-7B.")
        viz.save(fig2, SLUG, "decode_speedup")
        fig2.show()

# %% [markdown]
# **Every card on file.** The cell above reads the newest run; the same benchmark has been run on more
# than one card (the targets name an H100; cuBLAS and the copy rate differ per card), so here is
# each committed run's M = 1 speed-up, the 70B layer's share of copy bandwidth and the decode ratio.

# %%
from mlsys24.bench import load_results

print(f"{'GPU':24s} {'gate_up x':>9} {'down x':>7} {'bound x':>8} {'read bound x':>13} {'70B % copy':>10} "
      f"{'decode x':>9}  date")
for rf in load_results(SLUG):
    if rf.meta.get("device_type") != "cuda":
        continue
    one = {(r.get("shape"), r.get("provider")): r for r in rf.records if r.get("M") == 1 and "median_us" in r}
    sp = {k: one[(k, "cublas_fp16")]["median_us"] / one[(k, "w4a16")]["median_us"]
          for k in ("gate_up", "down", "mlp_70b") if (k, "w4a16") in one and (k, "cublas_fp16") in one}
    cp = next((r["GBps"] for r in rf.records if r.get("op") == "copy"), None)
    bd = [one[(k, "cublas_fp16")]["median_us"] / b["copy_rate_us"] for k in ("gate_up", "down")
          for b in rf.records if b.get("provider") == "bound" and b.get("shape") == k and (k, "cublas_fp16") in one]
    rbd = [min(r["max_speedup_single_vs_cublas"], r.get("max_speedup_single_vs_matmul_kn", 99)) for r in rf.records
           if r.get("provider") == "read_floor" and r.get("shape") in ("gate_up", "down")]
    dec = next((r["speedup"] for r in rf.records if r.get("op") == "decode" and r.get("path") == "fused"
                and "speedup" in r), None)
    pct = 100 * one[("mlp_70b", "w4a16")]["weight_GBps"] / cp if cp and ("mlp_70b", "w4a16") in one else float("nan")
    print(f"{rf.meta.get('device', '?'):24s} {sp.get('gate_up', float('nan')):8.2f}x {sp.get('down', float('nan')):6.2f}x "
          f"{min(bd) if bd else float('nan'):7.2f}x {min(rbd) if rbd else float('nan'):12.2f}x {pct:9.0f}% "
          f"{dec if dec else float('nan'):8.2f}x  {str(rf.meta.get('date', ''))[:10]}")
print("bound: cuBLAS F.linear time / the packed bytes at the run's measured copy rate (no per-call cost); read bound: the "
      "faster fp16 form's time / the read floor; each the smaller of the two shapes (nan: not measured in that run)")

# %% [markdown]
# **Takeaway (honest).** Every M = 1 shape chose the **group-major layout** and the **4-word fp16x2 loop**
# (the defaults now, `GEMV_TABLE_M1`), on both cards. The layout is the largest single step: on the
# 70B-sized layer the best row-major configuration takes 58 / 50 µs (H100 / H200), the best group-major one
# 48 / 37 µs (the fp32 loop: 75-77 µs), and the layer streams its packed weights at **86 % / 77 %** of copy
# bandwidth, **3.5x / 3.2x cuBLAS fp16** (60 % targeted).
#
# At the 7B shapes the issue asks for 3x on an H100 and the run falls short: our GEMV takes 15.8 / 15.4 µs
# (gate/up, down) per single timed call, cuBLAS fp16 38.5 / 38.3 µs with `F.linear` and 36.7 / 37.0 µs with
# `torch.matmul` and W stored [K, N] (the form; its anchor's ~44 µs came from another timing
# protocol, and in ours both forms are timed in the same run): **2.4-2.5x `F.linear`, 2.3-2.4x
# `torch.matmul`**. The read floor shows why this is not a kernel left unfinished: the fastest kernel the
# bench could find that *only reads* the 23.6 MB of packed weights, timed the same way, takes 12.5 / 12.3 µs.
# That is 4.8 µs of fixed cost per timed call (the graph floor) plus the bytes at ~3.05-3.15 TB/s, about
# the copy rate. So no W4A16 kernel that reads its weights from HBM could beat `torch.matmul` by more than
# **2.94x / 3.02x** in this run, or `F.linear` by more than 3.09x / 3.12x. Reaching 3x would need a GEMV
# that unpacks, multiplies, reduces across splits and writes its output in the time a pure read takes.
# Ours takes 1.25-1.27x that time. On the H200 the same bound is 2.69-2.99x. The card's 3x comes from
# TinyChat's end-to-end comparison with Hugging Face fp16, which is much slower than cuBLAS in a CUDA graph.
#
# Two attempts to close the gap, both measured:
# - **Split-K fix-up.** The last program of a tile now loads all partial sums in one vector load instead
#   of one L2 round trip per split: down went from 16.4 to 15.6 µs (two earlier H100 runs, before and
#   after the change).
# - **L2 bulk prefetch.** Each program first asks Hopper's copy engine to bring its whole share of the
#   weights into L2 (`GemvConfig.l2_prefetch`, one `cp.async.bulk.prefetch.L2` per tile and group). This
#   was *slower* every time: 17.7 vs 15.4 µs at gate/up on the H100, 13.5 vs 11.9 µs in the PDL chain.
#   The bench keeps it as an ablation.
#
# Back to back, as in decode, each GEMV can start before the previous one ends. With **programmatic
# dependent launch** it launches while the previous kernel drains, requests its first weights, and waits
# for that kernel only before reading x (outputs checked in the bench). Eight chained calls then take
# 12.0 / 11.7 µs each: **3.05x / 3.07x** the `F.linear` chain, but **2.82x / 2.96x** the faster
# `torch.matmul` [K, N] chain (33.8 / 34.6 µs per call). Here the read floor leaves room:
# - eight chained pure reads take 8.1 µs each when every read may overlap the previous kernel;
# - 9.1 µs when each waits for the previous one first (PDL, like a dependent kernel);
# - so up to ~3.7-4.2x is possible.
# What is left is the GEMV's own per-call cost over a dependent read, ~2.6-2.9 µs.
#
# The "eager x" column launches each call from Python. There the host can be the slower side: the
# Triton launch handles ~20 arguments in Python. The GPU then waits for the launch between the two timing
# events, and the number measures the host, not the kernel (qkvo, 0.08x, in the H100 run). CUDA graphs,
# as in every other column and in serving, remove that cost.
#
# End to end, the **fused decode step** (q/k/v and gate/up concatenated at load time, add+RMSNorm,
# RoPE+KV write and silu*mul one kernel each: 10 launches per layer) makes batch-1 decoding of the
# 7B-shaped model **2.1x** (H200) and **2.4x** (H100) faster in tokens/s with W4A16 than with fp16
# (TinyChat: 2.6-2.7x), against 1.6-1.7x for the module-by-module step in the same runs. The profile
# explains it: the projections alone run 2.85x faster (H100), and what is left (0.5 ms per token of norms,
# RoPE, attention) is the same on both sides — the fusions cut it from ~2.9 ms (the module-by-module fp16
# step minus the fused step's fp16 projections, H100) to 0.5 ms, which is what lets the projection
# speed-up show. cuBLAS fp16 wins from
# M = 8 on at gate/up and down on the H100 (M = 4 on the H200, and at q/k/v/o on both; crossover printed
# above); the tensor-core kernel is slower than cuBLAS at every M it was chosen for.
#
# ## 9. MiniLM: a real pretrained encoder under AWQ vs RTN
#
# all-MiniLM-L6-v2 (BERT-style, post-LN, GELU) from its PyPI package. Folds: v→attention-output dense
# (exact) and GELU→FFN-out (an explicit divide after GELU); the LayerNorm-fed q/k/v and FFN-in get an
# explicit input scale (x/s), because a post-LN LayerNorm output is also the residual stream — a stated
# deviation costing one elementwise op per token. Metric: cosine similarity of the mean-pooled sentence
# embeddings to the FP embeddings, on validation-split docstrings; calibration from train-split docstrings.

# %%
MINILM = None
if USE_MINILM:
    from mlsys24.models import load_minilm

    mm = load_minilm()
    val_docs = docstrings("validation", MINILM_DOCS, max_chars=400)
    order = np.argsort([len(t) for t in val_docs])            # length-sorted batches: little padding

    def embed(m) -> torch.Tensor:
        e = m.embed([val_docs[i] for i in order], batch_size=16)
        out = torch.empty_like(e)
        out[torch.as_tensor(order)] = e
        return out

    ref_emb = embed(mm)
    ids = []
    for enc in mm.tokenizer.encode_batch(docstrings("train", 64, max_chars=400)):
        ids += enc.ids[1:-1]
    cls, sep = mm.tokenizer.token_to_id("[CLS]"), mm.tokenizer.token_to_id("[SEP]")
    L = 126
    mcalib = torch.tensor([[cls] + ids[i * L:(i + 1) * L] + [sep] for i in range(MINILM_CALIB_BLOCKS)])
    r_mm = copy.deepcopy(mm)
    fake_quantize_linears(r_mm.encoder, MINILM_BITS, MINILM_GROUP)
    a_mm = copy.deepcopy(mm)
    mres = awq_minilm(a_mm.encoder, mcalib, MINILM_BITS, MINILM_GROUP, n_grid=N_GRID, max_shrink=MAX_SHRINK,
                      clip_tokens=CLIP_TOKENS)
    fake_quantize_linears(a_mm.encoder, MINILM_BITS, MINILM_GROUP)
    cos_rtn = (embed(r_mm) * ref_emb).sum(-1)
    cos_awq = (embed(a_mm) * ref_emb).sum(-1)
    MINILM = {"rtn": float(cos_rtn.mean()), "awq": float(cos_awq.mean()), "improved": mres.improved_count(),
              "docs_better": float((cos_awq >= cos_rtn).float().mean())}
    print(f"MiniLM INT{MINILM_BITS}-g{MINILM_GROUP}, {len(val_docs)} docstrings: mean cosine to FP  RTN "
          f"{MINILM['rtn']:.4f}  AWQ {MINILM['awq']:.4f}; AWQ >= RTN on {100 * MINILM['docs_better']:.0f}% of docs; "
          f"alpha* beats alpha=0 in {MINILM['improved'][0]}/{MINILM['improved'][1]} groups")
    fig = go.Figure()
    fig.add_histogram(x=cos_rtn.numpy(), name="RTN", marker_color=viz.color("rtn"), opacity=0.7, nbinsx=30)
    fig.add_histogram(x=cos_awq.numpy(), name="AWQ", marker_color=viz.color("awq"), opacity=0.7, nbinsx=30)
    viz.apply_template(fig, title=f"MiniLM INT{MINILM_BITS}-g{MINILM_GROUP}: embedding fidelity per docstring",
                       x="cosine similarity to the FP32 embedding", y="docstrings (count)")
    fig.update_layout(barmode="overlay")
    viz.caption(fig, f"{len(val_docs)} validation-split docstrings (≤400 chars); calibration {MINILM_CALIB_BLOCKS}x128 "
                "tokens of train-split docstrings. No paper number: the paper does not evaluate encoders.")
    viz.save(fig, SLUG, "minilm_fidelity")
    fig.show()

# %% [markdown]
# **Takeaway.** On a real pretrained model AWQ keeps the INT3 sentence embeddings much closer to FP than
# RTN does, even with two of the four scale groups paying for an explicit input scale. The encoder is not
# an LLM and the metric is not perplexity: this supports the mechanism, not the paper's numbers.
#
# ## 10. Claims

# %%
r3 = RESULTS.get((3, 64))
r4 = RESULTS.get((4, 64))
groups_better, groups_total = RESULTS[KEY]["search"].improved_count()
print(f"folding max |Δlogit| = {FOLD_ERR:.1e}; alpha=0 == RTN: {ALPHA0_IS_RTN}; "
      f"alpha* < alpha=0 loss in {groups_better}/{groups_total} groups")
assert FOLD_ERR < 1e-4                                        # 1. folding is exact in FP
assert ALPHA0_IS_RTN                                          # 2. alpha = 0 is RTN, bit for bit
assert groups_better > groups_total / 2                       # 3. the search beats RTN on most groups
if r3 is not None:                                            # 4. INT3-g64: FP < AWQ < RTN, >= 20 % of the gap back
    rec3 = (r3["rtn"] - r3["awq"]) / (r3["rtn"] - PPL_FP)
    print(f"INT3-g64: FP {PPL_FP:.4f} < AWQ {r3['awq']:.4f} < RTN {r3['rtn']:.4f}; recovered {100 * rec3:.0f}%")
    assert PPL_FP < r3["awq"] < r3["rtn"] and rec3 >= 0.2
if r4 is not None:                                            # 4b. INT4-g64: AWQ <= 1.01 x RTN
    print(f"INT4-g64: AWQ {r4['awq']:.4f} vs RTN {r4['rtn']:.4f}")
    assert r4["awq"] <= 1.01 * r4["rtn"]
for pct in SALIENT_PCTS:                                      # 5. Table 1: activation-chosen channels win
    assert T1[(pct, "activation")] <= T1[(pct, "weight")] and T1[(pct, "activation")] <= T1[(pct, "random")]
    assert T1[(pct, "activation")] < T1["RTN"]
if MINILM is not None:                                        # 6. MiniLM: AWQ closer to FP than RTN
    assert MINILM["awq"] >= MINILM["rtn"]
if INT4_KEY is not None:                                      # 7. real int4 = fake quant (up to fp16 steps); checkpoint
    assert REAL_VS_FAKE < 5e-3 and CKPT_SAME
if RUN_KERNEL_CHECK:                                          # 7b. kernels == dequantize + matmul
    assert all(e <= (1e-3 if "float32" in d else 2e-2) for (m, d, lay), e in KERNEL_ERR.items()), KERNEL_ERR
if GPU_RES is not None:                                       # 8. GPU claims, from the run named here
    w4 = [r for r in GPU_RES.records if r.get("provider") == "w4a16" and "median_us" in r]
    errs = [c["rel_err"] for r in w4 for c in r.get("candidates", []) if "median_us" in c]
    assert errs and max(errs) <= 3e-3                         #    every timed configuration was correct (fp16)
    print("GPU (from " + GPU_RES.caption() + "):")
    # what the run shows: at batch 1 the W4A16 GEMV beats cuBLAS fp16 on every measured shape
    assert SPEEDUP_M1 and all(v > 1.0 for v in SPEEDUP_M1.values()), SPEEDUP_M1
    m1 = {k: v for k, v in SPEEDUP_M1.items() if k in ("gate_up", "down")}
    # the claim against the faster of the two fp16 forms (F.linear's W [N, K], torch.matmul's W [K, N])
    m1 = {k: min(v, SPEEDUP_KN_M1.get(k, v)) for k, v in m1.items()}
    chained = {k: PDL_M1[k]["speedup_vs_best_fp16"] for k in ("gate_up", "down") if k in PDL_M1}
    if m1 and min(m1.values()) >= 3.0:
        print("  reproduced: W4A16 >= 3x fp16 (cuBLAS, either weight layout) at M=1 on 11008x4096 and 4096x11008")
    else:
        print("  NOT REPRODUCED: W4A16 >= 3x fp16 (cuBLAS, the faster weight layout) at M=1 on the 7B MLP shapes; "
              "measured " + ", ".join(f"{k} {v:.2f}x" for k, v in m1.items()) + " per single call"
              + ("; back-to-back in one graph with programmatic dependent launch, against the faster fp16 chain: "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in chained.items()) if chained else ""))
        bnd = {k: BOUND[k]["max_speedup_single"] for k in m1 if k in BOUND}
        if bnd:   # the arithmetic: cuBLAS time / (graph floor + packed bytes at the measured copy rate)
            peak = {}
            for k in bnd:   # the same with the datasheet bandwidth (the roofline's peak) instead of the copy rate
                r, b = _rec(k, 1, "w4a16"), BOUND[k]
                peak_GBps = r["GBps"] * 100 / r["pct_peak_bw"]
                peak[k] = _rec(k, 1, "cublas_fp16")["median_us"] / (b["graph_floor_us"] + b["weight_bytes"] / peak_GBps / 1e3)
            print("    bound on this card, single call, packed bytes at the measured copy rate: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in bnd.items()) + "; at the datasheet peak: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in peak.items())
                  + (" -> 3x is out of reach here unless the GEMV streams faster than a device copy"
                     if min(bnd.values()) < 3.0 else ""))
            for k in bnd:   # nothing beats the datasheet bandwidth (5 %: timing noise)
                assert SPEEDUP_M1[k] <= 1.05 * peak[k], (k, SPEEDUP_M1[k], peak[k])
        rb = {k: READ_FLOOR[k] for k in m1 if k in READ_FLOOR}
        if rb:   # the measured bound: this run's fp16 times over the fastest pure read of the packed bytes
            worst = min(min(r["max_speedup_single_vs_cublas"], r.get("max_speedup_single_vs_matmul_kn", 99))
                        for r in rb.values())
            print("    read floor (a kernel that only reads the packed bytes, timed the same way): at most "
                  + ", ".join(f"{k} {r['max_speedup_single_vs_cublas']:.2f}x F.linear / "
                              f"{r.get('max_speedup_single_vs_matmul_kn', float('nan')):.2f}x matmul [K,N]"
                              for k, r in rb.items())
                  + "; ours runs at " + ", ".join(f"{r['w4a16_over_read_floor']:.2f}x" for r in rb.values())
                  + " the floor" + (" -> 3x against the faster fp16 form would need a GEMV faster than a pure "
                                    "read of its bytes" if worst < 3.0 else ""))
    for k, rf in READ_FLOOR.items():   # the read floor is a floor: no timed kernel that reads the same bytes
        r = _rec(k, 1, "w4a16")         # beats it (5 %: timing noise), single or back to back
        assert r["median_us"] >= 0.95 * rf["median_us"], (k, r["median_us"], rf["median_us"])
        if k in PDL_M1:
            assert PDL_M1[k]["median_us"] >= 0.95 * rf["chain_us"], (k, PDL_M1[k]["median_us"], rf["chain_us"])
    for k in ("gate_up", "down"):   # PDL shortens back-to-back calls (outputs checked in the bench)
        if k in PDL_M1 and k in CHAIN_M1:
            assert PDL_M1[k]["rel_err"] <= 3e-3
            assert PDL_M1[k]["median_us"] < _rec(k, 1, "w4a16_chain")["median_us"], (k, PDL_M1[k]["median_us"])
    if "mlp_70b" in PCT_COPY_M1:
        pct = PCT_COPY_M1["mlp_70b"]
        print(f"  {'reproduced' if pct >= 60 else 'NOT REPRODUCED'}: 28672x8192 layer reads its packed weights at "
              f">= 60% of copy bandwidth; measured {pct:.0f}%")
    if DECODE is not None:
        print(f"  {'reproduced' if DECODE['speedup'] >= 2.0 else 'NOT REPRODUCED'}: batch-1 decode >= 2x fp16 "
              f"tokens/s (TinyChat 2.6-2.7x); measured {DECODE['speedup']:.2f}x ({DECODE['n_layers']} layers, "
              f"CUDA graphs, {'fused step' if DECODE.get('path') == 'fused' else 'module-by-module step'})")
        assert DECODE["speedup"] > 1.0                        #    and it does make decoding faster
        if DECODE_MODULE is not None and DECODE.get("path") == "fused":
            # the fusions, applied to both sides, raise the W4A16 gain over the module-by-module step
            assert DECODE["speedup"] > DECODE_MODULE["speedup"], (DECODE["speedup"], DECODE_MODULE["speedup"])
    print(f"  crossover M (cuBLAS fp16 wins from): {CROSSOVER}")
else:
    print("GPU claims skipped: run `PYTHONPATH=lib python3 -m mlsys24.bench awq` on a GPU machine")
print(f"notebook ran in {time.time() - T_START:.0f} s")

# %% [markdown]
# ## 11. Explore
#
# Pick a bit width / group size, a scale group and α: the curve is the calibration loss of that group
# over the α grid (the search's objective), the marker the chosen α*; the right panel shows the per-channel
# scale s = s_X^α against the activation magnitude s_X (everything precomputed above).

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    cfg_opts = [(f"INT{b}-g{g}", (b, g)) for (b, g) in RESULTS]
    w_cfg = W.Dropdown(options=cfg_opts, description="format")
    w_grp = W.Dropdown(options=[s.group.name for s in RESULTS[cfg_opts[0][1]]["search"].searches],
                       description="group", layout=W.Layout(width="340px"))
    w_alpha = W.FloatSlider(value=0.5, min=0.0, max=(N_GRID - 1) / N_GRID, step=1 / N_GRID, description="α")
    w_out = W.Output()
    figw = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=("calibration loss vs α",
                                                                        "scale s vs activation magnitude")))
    figw.add_scatter(mode="lines+markers", name="loss(α)", row=1, col=1, line_color=viz.color("awq"))
    figw.add_scatter(mode="markers", name="α*", marker=dict(size=14, symbol="star", color="black"), row=1, col=1)
    figw.add_scatter(mode="markers", name="selected α", marker=dict(size=11, color="#1f77b4"), row=1, col=1)
    figw.add_scatter(mode="markers", name="channels", marker=dict(size=4, color=viz.color("awq")), row=1, col=2)
    viz.apply_template(figw, width=980, height=420)
    figw.update_xaxes(title_text="α", row=1, col=1)
    figw.update_yaxes(title_text="MSE of the inspected module's output", type="log", row=1, col=1)
    figw.update_xaxes(title_text="s_X = mean |x| of the channel", type="log", row=1, col=2)
    figw.update_yaxes(title_text="scale s", type="log", row=1, col=2)

    def _update(*_):
        res = RESULTS[w_cfg.value]["search"]
        s = next(x for x in res.searches if x.group.name == w_grp.value)
        i_sel = min(range(len(s.alphas)), key=lambda i: abs(s.alphas[i] - w_alpha.value))
        with figw.batch_update():
            figw.data[0].x, figw.data[0].y = s.alphas, s.losses
            figw.data[1].x, figw.data[1].y = [s.best_alpha], [s.losses[s.alphas.index(s.best_alpha)]]
            figw.data[2].x, figw.data[2].y = [s.alphas[i_sel]], [s.losses[i_sel]]
            figw.data[3].x = s.x_mean.numpy()
            figw.data[3].y = scales_for_alpha(s.x_mean, s.alphas[i_sel]).numpy()
        r = RESULTS[w_cfg.value]
        with w_out:
            w_out.clear_output()
            print(f"{w_cfg.label}: FP {PPL_FP:.4f}  RTN {r['rtn']:.4f}  AWQ {r['awq']:.4f};  {w_grp.value}: "
                  f"α* = {s.best_alpha:.2f}, loss at α = {s.alphas[i_sel]:.2f}: {s.losses[i_sel]:.3e} "
                  f"(α = 0: {s.losses[0]:.3e})")

    for w_ in (w_cfg, w_grp, w_alpha):
        w_.observe(_update, names="value")
    _update()
    display(W.VBox([W.HBox([w_cfg, w_grp, w_alpha]), w_out, figw]))

# %% [markdown]
# ## 12. Going further
#
# - Full-size CPU run (16,384 evaluation bytes, 16 x 256 calibration bytes, Table 1 at 0.1/1/3 %):
#   `papermill notebooks/07_awq.ipynb runs/07_awq_full.ipynb -p EVAL_TOKENS 16384 -p CALIB_SEQLEN 256
#   -p LOSS_ROWS 16 -p SALIENT_PCTS "[0.1, 1.0, 3.0]" -p RANDOM_SEEDS 3 -p INTERACTIVE False`
# - A real model on a GPU: `papermill ... -p MODEL_PATH /path/to/Llama-2-7b-hf -p DEVICE cuda
#   -p EVAL_TEXT_PATH wikitext2_test.txt -p EVAL_WINDOW 2048 -p EVAL_TOKENS 400000 -p CALIB_SEQLEN 512
#   -p CALIB_BLOCKS 128 -p USE_MINILM False` (the paper's protocol, with your own copy of the text).
# - The kernel: `PYTHONPATH=lib python3 -m mlsys24.bench awq` (writes `data/results/awq/<gpu>.json`).
#
# Questions for a workshop:
# 1. Why does AWQ search α on the *output of the whole attention/MLP* rather than of each linear? What
#    changes if you inspect each linear alone (try `inspect_fn` returning the linear)?
# 2. The paper protects ~1 % of channels; the search scales *all* channels continuously. Plot the searched
#    s against s_X (Explore) — is it close to "1 % scaled, 99 % untouched"?
# 3. Folding into a post-LN LayerNorm is not exact (MiniLM). Prove it, then measure the cost of the
#    explicit input scale we use instead.
# 4. Count the SASS instructions per weight of the GEMV's inner loops (`triton.compile(...,
#    target=GPUTarget("cuda", 90, 32))`, then `nvdisasm`), then compare the sweep's per-layout bests: the
#    group-major layout and the prefetch change no instruction in the loop but move the 70B layer most.
#    Why (hint: Little's law, bytes in flight per SM, DRAM pages)?
# 5. The fused decode step (`FusedDecoder`) still spends ~0.5 ms per token outside the projections on
#    both sides. Which launches are those, and what would fusing RMSNorm into the following GEMV's
#    prologue, or the residual add into the previous GEMV's split-K fix-up, buy (and would cuBLAS get the
#    same fusion)?
