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
#     headline: "Paper: the f1\xB2\u2218g1\xB2 PAF keeps ResNet-18/ImageNet at 69.4%\
#       \ (= plaintext) and is 7.81x faster than a 27-degree minimax PAF. Ours (digits\
#       \ CNN, TenSEAL CKKS N=32768 128-bit on CPU): CT+PA+AT lifts the five low-degree\
#       \ PAFs from 95.8% (direct) to 97.8% mean (plaintext 97.8%, equal-epoch fine-tuning\
#       \ 96.6%); one encrypted f1\u2218g2 ReLU costs about half the CPU time of the\
#       \ 27-degree stand-in (no bootstrapping in that comparison); VGG-11-bn on 32x32\
#       \ digits (H200, 1 seed): f1\xB2\u2218g1\xB2 CT+PA+AT+DS 0.28 points below plaintext\
#       \ (paper, VGG-19-bn/CIFAR-10: 0.35)"
#     paper: '15'
#     slug: smartpaf
#     status: reproduced
# ---

# %% [markdown]
# # SmartPAF: Accurate Low-Degree Polynomial Approximation of Non-Polynomial Operators for Fast Private Inference in Homomorphic Encryption
#
# Jianming Tong, Jingtian Dang, Anupam Golder, Callie Hao, Arijit Raychowdhury, Tushar Krishna (Georgia Tech) ·
# MLSys 2024 · [arXiv 2404.03216](https://arxiv.org/abs/2404.03216) · official code
# [EfficientFHE/SmartPAF](https://github.com/EfficientFHE/SmartPAF) (PyTorch training only, no FHE library).
#
# **The idea in one paragraph.** CKKS homomorphic encryption computes only additions and multiplications,
# so ReLU and MaxPool must become polynomials: ReLU(x) = (x + x·sign(x))/2, max(a,b) = ((a+b) + (a−b)·sign(a−b))/2,
# and sign is replaced by a *polynomial approximation function* (PAF), e.g. a composite odd polynomial
# f1∘g2. Every multiplication level costs latency, and running out of levels forces bootstrapping, so
# accurate high-degree PAFs (27-degree minimax) are slow, while cheap low-degree ones (8–14 "degree")
# wreck accuracy when dropped in. SmartPAF keeps the low-degree PAFs and wins the accuracy back by training:
# **Coefficient Tuning** (fit each PAF's coefficients to its layer's real input distribution),
# **Progressive Approximation** (replace one layer at a time, fine-tuning in between), **Alternate
# Training** (alternate between the PAF coefficients and the preceding conv/BN weights) and **Dynamic →
# Static Scale** (normalise by the batch max in training, by a fixed training-set max in deployment,
# since FHE cannot compute a max).
#
# This notebook implements all four techniques as reusable modules (`mlsys24.privacy`) that replace the
# ReLU/MaxPool layers of any torch model, runs the technique ablation on a small CNN over sklearn's digits,
# and times the PAFs under **real CKKS encryption** (TenSEAL, 128-bit security) on this CPU — including an
# encrypted conv + BN + PAF-ReLU layer on packed digit images, checked against its plaintext twin.

# %% tags=["parameters"]
PAFS = ["f1g2", "f2g2", "f2g3", "2f12g1", "a7"]     # PAFs of the technique ablation (the paper's five)
TECHNIQUES = ["direct", "ct", "baseline_ds", "ct_pa_at"]  # technique sets ("pa_at", "ct_pa" also available)
LIVE_PAFS = ["f1g2"]        # PAFs trained live; the others of PAFS come from the committed run (= PAFS: all live)
WIDTHS = [8, 16]            # conv widths of the digits CNN (card: 16/32, see section 2 for why 8/16)
FLOAT_EPOCHS = 15           # float training epochs
GROUP_EPOCHS = 2            # AT epochs per parameter group (official: 20)
MAX_GROUPS = 3              # AT groups per layer at most (our budget cap)
CT_EPOCHS = 10              # CT epochs per layer (official: 40)
LR_C = 1e-3                 # AT coefficient learning rate (official: 1e-4, see section 2)
LR_W = 1e-3                 # AT weight learning rate (official: LR_C / 10)
ORDER = "code"              # composition order: "code" (first listed applied first) or "g_first"
DEPLOY_SCALE = "SS"         # scale of the deployed model: "SS" (static, FHE-compatible) or "DS"
CKKS_POLY_DEGREE = 32768    # CKKS ring degree (only 32768 holds the [60]+[40]x19+[60] chain at 128-bit)
CKKS_E2E_PAFS = ["f1g2", "a7", "deg27"]   # PAFs timed end to end under encryption, live
CKKS_LIVE_DEPTHS = [0, 9, 18]             # depths whose per-level op costs are re-measured live
FHE_PAF = "f1g2"            # PAF of the encrypted conv + BN + PAF-ReLU layer
FHE_IMAGES = 32             # test images packed into one ciphertext per tap (32 x 8 ch x 64 px = 16384 slots)
BOOTSTRAP_MS = 0.0          # ms charged per bootstrap in the network-level model (0: not charged)
VGG_BENCH = "auto"          # VGG-11-bn study: "auto" (re-run seed 0 live on a GPU, else the committed JSON), "json", "skip"
SEED = 0                    # seed of the data split, the models and the training order
INTERACTIVE = True          # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, ListOf, validate
from mlsys24.privacy.paf import PAF_FAMILIES, SMARTPAF_PAFS
from mlsys24.privacy.techniques import TECHNIQUES as _TECH

validate(globals(), PAFS=ListOf(Choice(*SMARTPAF_PAFS), min_len=1), TECHNIQUES=ListOf(Choice(*_TECH), min_len=1),
         LIVE_PAFS=ListOf(Choice(*SMARTPAF_PAFS)), WIDTHS=ListOf(Int(1, 64), min_len=2, max_len=2),
         FLOAT_EPOCHS=Int(1, 500), GROUP_EPOCHS=Int(1, 100), MAX_GROUPS=Int(1, 50), CT_EPOCHS=Int(0, 500),
         LR_C=Float(0, 1, lo_open=True), LR_W=Float(0, 1, lo_open=True), ORDER=Choice("code", "g_first"),
         DEPLOY_SCALE=Choice("SS", "DS"), CKKS_POLY_DEGREE=Choice(32768),
         CKKS_E2E_PAFS=ListOf(Choice(*PAF_FAMILIES), min_len=1), CKKS_LIVE_DEPTHS=ListOf(Int(0, 18), min_len=1),
         FHE_PAF=Choice(*SMARTPAF_PAFS), FHE_IMAGES=Int(1, 4096), BOOTSTRAP_MS=Float(0, 1e7),
         VGG_BENCH=Choice("auto", "json", "skip"), SEED=Int(0), INTERACTIVE=Bool())
if not set(LIVE_PAFS) <= set(PAFS):
    raise ValueError(f"parameter 'LIVE_PAFS' = {LIVE_PAFS}: must be a subset of PAFS = {PAFS}")
if FHE_IMAGES * WIDTHS[0] * 64 > CKKS_POLY_DEGREE // 2:
    raise ValueError(f"parameter 'FHE_IMAGES' = {FHE_IMAGES}: {FHE_IMAGES} x {WIDTHS[0]} channels x 64 pixels "
                     f"exceeds the {CKKS_POLY_DEGREE // 2} slots of one ciphertext")

# %%
import dataclasses
import json
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.bench import environment, gpu_results, load_results
from mlsys24.privacy import ckks
from mlsys24.privacy.ablation import DEFAULT_STUDY, StudyConfig, digits_study, float_model
from mlsys24.privacy.digits import evaluate
from mlsys24.privacy.paf import (PAF_LABELS, components_of, make_sign, paf_info, paf_numpy, relu_form_numpy,
                                 replace_nonpolynomial)
from mlsys24.privacy.techniques import TECHNIQUES as TECH_NAMES
from mlsys24.privacy.techniques import collect_layer_inputs, to_static

T_START = time.perf_counter()
SLUG = "smartpaf"
# one colour per PAF and per technique set in every figure of this notebook
PAF_COLORS = {"f1g2": "#1f77b4", "f2g2": "#17becf", "f2g3": "#2ca02c", "2f12g1": "#d62728", "a7": "#ff7f0e",
              "deg27": "#000000"}
TECH_COLORS = {"direct": "#7f7f7f", "ct": "#2ca02c", "baseline_ds": "#1f77b4", "ct_pa_at": "#d62728",
               "pa_at": "#9467bd", "ct_pa": "#ff7f0e"}
torch.set_num_threads(1)   # tiny tensors: one thread is as fast, deterministic, and CKKS (SEAL) is single-threaded too
ENV = environment("cpu")
print(f"device: {ENV['device']}, torch {ENV['torch']}, {torch.get_num_threads()} torch thread")
torch.manual_seed(SEED)

# %% [markdown]
# ## 1. Reference: the PAFs, in plain float64
#
# Each PAF is a list of odd polynomials applied in list order (the official `Sign_minmax_layer` applies
# the first one first: `f1g2` = g2(f1(u))). The reference below is the official evaluation scheme
# (u², then u^(2i+1) = u^(2i−1)·u²) in float64 PyTorch; the library's `SignPAF` (fused Horner forward,
# analytic backward, float32) and NumPy's `polyval` must agree with it. `deg27` is our stand-in for the
# paper's 27-degree minimax PAF (not published with the code): the odd least-squares fit of sign on
# [−1, −0.05] ∪ [0.05, 1].

# %%
def sign_paf_ref(u: torch.Tensor, components) -> torch.Tensor:
    """Composite odd polynomial, official power-chain evaluation, float64."""
    for c in components:
        u2, p, out = u * u, u, u * c[0]
        for ci in c[1:]:
            p = p * u2
            out = out + p * ci
        u = out
    return u


grid = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
rows = []
for paf in list(PAF_FAMILIES):
    comps = components_of(paf, ORDER)
    ref = sign_paf_ref(grid, comps)
    lib = make_sign(paf, order=ORDER, dtype=torch.float64).poly(grid).detach()
    npv = paf_numpy(grid.numpy(), comps)
    x = grid.numpy()
    far = np.abs(x) >= 0.3
    rows.append({"paf": paf, "label": PAF_LABELS[paf], "max|lib-ref|": float((lib - ref).abs().max()),
                 "max|numpy-ref|": float(np.abs(npv - ref.numpy()).max()),
                 "odd: max|p(-x)+p(x)|": float(np.abs(paf_numpy(-x, comps) + npv).max()),
                 "min p(x)·x, |x|>=0.05": float((npv * x)[np.abs(x) >= 0.05].min()),
                 "ReLU err |x|>=0.3 (code order)": float(np.abs(relu_form_numpy(x, components_of(paf)) - np.maximum(x, 0))[far].max()),
                 "ReLU err |x|>=0.3 (g first)": float(np.abs(relu_form_numpy(x, components_of(paf, "g_first")) - np.maximum(x, 0))[far].max())})
paf_table = pd.DataFrame(rows).set_index("paf")
paf_table.round(6)

# %%
# Claim 1 (PAF sanity, deterministic): odd, sign-correct away from 0, the library equals the reference,
# alpha=7 is the most accurate, and before any tuning the g-first order beats the code's f-first order.
for paf, r in paf_table.iterrows():
    assert r["max|lib-ref|"] < (1e-9 if paf != "deg27" else 1e-6), paf
    assert r["odd: max|p(-x)+p(x)|"] < 1e-9 and r["min p(x)·x, |x|>=0.05"] > 0, paf
assert paf_table.loc["a7", "ReLU err |x|>=0.3 (code order)"] < 0.01
for paf in ("f1g2", "f2g2", "f2g3", "2f12g1"):
    assert paf_table.loc[paf, "ReLU err |x|>=0.3 (g first)"] < paf_table.loc[paf, "ReLU err |x|>=0.3 (code order)"]

xs = np.linspace(-1, 1, 801)
fig_paf = go.Figure()
fig_paf.add_scatter(x=xs, y=np.sign(xs), name="sign(x)", line=dict(color="black", dash="dot"))
for paf in PAF_FAMILIES:
    fig_paf.add_scatter(x=xs, y=paf_numpy(xs, components_of(paf, ORDER)), name=PAF_LABELS[paf],
                        line=dict(color=PAF_COLORS[paf]))
viz.apply_template(fig_paf, title="PAFs with their initial coefficients (order: " + ORDER + ")",
                   x="input u = x / s", y="PAF(u)")
viz.caption(fig_paf, "f·/g· from Cheon et al. (IACR ePrint 2019/1234), α=7 from Lee et al.; 27-degree: our least-squares stand-in.")
viz.save(fig_paf, SLUG, "paf_curves")
fig_paf

# %% [markdown]
# **Takeaway.** The library's PAFs match the float64 reference to rounding, are odd and sign-correct away
# from 0. Dropped in with their published coefficients, the low-degree f/g composites are poor sign
# approximations near 0 (ReLU error 0.05–0.13 for |x| ≥ 0.3 in the code's order; 2–10x better if g ran
# first, which is why tuning them pays), while α=7 is already accurate (0.007). The 27-degree
# least-squares fit is accurate in the middle but ripples (0.04): a single polynomial of degree 27 is
# weaker than a composite of the same cost, so the stand-in is a *latency* baseline first.

# %% [markdown]
# ## 2. The techniques on a digits CNN (live + committed run)
#
# The model: conv(1→8)–BN–ReLU–MaxPool → conv(8→16)–BN–ReLU–MaxPool → FC, 4 non-polynomial ops, 15 float
# epochs on 1149 training images (288 for validation, 360 for test). **Scale-downs.** The card's 16/32
# widths are so over-provisioned on digits that direct PAF replacement loses < 0.6 points (measured while
# building this notebook), leaving nothing for the techniques to recover; at 8/16 direct replacement loses
# up to 3.3 points. AT groups are 2 epochs (official 20), at most 3 groups per layer, CT 10 epochs on the
# inputs of 300 training images. Learning rates are 10x the official `lr_c` (a group is 36 Adam steps here
# against ~10^5 on ImageNet); the committed run also holds the official learning rates, shown below.
#
# Technique sets: **direct** (initial coefficients, DS, no training) · **ct** (CT on the float model's
# layer inputs, no fine-tuning) · **baseline_ds** (direct, then joint fine-tuning of every weight and
# coefficient for exactly as many epochs as CT+PA+AT used for that PAF) · **ct_pa_at** (SmartPAF).
# Every trained model is evaluated with Dynamic Scale and after switching to Static Scale (per sign module,
# max |input| over the training split).
#
# To stay inside the CPU budget, the PAFs of `LIVE_PAFS` are trained here, live; the others are read from
# `data/results/smartpaf/cpu.ablation.json`, written by the committed script
# `PYTHONPATH=lib python -m mlsys24.privacy.ablation` (same code, same configuration, one thread) — the live
# PAFs are compared with it below. Set `LIVE_PAFS = PAFS` to train everything here (≈80 s more CPU).

# %%
tcfg = dataclasses.replace(DEFAULT_STUDY.technique, group_epochs=GROUP_EPOCHS, max_groups=MAX_GROUPS,
                           ct_epochs=CT_EPOCHS, lr_c=LR_C, lr_w=LR_W, seed=SEED)
study = StudyConfig(widths=tuple(WIDTHS), float_epochs=FLOAT_EPOCHS, seed=SEED, order=ORDER, technique=tcfg)

stored = [r for r in load_results(SLUG) if r.path.name.endswith(".ablation.json")]
stored_recs = []
if stored and stored[0].config["studies"]["default"]["config"] == json.loads(json.dumps(study.as_dict())):
    stored_recs = [r for r in stored[0].records if r["study"] == "default"]
    print("committed run:", stored[0].caption())
live_pafs = list(PAFS) if not stored_recs else [p for p in PAFS if p in LIVE_PAFS]
missing = [(p, t) for p in PAFS if p not in live_pafs for t in TECHNIQUES
           if not any(r["paf"] == p and r["technique"] == t for r in stored_recs)]
if missing:
    print(f"the committed run lacks {missing}: training every PAF live")
    live_pafs = list(PAFS)
if not stored_recs:
    print("no committed run with this configuration: every PAF is trained live")

t0 = time.perf_counter()
net, data = float_model(study)
live_recs, live_models, summary = digits_study(study, live_pafs, TECHNIQUES, model=net, data=data, keep_models=True)
T_TRAIN = time.perf_counter() - t0
FLOAT_ACC = summary["float_test_acc"]
print(f"float digits CNN: {FLOAT_ACC:.2f} % test accuracy; live PAFs {live_pafs}: {T_TRAIN:.1f} s")

for r in live_recs:
    r["source"] = "live"
recs = live_recs + [dict(r, source="committed") for r in stored_recs
                    if r["paf"] in PAFS and r["paf"] not in live_pafs and r["technique"] in TECHNIQUES]
abl = pd.DataFrame(recs)
acc_table = abl.pivot_table(index=["technique", "scale"], columns="paf", values="test_acc")[PAFS]
acc_table = acc_table.reindex([t for t in TECH_NAMES if t in TECHNIQUES], level=0)
acc_table["mean"] = acc_table.mean(axis=1)
acc_table.round(2)

# %%
# The live PAFs against the committed run (same code and configuration: equal on the same machine; another
# CPU's float rounding can move a prediction or two).
if stored_recs and live_recs:
    cmp_rows = []
    for r in live_recs:
        s = next((x for x in stored_recs if (x["paf"], x["technique"], x["scale"]) == (r["paf"], r["technique"], r["scale"])), None)
        if s is not None:
            cmp_rows.append({"paf": r["paf"], "technique": r["technique"], "scale": r["scale"], "live": r["test_acc"],
                             "committed": s["test_acc"], "Δ": r["test_acc"] - s["test_acc"]})
    cmp_df = pd.DataFrame(cmp_rows)
    print(f"live vs committed: max |Δ| = {cmp_df['Δ'].abs().max():.2f} points over {len(cmp_df)} records "
          f"(committed float accuracy {stored[0].config['studies']['default']['float_test_acc']:.2f} %, live {FLOAT_ACC:.2f} %)")
    official = pd.DataFrame([r for r in stored[0].records if r["study"] == "official_lr"])
    if len(official):
        t_off = official.pivot_table(index=["technique", "scale"], columns="paf", values="test_acc")
        t_off = t_off[[p for p in PAFS if p in t_off.columns]]
        t_off["mean"] = t_off.mean(axis=1)
        print("committed run with the official learning rates (lr_c 1e-4, lr_w 1e-5):")
        display(t_off.round(2))

# %% [markdown]
# **Takeaway.** On this run direct replacement costs up to a few points, CT alone — no training at all, only
# the coefficients refitted to each layer's real input distribution — wins back a large part of it, and
# the full CT+PA+AT pipeline brings every PAF back to about the float accuracy. Joint fine-tuning with the
# same number of epochs (baseline+DS) recovers less. With the official, much smaller learning rates the
# 2-epoch groups barely move the weights and the pipeline and the baseline end close together (committed
# table above): at this scale the ordering of the trained sets depends on the training budget, the CT
# effect does not. What this does not show: a 97 %-accurate 10-class task leaves a few points to recover,
# not the 40–60 points of ResNet-18 on ImageNet.

# %%
# Claim 2: CT never worsens a layer's fit (best-so-far checkpoint) and, on average, reduces it clearly.
ct_rows = [(r["paf"], r["technique"], i, a, b) for r in recs if r["scale"] == "DS"
           for i, (a, b) in enumerate(zip(r["ct_mse_init"], r["ct_mse_best"]))]
ct_df = pd.DataFrame(ct_rows, columns=["paf", "technique", "layer", "mse_init", "mse_after_ct"])
ct_df["ratio"] = ct_df["mse_after_ct"] / ct_df["mse_init"]
print(ct_df.groupby(["technique", "paf"])["ratio"].describe()[["mean", "min", "max"]].round(3))
assert (ct_df["mse_after_ct"] <= ct_df["mse_init"]).all()
assert ct_df["ratio"].mean() < 0.9, "CT should cut the per-layer PAF error by more than 10 % on average"

# %% [markdown]
# ## 3. Under encryption: TenSEAL CKKS on this CPU
#
# One context for everything: N = 32768 (16384 slots), modulus chain [60] + [40]×19 + [60] = 880 bits,
# scale 2^40 — **128-bit secure** (HomomorphicEncryption.org limit 881 bits at N = 32768; SEAL rejects the
# same chain at N = 16384, limit 438). 19 rescalings fit, so one PAF-ReLU (depth ≤ 16) needs no
# bootstrapping (TenSEAL has none). Each odd component of degree 2m+1 is evaluated with m+1
# ciphertext products at depth m+2 (the official code's power chain, done in the Chebyshev basis so the
# 27-degree fit's 1e8 monomial coefficients do not amplify CKKS noise; same products, same depth).
#
# Costs come from two places, both measured on this machine's CPU: the per-level cost of each op at every
# depth 0..18 and the end-to-end latency of every PAF, written by the committed script
# `PYTHONPATH=lib python -m mlsys24.privacy.ckks_bench` to `data/results/smartpaf/cpu.json`; and a live
# re-measurement here of the ops at `CKKS_LIVE_DEPTHS`, of `CKKS_E2E_PAFS` end to end, and of the encrypted
# layer. PAFs not timed live get **modelled** latencies: their traced op sequence times the per-level costs
# (scaled by the live/committed ratio of the re-measured ops). Latency is reported as the CPU time of the
# evaluating thread (SEAL runs every op single-threaded on it; on an idle machine this is the wall time,
# also reported): the 2 cores here are shared, and wall-clock times of the same PAF vary by 2x with the load.

# %%
info = ckks.context_info(CKKS_POLY_DEGREE)
print(info)
assert info["security_bits"] >= 128 and ckks.security_bits(16384, ckks.CHAIN) == 0
t0 = time.perf_counter()
ctx = ckks.make_context(CKKS_POLY_DEGREE)
T_KEYGEN = time.perf_counter() - t0
print(f"context + keys: {T_KEYGEN:.1f} s")

ckks_files = [r for r in load_results(SLUG) if r.path.name == "cpu.json"]
t0 = time.perf_counter()
live_costs = ckks.measure_level_costs(ctx, CKKS_LIVE_DEPTHS, repeats=1, warmup=0)
T_LEVELS = time.perf_counter() - t0
if ckks_files:
    stored_costs = ckks.LevelCosts.from_records(ckks_files[0].records)
    ratios = [live_costs.seconds[op][d] / stored_costs.seconds[op][d] for op in ("ct_mul", "pt_mul")
              for d in CKKS_LIVE_DEPTHS]
    CALIB = float(np.median(ratios))
    costs = stored_costs.scaled(CALIB)
    COST_SOURCE = f"per-level costs from {ckks_files[0].path.name} ({ckks_files[0].caption()}), x{CALIB:.2f} live calibration"
else:
    CALIB, costs = 1.0, live_costs
    COST_SOURCE = f"per-level costs measured live at depths {CKKS_LIVE_DEPTHS} (linear in between)"
print(COST_SOURCE)
lvl = pd.DataFrame([{"depth": d, "op": op, "live_cpu_ms": live_costs.seconds[op][d] * 1e3,
                     "live_wall_ms": live_costs.wall[op][d] * 1e3,
                     "committed_cpu_ms": (stored_costs.seconds[op][d] * 1e3 if ckks_files else np.nan)}
                    for op in live_costs.seconds for d in CKKS_LIVE_DEPTHS])
lvl.round(1)

# %%
# Each PAF timed in E2E_ROUNDS interleaved rounds (f1g2, a7, deg27, f1g2, ...), keeping each PAF's fastest
# round: the least disturbed by other processes on the shared cores.
E2E_ROUNDS = 2
e2e = {}
t0 = time.perf_counter()
for _ in range(E2E_ROUNDS):
    for paf in CKKS_E2E_PAFS:
        r = ckks.time_relu_paf(ctx, components_of(paf, ORDER), name=paf, seed=SEED)
        if paf not in e2e or r.cpu_seconds < e2e[paf].cpu_seconds:
            e2e[paf] = r
T_E2E = time.perf_counter() - t0

lat_rows = []
for paf in list(PAF_FAMILIES):
    comps = components_of(paf, ORDER)
    pi = paf_info(paf)
    tr = ckks.trace_relu(comps)
    row = {"paf": paf, "label": PAF_LABELS[paf], "degree_sum": pi.degree_sum, "composed_degree": pi.composed_degree,
           "ct_mults": tr.count("ct_mul"), "pt_mults": tr.count("pt_mul"), "depth": tr.ops[-1].depth,
           "modelled_ms": ckks.model_latency(tr, costs) * 1e3}
    if paf in e2e:
        row.update(measured_ms=e2e[paf].seconds * 1e3, measured_cpu_ms=e2e[paf].cpu_seconds * 1e3,
                   ckks_max_abs_err=e2e[paf].max_abs_err)
    if ckks_files:
        rec = next((r for r in ckks_files[0].records if r.get("kind") == "paf_e2e" and r["paf"] == paf), None)
        row["committed_cpu_ms"] = rec["cpu_s"] * 1e3 if rec else np.nan
    lat_rows.append(row)
lat = pd.DataFrame(lat_rows).set_index("paf")
lat["latency_ms"] = lat["measured_cpu_ms"].fillna(lat["modelled_ms"])
lat["latency_source"] = np.where(lat["measured_cpu_ms"].notna(), "measured live", "modelled")
lat.round(1).assign(ckks_max_abs_err=lat["ckks_max_abs_err"].map(lambda v: f"{v:.1e}" if v == v else ""))

# %% [markdown]
# ### The encrypted layer: conv + BN + PAF-ReLU on packed digit images
#
# The first block of the deployed (`DEPLOY_SCALE`) SmartPAF model of `FHE_PAF`, run on `FHE_IMAGES` test
# images under encryption: the client im2cols and encrypts 9 ciphertexts (one per 3×3 tap), slot
# (image, channel, pixel); the server multiplies each by the tap's weights (BN folded in, divided by the
# layer's static scale, so the ciphertext holds u = BN(conv(x))/s) and adds them, then evaluates the
# tuned PAF-ReLU. The plaintext twin is the torch model's own layer on the same images.

# %%
key = (FHE_PAF, "ct_pa_at", DEPLOY_SCALE)
if key not in live_models:
    _, mdl, _ = digits_study(study, [FHE_PAF], ["ct_pa_at"], model=net, data=data, keep_models=True)
    deployed = mdl[key]
else:
    deployed = live_models[key]
deployed.eval()
conv, bn, relu_paf = deployed.conv1, deployed.bn1, deployed.relu1
imgs = data.x_test[:FHE_IMAGES]
with torch.no_grad():
    pre = bn(conv(imgs))                                              # [B, C, 8, 8]
    s = relu_paf.sign.scale(pre).item()                               # static scale (or this batch's max if DS)
    twin_torch = relu_paf(pre)                                        # plaintext layer output
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_fold = (conv.weight * g[:, None, None, None]) / s               # [C, 1, 3, 3]
    b_fold = ((conv.bias - bn.running_mean) * g + bn.bias) / s        # [C]
comps_tuned = relu_paf.sign.coefficient_lists()
t0 = time.perf_counter()
enc_layer = ckks.encrypted_conv_relu(ctx, imgs.double().numpy(), w_fold.double().numpy(), b_fold.double().numpy(), comps_tuned)
T_LAYER = time.perf_counter() - t0
out_plain_units = enc_layer.output * s
err_twin = float(np.abs(enc_layer.output - enc_layer.twin).max())
err_torch = float(np.abs(out_plain_units - twin_torch.double().numpy()).max())
u_max = float(pre.abs().max() / s)
print(f"{FHE_IMAGES} images x {conv.out_channels} channels x 64 pixels = {enc_layer.output.size} slots, depth {enc_layer.depth}")
print(f"encrypt {enc_layer.encrypt_s:.2f} s, conv {enc_layer.linear_s:.2f} s, PAF-ReLU {enc_layer.paf_s:.2f} s, decrypt {enc_layer.decrypt_s:.2f} s")
print(f"max |decrypted - float64 twin| = {err_twin:.2e} (u units);  max |decrypted·s - torch layer| = {err_torch:.2e} "
      f"(activation units, layer output max {float(twin_torch.abs().max()):.2f});  max |u| = {u_max:.2f}")

# %%
# Claim 6: CKKS correctness at 128-bit security.
CKKS_TOL = 1e-2
for paf, r in e2e.items():
    assert r.max_abs_err < CKKS_TOL and r.max_abs_err_exact < CKKS_TOL, (paf, r.max_abs_err)
assert err_twin < CKKS_TOL, err_twin
assert err_torch < CKKS_TOL * max(1.0, s), err_torch

# %% [markdown]
# ## 4. Back-of-envelope: levels, products, bootstraps
#
# A ReLU-PAF of a composite with components of degrees d_k = 2m_k+1 uses Σ(m_k+1) + 1 ciphertext products
# and Σ(m_k+2) + 1 levels. The whole digits CNN in one ciphertext pipeline needs, per block, 1 level for the
# conv (plaintext weights), the ReLU-PAF, and two rounds of max for the 2×2 pool (each round a sign PAF
# plus one product) — so already this 4-op network exceeds 19 levels and would need bootstrapping for every
# PAF; the paper's point is that fewer levels per PAF mean fewer bootstraps, which dominate latency.

# %%
env_rows = []
for paf in list(PAF_FAMILIES):
    pi = paf_info(paf)
    net_levels = 2 * (1 + pi.depth_relu + 2 * (pi.depth_sign + 1)) + 1
    n_boot = max(0, int(np.ceil(net_levels / ckks.max_depth())) - 1)
    env_rows.append({"paf": paf, "sign depth": pi.depth_sign, "ReLU depth": pi.depth_relu,
                     "ct products / ReLU": pi.ct_mults_relu, "network levels": net_levels,
                     "refreshes needed (19 levels each)": n_boot,
                     "bootstrap ms charged": n_boot * BOOTSTRAP_MS})
env = pd.DataFrame(env_rows).set_index("paf")
env

# %%
# Claim 7: degree <-> depth <-> latency, monotone along the PAFs of increasing degree sum, and the
# 27-degree stand-in measured slower than alpha=7 and f1g2 under real encryption. The measured ordering is
# asserted on the CPU time of the evaluating thread (SEAL runs each op on the calling thread), best of the
# interleaved rounds: other processes sharing these 2 cores stretch wall-clock times unevenly.
chain_pafs = ["f1g2", "f2g2", "f2g3", "a7", "deg27"]
for col in ("degree_sum", "depth", "ct_mults", "modelled_ms"):
    vals = lat.loc[chain_pafs, col].tolist()
    assert all(a < b for a, b in zip(vals, vals[1:])), (col, vals)
if {"deg27", "a7", "f1g2"} <= set(e2e):
    cpu_s = {k: v.cpu_seconds for k, v in e2e.items()}
    assert cpu_s["deg27"] > cpu_s["a7"] and cpu_s["deg27"] > cpu_s["f1g2"], cpu_s
    print("CPU s per ReLU-PAF:", {k: round(v, 2) for k, v in cpu_s.items()},
          " wall s:", {k: round(v.seconds, 2) for k, v in e2e.items()})
model_err = (lat["modelled_ms"] / lat["measured_cpu_ms"]).dropna()
print("modelled / measured:", model_err.round(2).to_dict())

# %% [markdown]
# **Takeaway.** Under real encryption the cost tracks the products and where they happen: a product on
# a fresh ciphertext (20 primes) costs some 25 times one near the bottom of the chain, so a PAF's latency
# is its product count weighted by how early the products run — f1²∘g1² is deeper than α=7 (13 vs 11
# levels) yet no slower, because its products sit lower in the chain. The 27-degree stand-in needs 16 levels
# and 15 products for one ReLU; f1∘g2 needs 8 and 6. The per-level model predicts the end-to-end timings
# it was not fitted to within a factor of about 1.5 on this shared machine (ratios above; 1.0–1.1 in the
# committed quieter run, cpu.json; TenSEAL's in-place modulus switching also runs some products lower in the
# chain than the trace assumes), which is what places the PAFs not timed live on the latency axis. For one
# ReLU the gap is modest: about 2x between f1∘g2 and the 27-degree stand-in, 1.3–1.5x for f1²∘g1²; the
# paper's 7.81x is for a whole network, where deeper PAFs need more bootstraps (the table above).

# %% [markdown]
# ## 5. Headline: latency vs accuracy, ours beside the paper's
#
# x: CKKS latency (CPU time) of one ReLU-PAF on a full 16384-slot ciphertext, measured live on this CPU
# (filled markers) or modelled from the per-level costs (open markers). y: test accuracy with every ReLU and
# MaxPool replaced. Left: ours, digits CNN. Right: the paper's numbers (ResNet-18 on ImageNet-1k, replace
# all non-polynomial ops; README table of the official repository) placed at the same PAF's latency
# measured here — the paper's own latencies are for its FHE setup, not reproduced.

# %%
PAPER_PLAINTEXT = {"ResNet-18 / ImageNet-1k": 69.4, "VGG-19-bn / CIFAR-10": 93.95}
PAPER_ALL = {  # ResNet-18 / ImageNet-1k, replace all non-polynomial operators (README of EfficientFHE/SmartPAF)
    "ct (no fine-tune, DS)": {"2f12g1": 64.4, "a7": 59.4, "f2g3": 40.9, "f2g2": 33.1, "f1g2": 13.3},
    "baseline_ds": {"2f12g1": 59.6, "a7": 66.2, "f2g3": 62.0, "f2g2": 49.0, "f1g2": 37.0},
    "direct, SS (prior work)": {"2f12g1": 25.5, "a7": 47.1, "f2g3": 23.0, "f2g2": 4.2, "f1g2": 0.0},
    "ct_pa_at DS": {"2f12g1": 69.9, "a7": 68.0, "f2g3": 65.7, "f2g2": 64.1, "f1g2": 57.8},
    "ct_pa_at SS (SmartPAF)": {"2f12g1": 69.4, "a7": 67.0, "f2g3": 65.3, "f2g2": 57.3, "f1g2": 6.5},
}
PAPER_VGG_ALL = {  # VGG-19-bn / CIFAR-10, replace all
    "direct, SS (prior work)": {"2f12g1": 91.06, "a7": 81.35, "f2g3": 76.58, "f2g2": 58.11, "f1g2": 43.84},
    "ct (DS)": {"2f12g1": 93.39, "a7": 93.6, "f2g3": 93.3, "f2g2": 92.4, "f1g2": 91.53},
    "ct_pa_at DS": {"2f12g1": 93.6, "a7": 93.81, "f2g3": 93.59, "f2g2": 91.49, "f1g2": 91.51},
    "ct_pa_at SS (SmartPAF)": {"2f12g1": 92.16, "a7": 92.62, "f2g3": 91.51, "f2g2": 88.45, "f1g2": 76.93},
}

# the 27-degree stand-in, dropped in directly (no training needed for a latency baseline)
d27 = replace_nonpolynomial(net, "deg27")
deg27_acc = {"DS": evaluate(d27, data.x_test, data.y_test)[0],
             "SS": evaluate(to_static(d27, data.x_train)[0], data.x_test, data.y_test)[0]}


def pareto(points):
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher)."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


PAPER_SERIES_COLOR = {"ct (no fine-tune, DS)": "ct", "baseline_ds": "baseline_ds", "direct, SS (prior work)": "direct",
                      "ct_pa_at DS": "ct_pa_at", "ct_pa_at SS (SmartPAF)": "ct_pa_at"}


def headline_figure(highlight=None):
    f = make_subplots(rows=1, cols=2, horizontal_spacing=0.09,
                      subplot_titles=("ours: digits CNN, 4 non-polynomial ops", "paper: ResNet-18 / ImageNet-1k (their accuracy)"))
    dep = abl[abl["scale"] == DEPLOY_SCALE]
    all_pts = []
    for tech in [t for t in TECH_NAMES if t in TECHNIQUES]:
        sub = dep[dep["technique"] == tech]
        xs_ = [lat.loc[p, "latency_ms"] for p in sub["paf"]]
        meas = [lat.loc[p, "latency_source"] == "measured live" for p in sub["paf"]]
        f.add_scatter(x=xs_, y=sub["test_acc"], mode="markers", name=f"ours: {tech} ({DEPLOY_SCALE})",
                      marker=dict(color=TECH_COLORS[tech], size=11, symbol=["circle" if m else "circle-open" for m in meas],
                                  line=dict(width=2, color=TECH_COLORS[tech])),
                      text=[PAF_LABELS[p] for p in sub["paf"]], hovertemplate="%{text}: %{y:.2f} %, %{x:.0f} ms",
                      legendgroup="ours", row=1, col=1)
        all_pts += list(zip(xs_, sub["test_acc"], sub["paf"], [tech] * len(sub)))
    f.add_scatter(x=[lat.loc["deg27", "latency_ms"]], y=[deg27_acc[DEPLOY_SCALE]], mode="markers+text",
                  text=["27-degree"], textposition="bottom center", name="ours: 27-degree stand-in, direct",
                  marker=dict(color="black", size=11, symbol="square"), legendgroup="ours", row=1, col=1)
    all_pts.append((lat.loc["deg27", "latency_ms"], deg27_acc[DEPLOY_SCALE], "deg27", "direct"))
    fr = sorted(pareto([(p[0], p[1]) for p in all_pts]), key=lambda i: all_pts[i][0])
    f.add_scatter(x=[all_pts[i][0] for i in fr], y=[all_pts[i][1] for i in fr], mode="lines+markers",
                  name="ours: Pareto frontier", line=dict(color="#444", dash="dash"),
                  marker=dict(size=18, symbol="circle-open", color="#444"), legendgroup="ours", row=1, col=1)
    for i in fr:
        f.add_annotation(x=all_pts[i][0], y=all_pts[i][1], text=PAF_LABELS[all_pts[i][2]], showarrow=True, ax=30, ay=-22,
                         row=1, col=1)
    f.add_hline(y=FLOAT_ACC, line=dict(color="#999", dash="dot"), annotation_text="plaintext",
                annotation_position="bottom right", row=1, col=1)
    if highlight is not None:
        hx, hy = highlight
        f.add_scatter(x=[hx], y=[hy], mode="markers", name="selected", marker=dict(size=22, symbol="star", color="gold",
                      line=dict(width=1, color="black")), row=1, col=1)
    for name, vals in PAPER_ALL.items():
        ps = [p for p in vals if p in lat.index]
        ps = sorted(ps, key=lambda p: lat.loc[p, "latency_ms"])
        c = TECH_COLORS[PAPER_SERIES_COLOR[name]]
        f.add_scatter(x=[lat.loc[p, "latency_ms"] for p in ps], y=[vals[p] for p in ps], mode="markers",
                      name=f"paper: {name}", legendgroup="paper",
                      marker=dict(size=10, color=c, symbol="diamond" if "SS" in name else "diamond-open",
                                  line=dict(width=2, color=c)),
                      text=[PAF_LABELS[p] for p in ps], hovertemplate="%{text}: %{y:.1f} %", row=1, col=2)
    f.add_hline(y=PAPER_PLAINTEXT["ResNet-18 / ImageNet-1k"], line=dict(color="#999", dash="dot"),
                annotation_text="plaintext 69.4", annotation_position="bottom right", row=1, col=2)
    f.update_xaxes(title_text="CKKS latency of one ReLU-PAF (ms CPU time, 16384 slots)")
    f.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    f.update_yaxes(title_text="top-1 accuracy (%), paper", row=1, col=2)
    viz.apply_template(f, title=f"SmartPAF: latency vs accuracy per PAF and technique set (deployed at {DEPLOY_SCALE})",
                       height=560, width=1400)
    f.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top", font=dict(size=11)),
                    margin=dict(r=260))
    viz.caption(f, f"Ours: sklearn digits, CNN {WIDTHS[0]}/{WIDTHS[1]} channels, live PAFs {live_pafs} (others from the committed run); "
                   f"filled = CKKS-timed live, open = modelled from per-level costs.<br>TenSEAL CKKS N=32768, 128-bit, "
                   f"{ENV['device']}, thread CPU time. Paper: ResNet-18/ImageNet-1k accuracies (their models, README table), "
                   f"placed at our latency of the same PAF.")
    return f, all_pts, fr


fig_head, PTS, FRONT = headline_figure()
print(f"27-degree stand-in, direct replacement: DS {deg27_acc['DS']:.2f} %, SS {deg27_acc['SS']:.2f} %")
print("Pareto frontier (ours):", [(PAF_LABELS[PTS[i][2]], PTS[i][3], round(PTS[i][1], 2), round(PTS[i][0])) for i in FRONT])
print(f"27-degree / f1²∘g1² latency: {lat.loc['deg27', 'latency_ms'] / lat.loc['2f12g1', 'latency_ms']:.2f}x "
      f"(paper, with bootstrapping, ResNet-18: 7.81x)")
viz.save(fig_head, SLUG, "pareto_latency_accuracy")
fig_head

# %% [markdown]
# **Takeaway.** The latency axis is the PAF's, not the technique's: all technique sets of one PAF share a
# column, and training moves a low-degree PAF *up* that column. Here the CT+PA+AT points of the cheapest
# PAFs sit at the float accuracy, so the frontier is made of low-degree PAFs and the 27-degree stand-in is
# dominated — the paper's shape (right), where SmartPAF's f1²∘g1² matches plaintext at a fraction of the
# 27-degree minimax latency. What differs: on ImageNet naive replacement collapses (0–47 %) and static scale
# costs the lowest-degree PAF 51 points; digits is far more forgiving.

# %% [markdown]
# ## 6. Ablation table: ours beside the paper's
#
# Accuracy drop versus plaintext, in points (lower is better), for each technique set and PAF.

# %%
ours_drop = acc_table.drop(columns="mean").rsub(FLOAT_ACC)
paper_rows = {f"paper R18/IN: {k}": {p: PAPER_PLAINTEXT["ResNet-18 / ImageNet-1k"] - v for p, v in vals.items()}
              for k, vals in PAPER_ALL.items()}
paper_drop = pd.DataFrame(paper_rows).T[[p for p in PAFS]]
ours_drop.index = [f"ours digits: {t} {s}" for t, s in ours_drop.index]
both = pd.concat([ours_drop, paper_drop])
fig_tab = go.Figure(go.Heatmap(z=both.values, x=[PAF_LABELS[p] for p in both.columns], y=list(both.index),
                               colorscale="Reds", text=np.round(both.values, 1), texttemplate="%{text}",
                               colorbar=dict(title="points")))
viz.apply_template(fig_tab, title="Accuracy drop vs plaintext (points): ours (digits) and paper (ResNet-18/ImageNet)",
                   height=140 + 28 * len(both), width=900)
fig_tab.update_yaxes(autorange="reversed")
viz.caption(fig_tab, f"Ours: plaintext {FLOAT_ACC:.2f} %, 360 test images (1 image = 0.28 points). "
                     "Paper: plaintext 69.4 %, README table of EfficientFHE/SmartPAF.")
viz.save(fig_tab, SLUG, "ablation_table")
fig_tab

# %% [markdown]
# ## 7. Claims this run checks

# %%
ds = abl[abl["scale"] == "DS"].pivot_table(index="technique", columns="paf", values="test_acc")
ss = abl[abl["scale"] == "SS"].pivot_table(index="technique", columns="paf", values="test_acc")
low = min(PAFS, key=lambda p: paf_info(p).degree_sum)
checks = {}
# Claim 3: CT helps without any training (average over the PAFs), at DS.
if {"ct", "direct"} <= set(TECHNIQUES):
    checks["CT-only >= direct (mean, DS)"] = (ds.loc["ct", PAFS].mean(), ds.loc["direct", PAFS].mean())
    assert ds.loc["ct", PAFS].mean() >= ds.loc["direct", PAFS].mean()
# Claim 4: at equal epochs the pipeline beats plain fine-tuning, on average and for the lowest degree.
if {"ct_pa_at", "baseline_ds"} <= set(TECHNIQUES):
    checks["CT+PA+AT+DS >= baseline+DS (mean)"] = (ds.loc["ct_pa_at", PAFS].mean(), ds.loc["baseline_ds", PAFS].mean())
    checks[f"CT+PA+AT+DS >= baseline+DS ({low})"] = (ds.loc["ct_pa_at", low], ds.loc["baseline_ds", low])
    assert ds.loc["ct_pa_at", PAFS].mean() >= ds.loc["baseline_ds", PAFS].mean()
    assert ds.loc["ct_pa_at", low] >= ds.loc["baseline_ds", low]
# The pipeline recovers accuracy versus naive replacement, by a margin (mean over PAFs, deployed scale).
if {"ct_pa_at", "direct"} <= set(TECHNIQUES):
    dep = ds if DEPLOY_SCALE == "DS" else ss
    checks["CT+PA+AT >= direct + 1 point (mean, deployed scale)"] = (dep.loc["ct_pa_at", PAFS].mean(), dep.loc["direct", PAFS].mean() + 1)
    assert dep.loc["ct_pa_at", PAFS].mean() >= dep.loc["direct", PAFS].mean() + 1.0
# Claim 5: static scale is never much better than dynamic scale (SmartPAF models).
if "ct_pa_at" in TECHNIQUES:
    for p in PAFS:
        assert ss.loc["ct_pa_at", p] <= ds.loc["ct_pa_at", p] + 1.0, p
    checks["SS <= DS + 1 (every PAF)"] = (float((ss.loc["ct_pa_at", PAFS] - ds.loc["ct_pa_at", PAFS]).max()), 1.0)
pd.DataFrame(checks, index=["lhs", "rhs"]).T.round(2)

# %% [markdown]
# **Takeaway.** Checked on this run: PAF sanity and composition order (claim 1), CT never worsens and on
# average clearly improves each layer's fit (2), CT alone beats direct replacement (3), CT+PA+AT beats
# equal-epoch fine-tuning on average and for the lowest-degree PAF (4; sensitive to the learning rate at
# this scale, see section 2), static scale within a point of dynamic (5), encrypted == plaintext within
# 1e-2 at 128-bit (6), latency and depth monotone in degree and the 27-degree stand-in slower than α=7 and
# f1∘g2 under real encryption (7). Not checked: the paper's absolute accuracies and its 7.81x speedup
# (ImageNet, its FHE stack); the README's "72 % latency saved" and the abstract's 7.81x disagree.

# %%
print(f"notebook compute so far: {time.perf_counter() - T_START:.1f} s (training {T_TRAIN:.1f} s, keygen {T_KEYGEN:.1f} s, "
      f"per-level {T_LEVELS:.1f} s, PAF end-to-end {T_E2E:.1f} s, encrypted layer {T_LAYER:.1f} s)")

# %% [markdown]
# ## 8. GPU scale: VGG-11-bn with all 13 ReLU / MaxPool layers replaced
#
# The card's GPU part: the same technique ablation (same code: `digits_study` with the default technique
# configuration above) on a VGG-11-bn — 8 ReLU + 5 MaxPool = 13 non-polynomial ops, full VGG-11 channel
# widths (64–512), one linear classifier (CIFAR variant) — trained from seed on the GPU by
# `PYTHONPATH=lib python -m mlsys24.bench smartpaf` (module `mlsys24.privacy.bench`), for PAFs of three
# degrees and as many seeds as fit the run's time budget. **Scale-downs.** No CIFAR-10 here (nothing is
# downloaded): the digits split above, each 8×8 image upsampled bilinearly to 32×32 and replicated over 3
# channels (CIFAR's tensor shape, a far easier task: 1149 training images); VGG-11-bn instead of the
# paper's VGG-19-bn; AT groups of 2 epochs (official 20), CT 10 epochs on 300 images, learning rates
# 10x the official `lr_c`. The paper's VGG-19-bn / CIFAR-10 numbers (README of the official repository)
# are drawn beside ours as accuracy *drops* versus each model's own plaintext accuracy.
#
# On a GPU (`VGG_BENCH = "auto"`) the study is re-run live for seed 0 (about a minute per PAF); elsewhere
# the committed results file is read.

# %%
VGG_CMD = "PYTHONPATH=lib python3 -m mlsys24.bench smartpaf"
# live on a GPU (seed 0), else the committed VGG-11-bn results
VGG_RES = gpu_results(SLUG, VGG_BENCH, quick=False, extra=["--seeds", "0", "--budget", "400"],
                      where=lambda f: f.meta.get("device_type") == "cuda"
                      and any(r.get("model") == "vgg11_bn" for r in f.records))
if VGG_RES is None:
    print(f"no VGG-11-bn GPU results: run `{VGG_CMD}` on a GPU machine (GPU claims below are skipped)")
else:
    print(VGG_RES.caption())
    vgg = pd.DataFrame(VGG_RES.records)
    VGG_PAFS = [p for p in VGG_RES.config["pafs"] if p in set(vgg["paf"])]
    VGG_SEEDS = sorted(set(vgg["seed"]))
    vgg["drop"] = vgg["float_test_acc"] - vgg["test_acc"]
    vgg_mean = vgg.pivot_table(index=["technique", "scale"], columns="paf", values="test_acc", aggfunc="mean")[VGG_PAFS]
    vgg_std = vgg.pivot_table(index=["technique", "scale"], columns="paf", values="test_acc", aggfunc="std")
    VGG_FLOAT = float(np.mean(list(VGG_RES.config["float_test_acc"].values())))
    print(f"float VGG-11-bn: {VGG_FLOAT:.2f} % (mean of seeds {VGG_SEEDS}); PAFs {VGG_PAFS}; "
          f"skipped (budget): {VGG_RES.config['skipped'] or 'none'}")
    display(vgg_mean.reindex([t for t in TECH_NAMES if t in set(vgg["technique"])], level=0).round(2))

# %%
if VGG_RES is not None:
    paper_vgg = {"direct SS (prior work)": ("direct", "SS"), "ct DS": ("ct", "DS"), "ct_pa_at DS": ("ct_pa_at", "DS"),
                 "ct_pa_at SS (SmartPAF)": ("ct_pa_at", "SS")}
    series = [("direct", "DS"), ("direct", "SS"), ("ct", "DS"), ("baseline_ds", "DS"), ("ct_pa_at", "DS"),
              ("ct_pa_at", "SS")]
    fig_vgg = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06, subplot_titles=[
        f"ours: VGG-11-bn, 32x32 digits, {VGG_RES.device} (plaintext {VGG_FLOAT:.2f} %)",
        f"paper: VGG-19-bn, CIFAR-10 (plaintext {PAPER_PLAINTEXT['VGG-19-bn / CIFAR-10']} %)"])
    labels = [PAF_LABELS[p] for p in VGG_PAFS]
    for tech, scale in series:
        drops = vgg[(vgg["technique"] == tech) & (vgg["scale"] == scale)].groupby("paf")["drop"]
        fig_vgg.add_bar(x=labels, y=[drops.mean().get(p) for p in VGG_PAFS], name=f"{TECH_NAMES[tech]}, {scale}",
                        error_y=dict(type="data", array=[drops.std().get(p, 0) for p in VGG_PAFS],
                                     visible=len(VGG_SEEDS) > 1),
                        marker=dict(color=TECH_COLORS[tech], pattern_shape="/" if scale == "SS" else ""),
                        legendgroup=f"{tech}{scale}", row=1, col=1)
    for name, (tech, scale) in paper_vgg.items():
        vals = PAPER_VGG_ALL[{"direct SS (prior work)": "direct, SS (prior work)", "ct DS": "ct (DS)"}.get(name, name)]
        fig_vgg.add_bar(x=labels, y=[PAPER_PLAINTEXT["VGG-19-bn / CIFAR-10"] - vals[p] for p in VGG_PAFS],
                        name=f"paper: {name}", marker=dict(color=TECH_COLORS[tech], opacity=0.6,
                                                           pattern_shape="/" if scale == "SS" else "x"),
                        legendgroup="paper", row=1, col=2)
    fig_vgg.update_yaxes(title_text="accuracy drop vs plaintext (points)", row=1, col=1)
    fig_vgg.update_layout(barmode="group")
    viz.apply_template(fig_vgg, title="VGG with every ReLU / MaxPool replaced by a PAF: accuracy drop per technique set",
                       height=560, width=1400)
    fig_vgg.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top", font=dict(size=11)),
                          margin=dict(r=380, b=150))
    viz.caption(fig_vgg, f"Ours: {VGG_RES.caption()}<br>mean (± std where > 1 seed) over seeds {VGG_SEEDS}. "
                         "Scale-down: sklearn digits upsampled to 32x32x3 (1149 train / 360 test) instead of CIFAR-10, "
                         "VGG-11-bn instead of VGG-19-bn, AT groups 2 epochs (official 20).<br>Paper: VGG-19-bn / "
                         "CIFAR-10, README table of EfficientFHE/SmartPAF (no baseline+DS or direct-DS rows there). "
                         "Hatched = static scale.")
    viz.save(fig_vgg, SLUG, "vgg_gpu_ablation")
    fig_vgg.show()

# %% [markdown]
# **Takeaway.** With 13 non-polynomial layers the PAF errors compound: in the committed run (NVIDIA H200,
# seed 0) dropping f1²∘g1² or f1∘g2 in directly costs 16–24 points of the 99.2 % plaintext accuracy, while the
# α=7 composite is nearly exact (0.3 points). CT alone, with no training at all, brings the low-degree PAFs
# back to within 1.4 points (DS); CT+PA+AT reaches 98.9 % with f1²∘g1² (0.28 points below plaintext; paper,
# VGG-19-bn on CIFAR-10: 0.35) and, for the two low-degree PAFs, beats fine-tuning for the same number of
# epochs by 7–11 points. Static
# scale is free for f1²∘g1² and α=7 but costs f1∘g2 8 points — the paper's shape (its f1∘g2 loses 14.6
# points at SS on VGG-19-bn). The task is far easier than CIFAR-10, so the absolute accuracies are not
# comparable, and the run has one seed (the time budget of one GPU call); the orderings are what carries over.

# %% [markdown]
# Claims on the VGG run (means over its seeds): the card's claim 8 (CT+PA+AT+DS with f1²∘g1² within
# 2 points of plaintext) and the orderings the digits CNN asserts in section 7.

# %%
GPU_ASSERTED = ["card 8: CT+PA+AT+DS, f1²∘g1², drop <= 2 points", "CT-only >= direct (mean, DS)",
                "CT+PA+AT+DS >= baseline+DS (mean)", "CT+PA+AT >= direct + 1 point (mean, SS)",
                "CT+PA+AT+DS >= baseline+DS (f1g2)", "SS <= DS + 1 (CT+PA+AT, every PAF)",
                "SS costs the lowest-degree PAF (f1g2) >= 1 point more than any other (CT+PA+AT)"]
GPU_CHECKS = {}
if VGG_RES is not None:
    vds = vgg[vgg["scale"] == "DS"].pivot_table(index="technique", columns="paf", values="test_acc", aggfunc="mean")
    vss = vgg[vgg["scale"] == "SS"].pivot_table(index="technique", columns="paf", values="test_acc", aggfunc="mean")
    vlow = min(VGG_PAFS, key=lambda p: paf_info(p).degree_sum)
    if "2f12g1" in VGG_PAFS:
        GPU_CHECKS["card 8: CT+PA+AT+DS, f1²∘g1², drop <= 2 points"] = (VGG_FLOAT - vds.loc["ct_pa_at", "2f12g1"], 2.0)
    GPU_CHECKS["CT-only >= direct (mean, DS)"] = (-vds.loc["ct", VGG_PAFS].mean(), -vds.loc["direct", VGG_PAFS].mean())
    GPU_CHECKS["CT+PA+AT+DS >= baseline+DS (mean)"] = (-vds.loc["ct_pa_at", VGG_PAFS].mean(),
                                                       -vds.loc["baseline_ds", VGG_PAFS].mean())
    GPU_CHECKS[f"CT+PA+AT+DS >= baseline+DS ({vlow})"] = (-vds.loc["ct_pa_at", vlow], -vds.loc["baseline_ds", vlow])
    GPU_CHECKS["CT+PA+AT >= direct + 1 point (mean, SS)"] = (-vss.loc["ct_pa_at", VGG_PAFS].mean(),
                                                             -vss.loc["direct", VGG_PAFS].mean() - 1.0)
    GPU_CHECKS["SS <= DS + 1 (CT+PA+AT, every PAF)"] = (
        float((vss.loc["ct_pa_at", VGG_PAFS] - vds.loc["ct_pa_at", VGG_PAFS]).max()), 1.0)
    ss_cost = vds.loc["ct_pa_at", VGG_PAFS] - vss.loc["ct_pa_at", VGG_PAFS]     # points lost by static scale
    GPU_CHECKS[f"SS costs the lowest-degree PAF ({vlow}) >= 1 point more than any other (CT+PA+AT)"] = (
        -float(ss_cost[vlow]), -float(ss_cost.drop(vlow).max()) - 1.0 if len(VGG_PAFS) > 1 else 0.0)
    # each check is (lhs, rhs) with "holds" meaning lhs <= rhs (orderings negated to fit that form)
    for name, (lhs, rhs) in GPU_CHECKS.items():
        print(f"{'reproduced' if lhs <= rhs else 'NOT REPRODUCED'}: {name}  ({abs(lhs):.2f} vs {abs(rhs):.2f})")
    for name in GPU_ASSERTED:
        if name in GPU_CHECKS:
            assert GPU_CHECKS[name][0] <= GPU_CHECKS[name][1], name
else:
    print(f"GPU claims skipped: run `{VGG_CMD}` on a GPU machine")

# %% [markdown]
# ## 9. Explore: PAF, techniques, scale
#
# Pick a PAF and a technique set (CT / PA / AT checkboxes map to the sets that were run; an unrun
# combination says so), the deployment scale, and a DS `scale_ratio` (u = x / (ratio · max|x|): larger ratios
# squeeze the inputs towards 0, where low-degree PAFs are weakest). Left: the PAF against sign with the
# profiled input distribution of the chosen layer (float model, normalised by its max). Right: the Pareto
# plot with the chosen configuration starred. Everything is precomputed; the callbacks only look up.

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W

    layer_names = ["relu1", "pool1", "relu2", "pool2"]
    prof = collect_layer_inputs(net, layer_names, data.x_train)
    hists = {}
    for n, v in prof.items():
        u = (v / v.abs().max()).flatten().numpy()
        hists[n] = np.histogram(u, bins=80, range=(-1, 1))
    tech_of = {(False, False, False): "direct", (True, False, False): "ct", (True, True, True): "ct_pa_at",
               (False, True, True): "pa_at", (True, True, False): "ct_pa"}
    w_paf = W.Dropdown(options=[(PAF_LABELS[p], p) for p in PAFS], description="PAF")
    w_ct, w_pa, w_at = W.Checkbox(True, description="CT"), W.Checkbox(True, description="PA"), W.Checkbox(True, description="AT")
    w_ft = W.Checkbox(False, description="fine-tune only (baseline+DS)")
    w_scale = W.ToggleButtons(options=["DS", "SS"], value=DEPLOY_SCALE, description="scale")
    w_ratio = W.FloatSlider(value=1.0, min=0.5, max=4.0, step=0.25, description="scale_ratio")
    w_layer = W.Dropdown(options=layer_names, description="layer")
    out = W.Output()

    def _render():
        """The panel for the current selection: PAF-vs-sign figure, a line of text, the starred Pareto plot."""
        tech = "baseline_ds" if w_ft.value else tech_of.get((w_ct.value, w_pa.value, w_at.value))
        xs_ = np.linspace(-1, 1, 801)
        f = make_subplots(rows=1, cols=1, specs=[[{"secondary_y": True}]])
        cnt, edges = hists[w_layer.value]
        f.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=cnt / cnt.sum(), name=f"{w_layer.value} input / max",
                  marker_color="#ccc", secondary_y=True)
        f.add_scatter(x=xs_, y=np.sign(xs_), name="sign", line=dict(color="black", dash="dot"))
        f.add_scatter(x=xs_, y=paf_numpy(xs_ / w_ratio.value, components_of(w_paf.value, ORDER)),
                      name=f"{PAF_LABELS[w_paf.value]}(x / {w_ratio.value:g})", line=dict(color=PAF_COLORS[w_paf.value]))
        viz.apply_template(f, title="PAF (initial coefficients) vs sign, profiled inputs", x="x / max|x|",
                           y="PAF", height=360, width=560)
        f.update_yaxes(title_text="fraction of inputs", secondary_y=True)
        items = [f]
        sel = abl[(abl["paf"] == w_paf.value) & (abl["technique"] == tech) & (abl["scale"] == w_scale.value)] \
            if tech else abl.iloc[0:0]
        if len(sel) == 0:
            items.append(f"not run: technique {tech or (w_ct.value, w_pa.value, w_at.value)} "
                         f"(available: {sorted(set(abl['technique']))})")
            return items
        acc = float(sel["test_acc"].iloc[0])
        items.append(f"{PAF_LABELS[w_paf.value]}, {TECH_NAMES[tech]}, {w_scale.value}: {acc:.2f} % "
                     f"(plaintext {FLOAT_ACC:.2f} %), {int(sel['epochs'].iloc[0])} epochs, "
                     f"{lat.loc[w_paf.value, 'latency_ms']:.0f} ms per ReLU-PAF ({lat.loc[w_paf.value, 'latency_source']}), "
                     f"depth {int(lat.loc[w_paf.value, 'depth'])}, source: {sel['source'].iloc[0]}")
        if w_scale.value == DEPLOY_SCALE:
            items.append(headline_figure(highlight=(lat.loc[w_paf.value, "latency_ms"], acc))[0])
        return items

    def _show(items):
        for it in items:
            if isinstance(it, str):
                print(it)
            else:
                display(it)

    def _update(*_):
        with out:
            out.clear_output(wait=True)
            _show(_render())

    for w in (w_paf, w_ct, w_pa, w_at, w_ft, w_scale, w_ratio, w_layer):
        w.observe(_update, names="value")
    display(W.VBox([W.HBox([w_paf, w_scale, w_layer]), W.HBox([w_ct, w_pa, w_at, w_ft]), w_ratio, out]))
    # The initial selection is shown as plain cell output (changes redraw the panel above): executing a cell
    # that writes through an Output widget can stall headless runners (jupyter/nbclient#312, papermill#723).
    _show(_render())

# %% [markdown]
# ## 10. Going further
#
# - Everything live, all technique sets:
#   `papermill notebooks/15_smartpaf.ipynb runs/15_smartpaf.ipynb -p LIVE_PAFS '["f1g2","f2g2","f2g3","2f12g1","a7"]' -p TECHNIQUES '["direct","ct","baseline_ds","ct_pa_at","pa_at","ct_pa"]'`
# - The card's wider CNN (`-p WIDTHS '[16, 32]'`): direct replacement then barely hurts — try it and see the
#   techniques have nothing to recover. The official learning rates: `-p LR_C 1e-4 -p LR_W 1e-5`.
# - Refresh the committed measurements: `PYTHONPATH=lib python -m mlsys24.privacy.ckks_bench` (CKKS costs,
#   ~5 min) and `PYTHONPATH=lib python -m mlsys24.privacy.ablation` (digits ablation, ~3 min on one core).
# - GPU scale: `PYTHONPATH=lib python3 -m mlsys24.bench smartpaf` (VGG-11-bn, section 8; `--seeds 0,1,2
#   --pafs 2f12g1,f1g2,a7 --budget 220` after the name); the modules in `mlsys24.privacy` take any torch
#   model with `nn.ReLU` / `nn.MaxPool2d` layers, so a real CIFAR-10 VGG-19-bn is one data loader away.
#
# Questions for a workshop:
# 1. CT fits each PAF to the input distribution of its layer. Why does that help most for the lowest-degree
#    PAFs, and what does the histogram in the explorer say about where the PAF must be accurate?
# 2. Static scale divides by the largest input ever seen. How would outliers in ImageNet activations explain
#    the paper's collapse of f1∘g2 at SS (57.8 → 6.5 %) that digits does not show?
# 3. The per-level cost falls with depth. Given a fixed number of products, which evaluation order of a
#    composite PAF minimises latency, and what does that do to the depth budget before bootstrapping?
# 4. The encrypted layer packs 32 images × 8 channels × 64 pixels. How many ciphertexts and which
#    rotations would the second conv need, and why does MaxPool then need rotations too?
