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
#     figure: table3
#     headline: 'Paper: S-LoRA serves 2000 adapters at <6% throughput loss vs 5, up
#       to 4x vLLM-packed and 30x PEFT (A100). Ours: unified pool, heterogeneous-rank
#       MBGMM/MBGMV, TP layout exact; H100 (16 Llama-7B layers, decode steps in CUDA
#       graphs, 4 paired rounds, load above capacity): n=1000 at 1.02x n=5, 17x PEFT-style,
#       1.72x padded BMM in requests finished (rounds 1.68-1.85; tokens 1.49x, decode
#       step 1.47x; MBGMV 3.5x faster on a step''s LoRA work); merged copies OOM at
#       n=100; TP LoRA collectives ~3% of the base bytes but +64-101% latency on 2 H200s'
#     paper: '21'
#     slug: slora
#     status: reproduced
# ---

# %% [markdown]
# # S-LoRA: Serving Thousands of Concurrent LoRA Adapters
#
# Ying Sheng, Shiyi Cao, Dacheng Li, Coleman Hooper, Nicholas Lee, Shuo Yang, Christopher Chou, Banghua
# Zhu, Lianmin Zheng, Kurt Keutzer, Joseph E. Gonzalez, Ion Stoica (UC Berkeley, Stanford) · MLSys 2024 ·
# [arXiv 2311.03285](https://arxiv.org/abs/2311.03285) · official code
# [S-LoRA/S-LoRA](https://github.com/S-LoRA/S-LoRA) (Apache-2.0, built on LightLLM).
#
# **The idea in one paragraph.** One base model may have thousands of LoRA adapters (`h = xW + s·xAB`).
# Merging an adapter into W serves one adapter at a time; one merged copy per adapter runs out of GPU
# memory after a handful; swapping adapters PEFT-style cannot batch across adapters. S-LoRA keeps every
# adapter in host memory and pages the ones the running requests need into GPU memory, into **one paged
# pool shared with the KV cache** (a page = one token's K or V = H elements = one row of an adapter's
# A or B), so adapters of different ranks and sequences of different lengths never fragment each other.
# Custom kernels (**MBGMM** for prefill, **MBGMV** for decode) compute `xAB` for a batch that mixes
# adapters *and ranks*, reading weight rows straight from scattered pool pages. A tensor-parallel layout
# keeps the extra communication rank-sized.
#
# Here: `mlsys24.slora` — the unified slot pool with exact occupancy accounting, the adapter pager
# (host → pool on demand, a side CUDA stream on GPU, LRU eviction of idle adapters), the Triton MBGMM /
# MBGMV kernels with a float32 reference, S-LoRA and four baselines in the workbench's serving engine,
# the TP layout on two gloo processes. GPU numbers come from `python -m mlsys24.slora.bench`.

# %% tags=["parameters"]
DEVICE = "cpu"                # "cpu", or "cuda" to run the serving sweep on a GPU (the results JSON is read otherwise)
HIDDEN = 64                   # H of the Triton-interpreter kernel check (CPU: at most 128)
RANKS = [4, 8, 16]            # adapter ranks, mixed in every batch (card: [4, 8, 16])
NUM_ADAPTERS = [1, 8, 32, 128]  # adapter counts of the serving sweep
NUM_REQUESTS = 16             # requests per serving run (card: 96; scaled down for the CPU budget)
LEN_RANGE = [8, 16]           # input and output lengths U[lo, hi) (card: [8, 48); scaled down)
ALPHA = 1.0                   # adapter popularity: index floor(n U), U drawn from power(ALPHA), 1.0 is uniform
POOL_SLOTS = 6000             # memory budget in slots (a slot is H elements of K plus H of V, per layer)
ADAPTER_REGION = 512          # non-unified systems: slots reserved for adapters (8 adapters of rank 16)
MAX_BATCH = 32                # max running requests
SYSTEMS = ["slora", "no_unify", "bmm", "peft", "merged"]  # systems of the sweep
PEFT_ADAPTERS = [1, 32]       # adapter counts at which PEFT-style runs (it is the slow one)
REPEATS = 3                   # rounds of S-LoRA runs at the claims' adapter counts (medians taken)
TP_CHECK = True               # run the 2-process gloo tensor-parallel check (~10 s)
SEED = 42                     # seed of adapters and traces
INTERACTIVE = True            # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, ListOf, validate

validate(globals(), DEVICE=Choice("cpu", "cuda"), HIDDEN=Int(8, 8192), RANKS=ListOf(Int(1, 128), min_len=1),
         NUM_ADAPTERS=ListOf(Int(1, 100_000), min_len=2), NUM_REQUESTS=Int(2, 100_000),
         LEN_RANGE=ListOf(Int(1, 4096), min_len=2, max_len=2), ALPHA=Float(0, 100, lo_open=True),
         POOL_SLOTS=Int(64, 10**9), ADAPTER_REGION=Int(1, 10**9), MAX_BATCH=Int(1, 4096),
         SYSTEMS=ListOf(Choice("slora", "no_unify", "bmm", "peft", "merged"), min_len=1),
         PEFT_ADAPTERS=ListOf(Int(1, 100_000)), REPEATS=Int(1, 20), TP_CHECK=Bool(), SEED=Int(0), INTERACTIVE=Bool())
if LEN_RANGE[0] >= LEN_RANGE[1]:
    raise ValueError("LEN_RANGE is [low, high) with low < high")
if ADAPTER_REGION >= POOL_SLOTS:
    raise ValueError("ADAPTER_REGION must leave KV slots in POOL_SLOTS")

# %%
import os

if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the Triton kernels run in the CPU interpreter

import statistics

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.bench import load_results
from mlsys24.models import load_tiny_llama
from mlsys24.serving.lora import random_adapter
from mlsys24.slora import (
    MergedServer,
    SLoRAEngine,
    adapter_slots,
    kv_capacity_trace,
    lora_mbgmm,
    lora_mbgmv,
    make_tables,
    mbgmm_ref,
    merge_adapter,
    model_bytes,
    serve,
    slora_trace,
    slot_bytes,
)
from mlsys24.slora.engine import ATTN_TARGETS

SLUG = "slora"
torch.manual_seed(SEED)
torch.set_num_threads(1)  # CPU timings: one thread, medians (two shared cores)
GPU = DEVICE == "cuda" and torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
model = load_tiny_llama(DEV, torch.float16 if GPU else torch.float32)
cfg = model.cfg
print(f"tiny Llama: d {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads x {cfg.head_dim_}, on {DEV}")

# %% [markdown]
# ## 1. Reference and kernels
#
# The reference (`mbgmm_ref`) rebuilds each request's `A`, `B` densely from its pool rows and computes
# `s·xAB` in float32. The pool holds adapters of ranks {4, 8, 16} at *shuffled* slots; one batch mixes
# them. MBGMM (several tokens per request) and MBGMV (one) must agree with it.
#
# **Claim 1** — max abs error ≤ 1e-4 (fp32).

# %%
g = torch.Generator().manual_seed(SEED)
ranks_k = [RANKS[i % len(RANKS)] for i in range(5)]
need = sum(4 * r for r in ranks_k)
wa = torch.randn(need + 29, HIDDEN, generator=g) / HIDDEN**0.5
wb = torch.randn(need + 29, HIDDEN, generator=g) * 0.1
perm = torch.randperm(need + 29, generator=g).numpy()[:need]
starts = np.concatenate([[0], np.cumsum([4 * r for r in ranks_k])[:-1]])
errs = {}
for name, lens in (("MBGMM", [5, 1, 9, 3, 2]), ("MBGMV", [1] * 5)):
    seg_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    t = make_tables(seg_start, lens, starts, ranks_k, [2.0 / r for r in ranks_k], perm, sum(lens), DEV)
    x = torch.randn(sum(lens), HIDDEN, generator=g)
    fn = lora_mbgmm if name == "MBGMM" else lora_mbgmv
    errs[name] = max(float((fn(x.to(DEV), wa.to(DEV), wb.to(DEV), t, p).cpu() - mbgmm_ref(x, wa, wb, t, p)).abs().max())
                     for p in range(4))
    print(f"{name}: ranks {ranks_k}, tokens per request {lens}: max abs err {errs[name]:.2e}")
assert max(errs.values()) <= 1e-4, errs
print("claim 1 holds")

# %% [markdown]
# **Claim 2** — serving through the unified pool is exact: the logits S-LoRA produced for every token
# equal those of the same model with the request's adapter merged into W (teacher-forced on S-LoRA's
# tokens, fp32, max abs err ≤ 1e-4).

# %%
DT = next(model.parameters()).dtype
ad_all = {a: random_adapter(model, RANKS[a % len(RANKS)], seed=SEED + a, targets=ATTN_TARGETS, dtype=DT)
          for a in range(max(NUM_ADAPTERS))}
chk = {a: ad_all[a] for a in range(4)}
eng = SLoRAEngine(model, "slora", pool_slots=POOL_SLOTS, max_batch_size=MAX_BATCH, record_logits=True)
eng.add_adapters(chk)
serve(eng, slora_trace(8, 4, len_range=(4, 10), vocab=cfg.vocab_size, seed=SEED))
merged = {a: merge_adapter(model, w) for a, w in chk.items()}
err2 = 0.0
for s in eng.finished:
    with torch.no_grad():
        ref = merged[s.request.adapter_id](torch.tensor([s.request.prompt + s.output[:-1]], device=DEV))[0]
    err2 = max(err2, float((torch.stack(s.logits).to(ref) - ref[s.prompt_len - 1:]).abs().max()))
eng.check_invariants()
print(f"{len(eng.finished)} requests, 4 adapters of ranks {[w.rank for w in chk.values()]}: max |logit diff| = {err2:.2e}")
assert err2 <= (1e-4 if DT == torch.float32 else 5e-2)   # fp16 on a GPU: merged W rounds differently
print("claim 2 holds")
del merged

# %% [markdown]
# ## 2. Back of the envelope
#
# A slot is `H` elements in the K buffer plus `H` in the V buffer, per layer. An adapter of rank r on
# q, k, v, o takes `4r` slots — exactly the bytes of its A and B, no padding. A token of KV takes 1.
# Per layer and step the LoRA kernels read `Σ_b 8·H·r_b` weight elements (A and B of four
# projections); the padded-BMM baseline copies `Σ_b 8·H·r_max`.

# %%
EL = torch.finfo(DT).bits // 8
sb = slot_bytes(cfg, EL)
print(f"tiny Llama: H = {cfg.d_model}, slot = {sb / 1024:.0f} KiB over {cfg.n_layers} layers; "
      f"pool of {POOL_SLOTS} slots = {POOL_SLOTS * sb / 2**20:.1f} MiB; model = {model_bytes(model) / 2**20:.1f} MiB")
for r in RANKS:
    print(f"  rank {r:3d}: {adapter_slots(r)} slots = the KV of {adapter_slots(r)} tokens")
sb7 = 2 * 32 * 4096 * 2
print(f"Llama-7B fp16: slot = {sb7 / 2**20:.1f} MiB; rank-64 adapter = 256 slots = {256 * sb7 / 2**20:.0f} MiB "
      f"vs a merged copy of the model = 13.5 GB")
mix = np.array([RANKS[i % len(RANKS)] for i in range(MAX_BATCH)])
print(f"batch of {MAX_BATCH} with ranks {sorted(set(mix))}: MBGMV reads 8·H·Σr = {8 * cfg.d_model * mix.sum():,} elements "
      f"per layer, padded BMM 8·H·B·r_max = {8 * cfg.d_model * len(mix) * mix.max():,} "
      f"({mix.max() * len(mix) / mix.sum():.2f}x)")

# %% [markdown]
# ## 3. Serving sweep: S-LoRA and the baselines on one engine
#
# Offline throughput (all requests at t = 0): `slora` (unified pool, rank-grouped gather on CPU /
# MBGMM-MBGMV on GPU), `no_unify` (same kernels, a reserved adapter region of `ADAPTER_REGION` slots),
# `bmm` (reserved region + padded BMM), `peft` (one adapter per batch, static batching), `merged` (one
# merged copy per adapter; OOM when the copies exceed the budget = model + pool bytes).

# %%
budget_bytes = model_bytes(model) + POOL_SLOTS * slot_bytes(cfg, EL)


def run_one(system, n, seed=SEED):
    reqs = slora_trace(NUM_REQUESTS, n, alpha=ALPHA, len_range=tuple(LEN_RANGE), vocab=cfg.vocab_size, seed=seed)
    ads = {a: ad_all[a] for a in range(n)}
    if system == "merged":
        fits = n * model_bytes(model) <= budget_bytes
        srv = MergedServer(model, ads if fits else {}, budget_bytes=budget_bytes, pool_slots=POOL_SLOTS,
                           max_batch_size=MAX_BATCH)
        srv.fits, srv.need_bytes = fits, n * model_bytes(model)
        return serve(srv, reqs), None
    e = SLoRAEngine(model, system, pool_slots=POOL_SLOTS, adapter_region=ADAPTER_REGION, max_batch_size=MAX_BATCH)
    e.add_adapters(ads)
    res = serve(e, reqs)
    e.check_invariants()
    return res, e


RESULTS, ENGINES = {}, {}
for n in NUM_ADAPTERS:
    for system in SYSTEMS:
        if system == "peft" and n not in PEFT_ADAPTERS:
            continue
        res, e = run_one(system, n)
        RESULTS[(system, n)], ENGINES[(system, n)] = res, e
        tag = "OOM" if res.get("oom") else f"{res['throughput_rps']:6.2f} req/s, {res['finished']}/{NUM_REQUESTS} done"
        print(f"n={n:4d} {system:9s}: {tag}")

# %%
N_CLAIM = 32 if 32 in NUM_ADAPTERS else sorted(NUM_ADAPTERS)[len(NUM_ADAPTERS) // 2]
n_lo, n_hi = min(NUM_ADAPTERS), max(NUM_ADAPTERS)
# REPEATS rounds; each round runs the claims' adapter counts back to back, so a ratio within a round
# compares runs under the same machine conditions (CPU speed drifts over seconds on a shared machine).
# PEFT-style runs in every round too (claim 4 is a ratio of one round's runs, like claim 5).
ROUNDS = []
for _ in range(REPEATS):
    rnd = {n: run_one("slora", n)[0]["throughput_rps"] for n in sorted({N_CLAIM, n_lo, n_hi})}
    if ("peft", N_CLAIM) in RESULTS:
        rnd["peft"] = run_one("peft", N_CLAIM)[0]["throughput_rps"]
    ROUNDS.append(rnd)
MEDIAN = {n: statistics.median(r[n] for r in ROUNDS) for n in ROUNDS[0] if n != "peft"}
for n in MEDIAN:
    print(f"S-LoRA n={n}: median {MEDIAN[n]:.2f} req/s of {[round(r[n], 2) for r in ROUNDS]}")
RATIO_HI_LO = statistics.median(r[n_hi] / r[n_lo] for r in ROUNDS)   # claim 5: paired within rounds
thr_slora = MEDIAN[N_CLAIM]
thr_peft = statistics.median(r["peft"] for r in ROUNDS) if "peft" in ROUNDS[0] else None
RATIO_PEFT = statistics.median(r[N_CLAIM] / r["peft"] for r in ROUNDS) if thr_peft is not None else None

# %% [markdown]
# ## 4. Table 3 analogue: throughput vs number of adapters
#
# Left: ours (CPU, tiny Llama, offline). Right: the paper's Table 3 (A100-80GB, Llama-7B, S2 ranks
# {64, 32, 16, 8}, 10 req/s for 2 min): S-LoRA, vLLM-packed (merged copies), PEFT.

# %%
PAPER_T3 = {"slora": {5: 7.48, 100: 7.29, 1000: 6.69, 2000: 6.71}, "merged": {5: 2.04, 100: 0.0},
            "peft": {5: 0.74, 100: 0.24}}
NAMES = {"slora": "S-LoRA", "no_unify": "S-LoRA w/o unified pool", "bmm": "S-LoRA-bmm (padded)",
         "peft": "PEFT-style", "merged": "merged copies (vLLM-packed)"}
fig_t3 = make_subplots(rows=1, cols=2, subplot_titles=("ours: CPU, tiny Llama, offline",
                                                       "paper: A100-80GB, Llama-7B S2, R = 10 req/s"))
for system in SYSTEMS:
    xs = [n for n in NUM_ADAPTERS if (system, n) in RESULTS]
    ys = [RESULTS[(system, n)]["throughput_rps"] for n in xs]
    fig_t3.add_scatter(x=xs, y=ys, name=NAMES[system], mode="lines+markers", line=dict(color=viz.color(system)),
                       legendgroup=system, row=1, col=1)
    if system in PAPER_T3:
        px = sorted(PAPER_T3[system])
        fig_t3.add_scatter(x=px, y=[PAPER_T3[system][n] for n in px], name=NAMES[system] + " (paper)",
                           mode="lines+markers", line=dict(color=viz.color(system), dash="dash"),
                           legendgroup=system, showlegend=False, row=1, col=2)
fig_t3.update_xaxes(type="log", title_text="adapters")
fig_t3.update_yaxes(title_text="throughput (req/s)")
viz.apply_template(fig_t3, title="Throughput vs number of adapters (Table 3 analogue)", height=460)
viz.caption(fig_t3, f"CPU: {NUM_REQUESTS} requests, lengths U{LEN_RANGE}, ranks {RANKS}, pool {POOL_SLOTS} slots, "
            f"1 thread, shared 2-core machine (absolute req/s not comparable to the paper's). Merged copies: 0 = OOM. "
            "Paper: vLLM-packed OOM at n = 100 (plotted as 0).")
viz.save(fig_t3, SLUG, "table3")
fig_t3.show()

# %% [markdown]
# **Takeaway.** With mixed-adapter batching, S-LoRA's throughput barely depends on how many adapters the
# requests use; PEFT-style batches only requests of one adapter, so with 32 adapters its batches hold
# one or two requests; merged copies do not fit past a handful of adapters. Absolute numbers are CPU
# numbers of a tiny model — the shape, not the scale, is what this run can show.
#
# **Claim 4** — offline throughput at n = 32: S-LoRA ≥ 3× PEFT-style (CPU; the median over `REPEATS`
# rounds of the ratio within a round, each round running both back to back, as for claim 5: a single
# PEFT-style run against a median once fell to 2.9x on a busy 2-core machine).
# **Claim 5** — S-LoRA at the largest n ≥ 0.6 × at the smallest (the median over `REPEATS` rounds of the
# ratio within a round: runs of one round are back to back, so slow drifts of a shared CPU cancel); gathered elements counted from the
# index tensors: MBGMM/MBGMV `Σ 8·H·r_b` < padded BMM `Σ 8·H·r_max`.
# **Claim 6** — merged copies are OOM once `n × model bytes` exceeds the budget, while S-LoRA finishes
# every request at every n.

# %%
if thr_peft is not None:
    print(f"claim 4: S-LoRA / PEFT-style at n={N_CLAIM} (median of {REPEATS} paired rounds): {RATIO_PEFT:.1f}x "
          f"of {[round(r[N_CLAIM] / r['peft'], 2) for r in ROUNDS]} (paper, A100: ~30x at n=100)")
    assert RATIO_PEFT >= 3, [(r[N_CLAIM], r["peft"]) for r in ROUNDS]
r_hi = RESULTS[("slora", n_hi)]
print(f"claim 5: S-LoRA n={n_hi} / n={n_lo} (median of {REPEATS} paired rounds): {RATIO_HI_LO:.2f} (paper S2: 0.90)")
assert RATIO_HI_LO >= 0.6
g_s, g_b = r_hi["gathered_elements"], r_hi["gathered_elements_if_padded"]
print(f"         gathered at n={n_hi}: MBGMV/MBGMM {g_s:,} vs padded BMM {g_b:,} elements ({g_b / g_s:.2f}x)")
assert g_s < g_b
for n in NUM_ADAPTERS:
    assert RESULTS[("slora", n)]["finished"] == NUM_REQUESTS
    m = RESULTS.get(("merged", n))
    if m is not None:
        assert m["oom"] == (n * model_bytes(model) > budget_bytes)
oom_at = [n for n in NUM_ADAPTERS if RESULTS.get(("merged", n), {}).get("oom")]
peak_pool = max(r["peak_adapter_slots"] + r["peak_kv_slots"] for (s, _), r in RESULTS.items() if s == "slora")
print(f"claim 6: merged copies OOM at n = {oom_at} (budget {budget_bytes / 2**20:.0f} MiB, copy "
      f"{model_bytes(model) / 2**20:.1f} MiB); S-LoRA's peak pool use {peak_pool * slot_bytes(cfg, EL) / 2**20:.1f} MiB")
print("claims 4-6 hold")

# %% [markdown]
# ## 5. Ablation: unified pool and kernels vs number of adapters
#
# The paper (A100-80, S2, R = 10): S-LoRA 7.74 → 7.52 req/s from 1 to 200 adapters, without unified
# memory 7.82 → 6.53, padded bmm 7.76 → 0.26.

# %%
PAPER_ABL = {"slora": (7.74, 7.52), "no_unify": (7.82, 6.53), "bmm": (7.76, 0.26)}
fig_ab = go.Figure()
for system in ("slora", "no_unify", "bmm"):
    xs = [n for n in NUM_ADAPTERS if (system, n) in RESULTS]
    if not xs:
        continue
    base = RESULTS[(system, xs[0])]["throughput_rps"]
    fig_ab.add_scatter(x=xs, y=[RESULTS[(system, n)]["throughput_rps"] / base for n in xs], name=NAMES[system],
                       mode="lines+markers", line=dict(color=viz.color(system)))
    p0, p1 = PAPER_ABL[system]
    fig_ab.add_scatter(x=[1, 200], y=[1.0, p1 / p0], name=NAMES[system] + " (paper, A100)", mode="lines+markers",
                       line=dict(color=viz.color(system), dash="dash"))
viz.apply_template(fig_ab, title="Throughput relative to the fewest adapters", x="adapters",
                   y="throughput / throughput at the fewest adapters")
fig_ab.update_xaxes(type="log")
viz.caption(fig_ab, "Ours: CPU, offline, tiny Llama (the padded-bmm *time* gap is a GPU effect; on CPU the copy is cheap "
            "next to Python overhead). Paper: A100-80GB, S2, n = 1 → 200.")
viz.save(fig_ab, SLUG, "ablation")
fig_ab.show()

# %% [markdown]
# **Takeaway.** On this CPU the three S-LoRA variants track each other: what separates them on a GPU
# (the padded copy's bandwidth, the reserved region shrinking KV memory under load) is small next to
# per-step Python overhead of a tiny model. The reserved region does show up in memory: the next section.
#
# ## 6. Memory pool occupancy
#
# Per step of the largest-n runs: KV slots, adapter slots and free slots, unified pool vs a reserved
# adapter region. Then the deterministic accounting (**claim 3**): over the batches the S-LoRA run
# actually held, how many KV tokens can each layout hold — unified (every slot the batch's adapters
# do not use), partitioned (adapter region reserved for `MAX_BATCH` adapters of the largest rank),
# contiguous (KV reserved per request at its maximum length).

# %%
fig_occ = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("S-LoRA (unified pool)",
                                                                           "S-LoRA w/o unified pool"))
for row, system in ((1, "slora"), (2, "no_unify")):
    e = ENGINES.get((system, n_hi))
    if e is None:
        continue
    occ = np.array(e.occupancy)
    steps = np.arange(len(occ))
    for j, (lab, col) in enumerate((("KV", "#4C78A8"), ("adapters", "#F58518"), ("free", "#DDDDDD"),
                                    ("reserved, idle", "#B279A2"))):
        fig_occ.add_bar(x=steps, y=occ[:, j], name=lab, marker_color=col, legendgroup=lab, showlegend=row == 1,
                        row=row, col=1)
fig_occ.update_layout(barmode="stack", bargap=0)
fig_occ.update_yaxes(title_text="slots")
fig_occ.update_xaxes(title_text="engine step", row=2, col=1)
viz.apply_template(fig_occ, title=f"Pool occupancy per step, n = {n_hi} adapters", height=520)
viz.caption(fig_occ, f"{POOL_SLOTS} slots; the non-unified pool reserves {ADAPTER_REGION} for adapters (evicting LRU "
            "adapters inside it) and gives KV the rest. Exact counts from the allocator's owner tags.")
viz.save(fig_occ, SLUG, "occupancy")
fig_occ.show()

# %%
batches = [b for b in ENGINES[("slora", n_hi)].batches if b]
cap = kv_capacity_trace(batches, POOL_SLOTS, max_rank=max(RANKS), max_adapters=MAX_BATCH, max_len=2 * LEN_RANGE[1])
print(f"claim 3 over {len(batches)} steps: unified KV capacity {cap['unified'].min()}..{cap['unified'].max()} tokens, "
      f"partitioned {cap['partitioned'][0]}, contiguous {cap['contiguous'].min()}..{cap['contiguous'].max()}")
assert (cap["unified"] >= cap["partitioned"]).all() and (cap["unified"] > cap["partitioned"]).any()
print("claim 3 holds")

# %% [markdown]
# **Takeaway.** The unified pool gives KV every slot the *current* adapters do not use; a partitioned pool
# must reserve the worst case (`MAX_BATCH` adapters of the largest rank) all the time, and contiguous
# per-request reservation wastes the unused tail of every request's maximum length.
#
# ## 7. Tensor parallelism (2 gloo processes on CPU)
#
# **Claim 7** — one LoRA column/row pair with S-LoRA's layout on 2 processes equals the single-process
# result (max abs err ≤ 1e-5), and the LoRA collectives carry `B·r` (all-gather, column-parallel) + `B·r`
# (all-reduce, row-parallel) elements — against the base all-reduce's `B·h`.

# %%
if TP_CHECK:
    from mlsys24.slora.tp import run_tp_check

    tp = run_tp_check(2, tokens=5, h=64, d=96, r=8)
    print(f"max abs err per rank {tp['max_abs_err']}; LoRA elements per rank {tp['lora_elems']} "
          f"(expected 2·B·r = {tp['expected_lora_elems']}); base all-reduce {tp['base_allreduce_elems']}")
    assert max(tp["max_abs_err"]) <= 1e-5 and tp["lora_elems"] == [tp["expected_lora_elems"]] * 2
    print("claim 7 holds")
else:
    print("skipped (TP_CHECK = False)")

# %% [markdown]
# ## 8. GPU claims (results files)
#
# From `data/results/slora/<gpu>.json` (`python -m mlsys24.slora.bench`): Llama-7B-shaped layers, ranks
# {8, 16, 32, 64}, Poisson arrivals, throughput (finished requests) over a fixed window without
# draining. As in S-LoRA (built on LightLLM), prefill steps run apart from decode steps (`vllm` policy),
# and decode attention reads the token-granular pool in place (the Triton split-KV kernel of notebook 11).
# The claims are asserted from the newest *complete* run on file (every system measured).
#
# **Why the offered load is above capacity.** The setting is 10 req/s. At 10 req/s every system
# except PEFT-style keeps up with the arrivals, so each one finishes what arrives and the ratios measure
# the trace, not the systems. The bench offers more than any system serves (the rate is printed), so the
# window measures capacity.
#
# **Is the window trustworthy?** An earlier run (4 layers, eager steps, one window per system) measured
# the *same* system at 9.05 req/s (n = 5) and 11.75 req/s (n = 100). Not from the request lengths (the
# trace generator draws the adapter ids first, with a fixed number of draws, so arrivals and lengths are
# identical for every n and system), nor from adapter fetches (n = 100 paged in 98 adapters, n = 5 only
# 5, and n = 100 was the faster one). Eager steps are host-bound: every layer's kernels are launched from
# Python and several blocking host-device copies per step serialize host and device, so the step time
# carries host jitter; and one window per system cannot tell that apart from a real difference. The bench
# therefore captures each decode step *with its LoRA kernels* in a CUDA graph per (batch, context,
# largest-rank) bucket before the window (the systems then differ only in the LoRA kernels inside the
# graph), fills the step's indices with two copies from pinned memory, runs every system in several rounds
# on the same trace in alternating order, and takes each ratio within a round (median over rounds). The
# first round still runs colder than the later ones (printed per round below): the median is robust to it.

# %%
def complete(rf) -> bool:
    """Every system measured: no failed run and every planned round done (files before rounds: one)."""
    return (not any(r.get("kind") == "error" for r in rf.records)
            and rf.config.get("rounds_completed", 1) >= rf.config.get("rounds", 1))


gpu_files = [rf for rf in load_results(SLUG) if rf.meta.get("device_type") == "cuda"
             and rf.records and "system" in rf.records[0] and complete(rf)]
RES = gpu_files[0] if gpu_files else None
if RES is None:
    print("skipped: no GPU results; run `PYTHONPATH=lib python3 -m mlsys24.slora.bench` on a GPU")
else:
    C = RES.config
    print(RES.caption())
    print(f"  {C.get('layers')} Llama-7B layers; offered load {C.get('rate')} req/s for {C.get('duration_s')} s, "
          f"window {C.get('window_s')} s, {C.get('rounds_completed', 1)} paired round(s), decode graphs "
          f"{C.get('decode_graphs', False)}, policy {C.get('policy')}, attention {C.get('attention')}")
    summ = [r for r in RES.records if r.get("kind", "summary") == "summary"]
    runs = [r for r in RES.records if r.get("kind") == "run"]
    by = {(r["system"], r["n_adapters"]): r for r in summ}
    print(f"  {'system':9s} {'n':>5s} | req/s (median; per round)        | tok/s  | decode step p50 | jit in window")
    for k, r in by.items():
        rounds_ = ", ".join(f"{v:.2f}" for v in r.get("throughput_rounds", [r["throughput_rps"]]))
        step = f"{r['decode_step_ms_p50']:6.2f} ms" if "decode_step_ms_p50" in r else "      -  "
        print(f"  {k[0]:9s} {k[1]:5d} | {r['throughput_rps']:6.2f} ({rounds_:24s}) | "
              f"{r.get('token_throughput', float('nan')):6.0f} | {step}       | {r.get('jit_compiles_in_window')}"
              + ("  (OOM)" if r.get("oom") else ""))
    eager = [r for r in runs if not r.get("decode_graphs") and r["system"] != "merged"]
    for r in eager:
        print(f"  eager path {r['system']:9s} n={r['n_adapters']:5d}: {r['throughput_rps']:.2f} req/s, decode step p50 "
              f"{r.get('decode_step_ms_p50', float('nan')):.2f} ms (same trace, general path)")
    KERN = {r["method"]: r for r in RES.records if r.get("kind") == "lora_kernel"}
    for m, r in KERN.items():
        print(f"  LoRA work of one decode step ({r['batch']} requests, {r['layers']} layers, graph): {m:5s} "
              f"{r['step_us']:8.0f} µs, adapter rows {r['weight_bytes_step'] / 2**20:6.0f} MiB "
              f"({r['GBps_weights']:.0f} GB/s)")

# %% [markdown]
# **Figure** — throughput relative to S-LoRA at the fewest adapters, ours (GPU, complete run; median of
# its paired rounds with whiskers over their range when it has several) beside the paper (A100-80GB, S2; S-LoRA and PEFT from Table 3, padded
# BMM and no-unify from the ablation figure at n = 200).

# %%
if RES is not None:
    H = RES.headline
    ns = sorted({n for s, n in by if s == "slora"})
    PAPER_REL = {("slora", ns[0]): 1.0, ("slora", ns[1]): 7.29 / 7.48, ("slora", ns[2]): 6.69 / 7.48,
                 ("peft", ns[1]): 0.24 / 7.48, ("bmm", ns[1]): 0.26 / 7.76, ("no_unify", ns[1]): 6.53 / 7.82}
    base_rounds = by[("slora", ns[0])].get("throughput_rounds", [by[("slora", ns[0])]["throughput_rps"]])
    labels, ours, lo, hi, paper = [], [], [], [], []
    for k, pv in PAPER_REL.items():
        if k not in by:
            continue
        rr = by[k].get("throughput_rounds", [by[k]["throughput_rps"]])
        rel = [a / b for a, b in zip(rr, base_rounds) if b > 0]
        labels.append(f"{NAMES[k[0]]}, n={k[1]}")
        ours.append(float(np.median(rel)))
        lo.append(ours[-1] - min(rel))
        hi.append(max(rel) - ours[-1])
        paper.append(pv)
    fig_gpu = go.Figure()
    fig_gpu.add_bar(x=labels, y=paper, name="paper (A100-80GB, S2)", marker_color="#BBBBBB",
                    marker_pattern_shape="/")
    fig_gpu.add_bar(x=labels, y=ours, name=f"ours ({RES.meta.get('device')})", marker_color=viz.color("slora"),
                    error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo))
    viz.apply_template(fig_gpu, title="GPU: throughput relative to S-LoRA with the fewest adapters",
                       x="system, adapters", y="throughput / S-LoRA at n = 5")
    fig_gpu.update_layout(barmode="group")
    viz.caption(fig_gpu, f"Ours: {C.get('layers')} Llama-7B layers, ranks 8-64, {C.get('rate')} req/s offered "
                f"(above capacity), {C.get('window_s')} s window, median of {C.get('rounds_completed', 1)} paired "
                f"rounds; at most {C.get('distinct_sets_per_rank')} weight sets per rank aliased onto adapter ids. "
                "Paper: 7B, 10 req/s, 2 min. " + RES.caption())
    viz.save(fig_gpu, SLUG, "gpu_relative")
    fig_gpu.show()

# %% [markdown]
# **Claims 8** — S-LoRA n = 1000 ≥ 0.85 × n = 5; ≥ 3× PEFT-style and ≥ 1.5× padded BMM at n = 100 (each
# the median over rounds of the ratio within a round); pool memory against merged copies.

# %%
if RES is not None:
    H = RES.headline
    checks = {"S-LoRA n=1000 / n=5 >= 0.85": (H.get("ours"), H.get("ours_rounds"), 0.85),
              "S-LoRA / PEFT-style at n=100 >= 3": (H.get("vs_peft_n100"), H.get("vs_peft_n100_rounds"), 3.0),
              "S-LoRA / padded BMM at n=100 >= 1.5": (H.get("vs_bmm_n100"), H.get("vs_bmm_n100_rounds"), 1.5)}
    MISSED = []
    for name, (v, rr, target) in checks.items():
        per = ", ".join(f"{x:.2f}" for x in rr) if rr else "one run"
        if v is None:
            print(f"NOT REPRODUCED: {name}: not measured in this file")
            MISSED.append(name)
        elif v >= target:
            print(f"  {name}: {v:.2f} (rounds: {per}) -> OK")
        else:
            print(f"NOT REPRODUCED: {name}: {v:.2f} (rounds: {per})")
            MISSED.append(name)
    if H.get("no_unify_vs_bmm_n100") is not None:
        print(f"  kernel only (both with a reserved adapter region): MBGMV / padded BMM at n=100 = "
              f"{H['no_unify_vs_bmm_n100']:.2f}; the LoRA work of one decode step alone: "
              f"{H.get('lora_kernel_speedup', float('nan')):.2f}x")
    # memory: S-LoRA served n = 1000 adapters from one fixed pool smaller than even the n = 5 merged copies,
    # and the n = 100 merged copies do not fit
    sl = by[("slora", ns[-1])]
    mg = by.get(("merged", ns[1]))
    print(f"  pool {sl['pool_bytes'] / 2**30:.2f} GiB (peak adapters {sl['peak_adapter_bytes'] / 2**20:.0f} MiB at n={ns[-1]}) "
          f"vs merged copies at n={ns[1]}: {mg['need_bytes'] / 2**30:.0f} GiB scaled model, "
          f"{mg['full7b_copies_bytes'] / 2**30:.0f} GiB full 7B")
    assert not sl["oom"] and sl["finished"] > 0 and mg["oom"]
    assert sl["pool_bytes"] < by[("merged", ns[0])]["need_bytes"]
    # the kernel claim: MBGMV reads only each request's own rank, so its LoRA work per decode step reads
    # fewer bytes and takes less time than padded BMM's (both timed inside a CUDA graph, same rows)
    if KERN:
        assert KERN["mbgmv"]["weight_bytes_step"] < KERN["bmm"]["weight_bytes_step"], KERN
        assert KERN["mbgmv"]["step_us"] < KERN["bmm"]["step_us"], KERN

# %% [markdown]
# **Where the gap comes from.** Both systems run the same base layers and attention in every decode step
# and the same prefill steps; only the LoRA work differs. From the same file: the decode-step medians, the
# LoRA work of one step timed alone (as the engine runs it: q, k, v in one launch pair, o apart, when the
# file has that form), the time the window spent in prefill steps, and — from the copy bandwidth of the same
# card measured in another results file (`anchors`, `awq`) — the time MBGMV would take reading its adapter
# rows at copy speed, and the decode-step ratio that would give.

# %%
if RES is not None and KERN:
    sd, bd = by[("slora", ns[1])], by[("bmm", ns[1])]
    ks, kb = KERN.get("mbgmv_qkv", KERN["mbgmv"]), KERN.get("bmm_qkv", KERN["bmm"])
    l_s, l_b = ks["step_us"] / 1e3, kb["step_us"] / 1e3
    rest = sd["decode_step_ms_p50"] - l_s
    print(f"  decode step p50 at n={ns[1]}: S-LoRA {sd['decode_step_ms_p50']:.2f} ms, padded BMM "
          f"{bd['decode_step_ms_p50']:.2f} ms (ratio {bd['decode_step_ms_p50'] / sd['decode_step_ms_p50']:.2f}); "
          f"LoRA work alone ({ks['method']}, {kb['method']}) {l_s:.2f} vs {l_b:.2f} ms; the rest of S-LoRA's "
          f"step {rest:.2f} ms")
    for k in (("slora", ns[1]), ("bmm", ns[1])):
        r = by[k]
        print(f"  {k[0]:5s}: window spent {r['prefill_time_s']:.1f} s in {r['prefill_steps']} prefill steps, "
              f"{r['decode_time_s']:.1f} s in {r['decode_steps']} decode steps")
    same = [rf for slug in ("anchors", "awq") for rf in load_results(slug)
            if rf.meta.get("device") == RES.meta.get("device")]
    copy = next((r["GBps"] for rf in same for r in rf.records if r.get("op") == "copy" and "GBps" in r), None)
    if copy:
        l_floor = ks["weight_bytes_step"] / copy / 1e6                              # ms at copy bandwidth
        bound = bd["decode_step_ms_p50"] / (rest + l_floor)
        print(f"  MBGMV at {ks['GBps_weights']:.0f} GB/s = {ks['GBps_weights'] / copy:.0%} of the copy bandwidth "
              f"({copy:.0f} GB/s); at 100% its LoRA work would take {l_floor:.2f} ms and the decode-step ratio "
              f"would reach at most {bound:.2f}")
    for rf in gpu_files[1:]:   # the other complete GPU runs, for comparison
        h = rf.headline
        print(f"  also {rf.meta.get('device')} ({rf.meta.get('date', '')[:10]}): n=1000/n=5 {h.get('ours', float('nan')):.2f}, "
              f"x PEFT {h.get('vs_peft_n100', float('nan')):.2f}, x padded BMM {h.get('vs_bmm_n100', float('nan')):.2f} "
              f"(rounds {', '.join(f'{v:.2f}' for v in h.get('vs_bmm_n100_rounds', []))})")

# %% [markdown]
# **Takeaway.** Two complete runs, each with decode steps replayed from CUDA graphs (16 Llama-7B layers,
# batch up to 128, four paired rounds after a 10 s warm-up, load above capacity). On the H100 (the newest
# file, the one asserted above): n = 1000 vs n = 5 at 1.02 (rounds 0.88-1.17; paper S2: 0.89), 16.9x
# PEFT-style, and 1.72x padded BMM in requests finished within the window (every round above 1.5: 1.68-1.85).
# The same runs give 1.49x in tokens generated within the window and 1.47x in decode-step time: a request
# counts only once all its output tokens are out, so within a fixed window without draining the faster
# system finishes disproportionately more of the long requests — the req/s ratio is the and the
# paper's metric, the token and step ratios are printed beside it. On the LoRA work of a decode step alone
# MBGMV reads less than half of padded BMM's adapter bytes and is 3.5x faster (its shrink stores per-split
# partial sums, its expand walks the rank in 16-row chunks, q/k/v share one launch pair, tile shapes chosen
# in the run); the rest of the step (base layers, attention, one launch each for RMSNorm and RoPE) is the
# same for both. The older H200 file (one launch pair per projection, RMSNorm and RoPE in PyTorch
# elementwise kernels) gives 0.94, 16.8x and 1.38x. On the H100, an earlier complete run with q/k/v
# sharing but RMSNorm and RoPE still in PyTorch (the JSON this one replaced, in the repository's history)
# had decode steps of 13.66 vs 18.40 ms and 1.49x: the one-launch RMSNorm and RoPE took ~2 ms off the part
# of the step both systems share, which is what had diluted the gap. S-LoRA's throughput falls little with the number of adapters: adapters are
# paged in on demand and MBGMV reads only each request's own rank; PEFT-style batching (one adapter per
# batch) is an order of magnitude slower, as in the paper. In the paper's ablation padded BMM collapses
# once adapters differ (A100-80, S2: 7.76 → 0.26 req/s from n = 1 to 200); ours gathers and pads inside one
# graph-replayed step, where padding costs only the extra bytes it moves — a stronger baseline than the
# paper's, which is why the gap is smaller here. The memory side holds: 1000 adapters are served from one
# fixed pool smaller than even five merged copies of the scaled model, and 100 merged copies do not fit.
#
# **Tensor parallelism on 2 GPUs.** `python -m mlsys24.slora.tp` times one Llama-7B MLP pair (4096 →
# 11008 → 4096, fp16) with S-LoRA's layout on 2 GPUs (NCCL): the LoRA collectives carry only B·r elements
# each (bytes below), against the base all-reduce of B·h.

# %%
tp_files = [rf for rf in load_results(SLUG) if rf.meta.get("device_type") == "cuda"
            and rf.records and "lora_overhead" in rf.records[0]]
if not tp_files:
    print("skipped: no TP timing; run `PYTHONPATH=lib python3 -m mlsys24.slora.tp` on 2 GPUs")
else:
    TP = tp_files[0]
    print(TP.caption())
    print(" rank tokens | eager: base TP  S-LoRA TP  1 GPU (µs) | graphs: base TP  S-LoRA TP (µs) | LoRA bytes  base bytes")
    for r in TP.records:
        g = (f"{r['base_tp_graph_us']:8.1f}  {r['slora_tp_graph_us']:9.1f}" if "base_tp_graph_us" in r
             else f"{'-':>8}  {'-':>9}")
        print(f" {r['rank']:4d} {r['tokens']:6d} | {r['base_tp_us']:14.1f} {r['slora_tp_us']:10.1f} {r['slora_1gpu_us']:6.1f}"
              f"      | {g}       | {r['lora_bytes']:10,d} {r['base_bytes']:11,d}")
    assert all(r["lora_bytes"] * 16 <= r["base_bytes"] for r in TP.records), "LoRA traffic must be rank-sized"
    assert all(r["rel_err"] < 5e-3 for r in TP.records), "TP output must equal the single-GPU pair (fp16)"
    share = max(r["lora_bytes"] / r["base_bytes"] for r in TP.records)
    worst = max(r["lora_overhead"] for r in TP.records)
    print(f"LoRA collective bytes: at most {100 * share:.1f}% of the base all-reduce; eager step overhead of the "
          f"two extra collectives: up to {100 * worst:.0f}%")
    if all("lora_overhead_graph" in r for r in TP.records):
        og = [r["lora_overhead_graph"] for r in TP.records]
        print(f"with CUDA graphs: S-LoRA TP pair +{100 * min(og):.0f}% to +{100 * max(og):.0f}% over the base TP pair; "
              f"one GPU with LoRA / two: {min(r['tp_speedup_vs_1gpu_graph'] for r in TP.records):.2f}x to "
              f"{max(r['tp_speedup_vs_1gpu_graph'] for r in TP.records):.2f}x")
    else:
        print("NOT REPRODUCED: the TP LoRA step overhead was timed eagerly only (host launches and rank skew "
              "dominate these ~100 µs steps); the CUDA-graph timing `mlsys24.slora.tp` records was not run")

# %% [markdown]
# **Takeaway.** The layout is exact on GPUs too (fp16 error above), and the extra traffic is tiny: B·r
# elements per projection, at most ~3 % of the base all-reduce's B·h. Its *time* is another matter. With
# the pair captured in a CUDA graph (no host launches, no rank skew), the base Megatron pair takes ~46 µs
# on 2 H200s up to 64 tokens, and S-LoRA's two extra collectives add ~35-50 µs (+65 to +100 %): each NCCL
# collective has a fixed latency of ~20 µs over NVLink whatever its size, comparable to the whole pair's
# compute at these sizes. Eager timing (host launches) inflates it to +200-500 %. So the paper's point
# holds for *bytes*; for latency at decode batch sizes the extra collectives are not free, and one GPU
# (~85 µs for the pair with LoRA) is as fast as two. The paper measures whole-model throughput on larger
# models, where each layer's base compute is far larger than a collective's latency.
#
# ## 9. Explore
#
# Pick the rank mix and the number of adapters: the slots that many resident adapters take (against the
# pool) and the elements MBGMV and padded BMM read per layer for a full batch; and the measured throughput
# of the chosen systems at the sweep's adapter counts.

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    w_ranks = [W.Checkbox(value=r in RANKS, description=f"rank {r}") for r in (4, 8, 16, 32, 64)]
    w_n = W.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048], value=32, description="adapters")
    w_sys = W.SelectMultiple(options=SYSTEMS, value=tuple(SYSTEMS), description="systems")
    out = W.Output()
    fw = go.FigureWidget()
    viz.apply_template(fw, title="measured throughput (CPU sweep)", x="adapters", y="throughput (req/s)")
    fw.update_xaxes(type="log")

    def redraw(*_):
        rs = [r for r, w in zip((4, 8, 16, 32, 64), w_ranks) if w.value] or [8]
        n = w_n.value
        mixn = np.array([rs[i % len(rs)] for i in range(n)])
        batch = np.array([rs[i % len(rs)] for i in range(min(n, MAX_BATCH) if n >= MAX_BATCH else MAX_BATCH)])
        with out:
            out.clear_output()
            print(f"{n} resident adapters, ranks {rs}: {int(4 * mixn.sum()):,} slots "
                  f"({4 * mixn.sum() / POOL_SLOTS:.0%} of the {POOL_SLOTS}-slot pool)")
            print(f"per layer, batch of {len(batch)}: MBGMV reads {8 * cfg.d_model * batch.sum():,} elements, "
                  f"padded BMM {8 * cfg.d_model * len(batch) * batch.max():,}")
        with fw.batch_update():
            fw.data = []
            for s in w_sys.value:
                xs = [k for k in NUM_ADAPTERS if (s, k) in RESULTS]
                fw.add_scatter(x=xs, y=[RESULTS[(s, k)]["throughput_rps"] for k in xs], name=NAMES[s],
                               mode="lines+markers", line=dict(color=viz.color(s)))

    for w in (*w_ranks, w_n, w_sys):
        w.observe(redraw, "value")
    redraw()
    display(W.VBox([W.HBox(w_ranks), W.HBox([w_n, w_sys]), out, fw]))

# %% [markdown]
# ## 10. Going further
#
# - GPU scale: `PYTHONPATH=lib python3 -m mlsys24.slora.bench --rounds 4 --warm 10 --no-eager-check --budget 540`
#   (the committed run: 16 Llama-7B-shaped layers, n ∈ {5, 100, 1000}, decode steps from CUDA graphs,
#   4 paired rounds, ~7 min on an H200; the default is 3 rounds and a 3 s warm-up;
#   `--no-graphs` for the eager engine path); or this notebook on a GPU:
#   `papermill notebooks/21_slora.ipynb out.ipynb -p DEVICE cuda -p NUM_ADAPTERS "[5, 100, 1000]"`.
# - Two GPUs: time S-LoRA's rank-sized collectives (`mlsys24.slora.tp`) against the base all-reduce with NCCL.
# - Workshop questions: why does a page of exactly H elements make adapters and KV interchangeable —
#   and what breaks with grouped-query attention, where K/V rows are shorter than H? When would you rather
#   merge an adapter into W (the paper's merge ablation: one adapter, 1.58 vs 1.41 req/s)? How should
#   the scheduler choose *which* idle adapters to evict when the queue's popularity is skewed (ALPHA < 1)?
