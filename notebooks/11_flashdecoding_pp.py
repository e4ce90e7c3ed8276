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
#     headline: 'Paper: asynchronous unified-max softmax 1.14x in decode, flat GEMM
#       up to 52%, heuristic dataflow up to 29%, 4.86x end-to-end vs HF (A100). Ours
#       (H100 and H200, Triton): async/sync 1.00-1.02x at batch 1 (each at its best
#       tiling; 1.09-1.28x on the CUDA-core path), >= SDPA at batch 1 and 82-111% of
#       copy bandwidth from batch 8; split-K flat GEMM + dispatcher 1.05-1.06x vs cuBLAS-only
#       at M <= 16 on both cards (H100 bound at the copy rate 1.09x; within 2-6% of
#       the per-M best); engine decode 4.3-8.4x vs plain PyTorch (H100)'
#     paper: '11'
#     slug: flashdecoding_pp
#     status: partial
# ---

# %% [markdown]
# # FlashDecoding++: Faster Large Language Model Inference with Asynchronization, Flat GEMM Optimization, and Heuristics
#
# Ke Hong, Guohao Dai, Jiaming Xu, Qiuli Mao, Xiuhong Li, Jun Liu, Kangdi Chen, Yuhan Dong, Yu Wang
# (Tsinghua University, Infinigence-AI, SJTU) · MLSys 2024 · [arXiv 2311.01282](https://arxiv.org/abs/2311.01282)
# · no official code was published (the related operator library `inficom` is only partly public).
#
# **The idea in one paragraph.** In LLM decode every step reads the whole KV cache and every weight
# once, and three inefficiencies remain. (1) *Synchronized partial softmax*: FlashDecoding splits the
# KV cache over many thread blocks, but each block must track its own running max and rescale its
# accumulators, and a second kernel combines the splits with one more rescale. FlashDecoding++ uses a
# **unified max value φ** chosen offline from the statistics of the softmax inputs: since
# softmax(x)ᵢ = e^{xᵢ−φ} / Σⱼ e^{xⱼ−φ} for any φ, every split just adds e^{x−φ} and e^{x−φ}·v into
# shared accumulators — no max, no rescale, no synchronization — and a row whose logits leave the safe
# band around φ is detected and **recomputed** with the synchronized method. (2) *Flat GEMMs*: decode's
# linears have M = batch ≪ 64 rows, yet library GEMMs pad M to 64/128; a flat GEMM pads only to the
# tensor-core granularity and double-buffers the K loop. (3) *One static dataflow*: a profiled lookup
# table picks GEMV (CUDA cores), flat GEMM or cuBLAS per (M, N, K).
#
# Here: the Triton kernels of `mlsys24.kernels` (split-KV decode attention in both flavours, paged-KV
# aware, with in-kernel fallback; flat GEMM; GEMV; the dispatcher), checked against plain-PyTorch
# references; φ calibrated on the workbench's tiny Llama; GPU timings read from the committed results
# of `python -m mlsys24.bench flashdecoding_pp`.

# %% tags=["parameters"]
PHI = None                # unified max φ in nats of x = q·k/√d; None = calibrate on the tiny Llama (train split)
PHI_QUANTILE = 0.9999     # central mass of the per-row maxima that φ must fit inside the safe band
P_DTYPE = "fp16"          # precision P = e^(x-φ) is rounded to before P·V: "fp16" (tensor-core path) or "fp32"
STATS_TOKENS = 2048       # train-split bytes through the tiny Llama for calibration (card: 16384 at full scale)
EVAL_TOKENS = 2048        # validation-split bytes for the recompute rate
WINDOW = 256              # tokens per forward pass (each query row is one decode step's softmax input)
MINILM_DOCS = 8           # docstrings of the validation split fed to MiniLM (second model of Fig. 5); 0 = skip
KERNEL_CHECK = True       # run the Triton kernels (interpreter on CPU) against the references
KV_LEN = 64               # kernel check: decode over this many cached tokens (tiny Llama layer 1)
SPLIT = 32                # kernel check: tokens per KV split (so KV_LEN/SPLIT splits per row)
BENCH = "auto"            # GPU numbers: "auto" (live quick bench on a GPU, else the results JSON), "json", "skip"
SEED = 0                  # seed of the synthetic inputs
INTERACTIVE = True        # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, validate

validate(globals(), PHI_QUANTILE=Float(0.5, 1.0, lo_open=True, hi_open=True), P_DTYPE=Choice("fp16", "fp32"),
         STATS_TOKENS=Int(256, 10**7), EVAL_TOKENS=Int(256, 10**7), WINDOW=Int(16, 4096),
         MINILM_DOCS=Int(0, 10_000), KERNEL_CHECK=Bool(), KV_LEN=Int(2, 4096), SPLIT=Int(16, 4096),
         BENCH=Choice("auto", "json", "skip"), SEED=Int(0), INTERACTIVE=Bool())
if PHI is not None:
    PHI = float(PHI)

# %%
import math
import os
import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes on CPU)
from mlsys24 import viz
from mlsys24.kernels import dispatch as dsp
from mlsys24.kernels import flat_gemm as fg
from mlsys24.kernels.decode_attention import (
    DecodeConfig,
    attention_logits_ref,
    calibrate_phi,
    decode_attention_async,
    decode_attention_ref,
    decode_attention_sync,
    safe_band,
    unified_softmax_ref,
)

SLUG = "flashdecoding_pp"
torch.manual_seed(SEED)
torch.set_num_threads(2)
GPU = torch.cuda.is_available()
P_TORCH = torch.float16 if P_DTYPE == "fp16" else torch.float32
LO, HI = safe_band(P_TORCH)
T_START = time.time()
print(f"device: {'cuda' if GPU else 'cpu'}; Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}; "
      f"safe band for P in {P_DTYPE}: {LO} < max(x) - φ < {HI}")

# %% [markdown]
# ## 1. Reference: softmax with a unified max
#
# The identity behind the asynchronous softmax, in plain PyTorch: any constant φ gives the same
# softmax as long as e^{x−φ} neither overflows nor underflows in the precision it is stored in.
# The kernel rounds P = e^{x−φ} to fp16 (tensor-core path) before P·V and sums in fp32; the
# reference `unified_softmax_ref` does exactly that.

# %%
g = torch.Generator().manual_seed(SEED)
x_demo = torch.randn(8, 1000, generator=g, dtype=torch.float64) * 2.0      # 8 rows of logits
ref_demo = torch.softmax(x_demo, dim=-1)
for phi in (-2.0, 0.0, 4.0):
    e32 = (unified_softmax_ref(x_demo, phi) - ref_demo).abs().max().item()
    e16 = (unified_softmax_ref(x_demo, phi, p_dtype=torch.float16) - ref_demo).abs().max().item()
    print(f"φ = {phi:+.1f}: max |error| fp32 P {e32:.1e}   fp16 P {e16:.1e}")
    assert e32 < 1e-6 and e16 < 2e-3                                      # claim 1

# %% [markdown]
# ## 2. Softmax-input statistics and φ (Fig. 5 analogue)
#
# The paper picks φ per model from the distribution of the softmax inputs x (for Llama2-7B, 99.99 %
# of x lie in [−16.8, 6.5]). What the kernel actually needs is narrower: each **row's maximum** must
# stay inside the band (lo, hi) around φ. We run the workbench's tiny Llama (4 layers, 4 heads × 64,
# trained on the committed CPython-stdlib corpus) over the **train** split, collect every pre-softmax
# logit (the exact tensor fed to softmax, 1/√d included), choose φ, and measure the share of rows
# that would be recomputed on the **validation** split. MiniLM (a BERT encoder) on docstrings is the
# second model, standing in for the paper's wider-range OPT.

# %%
from mlsys24.models import load_split_bytes


def byte_windows(split: str, n_bytes: int, window: int) -> torch.Tensor:
    data = load_split_bytes(split)[:n_bytes]
    n = len(data) // window
    return torch.tensor(list(data[: n * window]), dtype=torch.long).reshape(n, window)


def llama_logits(model, ids: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Pre-softmax logits per layer, [rows, keys] float32, masked positions = -inf."""
    per_layer = None
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            with model.capture(outputs=["*.attn_logits"]) as cap:
                model(ids[i:i + batch])
            names = sorted(cap.outputs, key=lambda n: int(n.split(".")[1]))
            outs = [cap.outputs[n][0] for n in names]                          # [b, H, T, T]
            if per_layer is None:
                per_layer = [[] for _ in outs]
            for li, x in enumerate(outs):
                x = x.float().masked_fill(x < -1e30, float("-inf"))
                per_layer[li].append(x.reshape(-1, x.shape[-1]))
    return [torch.cat(p) for p in per_layer]


LOGIT_SOURCE = None
try:
    from mlsys24.models import load_tiny_llama

    llama = load_tiny_llama()
    LOGIT_SOURCE = "tiny Llama (data/models/tiny_llama)"
except FileNotFoundError as e:
    llama = None
    print(f"tiny Llama checkpoint not found ({e}); using synthetic logits instead")

if llama is not None:
    train_logits = llama_logits(llama, byte_windows("train", STATS_TOKENS, WINDOW))
    val_logits = llama_logits(llama, byte_windows("validation", EVAL_TOKENS, WINDOW))
else:  # synthetic stand-in with a Llama-like shape: a peaked sink column plus a Gaussian bulk
    LOGIT_SOURCE = "synthetic (no tiny Llama checkpoint)"

    def synth(n_rows, seed):
        gg = torch.Generator().manual_seed(seed)
        x = torch.randn(4, n_rows, WINDOW, generator=gg) * 2.5 - 2.0
        x[..., 0] += 6.0
        causal = torch.arange(WINDOW)[None, :] <= (torch.arange(n_rows) % WINDOW)[:, None]
        return [xi.masked_fill(~causal, float("-inf")) for xi in x]

    train_logits, val_logits = synth(STATS_TOKENS, SEED), synth(EVAL_TOKENS, SEED + 1)

n_layers = len(train_logits)
cal = calibrate_phi(torch.cat(train_logits), quantile=PHI_QUANTILE, p_dtype=P_TORCH)
phi = PHI if PHI is not None else cal.phi
cal_layers = [calibrate_phi(x, quantile=PHI_QUANTILE, p_dtype=P_TORCH) for x in train_logits]


def recompute_rate(logits: torch.Tensor, phi: float, lo: float = LO, hi: float = HI) -> float:
    d = logits.max(dim=-1).values - phi
    return float(((d > hi) | (d < lo)).float().mean())


rate_val = recompute_rate(torch.cat(val_logits), phi)
rate_val_layers = [recompute_rate(v, c.phi) for v, c in zip(val_logits, cal_layers)]
print(f"source: {LOGIT_SOURCE}; {cal.n_logits:,} logits, {cal.n_rows:,} rows from the train split")
print(f"{100 * PHI_QUANTILE:.2f} % of all logits in [{cal.x_range[0]:.2f}, {cal.x_range[1]:.2f}];"
      f" row maxima in [{cal.rowmax_range[0]:.2f}, {cal.rowmax_range[1]:.2f}]")
print(f"φ = {phi:.3f} (one per model); recompute rate on validation: {100 * rate_val:.3f} %")
for li, (c, r) in enumerate(zip(cal_layers, rate_val_layers)):
    print(f"  layer {li}: x range [{c.x_range[0]:6.2f}, {c.x_range[1]:6.2f}]  φ_layer {c.phi:6.2f}"
          f"  recompute (per-layer φ) {100 * r:.3f} %")
assert all(math.isfinite(v) for v in (*cal.x_range, *cal.rowmax_range))  # claim 5
assert rate_val <= 0.05, f"recompute rate {rate_val:.3%} above 5 %"

# %%
minilm_x = None
if MINILM_DOCS > 0:
    import re

    from mlsys24.models import iter_documents, load_minilm
    from mlsys24.models.llama import Capture

    docs = []
    for _, text in iter_documents("validation"):
        docs += [d.strip() for d in re.findall(r'"""(.*?)"""', text, flags=re.S) if len(d.strip()) > 40]
        if len(docs) >= MINILM_DOCS:
            break
    mini = load_minilm()
    ids, mask = mini.tokenize(docs[:MINILM_DOCS])
    heads = {n: m.n_heads for n, m in mini.named_modules() if hasattr(m, "n_heads")}
    with torch.no_grad(), Capture(mini, [], ["*.attention.self.query", "*.attention.self.key"]) as cap:
        mini(ids, mask, normalize=False)
    xs = []
    for name in sorted(n for n in cap.outputs if n.endswith("query")):
        nh = heads[name.rsplit(".", 1)[0]]
        q_, k_ = cap.outputs[name][0], cap.outputs[name.replace("query", "key")][0]
        B_, T_, D_ = q_.shape
        hq = q_.view(B_, T_, nh, D_ // nh).transpose(1, 2)
        hk = k_.view(B_, T_, nh, D_ // nh).transpose(1, 2)
        s = (hq @ hk.transpose(-1, -2)) / math.sqrt(D_ // nh)                     # [B, H, T, T]: softmax input
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        s = s.masked_fill(~mask.bool()[:, None, :, None], float("-inf"))          # padding query rows
        xs.append(s.reshape(-1, T_))
    minilm_x = torch.cat(xs)
    cal_mini = calibrate_phi(minilm_x, quantile=PHI_QUANTILE, p_dtype=P_TORCH)
    print(f"MiniLM on {len(docs[:MINILM_DOCS])} docstrings: x in [{cal_mini.x_range[0]:.2f}, {cal_mini.x_range[1]:.2f}],"
          f" row maxima in [{cal_mini.rowmax_range[0]:.2f}, {cal_mini.rowmax_range[1]:.2f}]")

# %%
def counts(x: torch.Tensor, bins: np.ndarray) -> np.ndarray:
    return np.histogram(x[torch.isfinite(x)].numpy(), bins=bins)[0].astype(float)


def hist(x: torch.Tensor, bins: np.ndarray) -> np.ndarray:
    h = counts(x, bins)
    return h / max(1.0, h.sum())


BINS = np.linspace(-40, 30, 141)
centres = 0.5 * (BINS[1:] + BINS[:-1])
layer_counts = [counts(x, BINS) for x in train_logits]
HISTS = {f"layer {i}": c / max(1.0, c.sum()) for i, c in enumerate(layer_counts)}
HISTS["all layers"] = sum(layer_counts) / max(1.0, sum(c.sum() for c in layer_counts))
ROWMAX_HIST = hist(torch.cat([x.max(-1).values for x in train_logits]), BINS)
fig5 = go.Figure()
fig5.add_bar(x=centres, y=HISTS["all layers"], name=f"{LOGIT_SOURCE.split(' (')[0]}: all x",
             marker_color=viz.color("ours"), opacity=0.75)
fig5.add_bar(x=centres, y=ROWMAX_HIST, name=f"{LOGIT_SOURCE.split(' (')[0]}: row maxima", marker_color=viz.color("async"), opacity=0.5)
if minilm_x is not None:
    fig5.add_bar(x=centres, y=hist(minilm_x, BINS), name="MiniLM (docstrings): all x",
                 marker_color=viz.color("torch"), opacity=0.5)
fig5.add_vrect(x0=phi + LO, x1=phi + HI, fillcolor="green", opacity=0.08, line_width=0,
               annotation_text="safe band for row maxima", annotation_position="top left")
fig5.add_vline(x=phi, line_dash="dash", annotation_text=f"φ = {phi:.2f}", annotation_position="bottom right")
fig5.add_vrect(x0=-16.8, x1=6.5, fillcolor="grey", opacity=0.08, line_width=0,
               annotation_text="paper: Llama2-7B 99.99 % range", annotation_position="bottom left")
fig5.update_layout(barmode="overlay")
viz.apply_template(fig5, title="Softmax inputs x = q·k/√d (Fig. 5 analogue)", x="x (nats)", y="fraction of logits")
fig5.update_yaxes(type="log")
viz.caption(fig5, f"{LOGIT_SOURCE}, {STATS_TOKENS} train-split bytes in windows of {WINDOW}; paper: Llama2-7B, "
            "OPT-6.7B, ChatGLM2-6B at full scale. Band for P in " + P_DTYPE + ".")
viz.save(fig5, SLUG, "fig5_logit_histogram")
fig5

# %% [markdown]
# **Takeaway.** The logits of a real (tiny) model occupy a bounded range, and — what matters for the
# kernel — the per-row maxima occupy an even narrower one, so a single φ per model keeps almost every
# row inside the band where e^{x−φ} is representable; the rows outside are recomputed, not wrong. This
# is a 4-layer byte-level model, not Llama2-7B: its range is not the paper's [−16.8, 6.5], and a model
# with a wider spread (the paper's OPT) would recompute more rows or fall back to synchronized softmax.
#
# ## 3. Numerics explorer: where φ is safe
#
# One real row of logits, softmax computed with a unified max φ swept across a wide range, P stored
# in fp16 or fp32, compared with a float64 softmax.

# %%
row = val_logits[-1][-1:].double()                                  # the last row: attends to a full window
row = row[:, torch.isfinite(row[0])]
ref_row = torch.softmax(row, dim=-1)
offsets = np.linspace(-25, 25, 201)                                # max(x) - φ
m = float(row.max())
SWEEP = {}
for name, dt in (("fp16", torch.float16), ("fp32", torch.float32)):
    errs = []
    for off in offsets:
        p = unified_softmax_ref(row, m - off, p_dtype=dt)
        errs.append(float((p - ref_row).abs().max()) if torch.isfinite(p).all() else float("inf"))
    SWEEP[name] = np.array(errs)
fig_num = go.Figure()
for name in SWEEP:
    y = np.where(np.isfinite(SWEEP[name]), SWEEP[name], np.nan)
    fig_num.add_scatter(x=offsets, y=y, name=f"P in {name}", mode="lines", line_color=viz.color("torch" if name == "fp32" else "ours"))
lo16, hi16 = safe_band(torch.float16)
fig_num.add_vrect(x0=lo16, x1=hi16, fillcolor="green", opacity=0.08, line_width=0, annotation_text="fp16 safe band")
fig_num.add_vline(x=math.log(65504.0), line_dash="dot", annotation_text="fp16 overflow (e^11.09)")
viz.apply_template(fig_num, title="Unified-max softmax error vs max(x) − φ",
                   x="max(x) − φ (nats)", y="max |P − softmax| (float64 reference)")
fig_num.update_yaxes(type="log")
viz.caption(fig_num, "Gaps in a curve: inf/NaN (overflow). Left of the band fp16 P underflows and the error grows.")
viz.save(fig_num, SLUG, "phi_numerics")
fig_num

# %%
inside = (offsets > lo16) & (offsets < hi16)
over = offsets > math.log(65504.0)
assert np.all(SWEEP["fp16"][inside] < 2e-3)                                      # claim 4: inside the band
assert np.all(~np.isfinite(SWEEP["fp16"][over]))                                 # overflow -> inf/NaN
assert np.all(SWEEP["fp32"][np.abs(offsets) < 25] < 1e-6)                        # fp32 P: ±60 is safe
print(f"fp16 P: max error inside the band {SWEEP['fp16'][inside].max():.1e}; "
      f"non-finite for max(x) − φ > ln 65504 = {math.log(65504.0):.2f}; "
      f"error at max(x) − φ = {offsets[0]:.0f}: {SWEEP['fp16'][0]:.1e}")

# %% [markdown]
# **Takeaway.** In fp16, e^{x−φ} overflows as soon as a row's max exceeds φ by 11.09 nats and loses
# precision below the band; in fp32 the safe band is ±60 nats, so on the fp32 CUDA-core path the
# fallback essentially never fires. The kernel checks the band per row with the *same* (lo, hi)
# (`safe_band`) and recomputes the rows outside it.
#
# ## 4. The kernels, checked against the references
#
# Decode attention for one step of the tiny Llama (layer 1): the query at position `KV_LEN`−1 attends
# to the `KV_LEN` cached keys and values of the same forward pass (post-RoPE), split into
# `KV_LEN/SPLIT` splits per row. Synchronized (split + combine kernels) and asynchronous (one kernel,
# atomics, last split normalizes) flavours; fp32 so that the comparison is at 1e-5. On CPU the Triton
# kernels run in the interpreter (TRITON_INTERPRET=1): correctness only, no timing.

# %%
KCHECK = {}
if KERNEL_CHECK:
    if llama is not None:
        ids = byte_windows("validation", 2 * KV_LEN, KV_LEN)[:2]
        with torch.no_grad(), llama.capture(outputs=["layers.1.*.q_rot", "layers.1.*.k_rot", "layers.1.*.v_new"]) as cap:
            llama(ids)
        get = {n.split(".")[-1]: v[0] for n, v in cap.outputs.items()}          # [B, T, H, d]
        q_all, k_all, v_all = get["q_rot"], get["k_rot"], get["v_new"]
    else:
        gg = torch.Generator().manual_seed(SEED)
        q_all, k_all, v_all = (torch.randn(2, KV_LEN, 2, 32, generator=gg) for _ in range(3))
    q = q_all[:, -1].contiguous()                                                  # [B, H, d] one decode step
    k = k_all.transpose(1, 2).contiguous()                                         # [B, H_kv, L, d]
    v = v_all.transpose(1, 2).contiguous()
    lens = torch.full((q.shape[0],), KV_LEN, dtype=torch.int32)
    n_splits = math.ceil(KV_LEN / SPLIT)
    cfg = DecodeConfig(block_n=min(SPLIT, 64), num_splits=n_splits)
    ref = decode_attention_ref(q, k, v, lens)
    out_sync = decode_attention_sync(q, k, v, lens, config=cfg)
    out_async, flags = decode_attention_async(q, k, v, lens, phi=phi, config=cfg, return_flags=True)
    KCHECK["sync"] = (out_sync - ref).abs().max().item()
    KCHECK["async"] = (out_async - ref).abs().max().item()
    print(f"B={q.shape[0]}, H={q.shape[1]}, d={q.shape[2]}, L={KV_LEN}, {n_splits} splits: "
          f"sync err {KCHECK['sync']:.1e}, async err {KCHECK['async']:.1e}, rows flagged {int(flags.sum())}")
    assert KCHECK["sync"] < 1e-5                                                   # claim 2
    # claim 3: inject large logits on two rows; the band is the fp32 one on this path (P in fp32)
    lo32, hi32 = safe_band(torch.float32)
    q_inj = q.clone()
    q_inj[0, 0] *= 1.0 + (hi32 + 20.0) / max(1e-3, float(attention_logits_ref(q, k, lens)[0, 0].max().abs()))
    q_inj[1, -1] *= -50.0
    x_inj = attention_logits_ref(q_inj, k, lens)
    d = x_inj.max(-1).values - phi
    expect = (d > hi32) | (d < lo32)
    out_inj, flags_inj = decode_attention_async(q_inj, k, v, lens, phi=phi, config=cfg, return_flags=True)
    raw_inj = decode_attention_async(q_inj, k, v, lens, phi=phi, config=cfg, fallback=False)
    ref_inj = decode_attention_ref(q_inj, k, v, lens)
    ok_rows = ~expect
    KCHECK["async_clean_rows"] = (out_async - ref).abs().amax(-1)[ok_rows].max().item() if ok_rows.any() else 0.0
    KCHECK["after_fallback"] = (out_inj - ref_inj).abs().max().item()
    KCHECK["without_fallback"] = (raw_inj - ref_inj).abs().nan_to_num(float("inf")).max().item()
    print(f"injected: rows outside the band {expect.nonzero().tolist()}, flagged {flags_inj.nonzero().tolist()}; "
          f"error after fallback {KCHECK['after_fallback']:.1e}, without fallback {KCHECK['without_fallback']:.1e}")
    assert KCHECK["async"] < 1e-5 and torch.equal(flags_inj.bool(), expect) and expect.any()
    assert KCHECK["after_fallback"] < 1e-5 and KCHECK["without_fallback"] > 1e-3

# %% [markdown]
# Flat GEMM (tensor cores, M padded to the tile) with BLOCK_M ∈ {16, 64} and num_stages ∈ {1, 2}, and
# the GEMV (CUDA cores, broadcast multiply, one reduction at the end), against `torch.matmul`.

# %%
if KERNEL_CHECK:
    gg = torch.Generator().manual_seed(SEED)
    w = torch.randn(96, 80, generator=gg).t()                                       # nn.Linear weight [N, K] -> [K, N]
    errs = {}
    for M in (1, 3, 8, 16):
        x = torch.randn(M, 80, generator=gg)
        ref_mm = x @ w
        for bm in (16, 64):
            for st in (1, 2):
                cfgm = fg.GemmConfig(block_m=bm, block_n=32, block_k=32, num_stages=st)
                errs[("flat", M, bm, st)] = (fg.flat_gemm(x, w, config=cfgm) - ref_mm).abs().max().item()
        if M <= 4:
            errs[("gemv", M)] = (fg.gemv(x, w, config=fg.GemmConfig(block_n=16, block_k=32)) - ref_mm).abs().max().item()
    print(f"max |error| over {len(errs)} flat GEMM / GEMV runs: {max(errs.values()):.1e}")
    assert max(errs.values()) < 1e-4                                               # claim 6

# %% [markdown]
# **Takeaway.** Both attention flavours compute the same function as the float32 reference on real
# (tiny-model) queries, keys and values; the asynchronous kernel flags exactly the rows whose maximum
# leaves the band and, with the in-kernel fallback, still returns the exact result — without it those
# rows are wrong. The flat GEMM and GEMV agree with `torch.matmul`. These interpreter runs say
# nothing about speed.
#
# ## 5. Back of the envelope
#
# Decode is memory-bound: every step reads each weight once and each sequence's KV cache once.
# Llama-2-7B in fp16, one H100 (copy bandwidth ≈ 3.0 TB/s, `shared/anchors`):

# %%
P_BYTES = 2
d_model, n_layers_7b, ffn, vocab = 4096, 32, 11008, 32000
w_bytes = n_layers_7b * (4 * d_model * d_model + 3 * d_model * ffn) * P_BYTES + 2 * vocab * d_model * P_BYTES
kv_per_token = 2 * n_layers_7b * d_model * P_BYTES
BW = 3.0e12
print(f"weights {w_bytes / 1e9:.1f} GB -> {w_bytes / BW * 1e3:.2f} ms per decode step at batch 1 (floor)")
for B, L in ((1, 1024), (1, 32768), (64, 1024), (64, 8192)):
    kv = B * L * kv_per_token
    print(f"B={B:3d} L={L:6d}: KV {kv / 1e9:6.2f} GB -> attention floor {kv / BW * 1e3:7.3f} ms/step "
          f"({100 * kv / (kv + w_bytes):.0f} % of the step's bytes)")
print("one attention layer at B=1, L=8192, 32x128 heads: "
      f"{2 * 8192 * 32 * 128 * 2 / 1e6:.0f} MB -> {2 * 8192 * 32 * 128 * 2 / BW * 1e6:.0f} us floor "
      "(SDPA anchor: 64.6 us)")

# %% [markdown]
# Flat GEMM tiling (paper §4, Fig. 7): with an N tile B_N, a block's compute/memory ratio is
# CMR = 2MK / (K + MK/B_N + M) and there are N/B_N blocks. Small B_N: many blocks (fills the SMs) but
# low reuse of x; large B_N: few blocks. For M = 8 and K = 4096:

# %%
BN_GRID = [8, 16, 32, 64, 128, 256]
fig7a = make_subplots(rows=1, cols=2, subplot_titles=("compute / memory ratio of one block", "blocks = N / B_N"))
fig7a.add_scatter(x=BN_GRID, y=[fg.cmr(8, 4096, bn) for bn in BN_GRID], name="CMR (M=8, K=4096)",
                  line_color=viz.color("ours"), row=1, col=1)
for N, dash in ((4096, "solid"), (11008, "dash")):
    fig7a.add_scatter(x=BN_GRID, y=[N / bn for bn in BN_GRID], name=f"N = {N}", line=dict(dash=dash),
                      line_color=viz.color("torch"), row=1, col=2)
for sms, name in ((108, "A100: 108 SMs"), (132, "H100: 132 SMs")):
    fig7a.add_hline(y=sms, line_dash="dot", annotation_text=name, row=1, col=2)
fig7a.update_xaxes(type="log", title_text="B_N (columns per block)")
fig7a.update_yaxes(type="log", row=1, col=2)
viz.apply_template(fig7a, title="Flat GEMM: reuse vs parallelism (analytic)", width=900)
fig7a

# %% [markdown]
# ## 6. The heuristic dispatcher on a synthetic cost table
#
# Three implementations per [N, K]: GEMV for M ≤ M1, flat GEMM up to M2, cuBLAS beyond. The
# inflection points come from a profile; here from a synthetic one (no timing on CPU).

# %%
ms = [1, 2, 4, 8, 16, 32, 64, 128, 256]
synthetic = {"gemv": {m: 20.0 * m for m in ms if m <= 4}, "flat": {m: 30.0 + 0.8 * m for m in ms},
             "cublas": {m: 45.0 + 0.2 * m for m in ms}}
fit = dsp.fit_thresholds(synthetic)
table = {"kind": dsp.TABLE_KIND, "device": None, "default": {"M1": fit["M1"], "M2": fit["M2"]}, "shapes": []}
picked = [dsp.choose_from_table(table, m, 4096, 4096)[0] for m in ms]
argmin = [min(synthetic, key=lambda i: synthetic[i].get(m, float("inf"))) for m in ms]
print(f"M1 = {fit['M1']}, M2 = {fit['M2']}; picks {dict(zip(ms, picked))}")
assert picked == argmin and fit["M1"] <= fit["M2"]                               # claim 7

# %% [markdown]
# ## 7. GPU results: attention, flat GEMM, dispatcher, decode step
#
# Measured by `python -m mlsys24.bench flashdecoding_pp` in one run on one GPU: every operation is
# replayed from a CUDA graph and timed with CUDA events, the L2 cache flushed (a read of twice its
# size) before every replay, median of the repeats. What the two attention kernels do:
#
# - **ours sync = FlashDecoding as it is built**: kernel 1 gives each (sequence, KV head, split) a
#   range of the cache; the program keeps a running max m, rescales its accumulators l and o whenever
#   m grows, and writes (m_j, l_j, o_j) to a workspace. Kernel 2 (combine) reads the S partials of
#   each row, takes m = max m_j and rescales: l = Σ e^{m_j−m} l_j, o = Σ e^{m_j−m} o_j / l.
# - **ours async = FlashDecoding++**: one kernel with the same tiling; each split computes
#   l_j = Σ e^{x−φ} and o_j = Σ e^{x−φ} v with no max and no rescale in its loop (it only keeps an
#   element-wise max for the overflow check, reduced once), adds l_j and o_j into fp32 accumulators with
#   atomics, and the program that takes the last ticket of the row divides o / l, checks the row's
#   max against the band and recomputes it with the synchronized method if it is outside.
#
# Both flavours are swept over the same tile candidates (tensor-core and CUDA-core paths, 32–128
# tokens per step) and split counts (2–32 programs per SM); **each flavour's best** is the headline
# comparison (the asynchronous one can afford finer splits: it has no combine to pay for them), and
# each is also timed at the other's best tiling ("same tiling"). Baselines: torch SDPA (its default
# backend choice and the flash backend), a naive eager attention; for the linears, cuBLAS via `F.linear`.

# %%
from mlsys24.bench import gpu_results, load_results
from mlsys24.kernels.bench_fdpp import summarize

# live: the quick benchmark into a temporary directory on a GPU; else the newest committed kernel results
RES = gpu_results(SLUG, BENCH, where=lambda f: f.meta.get("device_type") == "cuda" and f.config.get("kind") != "e2e")
if RES is None:
    print("No GPU results: run `PYTHONPATH=lib python3 -m mlsys24.bench flashdecoding_pp` on a GPU "
          "(writes data/results/flashdecoding_pp/<gpu>.json); the GPU figures and claims are skipped.")
    S = None
else:
    m_ = RES.meta
    GPU_NAME = RES.device
    CAPTION = (f"{GPU_NAME} · torch {m_.get('torch')}, triton {m_.get('triton')} · {m_.get('date', '')[:10]} · "
               f"bench_fdpp ({'quick' if RES.config.get('quick') else 'full'}) → {RES.path.name}")
    FLUSH = [r for r in RES.records if r.get("timing", "flush") == "flush"]
    S = summarize(RES.records)
    print(RES.caption())
    copy = next(r for r in RES.records if r.get("bench") == "copy")
    print(f"GPU: {GPU_NAME}; copy bandwidth {copy['GBps']:.0f} GB/s")
    checks = [r for r in RES.records if r.get("bench") == "check"]
    att_checks = [r for r in checks if r.get("op") == "decode_attention"]
    gemm_checks = [r for r in checks if r.get("op") == "gemm"]
    worst_check = max(max(r["rel_err_sync"], r["rel_err_async"], r["rel_err_forced_fallback"]) for r in att_checks)
    print(f"on the GPU: {len(att_checks)} attention checks (rel. error <= {worst_check:.1e}; forced φ flagged "
          f"{sum(r['flags_forced'] for r in att_checks)} of {sum(r['rows'] for r in att_checks)} rows, calibrated φ "
          f"{sum(r['flags_calibrated'] for r in att_checks)}); {len(gemm_checks)} GEMM checks incl. split-K")
    assert worst_check < 1e-3
    assert all(r["flags_forced"] == r["rows"] and r["flags_calibrated"] == 0 for r in att_checks)
    assert all(v < 1e-3 for r in gemm_checks for k, v in r.items() if k.startswith("rel_err"))
# the engine's end-to-end decode run (python -m mlsys24.bench flashdecoding_pp_e2e), when committed
E2E = next((r for r in load_results(SLUG) if r.config.get("kind") == "e2e"), None) if BENCH != "skip" else None
E2E_STEP = {(r["variant"], r["batch"]): r["step_median_ms"] for r in E2E.records if r["kind"] == "e2e"} if E2E else {}

# %%
if S is not None:
    att = [r for r in FLUSH if r.get("bench") == "attention" and "median_us" in r]
    batches = sorted({r["B"] for r in att})
    provs = [("ours_async_own_tiling", "ours async (FlashDecoding++)", "async"),
             ("ours_sync", "ours sync (FlashDecoding)", "sync"), ("sdpa", "torch SDPA", "sdpa"),
             ("naive", "naive eager", "loop")]
    fig_att = make_subplots(rows=1, cols=len(batches), subplot_titles=[f"batch {b}" for b in batches])
    for ci, B in enumerate(batches):
        for key, label, col in provs:
            pts = sorted((r["L"], r["GBps"]) for r in att if r["B"] == B and r["provider"] == key)
            if pts:
                fig_att.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label, legendgroup=key,
                                    showlegend=ci == 0, line_color=viz.color(col), row=1, col=ci + 1)
        fig_att.add_hline(y=copy["GBps"], line_dash="dot", line_color="grey", row=1, col=ci + 1)
    fig_att.update_xaxes(type="log", title_text="KV length (tokens)")
    viz.apply_template(fig_att, title="Decode attention: KV bytes read per second (32 heads × 128, fp16)",
                       width=260 * len(batches) + 120)
    fig_att.update_yaxes(title_text="GB/s (dotted: copy bandwidth)", row=1, col=1)
    fig_att.update_layout(legend=dict(y=1.18))
    viz.caption(fig_att, CAPTION + " · each kernel at its best tiling")
    viz.save(fig_att, SLUG, "attention_bandwidth")
    fig_att

# %%
if S is not None:
    fig_ratio = go.Figure()
    for key, label, dash in (("best_sync_over_best_async", "each at its best tiling", "solid"),
                             ("async_over_sync_same_tiling", "same tiling (sync's best)", "dot")):
        for B in batches:
            pts = [(a["L"], a[key]) for a in S["attention"] if a["B"] == B]
            fig_ratio.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=f"batch {B}: {label}",
                                  mode="lines+markers", line_dash=dash)
    fig_ratio.add_hline(y=1.14, line_dash="dash", annotation_text="paper: 1.14× (decode, A100)")
    fig_ratio.add_hline(y=1.0, line_color="grey")
    viz.apply_template(fig_ratio, title="Asynchronous (unified max) vs synchronized split-KV decode attention",
                       x="KV length (tokens)", y="speedup (sync time / async time)")
    fig_ratio.update_xaxes(type="log")
    viz.caption(fig_ratio, CAPTION)
    viz.save(fig_ratio, SLUG, "async_vs_sync")
    for a in S["attention"]:
        if a["B"] == 1:
            print(f"B=1 L={a['L']:6d}: best/best {a['best_sync_over_best_async']:.3f}x, same tiling at sync's "
                  f"pick {a['async_over_sync_same_tiling']:.3f}x, at async's pick "
                  f"{a['async_over_sync_same_tiling_async_pick']:.3f}x; SDPA/ours {a['sdpa_best_over_ours_async']:.3f}")
    fig_ratio

# %% [markdown]
# Where does the unified max pay? The sweep timed every candidate tiling in both flavours; grouped by
# the score path — tensor cores (q·Kᵀ and P·V as `tl.dot`, memory-bound) or CUDA cores (broadcast
# multiply and reductions, where the per-tile max and rescale of the fp32 accumulator are real
# work) — and compared at each flavour's best tiling on that path:

# %%
if S is not None:
    cfgs = RES.config["attn_configs"]
    sw = [r for r in RES.records if r.get("provider") == "sweep"]
    fig_path = go.Figure()
    PATH_RATIO = {}
    for dot, label, col in ((False, "CUDA cores", "sync"), (True, "tensor cores", "async")):
        xs_, ys_ = [], []
        for B, L in sorted({(r["B"], r["L"]) for r in sw}):
            rr = [r for r in sw if r["B"] == B and r["L"] == L and cfgs[r["config_id"]]["use_dot"] == dot]
            if rr:
                xs_.append(f"B{B} L{L // 1024}K")
                ys_.append(min(r["sync_us"] for r in rr) / min(r["async_us"] for r in rr))
        PATH_RATIO[label] = ys_
        fig_path.add_bar(x=xs_, y=ys_, name=label, marker_color=viz.color(col))
    fig_path.add_hline(y=1.14, line_dash="dash", annotation_text="paper 1.14×")
    viz.apply_template(fig_path, title="Async vs sync per score path (each flavour's best tiling on the path)",
                       y="best sync time / best async time", width=900)
    viz.caption(fig_path, CAPTION + f"<br>sweep: {RES.config.get('repeats')} repeats in the final timings, fewer per sweep point")
    viz.save(fig_path, SLUG, "async_by_path")
    print({k: f"{min(v):.2f}-{max(v):.2f}x" for k, v in PATH_RATIO.items()})
    fig_path

# %% [markdown]
# **Takeaway.** On the tensor-core path both kernels stream the KV cache at about the copy bandwidth
# from batch 8 on, and there synchronized and asynchronous softmax take the same time: the running
# max and the rescale hide behind memory, and the combine kernel costs a few microseconds against
# hundreds. At batch 1 too, once each flavour has its best split count (counts that fill whole waves
# of programs), the two are within about 1-2 % in the committed runs on an H200 and on an H100 (the
# newest, printed above; the other file is in `data/results/flashdecoding_pp/`): the combine
# kernel's launch and the asynchronous kernel's atomics and last-split ticket cost about the same, so
# the paper's 1.14× does not appear with these Triton kernels on this GPU. On the CUDA-core path,
# where the kernel is not purely memory-bound, dropping the per-tile max and rescale is worth
# 1.1–1.3× — the paper's mechanism, visible where there is work for it to save — but the tensor-core
# path is the faster one in both flavours. Our attention matches torch SDPA at batch 1 and stays
# within a few per cent of it elsewhere.

# %%
if S is not None:
    gem = [r for r in FLUSH if r.get("bench") == "gemm"]
    tune = [r for r in gem if r.get("phase") == "tune" and r["impl"] == "flat" and r["M"] == 16]
    shapes_n = sorted({(r["N"], r["K"], r["shape"]) for r in tune})
    bns = sorted({r["config"]["block_n"] for r in tune})
    fig7 = go.Figure()
    for bn in bns:
        ys = []
        for _n, _k, name in shapes_n:
            pts = [r["median_us"] for r in tune if r["shape"] == name and r["config"]["block_n"] == bn]
            best = min(r["median_us"] for r in tune if r["shape"] == name)
            ys.append(best / min(pts) if pts else None)
        fig7.add_scatter(x=[f"{n}×{k}" for n, k, _ in shapes_n], y=ys, name=f"B_N = {bn}", mode="lines+markers")
    viz.apply_template(fig7, title="Flat GEMM at M = 16: normalized performance vs weight shape (Fig. 7 analogue)",
                       x="weight N × K", y="best time / time (1 = best B_N)")
    viz.caption(fig7, CAPTION + "<br>each B_N at its best B_K / stages among the tuned candidates")
    viz.save(fig7, SLUG, "flat_gemm_block_n")
    fig7

# %%
if S is not None:
    ev = [r for r in gem if r.get("phase") == "eval"]
    shape_names = list(dict.fromkeys(r["shape"] for r in ev))
    fig_disp = make_subplots(rows=1, cols=len(shape_names), subplot_titles=shape_names)
    impls = [("gemv", "GEMV", "bgmv"), ("flat16", "flat GEMM BLOCK_M=16", "ours"),
             ("flat64", "flat GEMM BLOCK_M=64", "sync"), ("cublas", "cuBLAS", "cublas"),
             ("dispatch", "dispatcher", "reference")]
    for ci, name in enumerate(shape_names):
        for key, label, col in impls:
            pts = sorted((r["M"], r["GBps"]) for r in ev if r["shape"] == name and r["impl"] == key)
            if pts:
                fig_disp.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label, legendgroup=key,
                                     showlegend=ci == 0, line_color=viz.color(col),
                                     line_dash="dot" if key == "dispatch" else "solid", row=1, col=ci + 1)
    fig_disp.update_xaxes(type="log", title_text="M (batch)")
    viz.apply_template(fig_disp, title="Linear layers of Llama-2-7B: bandwidth vs M", width=240 * len(shape_names) + 120)
    fig_disp.update_yaxes(title_text="GB/s (weights + activations)", row=1, col=1)
    fig_disp.update_layout(legend=dict(y=1.18))
    viz.caption(fig_disp, CAPTION + " · L2 flushed before every call")
    viz.save(fig_disp, SLUG, "gemm_dispatch")
    fig_disp

# %%
if S is not None:
    gm = S["gemm"]
    worst = gm["static_worst_loss"]
    cats = [k for k in ("cublas", "flat64", "flat16", "gemv") if k in worst] + ["dispatcher"]
    fig_static = go.Figure()
    fig_static.add_bar(x=cats, y=[100 * worst[k] for k in cats[:-1]] + [100 * gm["dispatch_max_loss"]],
                       name="ours", marker_color=viz.color("ours"), texttemplate="%{y:.0f} %", textposition="outside")
    fig_static.add_hline(y=50.25, line_dash="dash", annotation_text="paper: a static choice loses up to 50.25 %",
                         annotation_position="top left")
    viz.apply_template(fig_static, title="Static dataflow vs the heuristic dispatcher (worst case over M = 1..256)",
                       y="slowdown vs the per-M best option (%)")
    viz.caption(fig_static, CAPTION + "<br>gemv only for M ≤ 4; the table comes from a separate profile pass")
    viz.save(fig_static, SLUG, "static_vs_dispatch")
    disp_picks = {}
    for r in ev:
        if r["impl"] == "dispatch":
            disp_picks.setdefault(r["shape"], []).append(f"{r['M']}:{r['picked'][0]}")
    print("dispatcher picks (g=GEMV, f=flat GEMM, c=cuBLAS): " + "; ".join(f"{k} {' '.join(v)}" for k, v in disp_picks.items()))
    print("dispatcher vs cuBLAS-only, geomean over M = 1..16: " + ", ".join(
        f"{k} {v:.3f}x" for k, v in gm.get("dispatch_geomean_over_cublas_M1_16_by_shape", {}).items()) +
        f"; all shapes {gm['dispatch_geomean_over_cublas_M1_16']:.3f}x; worst loss vs the per-M best "
        f"{100 * gm['dispatch_max_loss']:.1f} %")
    assert all(r["rel_err"] < 1e-2 for r in ev if r["impl"] == "dispatch" and "rel_err" in r)   # picks compute y
    fig_static

# %% [markdown]
# **Takeaway.** The flat GEMM (BLOCK_M = 16, K pipelined, split-K where N/B_N tiles would leave SMs
# idle) reads the weights faster than cuBLAS at M ≤ 16 on most Llama-2-7B shapes — by 0–12 %
# (geomean per shape, printed above), not the paper's 52 %: at M = 1 cuBLAS here already streams the
# large weights at 70–95 % of the copy bandwidth, so padding M to 64 costs it little. The shapes with
# N = 4096 (o, down; cuBLAS at 50–70 % there) are where the small tiles and split-K pay.
# Our CUDA-core GEMV (no K pipelining) loses to the pipelined flat GEMM even at M = 1, so the
# profiled table never picks it on this GPU. The dispatcher's larger value is avoiding the losses
# of a static choice: the BLOCK_M = 16 flat GEMM at M = 256 or the GEMV at M = 4 cost 2–6× there.

# %%
if S is not None:
    a81 = next((a for a in S["attention"] if a["B"] == 1 and a["L"] == 8192), None)
    e2e1 = next((e for e in S["e2e"] if e["B"] == 1), None)
    cats = ["async vs sync<br>attention (B=1, 8K)", "flat GEMM/GEMV vs<br>cuBLAS (best, M ≤ 16)",
            "dispatcher vs static<br>cuBLAS (worst M)", "decode step vs<br>plain PyTorch (B=1)"]
    paper = [1.14, 1.52, 1.29, 4.86]
    e2e_b1 = (E2E_STEP["pytorch", 1] / E2E_STEP["fdpp+graphs", 1]) if E2E is not None and ("fdpp+graphs", 1) in E2E_STEP \
        else (e2e1["speedup_vs_cublas_naive"] if e2e1 else None)
    oursv = [a81["best_sync_over_best_async"] if a81 else None, gm["best_ours_over_cublas_M1_16_max"],
             1 + worst["cublas"], e2e_b1]
    fig_pv = viz.paper_vs_ours(cats, oursv, paper, title=f"FlashDecoding++: paper (A100) vs ours ({GPU_NAME})",
                               y="speedup (×)")
    viz.caption(fig_pv, CAPTION + "<br>paper's e2e is vs HF eager; ours: the serving engine's decode step "
                "(FlashDecoding++ path + CUDA graphs vs plain PyTorch, batch 1) when flashdecoding_pp_e2e has run,<br>"
                "else a sum of measured GEMM + attention kernel times vs cuBLAS + naive attention")
    viz.save(fig_pv, SLUG, "paper_vs_ours")
    for e in S["e2e"]:
        print(f"decode step estimate B={e['B']:2d}, L={e['L']}: ours {e['ours_step_us'] / 1e3:.2f} ms "
              f"({e['ours_tokens_per_s']:.0f} tok/s), vs cuBLAS+SDPA {e['speedup_vs_cublas_sdpa']:.3f}×, "
              f"vs cuBLAS+naive {e['speedup_vs_cublas_naive']:.3f}×")
    fig_pv

# %% [markdown]
# ### End to end in the serving engine
#
# The same kernels as the model's decode path (`mlsys24.models.fast_decode`): the paged decode
# attention runs on the engine's block pool in place (no K/V gather), the linears go through the
# dispatcher, and the whole step is replayed from a CUDA graph. `python -m mlsys24.bench
# flashdecoding_pp_e2e` serves a Llama-2-7B-shaped model (random fp16 weights, prompts of 1,024
# tokens, 32 new tokens) at batch 1/8/32 and times full-batch decode steps of every variant in one
# run. "plain PyTorch" is the model with eager attention and no graphs — the role HuggingFace plays
# in the paper's 4.86×.

# %%
if E2E is None:
    print("No end-to-end results: run `PYTHONPATH=lib python3 -m mlsys24.bench flashdecoding_pp_e2e` on a GPU.")
else:
    e2e_batches = sorted({b for _, b in E2E_STEP})
    e2e_variants = [("pytorch", "plain PyTorch (eager attention)", "loop"), ("sdpa", "SDPA", "sdpa"),
                    ("sdpa+graphs", "SDPA + CUDA graphs", "baseline"),
                    ("flashdecoding+graphs", "FlashDecoding kernel + graphs", "sync"),
                    ("fdpp", "FlashDecoding++ (async + dispatcher)", "ours"),
                    ("fdpp+graphs", "FlashDecoding++ + graphs", "ours")]
    fig_e2e = go.Figure()
    for key, label, col in e2e_variants:
        ys = [E2E_STEP.get((key, b)) for b in e2e_batches]
        fig_e2e.add_bar(x=[f"batch {b}" for b in e2e_batches], y=[E2E_STEP[("pytorch", b)] / y if y else None for y, b in
                                                                  zip(ys, e2e_batches)],
                        name=label, marker_color=viz.color(col), texttemplate="%{y:.2f}×", textposition="outside",
                        marker_pattern_shape="/" if key == "fdpp" else "")
    # the paper's number as a legend entry (an annotation on the line would sit on the bars)
    fig_e2e.add_scatter(x=[f"batch {b}" for b in e2e_batches], y=[4.86] * len(e2e_batches), mode="lines",
                        line=dict(color="black", dash="dash"), name="paper: 4.86× vs HuggingFace (A100, real weights)")
    viz.apply_template(fig_e2e, title="Decode step speedup over plain PyTorch, Llama-2-7B shapes",
                       y="speedup (×, median full-batch step)")
    fig_e2e.update_layout(legend=dict(orientation="h", y=1.32, entrywidth=0.5, entrywidthmode="fraction"),
                          margin=dict(t=170))
    viz.caption(fig_e2e, f"Ours: {E2E.caption()}<br>prompt {E2E.config['prompt_len']}, {E2E.config['new_tokens']} new "
                         f"tokens; random weights (φ = {E2E.config['phi']:.2f} calibrated on this model); "
                         f"dispatcher table: {E2E.config['dispatcher_table']}")
    viz.save(fig_e2e, SLUG, "e2e_decode")
    for b in e2e_batches:
        print(f"batch {b:2d}: " + ", ".join(f"{k} {E2E_STEP[k, b]:.2f} ms" for k, _, _ in e2e_variants if (k, b) in E2E_STEP))
    fig_e2e

# %% [markdown]
# **Takeaway.** End to end, the FlashDecoding++ path decodes 4.3–8.4× faster than the plain-PyTorch
# model (H100 run; 4.9–6.7× on the H200), the paper's order of magnitude, but read the staircase: most of
# that is CUDA graphs removing per-kernel launch and Python overhead (the same thing that separates
# HuggingFace from any serving engine), and the rest is the paged split-KV kernel reading the block
# pool in place instead of gathering K/V for SDPA — 1.2× at batch 1, 1.6–2.0× at batch 8 and 32 with 1K
# contexts on the H100. Asynchronous softmax with the profiled dispatcher (this GPU's table, written by
# the kernel benchmark) over FlashDecoding with cuBLAS linears adds about 7 % at batch 1 — the flat GEMMs
# at M = 1 — and is 2–7 % slower at batch 8 and 32 on the H100 (the H200 run: +6 %, then nothing
# measurable).

# %% [markdown]
# ## 8. Claims
#
# CPU claims 1–7 were asserted where they were computed. Each GPU target of the card is printed with
# our number from the results above ("NOT REPRODUCED" when missed); the asserts below check what
# this run supports.

# %%
CLAIMS = []
if S is not None:
    def claim(name, value, target, ok):
        CLAIMS.append((name, value, target, ok))
        print(f"{'met' if ok else 'NOT REPRODUCED'}: {name}: {value} (target {target}; {GPU_NAME})")

    rows = {(a["B"], a["L"]): a for a in S["attention"]}
    b1_long = {k[1]: rows[k]["best_sync_over_best_async"] for k in rows if k[0] == 1 and k[1] >= 8192}
    claim("async/sync at B=1, KV>=8K, each at its best tiling (min over "
          f"{', '.join(f'{L // 1024}K {v:.3f}' for L, v in b1_long.items())})",
          round(min(b1_long.values()), 3), ">= 1.05", min(b1_long.values()) >= 1.05)
    # what 1.05x would take: the async kernel reading the KV cache at this share of the copy rate (the sync
    # kernel's main loop is the same; they differ only in FlashDecoding's combine pass)
    need = {k[1]: rows[k]["ours_async_pct_copy_bw"] * 1.05 / rows[k]["best_sync_over_best_async"]
            for k in rows if k[0] == 1 and k[1] >= 8192}
    print("    1.05x would need the async kernel at "
          + ", ".join(f"{L // 1024}K {v:.0f}%" for L, v in need.items()) + " of the copy rate (it runs at "
          + ", ".join(f"{rows[(1, L)]['ours_async_pct_copy_bw']:.0f}%" for L in need) + ")")
    same = {k[1]: rows[k]["async_over_sync_same_tiling_async_pick"] for k in rows if k[0] == 1 and k[1] >= 8192}
    print(f"    (info) same tiling, at the async kernel's pick: {', '.join(f'{L // 1024}K {v:.3f}' for L, v in same.items())}")
    rest = [rows[k]["best_sync_over_best_async"] for k in rows if not (k[0] == 1 and k[1] >= 8192)]
    claim("async/sync elsewhere, each at its best tiling (min)", round(min(rest), 3), ">= 1.0", min(rest) >= 1.0)
    for L in (8192, 32768):
        if (1, L) in rows:
            v = rows[(1, L)]["sdpa_best_over_ours_async"]
            claim(f"SDPA/ours at B=1, L={L}", round(v, 3), ">= 1.0", v >= 1.0)
    big = [rows[k] for k in rows if k[0] >= 8]
    if big:
        v = min(a["sdpa_best_over_ours_async"] for a in big)
        claim("SDPA/ours at B>=8 (min)", round(v, 3), ">= 0.95", v >= 0.95)
        low = min(big, key=lambda a: a["ours_async_pct_copy_bw"])
        claim(f"ours at B>=8: % of copy bandwidth (min, at B={low['B']} L={low['L']})",
              round(low["ours_async_pct_copy_bw"], 1), ">= 80", low["ours_async_pct_copy_bw"] >= 80)
    v = gm["flat16_over_flat64_M_le_8_geomean"]
    claim(f"BLOCK_M=16 vs BLOCK_M=64 at M<=8 (geomean; min {gm['flat16_over_flat64_M_le_8_min']:.3f})",
          round(v, 3), "> 1", v > 1)
    v = gm["dispatch_max_loss"]
    claim("dispatcher vs per-M best, M=1..256 (max loss)", f"{100 * v:.1f} %", "<= 5 %", v <= 0.05)
    v = gm["dispatch_geomean_over_cublas_M1_16"]
    claim("dispatcher vs cuBLAS-only, M=1..16 (geomean over the shapes)", round(v, 3), ">= 1.1", v >= 1.1)
    FLOOR_US = next((r["median_us"] for r in RES.records if r.get("bench") == "graph_floor"), None)
    if FLOOR_US is not None:
        # the most any kernel could gain here: cuBLAS's time over (its bytes at the copy rate + the fixed
        # cost of one timed call), geomean over M = 1..16 per shape, then over the shapes
        cp_GBps = next(r["GBps"] for r in RES.records if r.get("bench") == "copy")
        shp = RES.config["gemm_shapes"]
        per = {}
        for r in RES.records:
            if r.get("bench") == "gemm" and r.get("phase") == "eval" and r.get("impl") == "cublas" and r["M"] <= 16:
                N_, K_ = shp[r["shape"]]
                t_min = 2 * (N_ * K_ + r["M"] * (N_ + K_)) / cp_GBps / 1e3 + FLOOR_US
                per.setdefault(r["shape"], []).append(math.log(r["median_us"] / t_min))
        DISPATCH_BOUND = math.exp(sum(sum(v_) / len(v_) for v_ in per.values()) / len(per))
        print(f"    bound: a kernel reading the weights at the copy rate, plus this run's graph floor of "
              f"{FLOOR_US:.1f} µs per timed call, would reach {DISPATCH_BOUND:.3f}x cuBLAS-only here")

# %%
if S is not None:
    # what this run supports, asserted from the JSON
    att_s = S["attention"]
    assert all(a["best_sync_over_best_async"] >= 0.97 for a in att_s), "async more than 3 % slower than sync"
    assert max(a["best_sync_over_best_async"] for a in att_s if a["B"] == 1) > 1.0      # it pays at batch 1
    assert all(a["sdpa_best_over_ours_async"] >= 0.9 for a in att_s)                   # within 10 % of SDPA
    assert max(PATH_RATIO["CUDA cores"]) > 1.14 and max(PATH_RATIO["CUDA cores"]) > max(PATH_RATIO["tensor cores"])
    assert gm["dispatch_max_loss"] <= 0.10 and gm["dispatch_geomean_over_cublas_M1_16"] > 1.0
    assert gm["dispatch_max_loss"] < min(v for k, v in worst.items() if k != "gemv")

# %%
if E2E is not None:
    for b in e2e_batches:
        sp = E2E_STEP["pytorch", b] / E2E_STEP["fdpp+graphs", b]
        assert sp >= 2.0, (b, sp)                                  # the FlashDecoding++ path vs plain PyTorch
        assert E2E_STEP["sdpa+graphs", b] / E2E_STEP["fdpp+graphs", b] >= 0.95, b   # the kernels never cost
    big = max(e2e_batches)
    assert E2E_STEP["sdpa+graphs", big] / E2E_STEP["flashdecoding+graphs", big] >= 1.2   # in-place paged reads pay
    assert all(r["kernel_calls"] > 0 for r in E2E.records if r["kind"] == "e2e" and r["variant"].startswith("fdpp"))
    a_s = [E2E_STEP["flashdecoding+graphs", b] / E2E_STEP["fdpp+graphs", b] for b in e2e_batches]
    print(f"end to end: FlashDecoding++ path {min(E2E_STEP['pytorch', b] / E2E_STEP['fdpp+graphs', b] for b in e2e_batches):.2f}"
          f"-{max(E2E_STEP['pytorch', b] / E2E_STEP['fdpp+graphs', b] for b in e2e_batches):.2f}x over plain PyTorch "
          f"(paper 4.86x); async+dispatcher over sync+cuBLAS {min(a_s):.2f}-{max(a_s):.2f}x")
    if min(a_s) < 1.0:
        print("NOT REPRODUCED: end to end, the asynchronous softmax + dispatcher step is not faster than the "
              "synchronized kernel with cuBLAS linears on this GPU")

# %% [markdown]
# **Takeaway.** On an H100 and an H200 with Triton the three ideas are implemented and correct (the
# asynchronous kernel's fallback included), but they buy less than the paper's CUDA kernels did on
# an A100: both attention flavours run at the memory roofline, so asynchronous ≈ synchronized softmax
# on the fast tensor-core path (the unified max pays 1.1–1.3× only on the compute-heavier CUDA-core
# path); the split-K flat GEMM beats cuBLAS by about 5 % (geomean, M ≤ 16) rather than 52 %, because
# cuBLAS already streams the large weights near the bandwidth limit; and the dispatcher's value is
# mostly avoiding the large losses of a wrong static choice (it stays within a few per cent of the
# per-M best). End to end in the serving engine the path is 4-8× faster than plain PyTorch, like the
# paper's 4.86×, but mostly through CUDA graphs and in-place paged reads, not through the asynchronous
# softmax. The newest run is on an H100, the card the issue names, and the bounds printed with the
# claims say how far each missed target is from what the card allows:
# - async/sync at batch 1 from 8K: 1.008-1.015×. The two kernels share their main loop and differ only
#   in FlashDecoding's combine pass, so 1.05× would need the asynchronous kernel to read the KV cache at
#   90 % / 98 % / 103 % of the copy rate at 8K / 16K / 32K; it reads at 86 % / 95 % / 100 %. At 32K the
#   target asks for more than a device copy achieves.
# - dispatcher 1.050× cuBLAS-only at M ≤ 16: a kernel streaming the weights at the full copy rate, plus
#   the 4.8 µs that every timed call costs here (the graph floor, measured in the same run), would reach
#   1.093×, so 1.1× is out of reach on this card.
# - the dispatcher's largest loss to the per-M best, 5.05 % (target 5 %), is the o projection at M = 8,
#   where cuBLAS switches to a faster kernel (17.1 µs, 17.8-18.4 µs for the flat GEMM) and the paper's
#   two-threshold table (GEMV up to M1, flat GEMM up to M2, cuBLAS beyond) cannot pick cuBLAS for that
#   one M while flat GEMM wins at M = 4 and 12 (3.5-5.9 % in other H100 runs). The profile and
#   evaluation points take the lower of two medians: in one H100 run a single disturbed series
#   (cuBLAS 189 µs instead of 105 µs at lm_head, M = 192) had set that shape's flat-GEMM threshold at 192.
#
# ## 9. Explore

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W

    phi_s = W.FloatSlider(value=phi, min=phi - 20, max=phi + 20, step=0.25, description="φ (nats)")
    dt_t = W.ToggleButtons(options=["fp16", "fp32"], value=P_DTYPE, description="P dtype")
    layer_d = W.Dropdown(options=list(HISTS), value="all layers", description="layer")
    out_phi = W.Output()
    val_all = {f"layer {i}": v for i, v in enumerate(val_logits)}
    val_all["all layers"] = torch.cat(val_logits)
    val_rowmax = {k: v.max(-1).values for k, v in val_all.items()}

    def show_phi(*_):
        lo, hi = safe_band(torch.float16 if dt_t.value == "fp16" else torch.float32)
        d = val_rowmax[layer_d.value] - phi_s.value
        rate = float(((d > hi) | (d < lo)).float().mean())
        f = go.Figure(go.Bar(x=centres, y=HISTS[layer_d.value], marker_color=viz.color("ours")))
        f.add_vrect(x0=phi_s.value + hi, x1=BINS[-1], fillcolor="red", opacity=0.08, line_width=0,
                    annotation_text="overflow zone (row max)")
        f.add_vrect(x0=BINS[0], x1=phi_s.value + lo, fillcolor="blue", opacity=0.06, line_width=0,
                    annotation_text="underflow zone (row max)")
        f.add_vline(x=phi_s.value, line_dash="dash")
        viz.apply_template(f, title=f"{layer_d.value}: recompute rate on validation {100 * rate:.3f} %",
                           x="x (nats)", y="fraction")
        f.update_yaxes(type="log")
        with out_phi:
            out_phi.clear_output(wait=True)
            f.show()

    for wdg in (phi_s, dt_t, layer_d):
        wdg.observe(show_phi, names="value")
    bn_s = W.IntSlider(value=32, min=8, max=256, step=8, description="B_N")
    n_s = W.IntSlider(value=4096, min=1024, max=32768, step=1024, description="N")
    m_s = W.IntSlider(value=8, min=1, max=64, description="M")
    out_cmr = W.Label()

    def show_cmr(*_):
        out_cmr.value = (f"CMR = {fg.cmr(m_s.value, 4096, bn_s.value):.1f} FLOP/element; blocks = N/B_N = "
                         f"{n_s.value / bn_s.value:.0f} (A100 108 SMs, H100 132 SMs)")

    for wdg in (bn_s, n_s, m_s):
        wdg.observe(show_cmr, names="value")
    show_phi()
    show_cmr()
    boxes = [W.HTML("<b>φ over the logit histogram</b>"), W.HBox([phi_s, dt_t, layer_d]), out_phi,
             W.HTML("<b>Flat GEMM tiling</b>"), W.HBox([bn_s, n_s, m_s]), out_cmr]
    if S is not None:
        ev_rows = {}
        for r in ev:
            ev_rows.setdefault((r["shape"], r["M"]), {})[r["impl"]] = r["median_us"]
        shape_d = W.Dropdown(options=shape_names, description="shape")
        mgpu = W.SelectionSlider(options=sorted({r["M"] for r in ev}), description="M")
        out_m = W.HTML()

        def show_m(*_):
            rowm = ev_rows.get((shape_d.value, mgpu.value), {})
            pick = next((r.get("picked") for r in ev if r["shape"] == shape_d.value and r["M"] == mgpu.value
                         and r["impl"] == "dispatch"), None)
            out_m.value = "<br>".join(f"{k}: {v:.1f} µs" for k, v in sorted(rowm.items(), key=lambda kv: kv[1])) + \
                f"<br><b>dispatcher picks: {pick}</b>"

        shape_d.observe(show_m, names="value")
        mgpu.observe(show_m, names="value")
        show_m()
        boxes += [W.HTML(f"<b>GPU: implementations at one M</b> ({CAPTION})"), W.HBox([shape_d, mgpu]), out_m]
    display(W.VBox(boxes))  # noqa: F821

# %% [markdown]
# ## Going further
#
# - GPU scale: `PYTHONPATH=lib python3 -m mlsys24.bench flashdecoding_pp` (batch 1–64, KV 1K–32K,
#   all Llama-2-7B weight shapes; about 80 s on an H200, `budget=S` bounds it), then re-run this
#   notebook (`BENCH="json"`), or
#   `papermill notebooks/11_flashdecoding_pp.ipynb runs/11.ipynb -p BENCH auto -p STATS_TOKENS 16384`
#   on the GPU machine.
# - Workshop questions:
#   1. The fp32 CUDA-core path has a ±60-nat band: when is a unified max still worth it if the
#      kernel never rounds P to fp16? (Hint: the running max is not the only cost; the combine is.)
#   2. Where does the recompute rate come from on the tiny Llama — early positions, particular heads,
#      or layers? Try per-layer φ (`cal_layers`) and compare.
#   3. The asynchronous kernel ends with atomics and a "last split normalizes" ticket. What breaks if
#      two streams run it concurrently with the same workspace, and how would you fix it?
#   4. Why does a BLOCK_M = 16 flat GEMM beat a BLOCK_M = 64 one at M ≤ 8 even though both are
#      memory-bound? (Look at registers, shared memory per stage, and blocks per SM.)
#   5. Build the dispatcher table on one GPU and use it on another: how much of the 5 % budget is lost?
#   6. In the H200 sweep, 16 splits at batch 1 (512 programs) are ~15 % slower than 8 splits (256
#      programs) in both flavours, and so are 2 splits at batch 8. Why? (Hint: compute the shared
#      memory and registers per CTA of 64-token tiles with 3 stages, hence CTAs per SM, and count the
#      waves 256 and 512 programs take on 132 SMs.)
