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
#     figure: fidelity
#     headline: 'Paper: simulated latency within 9% of real deployments. Ours (H200,
#       Llama-2-7B shapes, vs the workbench engine at 85% of capacity): vLLM-like P50
#       error E2E 4.1%, TTFT 4.8%, TPOT 2.7% (P95 0.6/10.4/0.1%); Sarathi-like E2E 4.9%,
#       TTFT 14.5%, TPOT 2.4%; replayed step times give the engine''s exact batches;
#       one simulated hour in 7 s'
#     paper: '25'
#     slug: vidur
#     status: partial
# ---

# %% [markdown]
# # Vidur: A Large-Scale Simulation Framework for LLM Inference
#
# Amey Agrawal, Nitin Kedia, Jayashree Mohan, Ashish Panwar, Nipun Kwatra, Bhargav Gulavani, Ramachandran
# Ramjee, Alexey Tumanov (Georgia Tech, Microsoft Research India) · MLSys 2024 ·
# [arXiv 2405.05465](https://arxiv.org/abs/2405.05465) · official code
# [microsoft/vidur](https://github.com/microsoft/vidur) (MIT).
#
# **The idea in one paragraph.** Picking an LLM deployment (parallelism, scheduler, chunk size, batch
# cap) for a workload and latency SLO means trying hundreds of configurations, each a GPU-hours load
# test. Vidur notices that an LLM is built from a handful of operators whose runtime depends on a few
# features (tokens in the batch, K/V lengths), profiles them once, fits a random forest per operator,
# and replays whole serving systems — request arrivals, batching policies, KV memory — in a
# discrete-event simulator on a CPU. Because iterations are milliseconds long and errors compound
# through queueing, fidelity is the whole game: the paper reports latency within 9% of real runs, and
# Vidur-Search finds the best LLaMA2-70B deployment in about one CPU hour instead of 42K GPU hours.
#
# Here (`mlsys24.sim`): the operator profiler over *this workbench's* engine (the shared Llama and its
# paged attention), random-forest operator models with held-out error, Vidur's iteration-time sum plus
# a per-step overhead model fitted from the engine's own step log, an event-driven simulator whose
# replicas run **the same `mlsys24.serving.Scheduler` object** as the real engine (vLLM-, Orca-,
# Sarathi- and static-batching policies), and a capacity search. The ground truth is the workbench's
# engine, not vLLM: the simulator is validated against the system it models. GPU numbers come from
# `python -m mlsys24.sim.bench` (registered as `python -m mlsys24.bench vidur`).

# %% tags=["parameters"]
DEVICE = "cpu"                 # "cpu"; GPU numbers come from data/results/vidur/<gpu>.json (python -m mlsys24.sim.bench)
PROFILE_CSV = None             # a profile CSV (profile.write_csv format) instead of profiling the tiny Llama live
NUM_REQUESTS = 20              # real-vs-sim requests per policy on CPU (card: 64; scaled down for 2 shared cores)
CAL_REQUESTS = 12              # offline calibration burst per policy (fits the per-step overhead)
LOAD = 0.7                     # real-vs-sim arrival rate as a fraction of the simulated capacity
SCHEDULERS = ["vllm", "sarathi"]  # policies compared against the real engine
CHUNK_SIZE = 64                # Sarathi chunk / token budget of the CPU runs
BATCH_CAP = 16                 # max requests per step in the CPU runs
LENGTH_SCALE = 0.06            # CPU trace lengths = chat-trace lengths x this (prompt P50 ~ 61, output P50 ~ 8)
RF_GRID = "fast"               # "fast" (one forest per op), "ci" (2 depths x 3-fold CV), "full" (Vidur's 27-point grid)
SEARCH = "ci"                  # "ci": TP {1,2} x {vLLM, Sarathi-512} x caps {64,128}; "full": TP {1,2,4}, Sarathi 512/1024, caps {32,64,128}
SEARCH_GPUS = 8                # cluster size of the search (replicas = GPUs / TP)
SEARCH_REQUESTS = 100          # requests per simulated trace in the search (card: 200)
SEARCH_STEPS = 4               # bisection steps per capacity (below the saturation throughput)
GPU_PRICE = 1.0                # price of one GPU-hour (relative units), for QPS per dollar
STUDY_REQUESTS = 300           # scheduler study (7B-shaped profile) requests
SEED = 0                       # seed of traces and forests
INTERACTIVE = True             # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, ListOf, Str, validate

validate(globals(), DEVICE=Choice("cpu", "cuda"), NUM_REQUESTS=Int(4, 100_000), CAL_REQUESTS=Int(4, 100_000),
         LOAD=Float(0, 1, lo_open=True), SCHEDULERS=ListOf(Choice("vllm", "sarathi", "orca", "static"), min_len=1),
         CHUNK_SIZE=Int(8, 8192), BATCH_CAP=Int(1, 1024), LENGTH_SCALE=Float(0, 1, lo_open=True),
         RF_GRID=Choice("fast", "ci", "full"), SEARCH=Choice("ci", "full"), SEARCH_GPUS=Int(1, 4096),
         SEARCH_REQUESTS=Int(20, 100_000), SEARCH_STEPS=Int(2, 30), GPU_PRICE=Float(0, 1e6, lo_open=True),
         STUDY_REQUESTS=Int(20, 100_000), SEED=Int(0), INTERACTIVE=Bool())
if PROFILE_CSV is not None:
    validate(globals(), PROFILE_CSV=Str())

# %%
import json
import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.bench import load_results
from mlsys24.models import LlamaConfig, preset, random_llama
from mlsys24.paths import RESULTS_DIR
from mlsys24.sim import (AnalyticCost, ConstantCost, OperatorCost, ProfileGrid, ReplayCost, ReplicaConfig,
                         Simulator, capacity, fit_operator_models, fit_overhead, kv_blocks_for, latency_summary,
                         make_trace, pareto, profile_operators, read_csv, run_engine, scheduler_config, search,
                         synthetic_profile, tp_shard)
from mlsys24.sim.search import grid as search_grid

T_START = time.time()
SLUG = "vidur"
torch.manual_seed(SEED)
torch.set_num_threads(1)  # timings below are per-core; one thread keeps them steadier on shared cores
METRICS = ("e2e", "ttft", "tpot")

# %% [markdown]
# ## 1. Reference: the simulator against queueing theory and a known cost function
#
# Two checks that need no hardware. (a) One replica, one request at a time, deterministic service D,
# Poisson arrivals: the mean scheduling delay must match Pollaczek–Khinchine's M/D/1 wait
# `ρD / (2(1 − ρ))`. (b) A known cost function (`AnalyticCost`: token ops linear in tokens, attention
# linear in B·T·S and B·S, per-step overhead) is "profiled" on the CPU grid (noise-free), random
# forests are fitted to it, and the simulation with the fitted models is compared with the simulation
# with the true function — the error of Vidur's modelling step alone.

# %%
lam, D, n_q = 1.0, 0.5, 4000  # rho = 0.5; four independent replications of 4000 requests
from mlsys24.serving import Request, SchedulerConfig  # noqa: E402

waits = []
for rep_i in range(4):
    arr = np.cumsum(np.random.default_rng(SEED * 10 + rep_i).exponential(1 / lam, n_q))
    md1 = Simulator(ReplicaConfig(SchedulerConfig("orca", max_batch_size=1), 10**6), 1, ConstantCost(D)).run(
        [Request(i, [0] * 8, 1, arrival_s=float(t)) for i, t in enumerate(arr)])
    waits.append(np.array([s.first_scheduled_s - s.request.arrival_s for s in md1.finished])[n_q // 10:])
waits = np.concatenate(waits)
pk = lam * D * D / (2 * (1 - lam * D))
print(f"M/D/1, rho={lam * D:.1f}: simulated mean wait {waits.mean():.3f} s, Pollaczek-Khinchine {pk:.3f} s "
      f"({100 * abs(waits.mean() - pk) / pk:.1f}% off, 4 x {n_q} requests, {md1.sim_wall_s:.2f} s per replication)")

true_cost = AnalyticCost(n_layers=4)
syn_grid = ProfileGrid(num_tokens=list(range(1, 17)) + list(range(24, 1025, 8)),
                       decode_batch=[1, 2, 4, 8, 16], decode_kv=[16, 64, 128, 256, 384, 512],
                       prefill_batch=[1, 2, 4, 8], prefill_q=[8, 16, 32, 64, 128, 256], prefill_prefix=[0, 64, 256],
                       lm_rows=[1, 2, 4, 8, 16, 32])
syn_models = fit_operator_models(synthetic_profile(true_cost, syn_grid, noise=0.0, seed=SEED), grid=RF_GRID, seed=SEED)
syn_fit = OperatorCost(syn_models, true_cost.n_layers, 256)


class FittedPlusKnownOverhead:
    """Fitted operator models + the known per-step overhead (the modelling step's error only)."""

    def step_time(self, shape):
        return syn_fit.op_seconds(shape) + true_cost.step_time(shape) - true_cost.op_seconds(shape)


syn_sc = scheduler_config("sarathi", 16, 128)
syn_trace = make_trace("chat", 150, 30.0, seed=SEED + 2, length_scale=0.1, max_prompt=256, max_output=48)
oracle = latency_summary(Simulator(ReplicaConfig(syn_sc, 2000), 1, true_cost).run(syn_trace).finished)
fitted = latency_summary(Simulator(ReplicaConfig(syn_sc, 2000), 1, FittedPlusKnownOverhead()).run(syn_trace).finished)
SYN_ERR = {k: abs(fitted[k] - oracle[k]) / oracle[k] for k in ("e2e_p50_s", "e2e_p90_s", "ttft_p50_s", "tpot_p50_s")}
syn_op_err = {op: e["weighted_err"] for op, e in syn_models.errors.items()}
print("synthetic ground truth, fitted vs oracle simulation:", {k: f"{100 * v:.2f}%" for k, v in SYN_ERR.items()})
print("held-out operator error on the synthetic profile (time-weighted, points >= 50 us):",
      {k: f"{100 * v:.1f}%" for k, v in syn_op_err.items()})

# %% [markdown]
# **Takeaway.** The event loop reproduces M/D/1 queueing, and with noise-free profiles the random
# forests lose only a few percent of end-to-end latency: what remains for the real runs is measurement
# noise and whatever the engine does outside the profiled operators.

# %% [markdown]
# ## 2. Profile the engine's operators and fit the runtime models (CPU, tiny Llama)
#
# One layer of the workbench's tiny Llama (d = 256, 4 heads, FFN 768, fp32), each operator alone over
# a grid: token-level ops at 1..1024 tokens, the paged attention over (rows B, new tokens T, K/V length
# S), `lm_head` over sampled rows. Vidur's metric: held-out time-weighted error Σ|y − ŷ| / Σy over
# points whose median ≥ 50 µs (per-point MAPE beside it).

# %%
tiny = LlamaConfig()
if PROFILE_CSV:
    prof_rows = read_csv(PROFILE_CSV)
    prof_src = PROFILE_CSV
else:
    cpu_grid = ProfileGrid(num_tokens=sorted({int(x) for x in np.geomspace(1, 1024, 40).round()}),
                           decode_batch=[1, 2, 4, 8, 16], decode_kv=[16, 64, 128, 256, 512],
                           prefill_batch=[1, 2, 4, 8, 16], prefill_q=[8, 32, 64, 128], prefill_prefix=[0, 128],
                           lm_rows=[1, 2, 4, 8, 16], warmup=1, repeats=5)
    t0 = time.perf_counter()
    prof_rows = profile_operators(tiny, cpu_grid, seed=SEED)
    prof_src = f"profiled live on this CPU in {time.perf_counter() - t0:.1f} s"
cpu_models = fit_operator_models(prof_rows, grid=RF_GRID, seed=SEED)
print(f"{len(prof_rows)} profile rows ({prof_src})")
print(f"{'op':16s} {'n_test':>6s} {'>=50us':>6s} {'weighted err':>12s} {'MAPE':>7s}")
for op, e in cpu_models.errors.items():
    print(f"{op:16s} {e['n_test']:6d} {e['n_test_ge50']:6d} {100 * e['weighted_err']:11.1f}% {100 * e['mape']:6.1f}%")

# %%
fig_ops = make_subplots(rows=1, cols=2, subplot_titles=["token-level ops", "attention"])
for op, (y, yh) in cpu_models.test_points.items():
    fig_ops.add_trace(go.Scatter(x=y, y=yh, mode="markers", name=op, marker=dict(color=viz.color(op), size=6)),
                      row=1, col=2 if op == "attention" else 1)
for c in (1, 2):
    fig_ops.add_trace(go.Scatter(x=[1, 1e5], y=[1, 1e5], mode="lines", line=dict(color="#999", dash="dot"),
                                 showlegend=False), row=1, col=c)
    fig_ops.update_xaxes(type="log", title_text="measured (µs)", row=1, col=c)
    fig_ops.update_yaxes(type="log", title_text="predicted (µs)", row=1, col=c)
viz.apply_template(fig_ops, title="Held-out operator predictions (CPU, tiny Llama)", height=430)
viz.caption(fig_ops, "CPU, fp32, 1 thread, median of 5; shared cores, so timings carry contention noise.")
viz.save(fig_ops, SLUG, "operator_models")
fig_ops

# %% [markdown]
# **Takeaway.** On a CPU the tiny model's operators are tens to hundreds of microseconds and noisy;
# the forests interpolate well where the grid is dense. The GPU profile (section 6) is the one the
# paper's claims are about.

# %% [markdown]
# ## 3. Back-of-envelope: what a step costs
#
# For Llama-2-7B in fp16 one decode step reads all 13.5 GB of weights: at H100's 3.35 TB/s that is
# ≥ 4 ms, whatever the batch (until ~150 tokens, where the GEMMs turn compute-bound at 989 TFLOP/s).
# K/V per token is 2·32·32·128·2 B = 0.5 MB, so an 80 GB H100 holds ~117K tokens of K/V after the
# weights (Vidur's memory planner, 10% margin). Step times of milliseconds with per-step overheads of
# the same order are exactly where a simulator needs an overhead model.

# %%
c7 = preset("llama2-7b")
print(f"Llama-2-7B: {c7.n_params() / 1e9:.2f} B params, {2 * c7.n_params() / 1e9:.1f} GB fp16; "
      f"decode floor {2 * c7.n_params() / 3.35e12 * 1e3:.1f} ms at 3.35 TB/s; "
      f"K/V {c7.kv_bytes_per_token(2) / 2**20:.2f} MiB/token; "
      f"KV blocks (16 tokens) on 80 GB: TP1 {kv_blocks_for(c7, 80e9, 1)}, TP2 {kv_blocks_for(c7, 80e9, 2)} per GPU group")

# %% [markdown]
# ## 4. Real engine vs simulator on the same trace (CPU)
#
# For each policy: (1) an offline burst through the real engine fits the per-step overhead
# (`measured − Σ predicted ops`, Vidur's CPU-overhead model); (2) the simulator finds the capacity;
# (3) the engine serves a chat-shaped Poisson trace at `LOAD` × that capacity, and the simulator runs
# the same trace; (4) P50/P95 of E2E, TTFT and TPOT are compared. Then the engine's measured step
# times are replayed through the simulator: with the same step times, the simulator must form
# exactly the engine's batches, step by step (the scheduler is one object, not two copies).

# %%
model = random_llama(tiny, "cpu", torch.float32, seed=SEED)
trace_kw = dict(length_scale=LENGTH_SCALE, max_prompt=256, max_output=48, vocab=tiny.vocab_size)
N_BLOCKS = 512
REAL = {}
for pol in SCHEDULERS:
    sc = scheduler_config(pol, BATCH_CAP, CHUNK_SIZE)
    cost = OperatorCost(cpu_models, tiny.n_layers, tiny.d_model)
    cal = make_trace("chat", CAL_REQUESTS, None, seed=SEED + 100, token_ids=True, **trace_kw)
    rc = run_engine(model, cal, sc, n_blocks=N_BLOCKS)
    cost.overhead = fit_overhead(rc.shapes, rc.durations_s, cost)
    unit = make_trace("chat", NUM_REQUESTS, 1.0, seed=SEED, **trace_kw)
    cap = capacity(unit, ReplicaConfig(sc, N_BLOCKS), 1, cost, slo_delay_s=2.0, steps=5)["capacity_qps"]
    qps = LOAD * cap
    rr = run_engine(model, make_trace("chat", NUM_REQUESTS, qps, seed=SEED, token_ids=True, **trace_kw), sc,
                    n_blocks=N_BLOCKS)
    sim = Simulator(ReplicaConfig(sc, N_BLOCKS), 1, cost).run(make_trace("chat", NUM_REQUESTS, qps, seed=SEED, **trace_kw))
    replay = Simulator(ReplicaConfig(sc, N_BLOCKS), 1, ReplayCost(rr.step_intervals())).run(
        make_trace("chat", NUM_REQUESTS, qps, seed=SEED, **trace_kw))
    a, b = rr.summary(), latency_summary(sim.finished)
    REAL[pol] = {"qps": qps, "real": a, "sim": b, "real_run": rr, "sim_run": sim,
                 "same_batches": replay.plans() == rr.plans, "n_steps": len(rr.plans),
                 "err": {f"{m}_p{q}": abs(b[f"{m}_p{q}_s"] - a[f"{m}_p{q}_s"]) / a[f"{m}_p{q}_s"]
                         for m in METRICS for q in (50, 95)}}
    print(f"{pol:8s} {NUM_REQUESTS} requests at {qps:.2f} QPS ({LOAD:.0%} of simulated capacity {cap:.2f}); "
          f"replayed batches identical: {REAL[pol]['same_batches']} ({len(rr.plans)} steps)")
    print("         " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in REAL[pol]["err"].items()))

# %%
fig_cdf = make_subplots(rows=1, cols=len(SCHEDULERS), subplot_titles=[f"{p}: E2E latency CDF" for p in SCHEDULERS])
for j, pol in enumerate(SCHEDULERS):
    for who, run in (("real engine", REAL[pol]["real_run"].finished), ("simulator", REAL[pol]["sim_run"].finished)):
        x = np.sort([s.finish_s - s.request.arrival_s for s in run])
        fig_cdf.add_trace(go.Scatter(x=x, y=np.arange(1, len(x) + 1) / len(x), mode="lines", name=who,
                                     line=dict(color=viz.color("ours" if who == "simulator" else "reference")),
                                     showlegend=j == 0), row=1, col=j + 1)
    fig_cdf.update_xaxes(title_text="E2E latency (s)", row=1, col=j + 1)
fig_cdf.update_yaxes(title_text="fraction of requests", row=1, col=1)
viz.apply_template(fig_cdf, title="Simulated vs measured E2E latency (CPU, tiny Llama)", height=420)
viz.caption(fig_cdf, f"CPU, {NUM_REQUESTS} chat-shaped requests per policy (lengths x{LENGTH_SCALE}), {LOAD:.0%} of the "
            "simulated capacity; 2 shared cores: step times carry contention noise.")
viz.save(fig_cdf, SLUG, "fidelity_cpu")
fig_cdf

# %% [markdown]
# **Takeaway.** Given the engine's own step times the simulator forms the engine's batches exactly —
# the policy is shared code. The remaining latency error is step-time prediction error amplified by
# queueing; on two contended CPU cores it is far above the paper's 9% (see section 6 for the GPU).

# %% [markdown]
# ## 5. Scheduler study and Vidur-Search on a 7B-shaped profile
#
# The operator profile of Llama-2-7B from the GPU run (`data/results/vidur/profile_tp{1,2}_<gpu>.csv`,
# fp16, random weights) drives the simulator; without it, a roofline-synthesised `AnalyticCost` stands
# in (labelled). Here the step is composed as in a *varlen* engine like the paper's systems (token
# ops over the valid tokens, prefill and decode attention separately, `padded=False`): the workbench
# engine pads mixed batches to `[B, T]`, which would charge every decode row of a Sarathi batch a
# full chunk. The study: vLLM vs Sarathi-512 on an arxiv-shaped trace at equal QPS (Sarathi's
# chunking should remove the prefill stalls that dominate vLLM's P99 TBT). The search: TP × scheduler
# × batch cap on `SEARCH_GPUS` GPUs, capacity = max QPS with P99 scheduling delay ≤ 5 s, then QPS per
# dollar, the latency SLO (TTFT P90 ≤ 2 s, TBT P99 ≤ 200 ms) and the Pareto frontier.

# %%
gpu_csvs = {tp: sorted((RESULTS_DIR / SLUG).glob(f"profile_tp{tp}_*.csv")) for tp in (1, 2, 4)}
WANT_TPS = [1, 2] if SEARCH == "ci" else [1, 2, 4]
PROFILED = [tp for tp in WANT_TPS if gpu_csvs[tp]]
# one kind of step model for every configuration: the GPU forests where profiles exist (TP degrees
# without a profile are left out, not mixed with a different model), the roofline otherwise
SEARCH_TPS = PROFILED if 1 in PROFILED else WANT_TPS
COSTS, COST_SRC = {}, {}
for tp in SEARCH_TPS:
    if tp in PROFILED:
        om = fit_operator_models(read_csv(gpu_csvs[tp][0]), grid="fast", seed=SEED)
        COSTS[tp] = OperatorCost(om, c7.n_layers, c7.d_model, tp=tp, padded=False)
        COST_SRC[tp] = f"TP{tp}: forests on the {gpu_csvs[tp][0].name.split('_', 2)[-1][:-4]} profile"
    else:  # roofline-synthesised: weights / (0.8 x 3.35 TB/s) per step + 2 FLOP/param/token at 60% of 989 TF
        w = 2 * c7.n_params() / tp
        COSTS[tp] = AnalyticCost(n_layers=c7.n_layers, per_token_s=2 * c7.n_params() / tp / (0.6 * 989e12) / c7.n_layers,
                                 per_attn_s=4 * c7.d_model / tp / (0.6 * 989e12),
                                 per_kv_s=c7.kv_bytes_per_token(2) / tp / c7.n_layers / (0.8 * 3.35e12),
                                 per_layer_s=w / c7.n_layers / (0.8 * 3.35e12), per_step_s=2e-3, per_row_s=0,
                                 padded=False)
        COST_SRC[tp] = f"TP{tp}: roofline-synthesised (H100 datasheet)"
if set(SEARCH_TPS) != set(WANT_TPS):
    print(f"TP degrees without a GPU profile left out of the search: {sorted(set(WANT_TPS) - set(SEARCH_TPS))}")
cost_src = "; ".join(COST_SRC[tp] for tp in sorted(COST_SRC)) + " (varlen step, no overhead term)"
print("7B step-time models:", cost_src)
BLOCKS = {tp: kv_blocks_for(c7, 80e9, tp) for tp in (1, 2, 4)}
arxiv = make_trace("arxiv", STUDY_REQUESTS, 1.0, seed=SEED + 5, length_scale=0.5, max_prompt=2048, max_output=512)
STUDY = {}
study_qps = None
for name in ("vllm", "sarathi"):
    rep = ReplicaConfig(scheduler_config(name, 128, 512), BLOCKS[1])
    if study_qps is None:
        study_qps = 0.7 * capacity(arxiv, rep, 1, COSTS[1], steps=4)["capacity_qps"]
    from mlsys24.sim import scale_arrivals  # noqa: E402

    res = Simulator(rep, 1, COSTS[1]).run(scale_arrivals(arxiv, 1 / study_qps))
    STUDY[name] = {"summary": latency_summary(res.finished), "batch": [len(s["rows"]) for s in res.steps]}
for name, st in STUDY.items():
    s = st["summary"]
    print(f"{name:8s} at {study_qps:.2f} QPS: TBT P99 {1e3 * s['tbt_p99_s']:.0f} ms, TTFT P50 {s['ttft_p50_s']:.2f} s, "
          f"E2E P50 {s['e2e_p50_s']:.1f} s, mean batch {np.mean(st['batch']):.1f}")

# %%
if SEARCH == "ci":
    CONFIGS = search_grid(SEARCH_TPS, ["vllm", ("sarathi", 512)], [64, 128])
else:
    CONFIGS = search_grid(SEARCH_TPS, ["vllm", ("sarathi", 512), ("sarathi", 1024)], [32, 64, 128])
chat = make_trace("chat", SEARCH_REQUESTS, 1.0, seed=SEED + 9, length_scale=0.5, max_prompt=2048, max_output=512)
t0 = time.perf_counter()
RESULTS = search(chat, CONFIGS, COSTS, n_gpus=SEARCH_GPUS, blocks_for_tp=BLOCKS, gpu_price_per_hour=GPU_PRICE,
                 steps=SEARCH_STEPS)
SEARCH_CPU_S = time.perf_counter() - t0
for r in sorted(RESULTS, key=lambda r: -r["qps_per_dollar"]):
    print(f"{r['label']:22s} {r['replicas']} replicas: capacity {r['capacity_qps']:6.2f} QPS, "
          f"{r['qps_per_dollar']:.3f} QPS/$, TTFT P90 {r['ttft_p90_s']:.2f} s, TBT P99 {1e3 * r['tbt_p99_s']:.0f} ms"
          f"{'' if r['meets_latency_slo'] else '  (misses latency SLO)'}")
ok = [r for r in RESULTS if r["meets_latency_slo"]] or RESULTS
BEST = max(ok, key=lambda r: r["qps_per_dollar"])
n_sims = sum(r["n_sims"] for r in RESULTS)
print(f"best under the SLO: {BEST['label']}; {len(RESULTS)} configurations, {n_sims} simulations in {SEARCH_CPU_S:.1f} CPU-s")
if SEARCH == "full":
    out = RESULTS_DIR / SLUG / "search_full.json"
    out.write_text(json.dumps({"configs": RESULTS, "cost_source": cost_src, "requests": SEARCH_REQUESTS,
                               "gpus": SEARCH_GPUS, "cpu_s": SEARCH_CPU_S}, indent=1, default=float) + "\n")
    print("wrote", out)

# %%
front = pareto(RESULTS, "qps_per_dollar", "ttft_p90_s")
fig_s = go.Figure()
for sched in sorted({r["scheduler"] for r in RESULTS}):
    rs = [r for r in RESULTS if r["scheduler"] == sched]
    fig_s.add_trace(go.Scatter(x=[r["qps_per_dollar"] for r in rs], y=[r["ttft_p90_s"] for r in rs], mode="markers+text",
                               text=[r["label"] for r in rs], textposition="top center", name=sched,
                               marker=dict(size=11, color=viz.color(sched))))
front = sorted(front, key=lambda r: r["qps_per_dollar"])
fig_s.add_trace(go.Scatter(x=[r["qps_per_dollar"] for r in front], y=[r["ttft_p90_s"] for r in front], mode="lines",
                           name="Pareto frontier", line=dict(color="#444", dash="dash")))
viz.apply_template(fig_s, title="Vidur-Search: capacity per dollar vs TTFT at capacity", x="capacity per dollar (QPS per GPU-hour unit)",
                   y="TTFT P90 at capacity (s)", height=460)
viz.caption(fig_s, f"Simulated, Llama-2-7B shapes on {SEARCH_GPUS} GPUs, {SEARCH_REQUESTS} chat-shaped requests (lengths x0.5); "
            f"capacity: P99 scheduling delay <= 5 s; step times: {cost_src}.")
viz.save(fig_s, SLUG, "search")
fig_s

# %%
full_path = RESULTS_DIR / SLUG / "search_full.json"
if SEARCH == "ci" and full_path.exists():
    FULL = json.loads(full_path.read_text())
    ok_full = [r for r in FULL["configs"] if r["meets_latency_slo"]] or FULL["configs"]
    print(f"committed full search ({len(FULL['configs'])} configurations, {FULL['requests']} requests, "
          f"{FULL['cpu_s']:.0f} CPU-s; {FULL['cost_source']}):")
    for r in sorted(ok_full, key=lambda r: -r["qps_per_dollar"])[:5]:
        print(f"  {r['label']:22s} capacity {r['capacity_qps']:6.2f} QPS, {r['qps_per_dollar']:.3f} QPS/$, "
              f"TTFT P90 {r['ttft_p90_s']:.2f} s, TBT P99 {1e3 * r['tbt_p99_s']:.0f} ms")
elif SEARCH == "ci":
    print("no committed full search: papermill ... -p SEARCH full writes data/results/vidur/search_full.json")

# %% [markdown]
# **Takeaway.** The search ranks deployments in CPU-seconds; the capacity criterion (scheduling delay)
# and the latency SLO (TTFT/TBT) are different filters, and the cheapest configuration by capacity is
# not always the one that meets the latency SLO. TP=2 here uses an analytic all-reduce (no multi-GPU
# profile this round), so its ranking is indicative only.

# %% [markdown]
# ## 6. GPU: the simulator against the real engine at Llama-2-7B shapes
#
# From `data/results/vidur/<gpu>.json` (`python -m mlsys24.sim.bench`): operator profile and forests at
# TP=1/TP=2 shard shapes; for vLLM-like and Sarathi-like policies the real engine (random fp16 weights,
# CUDA-graph decode) at 0.85× the simulator's capacity and the simulator on the same trace.
#
# Provenance note: the committed H200 file was measured with the first version of the calibration
# (least squares over every calibration step, no warm-up run before it). Its vLLM-like run predicts
# decode steps about 3× too long (simulated TPOT P50 84 ms vs 28 ms measured); the most likely cause
# is CUDA-graph captures (hundreds of ms, once per batch/context bucket) inside the calibration steps.
# The bench now warms the engine up first, trims outlier steps from the fit and adds the graph batch
# bucket as a feature; those changes have not been re-measured on a GPU yet.

# %%
gpu_files = [rf for rf in load_results(SLUG) if rf.meta.get("device_type") == "cuda" and not rf.path.name.endswith(".quick.json")]
GPU_RES = gpu_files[0] if gpu_files else None
GPU_FID = {}
if GPU_RES is None:
    print("skipped: no GPU results; run `PYTHONPATH=lib python3 -m mlsys24.sim.bench --out data/results/vidur` on a GPU")
else:
    print(f"GPU results: {GPU_RES.caption()}")
    GPU_FID = {r["policy"]: r for r in GPU_RES.records if r["kind"] == "fidelity"}
    for r in GPU_RES.records:
        if r["kind"] == "op_model" and r["tp"] == 1 and r["weighted_err"] is not None:
            print(f"  op model {r['op']:15s} held-out weighted error {100 * r['weighted_err']:5.1f}% (MAPE {100 * r['mape']:.1f}%)")
    for pol, r in GPU_FID.items():
        print(f"  {pol:8s}: {r['completed_real']}/{r['requests']} real and {r['completed_sim']} simulated requests at "
              f"{r['qps']:.2f} QPS (0.85 x {r['sim_capacity_qps']:.2f}); step-time error {100 * r['step_time_weighted_err']:.1f}%")
        for m in METRICS:
            e50, e95 = r[f"{m}_p50_err"], r[f"{m}_p95_err"]
            flag = "" if (e50 <= 0.05 and e95 <= 0.10) else "   <- misses the goal (P50 <= 5%, P95 <= 10%)"
            print(f"      {m:5s} P50 err {100 * e50:5.1f}%  P95 err {100 * e95:5.1f}%{flag}")

# %%
if GPU_FID:
    cats = [f"{p} {m} P{q}" for p in GPU_FID for m in METRICS for q in (50, 95)]
    ours = [100 * GPU_FID[p][f"{m}_p{q}_err"] for p in GPU_FID for m in METRICS for q in (50, 95)]
    fig_g = viz.paper_vs_ours(cats, ours, [9.0] * len(cats), title="Simulator error vs the real engine (GPU)",
                              y="relative error (%)", paper_label="paper bound (< 9%)", text_fmt=".1f")
    viz.caption(fig_g, GPU_RES.caption() + "<br>Llama-2-7B shapes, random fp16 weights, chat-shaped trace; paper: LLaMA2/InternLM/Qwen "
                "on A100/H100 against Sarathi-Serve's runtime.")
    viz.save(fig_g, SLUG, "fidelity")
    fig_g

# %%
if GPU_FID:
    fig_gc = make_subplots(rows=1, cols=2, subplot_titles=["E2E latency CDF", "TTFT CDF"])
    for pol, r in GPU_FID.items():
        for j, m in enumerate(("e2e", "ttft")):
            for who, dash in (("real", "solid"), ("sim", "dash")):
                x = np.sort(r[f"{who}_{m}"])
                fig_gc.add_trace(go.Scatter(x=x, y=np.arange(1, len(x) + 1) / len(x), mode="lines",
                                            name=f"{pol} {'engine' if who == 'real' else 'simulator'}",
                                            line=dict(color=viz.color(pol), dash=dash), showlegend=j == 0),
                                 row=1, col=j + 1)
            fig_gc.update_xaxes(title_text=f"{m.upper()} (s)", type="log", row=1, col=j + 1)
    fig_gc.update_yaxes(title_text="fraction of requests", row=1, col=1)
    viz.apply_template(fig_gc, title="GPU: measured (solid) vs simulated (dashed) latency", height=430)
    viz.caption(fig_gc, GPU_RES.caption())
    viz.save(fig_gc, SLUG, "cdf_gpu")
    fig_gc

# %%
if GPU_FID and all("steps" in r for r in GPU_FID.values()):
    fig_st = go.Figure()
    for pol, r in GPU_FID.items():
        st = np.array(r["steps"])
        fig_st.add_trace(go.Scattergl(x=st[:, 4], y=st[:, 5], mode="markers", name=pol, opacity=0.5,
                                      marker=dict(size=4, color=viz.color(pol))))
    top = max(float(np.max(np.array(r["steps"])[:, 4:])) for r in GPU_FID.values())
    fig_st.add_trace(go.Scatter(x=[0.5, top], y=[0.5, top], mode="lines", line=dict(color="#999", dash="dot"), name="y = x"))
    viz.apply_template(fig_st, title="Step time: predicted vs measured (GPU engine, evaluation runs)",
                       x="measured step time (ms)", y="predicted step time (ms)", height=430)
    fig_st.update_xaxes(type="log")
    fig_st.update_yaxes(type="log")
    viz.caption(fig_st, GPU_RES.caption())
    viz.save(fig_st, SLUG, "steps_gpu")
    fig_st

# %% [markdown]
# **Takeaway.** On the H200 both schedulers are predicted at 85 % of capacity to within the paper's
# "< 9 %" for E2E and TPOT at P50 and P95 (vLLM-like 4.1 / 0.6 % E2E, Sarathi-like 4.9 / 9.6 %). TTFT is
# the hard metric: it is mostly queueing delay, which a few percent of step-time bias near capacity
# magnifies (vLLM-like P95 10.4 %, Sarathi-like P50 14.5 %, where the chunked prefill of a prompt spans
# several steps shared with decodes). An earlier H200 run missed the vLLM-like case by 35 % P50; its
# per-step records showed why: an eager prefill step of this engine takes ~80 ms for one prompt of 8 to
# 1024 tokens (the host's launches, not the device, set its time), and those steps kept getting faster
# through the run (measured/predicted 0.94 in the first sixth, 0.83 in the last) — a warm-up the bench
# had not finished before calibrating. The bench now warms the engine with prompts of many widths arriving
# one by one before it calibrates, and the drift, and most of the error, are gone.

# %% [markdown]
# ## 7. Claims

# %%
# 1. Simulator invariants: every request completes in order a <= s <= f <= c.
for pol in SCHEDULERS:
    fin = REAL[pol]["sim_run"].finished
    assert len(fin) == NUM_REQUESTS
    assert all(s.request.arrival_s <= s.first_scheduled_s <= s.token_times_s[0] <= s.finish_s for s in fin)
# Queueing theory: M/D/1 mean wait within 10% of Pollaczek-Khinchine (4 x 4000 requests).
assert abs(waits.mean() - pk) / pk < 0.10, (waits.mean(), pk)
# 2. Predictor quality on the synthetic profile: each token-level op's held-out time-weighted error
#    <= 5% (attention, a 3-feature forest on a sparse grid, is reported: <= 15% asserted).
assert all(v <= 0.05 for op, v in syn_op_err.items() if v == v and op != "attention"), syn_op_err
assert syn_op_err["attention"] <= 0.15, syn_op_err
# CPU profile: reported per op; the card's <= 20% target for token-level ops, checked and flagged.
miss = {op: e["weighted_err"] for op, e in cpu_models.errors.items() if op != "attention" and e["weighted_err"] > 0.20}
if miss:
    print("NOT REPRODUCED: CPU operator-model error <= 20% for every token-level op; over it:",
          {k: f"{100 * v:.0f}%" for k, v in miss.items()})
# 3. Synthetic ground truth: P50 and P90 E2E with fitted models within 5% of the oracle simulation.
assert SYN_ERR["e2e_p50_s"] <= 0.05 and SYN_ERR["e2e_p90_s"] <= 0.05, SYN_ERR
# 4. One scheduler: replaying the engine's step times, the simulator forms the engine's batches exactly.
assert all(REAL[p]["same_batches"] for p in SCHEDULERS)
# 5. Scheduling: Sarathi-512's P99 TBT below vLLM's at equal QPS (arxiv-shaped trace).
assert STUDY["sarathi"]["summary"]["tbt_p99_s"] < STUDY["vllm"]["summary"]["tbt_p99_s"]
# 6. Search: 2x replicas give >= capacity; the capacity meets the delay SLO.
r1 = [r for r in RESULTS if r["tp"] == 1 and r["scheduler"] == "vllm"][0]
cap2 = capacity(chat, ReplicaConfig(scheduler_config("vllm", r1["batch_cap"]), BLOCKS[1]), 2 * r1["replicas"], COSTS[1],
                steps=SEARCH_STEPS)
assert cap2["capacity_qps"] >= r1["capacity_qps"] > 0
assert all(r["sched_delay_p99_s"] <= 5.0 for r in RESULTS if r["capacity_qps"] > 0)
# 7. Real vs sim on CPU: P50 E2E within 35% for every policy (loose: 2 noisy shared cores).
cpu_e2e = {p: REAL[p]["err"]["e2e_p50"] for p in SCHEDULERS}
print("CPU real-vs-sim P50 E2E error:", {k: f"{100 * v:.0f}%" for k, v in cpu_e2e.items()})
if any(v > 0.35 for v in cpu_e2e.values()):
    print("NOT REPRODUCED: CPU real-vs-sim P50 E2E error <= 35% for every policy")
# 8. GPU: both policies served their requests to completion; errors vs the goal printed above.
if GPU_FID:
    for pol, r in GPU_FID.items():
        assert r["completed_real"] == r["requests"] == r["completed_sim"], r
        bad = [m for m in METRICS if r[f"{m}_p50_err"] > 0.05 or r[f"{m}_p95_err"] > 0.10]
        if bad:
            print(f"NOT REPRODUCED ({pol}, {GPU_RES.meta.get('device')}): P50 <= 5% / P95 <= 10% for {bad}")
        if r["requests"] < 300:
            print(f"scale-down: {pol} ran {r['requests']} requests (card: 300) to fit one device call")
print("claims checked")

# %% [markdown]
# ## 8. Explore
#
# Re-simulate the 7B-shaped model (section 5's step-time models) on another trace shape, load,
# scheduler and chunk size; each change runs a ~100-request simulation (well under a second).

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    w_trace = W.Dropdown(options=["chat", "arxiv", "code"], value="chat", description="trace")
    w_sched = W.Dropdown(options=["vllm", "sarathi", "orca", "static"], value="sarathi", description="scheduler")
    w_chunk = W.SelectionSlider(options=[128, 256, 512, 1024, 2048], value=512, description="chunk")
    w_qps = W.FloatSlider(value=1.0, min=0.1, max=10.0, step=0.1, description="QPS")
    w_tp = W.Dropdown(options=sorted(COSTS), value=1, description="TP")
    fw = go.FigureWidget(layout=dict(template="plotly_white", height=380, xaxis_title="latency (s)",
                                     yaxis_title="fraction of requests"))
    txt = W.HTML()

    def _update(*_):
        reqs = make_trace(w_trace.value, 100, w_qps.value, seed=SEED, length_scale=0.5, max_prompt=2048, max_output=512)
        rep = ReplicaConfig(scheduler_config(w_sched.value, 128, w_chunk.value), BLOCKS[w_tp.value])
        res = Simulator(rep, 1, COSTS[w_tp.value]).run(reqs)
        s = latency_summary(res.finished)
        with fw.batch_update():
            fw.data = []
            for m in ("ttft", "e2e"):
                x = np.sort([(q.token_times_s[0] if m == "ttft" else q.finish_s) - q.request.arrival_s for q in res.finished])
                fw.add_scatter(x=x, y=np.arange(1, len(x) + 1) / len(x), name=m.upper(), mode="lines")
        txt.value = (f"TTFT P50 {s['ttft_p50_s']:.2f} s · TBT P99 {1e3 * s['tbt_p99_s']:.0f} ms · "
                     f"E2E P50 {s['e2e_p50_s']:.1f} s · simulated in {res.sim_wall_s:.2f} s")

    for w in (w_trace, w_sched, w_chunk, w_qps, w_tp):
        w.observe(_update, names="value")
    _update()
    display(W.VBox([W.HBox([w_trace, w_sched, w_tp]), W.HBox([w_chunk, w_qps]), txt, fw]))

# %%
print(f"notebook ran in {time.time() - T_START:.1f} s")

# %% [markdown]
# ## 9. Going further
#
# - GPU scale: `PYTHONPATH=lib python3 -m mlsys24.sim.bench --out data/results/vidur` (profiles
#   Llama-2-7B shapes at TP 1/2, fits the forests, runs engine and simulator for vLLM and Sarathi;
#   about 6 minutes on one H100/H200), then re-run this notebook.
# - The full search: `papermill notebooks/25_vidur.ipynb out.ipynb -p SEARCH full -p SEARCH_REQUESTS 300`
#   writes `data/results/vidur/search_full.json`; `-p RF_GRID full` uses Vidur's 27-setting forest grid.
# - Your own profile: `-p PROFILE_CSV path.csv` (columns `op,num_tokens,batch,q_len,kv_len,median_us,...`).
# - Workshop questions: (1) Why does a padded engine make `B·T`, not `Σ tokens`, the feature of the
#   token-level ops — and what would change for a FlashAttention-varlen engine? (2) Where does the
#   fitted overhead term come from on a GPU with CUDA graphs, and why does it differ for decode-only
#   and mixed steps? (3) Errors compound near capacity: sweep `LOAD` and plot the P95 error. (4) The
#   search's capacity criterion is scheduling delay; which configuration wins if the criterion is the
#   TBT SLO instead?
