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
#     figure: quality_vs_budget
#     headline: 'Paper: >=99% of full accuracy at 70% KV, 2.1x lower latency and 2.4x
#       tokens/s at 50% KV (A100). Ours: tiny Llama at 50% KV, Keyformer beats window
#       attention on PPL/KL/top-1/ROUGE-L (3 noise replicas); H200, 7B shape, 8K prompts,
#       scores taken from the attention pass: Keyformer-50% 1.54x Full tokens/s at equal
#       memory (batch 52 vs 24), 1.21x at equal batch (scoring 8.6% of the step); batch-1
#       latency 1.01x (paper 2.1x NOT reproduced)'
#     paper: 09
#     slug: keyformer
#     status: partial
# ---

# %% [markdown]
# # Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference
#
# Muhammad Adnan, Akhil Arunkumar, Gaurav Jain, Prashant J. Nair, Ilya Soloveychik, Purushotham Kamath
# (UBC, d-Matrix) · MLSys 2024 · [arXiv 2403.09054](https://arxiv.org/abs/2403.09054) · official code
# [d-matrix-ai/keyformer-llm](https://github.com/d-matrix-ai/keyformer-llm) (patched HF modeling files for
# MPT / GPT-J / Cerebras-GPT; `summarization/`, `conversation/`, `lm_eval_harness/` drivers).
#
# **The idea in one paragraph.** Every decoded token reads the whole KV cache, and for long prompts the
# cache outgrows the weights, so decode time is dominated by KV traffic. Attention is sparse: most of its
# mass falls on a few *key tokens*. Keyformer keeps a budget of `k` tokens per layer and head: a recent
# window of `w` tokens plus the `k − w` tokens with the highest *accumulated score*
# `f(x_j) = softmax((x_j + g_j) / τ)` of the pre-softmax logits, where `g` is Gumbel noise and the
# temperature τ rises from 1 to 2 over the generation. The noise and temperature compensate for the bias
# that eviction itself creates (once tokens are dropped, softmax mass is redistributed unevenly over the
# survivors); H2O is the same scheme with plain softmax scores, window attention keeps only recent tokens.
#
# Here: the policies (Full, Window, StreamingLLM sinks, H2O, Keyformer) in `mlsys24.kvcache` on one
# interface, a per-(layer, head) cache that is **physically compacted** (budget `k + 1` slots, the
# evicted slot overwritten in place, a position map for RoPE) and a masked twin that reproduces the
# official code's simulation, checked against each other; quality on the workbench's tiny Llama
# (byte-level, committed CPython-stdlib corpus, validation split); decode speed on a 7B-shaped model from
# `python -m mlsys24.kvcache.bench` (GPU).

# %% tags=["parameters"]
KV_BUDGET = 0.5               # KV budget (fraction of the prompt) of the claims and the explorer's default
BUDGETS = [0.3, 0.5]          # budgets of the quality-vs-budget sweep (100 % = Full is always added)
RECENT_RATIO = 0.7            # recent window w = floor(k * RECENT_RATIO) (chosen on train-split prompts; paper 0.3)
PROMPT_NORM = True            # divide prompt-phase column sums by the rows that see each token (paper: False)
PAPER_RECENT_RATIO = 0.3      # the paper's defaults, also run at KV_BUDGET for comparison...
PAPER_PROMPT_NORM = False     # ...(official repo: --recent 30, plain sums)
TAU_INIT = 1.0                # Keyformer temperature at the prompt
TAU_END = 2.0                 # Keyformer temperature after GEN_LEN decode steps
NOISE = "gumbel"              # Keyformer score noise: "gumbel" | "gaussian" | "none"
SINK_TOKENS = 4               # StreamingLLM attention sinks
N_PROMPTS = 8                 # prompts from the validation split (card: 32)
PROMPT_LEN = 192              # prompt tokens (bytes)
GEN_LEN = 32                  # teacher-forced continuation tokens (card: 64)
SEEDS = [0, 1, 2]             # Keyformer noise: one replica of the prompts per entry, independent draws from a
                              # generator seeded SEEDS[0] (results averaged over replicas, spread shown)
SCORE_CHUNK = 64              # prompt scoring: query rows per chunk (never the whole n x n block)
ROUGE = True                  # greedy generation at KV_BUDGET + token ROUGE-L vs the Full generation
TUNE_RECENT = False           # re-run the recent-ratio / normalisation choice on train-split prompts (slow)
BENCH = "auto"                # GPU numbers: "auto" (live on a GPU, else the results JSON), "json", "skip"
BENCH_PROMPT_LENS = [2048, 4096, 8192]  # (live GPU run) prompt lengths; the committed run used these
MODEL_PATH = None             # an HF Llama directory to evaluate instead of the tiny Llama
EVAL_TEXT_PATH = None         # a UTF-8 text file for prompts instead of the validation split
THREADS = 1                   # torch CPU threads
SEED = 0                      # seed of the prompt windows
INTERACTIVE = True            # build the ipywidgets explorer at the end

# %%
from mlsys24.params import Bool, Choice, Float, Int, ListOf, Str, validate

validate(globals(), KV_BUDGET=Float(0, 1, lo_open=True), BUDGETS=ListOf(Float(0, 1, lo_open=True), min_len=1),
         RECENT_RATIO=Float(0, 1), PROMPT_NORM=Bool(), PAPER_RECENT_RATIO=Float(0, 1), PAPER_PROMPT_NORM=Bool(),
         TAU_INIT=Float(0, 100, lo_open=True), TAU_END=Float(0, 100, lo_open=True),
         NOISE=Choice("gumbel", "gaussian", "none"), SINK_TOKENS=Int(0, 1024), N_PROMPTS=Int(1, 4096),
         PROMPT_LEN=Int(16, 100_000), GEN_LEN=Int(2, 100_000), SEEDS=ListOf(Int(0), min_len=1),
         SCORE_CHUNK=Int(1, 100_000), ROUGE=Bool(), TUNE_RECENT=Bool(), BENCH=Choice("auto", "json", "skip"),
         BENCH_PROMPT_LENS=ListOf(Int(64, 1_000_000), min_len=1), THREADS=Int(1, 256), SEED=Int(0),
         INTERACTIVE=Bool())
if MODEL_PATH is not None:
    validate(globals(), MODEL_PATH=Str())
if EVAL_TEXT_PATH is not None:
    validate(globals(), EVAL_TEXT_PATH=Str())
assert KV_BUDGET in BUDGETS, "KV_BUDGET must be one of BUDGETS (the claims read the sweep)"

# %%
import math
import time

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlsys24 import viz
from mlsys24.kvcache import (
    KVPolicyConfig,
    PolicyKVCache,
    attention_mass_cdf,
    budget_tokens,
    greedy,
    gumbel,
    policy_backend,
    prompt_scores,
    quality_metrics,
    rouge_l,
    teacher_forced,
    tokens_for_mass,
    validation_prompts,
)
from mlsys24.models import ByteTokenizer, load_hf_llama, load_tiny_llama

T_START = time.time()
SLUG = "keyformer"
torch.set_num_threads(THREADS)
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
model = load_hf_llama(MODEL_PATH, device=DEV) if MODEL_PATH else load_tiny_llama(device=DEV)
ids = None
if EVAL_TEXT_PATH:
    ids = ByteTokenizer().encode_tensor(open(EVAL_TEXT_PATH, "rb").read())
PROMPTS, CONTS = validation_prompts(N_PROMPTS, PROMPT_LEN, GEN_LEN, seed=SEED, ids=ids)
PROMPTS, CONTS = PROMPTS.to(DEV), CONTS.to(DEV)
cfg = model.cfg
print(f"model: {cfg.n_layers} layers, {cfg.n_heads} heads x {cfg.head_dim_}, {model.num_parameters / 1e6:.1f} M params; "
      f"{N_PROMPTS} prompts x {PROMPT_LEN} tokens + {GEN_LEN} continuation tokens (validation split)")


def pol(name, budget=KV_BUDGET, seed=0, recent=RECENT_RATIO, norm=PROMPT_NORM, **kw):
    base = dict(kv_budget=budget, recent_ratio=recent, n_sink=SINK_TOKENS, tau_init=TAU_INIT, tau_end=TAU_END,
                noise=NOISE, seed=seed, prompt_norm=norm)
    base.update(kw)
    return KVPolicyConfig(name, **base)


# %% [markdown]
# ## 1. Reference: the score and the selection in a few lines
#
# `keyformer_select_ref` is the method as the card states it, on one head's logits: accumulate
# `f = softmax((x + g)/τ)` over the prompt's query rows, keep the last `w` positions and the top `k − w`
# of the rest. The library's `prompt_scores` does the same in query chunks, for every head, with the
# grouped-query rule (a KV head's score sums its query heads).

# %%
def keyformer_select_ref(logits, k, w, tau=1.0, noise=None):
    """logits [n, n] (causal rows) of one head -> kept positions (sorted)."""
    n = logits.shape[0]
    x = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if noise is not None:
        x = x + noise
    S = torch.softmax(x / tau, dim=-1).sum(0)            # column sums over the query rows
    recent = torch.arange(n - w, n)
    rest = torch.topk(S[: n - w], k - w).indices
    return torch.cat([rest, recent]).sort().values


g = torch.Generator().manual_seed(SEED)
q_, k_ = torch.randn(1, 83, 1, 16, generator=g), torch.randn(1, 83, 1, 16, generator=g)
logits_ = (q_[0, :, 0] @ k_[0, :, 0].T) / 4.0
p_ = KVPolicyConfig("keyformer", kv_budget=0.5, recent_ratio=0.3, noise="none")
kk_, ww_ = budget_tokens(p_, 83)
S_lib = prompt_scores(q_, k_, 0.25, p_, chunk=7)[0, 0]
kept_lib = torch.cat([torch.topk(S_lib[: 83 - ww_], kk_ - ww_).indices, torch.arange(83 - ww_, 83)]).sort().values
kept_ref = keyformer_select_ref(logits_, kk_, ww_)
print(f"k={kk_}, w={ww_}: chunked library selection == reference: {torch.equal(kept_lib, kept_ref)}")
G_DRAWS = gumbel((1_000_000,), generator=torch.Generator().manual_seed(SEED))
print(f"Gumbel sampler: mean {G_DRAWS.mean():.4f} (0.5772), variance {G_DRAWS.var():.4f} (pi^2/6 = {math.pi**2 / 6:.4f})")
assert torch.equal(kept_lib, kept_ref)

# %% [markdown]
# ## 2. The real thing: compacted vs masked cache, and Keyformer(no noise, τ = 1) = H2O
#
# `PolicyKVCache(mode="compact")` holds `k + 1` slots per (layer, sequence, KV head): after the prompt
# the kept tokens are gathered once; every decode step writes the new token into the slot evicted at the
# previous step and updates the position map. `mode="masked"` keeps the whole growing cache and masks the
# evicted tokens (as the official code does). Both must give the same logits and the same kept sets.

# %%
CHECK = {}
P8, C8 = PROMPTS[:2], CONTS[:2, :12]
for name in ("window", "sink", "h2o", "keyformer"):
    lc, cc = teacher_forced(model, P8, C8, pol(name), mode="compact", return_cache=True, score_chunk=SCORE_CHUNK)
    lm, cm = teacher_forced(model, P8, C8, pol(name), mode="masked", return_cache=True, score_chunk=SCORE_CHUNK)
    cc.check_invariants()
    same_sets = all(torch.equal(cc.kept_positions(i), cm.kept_positions(i)) for i in range(cfg.n_layers))
    CHECK[name] = dict(max_abs=float((lc - lm).abs().max()), same_sets=same_sets, k=cc.k_budget,
                       compact_MB=cc.nbytes() / 2**20, masked_MB=cm.nbytes() / 2**20)
    print(f"{name:9s} k={cc.k_budget:3d}: max|logits_compact - logits_masked| = {CHECK[name]['max_abs']:.1e}, "
          f"same kept sets: {same_sets}, cache {CHECK[name]['compact_MB']:.2f} MiB vs {CHECK[name]['masked_MB']:.2f} MiB")
h2o_c = teacher_forced(model, P8, C8, pol("h2o"), return_cache=True, score_chunk=SCORE_CHUNK)[1]
kf0_c = teacher_forced(model, P8, C8, pol("keyformer", noise="none", tau_init=1.0, tau_end=1.0), return_cache=True,
                       score_chunk=SCORE_CHUNK)[1]
KF_EQ_H2O = all(torch.equal(h2o_c.kept_positions(i), kf0_c.kept_positions(i)) for i in range(cfg.n_layers))
full_c = teacher_forced(model, P8, C8, KVPolicyConfig("full"))
with torch.no_grad():
    plain = model(torch.cat([P8, C8], 1))[:, PROMPT_LEN - 1:PROMPT_LEN + C8.shape[1] - 1].float()
FULL_ERR = float((full_c - plain).abs().max())
print(f"Keyformer(noise=none, tau=1) keeps exactly H2O's tokens: {KF_EQ_H2O}; Full policy vs plain forward: {FULL_ERR:.1e}")

# %% [markdown]
# **Takeaway.** The compacted cache is the masked simulation with the memory actually returned: same
# logits to float rounding, same kept sets, a cache of `k + 1` slots instead of `n + T`. With the noise off
# and τ fixed at 1 Keyformer's selection *is* H2O's, so any difference below comes from the noise and the
# schedule alone.

# %% [markdown]
# ## 3. Back-of-envelope: when does evicting KV pay?
#
# Decode is memory-bound: each step streams the weights once per batch and the KV cache once per sequence.
# For Llama-2-7B in fp16: weights 13.5 GB; KV `2 · 32 layers · 4096 · 2 B` = 512 KiB per token.

# %%
W_BYTES, KV_TOK = 13.5e9, 2 * 32 * 4096 * 2
for n in (2048, 4096, 8192):
    for B in (1, 8):
        full_b = W_BYTES + B * (n + 256) * KV_TOK       # mid-generation of 512 tokens
        half_b = W_BYTES + B * (n // 2 + 1) * KV_TOK
        print(f"prompt {n:5d}, batch {B:2d}: KV share of bytes/step {B * (n + 256) * KV_TOK / full_b:5.1%}; "
              f"ideal speed-up at 50 % KV {full_b / half_b:.2f}x")
print("at the same memory, 50 % KV also fits ~2x the sequences: throughput grows with batch until weights stop mattering")

# %% [markdown]
# So a 2x saving in KV bytes gives at most ~1.3x at batch 1 and 8K tokens, and approaches 2x only when KV
# dominates (large batch, long prompt); beyond that, the freed memory buys a larger batch. The scoring
# itself (logits materialised, noise, a top-k / argmin per head and step) must stay small next to that.

# %% [markdown]
# ## 4. Motivation: how sparse is attention in this model?
#
# Sorted attention probabilities of the last 32 prompt rows per layer and head: the fraction of visible
# tokens needed to cover 90 % of the mass (blog: ~40 % of tokens hold 90 % of the mass in MPT-7B).

# %%
SORTED = attention_mass_cdf(model, PROMPTS[:4], last_rows=32)       # [L, B, H, rows, n]
FRAC90 = tokens_for_mass(SORTED, 0.9)                                # [L, B, H, rows]
frac_layer = FRAC90.mean(dim=(1, 3))                                 # [L, H]
cdf = SORTED.cumsum(-1).mean(dim=(1, 2, 3))                           # [L, n]
fig = make_subplots(rows=1, cols=2, subplot_titles=("attention-mass CDF (last 32 rows, mean)",
                                                    "tokens holding 90 % of the mass, per head"))
xs = np.arange(1, cdf.shape[1] + 1) / cdf.shape[1] * 100
for li in range(cfg.n_layers):
    fig.add_scatter(x=xs, y=cdf[li].numpy() * 100, mode="lines", name=f"layer {li}", row=1, col=1)
    fig.add_bar(x=[f"L{li}H{h}" for h in range(cfg.n_heads)], y=frac_layer[li].numpy() * 100, name=f"layer {li}",
                showlegend=False, row=1, col=2)
fig.add_hline(y=90, line_dash="dot", row=1, col=1)
viz.apply_template(fig, title="Attention sparsity of the tiny Llama (prompt of 192 bytes)", width=980, height=430)
fig.update_xaxes(title_text="tokens kept, most-attended first (% of the prompt)", row=1, col=1)
fig.update_yaxes(title_text="attention mass covered (%)", row=1, col=1)
fig.update_yaxes(title_text="% of visible tokens for 90 % mass", row=1, col=2)
viz.caption(fig, "Ours: tiny Llama (4 layers x 4 heads, byte-level), 4 validation prompts. Paper (blog): ~40 % of "
            "tokens hold 90 % of the mass (MPT-7B).")
viz.save(fig, SLUG, "attention_sparsity")
fig.show()
print(f"mean fraction of tokens for 90 % of the mass: {FRAC90.mean():.1%} (min head {frac_layer.min():.1%}, "
      f"max head {frac_layer.max():.1%})")

# %% [markdown]
# **Takeaway.** Attention here is sparse too, and very uneven across heads: some heads look at a handful
# of tokens (those are cheap to compress), others spread over most of the prompt. Eviction at 50 % therefore
# cannot be free for every head.

# %% [markdown]
# ### Uneven redistribution after eviction
#
# One head's attention of the last prompt row, before eviction and renormalised over the tokens Keyformer
# keeps at 50 %: the softmax mass of the dropped tokens is spread over the survivors in proportion to their
# weight, so the big ones grow most — the bias Keyformer's noise and temperature try to offset.

# %%
LAYER, HEAD = cfg.n_layers - 1, 0
with model.capture(outputs=["*.attn_probs"]) as cap_:
    model(PROMPTS[:1])
p_full = cap_.outputs[f"layers.{LAYER}.self_attn.attn_probs"][0][0, HEAD, -1]   # [n]
_, c1 = teacher_forced(model, PROMPTS[:1], CONTS[:1, :2], pol("keyformer"), return_cache=True, score_chunk=SCORE_CHUNK)
kv_head = HEAD // (cfg.n_heads // cfg.n_kv_heads)
kept1 = c1.kept_positions(LAYER)[0, kv_head]
kept1 = kept1[kept1 < PROMPT_LEN]
p_after = torch.zeros_like(p_full)
p_after[kept1] = p_full[kept1] / p_full[kept1].sum()
fig = go.Figure()
fig.add_bar(x=np.arange(PROMPT_LEN), y=p_full.numpy(), name="full cache", marker_color=viz.color("full"))
fig.add_bar(x=np.arange(PROMPT_LEN), y=p_after.numpy(), name="kept by Keyformer-50 %, renormalised",
            marker_color=viz.color("keyformer"), opacity=0.6)
viz.apply_template(fig, title=f"Attention of the last prompt row, layer {LAYER} head {HEAD}", width=980, height=380)
fig.update_layout(barmode="overlay", xaxis_title="key position (byte)", yaxis_title="attention probability")
viz.caption(fig, f"Ours: one validation prompt; mass dropped by eviction: {1 - float(p_full[kept1].sum()):.1%}.")
viz.save(fig, SLUG, "redistribution")
fig.show()

# %% [markdown]
# ## 5. Headline: quality vs KV budget (Fig. 7 analogue)
#
# Prompt + teacher-forced continuation with the policy active; metrics against the true continuation
# (perplexity) and against Full (KL(Full ‖ policy) per token, top-1 agreement). Keyformer: mean of the
# seeds. The paper's metric is ROUGE on summarization with 6–7B models; the card's CPU metrics stand in.

# %%
FULL_LOGITS = teacher_forced(model, PROMPTS, CONTS, KVPolicyConfig("full"))
FULL_Q = quality_metrics(FULL_LOGITS, FULL_LOGITS, CONTS)
RES = {}   # (policy, budget) -> metrics (keyformer: mean over seeds, plus per-seed list)


def run_policy(name, budget, **kw):
    """Metrics of one policy; Keyformer runs len(SEEDS) replicas of the prompts in one batch (each row
    draws its own noise), reported per replica and averaged."""
    R = len(SEEDS) if name == "keyformer" and kw.get("noise", NOISE) != "none" else 1
    lg = teacher_forced(model, PROMPTS.repeat(R, 1), CONTS.repeat(R, 1), pol(name, budget, seed=SEEDS[0], **kw),
                        score_chunk=SCORE_CHUNK)
    N = PROMPTS.shape[0]
    per = [quality_metrics(lg[r * N:(r + 1) * N], FULL_LOGITS, CONTS) for r in range(R)]
    out = {m: float(np.mean([p[m] for p in per])) for m in ("nll", "kl", "top1_agree")}
    out["ppl"] = math.exp(out["nll"])
    out["ppl_seeds"] = [p["ppl"] for p in per]
    out["kl_seeds"] = [p["kl"] for p in per]
    out["top1_seeds"] = [p["top1_agree"] for p in per]
    return out


t0 = time.time()
for b in BUDGETS:
    for name in ("window", "sink", "h2o", "keyformer"):
        RES[(name, b)] = run_policy(name, b)
PAPER_DEFAULT = {name: run_policy(name, KV_BUDGET, recent=PAPER_RECENT_RATIO, norm=PAPER_PROMPT_NORM)
                 for name in ("keyformer",)}
KF_100 = teacher_forced(model, PROMPTS, CONTS, pol("keyformer", 1.0))
print(f"sweep: {time.time() - t0:.0f} s (2 shared CPU cores, timing inflated by other work)")
print(f"Full: PPL {FULL_Q['ppl']:.4f}")
print(f"{'policy':10s} {'budget':>6s} {'PPL':>8s} {'KL':>8s} {'top-1':>6s}")
for (name, b), r in sorted(RES.items(), key=lambda x: (x[0][1], x[0][0])):
    print(f"{name:10s} {b:6.0%} {r['ppl']:8.4f} {r['kl']:8.4f} {r['top1_agree']:6.3f}")
for name, r in PAPER_DEFAULT.items():
    print(f"{name:10s} {KV_BUDGET:6.0%} {r['ppl']:8.4f} {r['kl']:8.4f} {r['top1_agree']:6.3f}   "
          f"(paper defaults: recent {PAPER_RECENT_RATIO}, plain sums)")

# %%
PAPER_FIG7 = {  # blog Fig. 7 / paper: KV budget (% of prompt) at which a method reaches 99 % of Full accuracy
    "keyformer": 70, "h2o": 90, "window": None}
fig = make_subplots(rows=1, cols=3, subplot_titles=("accuracy proxy: Full PPL / policy PPL (%)",
                                                    "KL(Full ‖ policy) per token (nats)",
                                                    "top-1 agreement with Full (%)"))
xb = [100 * b for b in BUDGETS] + [100]
for name, label in (("window", "Window"), ("sink", "StreamingLLM (sinks)"), ("h2o", "H2O"), ("keyformer", "Keyformer")):
    rs = [RES[(name, b)] for b in BUDGETS]
    ckey = "streamingllm" if name == "sink" else name
    acc = [100 * FULL_Q["ppl"] / r["ppl"] for r in rs] + [100]
    kls = [r["kl"] for r in rs] + [0.0]
    t1 = [100 * r["top1_agree"] for r in rs] + [100]
    err = None
    if name == "keyformer":
        err = dict(type="data", array=[100 * FULL_Q["ppl"] * (1 / min(r["ppl_seeds"]) - 1 / max(r["ppl_seeds"])) / 2
                                        for r in rs] + [0])
    fig.add_scatter(x=xb, y=acc, mode="lines+markers", name=label, line_color=viz.color(ckey), error_y=err, row=1, col=1)
    fig.add_scatter(x=xb, y=kls, mode="lines+markers", name=label, line_color=viz.color(ckey), showlegend=False,
                    row=1, col=2)
    fig.add_scatter(x=xb, y=t1, mode="lines+markers", name=label, line_color=viz.color(ckey), showlegend=False,
                    row=1, col=3)
fig.add_hline(y=99, line_dash="dash", line_color="red", annotation_text="99 % of Full", row=1, col=1)
fig.add_scatter(x=[70], y=[99], mode="markers+text", marker=dict(symbol="star", size=14, color=viz.color("paper")),
                text=["paper: Keyformer 99 % at 70 % KV"], textposition="bottom right", name="paper (Fig. 7)",
                row=1, col=1)
for c in (1, 2, 3):
    fig.update_xaxes(title_text="KV budget (% of prompt)", row=1, col=c)
viz.apply_template(fig, title="Quality vs KV budget (Fig. 7 analogue)", width=1100, height=450)
viz.caption(fig, f"Ours: tiny Llama, {N_PROMPTS} validation prompts x {PROMPT_LEN} bytes, {GEN_LEN} teacher-forced tokens; "
            f"recent ratio {RECENT_RATIO}, prompt norm {PROMPT_NORM}; Keyformer mean of seeds {SEEDS} (bar: spread). "
            "Paper: ROUGE on CNN/DailyMail with 6-7B models (scale-down: no hub data offline).")
viz.save(fig, SLUG, "quality_vs_budget")
fig.show()

# %% [markdown]
# **Takeaway.** See the printed table: the ordering at the claim budget is what the asserts below check.
# The 99 % line is drawn for the accuracy proxy `PPL_Full / PPL_policy`; on a 4-layer byte model with
# 192-byte prompts every policy loses more than on a 7B model with 2K-token prompts, so the budget at which
# a policy crosses 99 % is not comparable to the paper's 70 %; the *ordering* of the policies is.

# %% [markdown]
# ### Greedy generation: ROUGE-L against the Full generation

# %%
ROUGE_RES = {}
if ROUGE:
    full_gen = greedy(model, PROMPTS, GEN_LEN, KVPolicyConfig("full")).tolist()
    for name in ("window", "h2o", "keyformer"):
        R = len(SEEDS) if name == "keyformer" else 1
        gen_ = greedy(model, PROMPTS.repeat(R, 1), GEN_LEN, pol(name, seed=SEEDS[0]), score_chunk=SCORE_CHUNK).tolist()
        ROUGE_RES[name] = float(np.mean([rouge_l(a, b) for a, b in zip(gen_, full_gen * R)]))
        print(f"{name:10s} ROUGE-L vs Full generation at {KV_BUDGET:.0%} KV: {ROUGE_RES[name]:.3f}")

# %% [markdown]
# ### Kept-token map
#
# Which prompt positions one layer/head keeps at each decode step (Keyformer, budget `KV_BUDGET`):
# the recent window slides, key tokens stay until their score is overtaken.

# %%
one = PolicyKVCache.for_model(model, 1, PROMPT_LEN, GEN_LEN, pol("keyformer"), score_chunk=SCORE_CHUNK)
MAP = np.zeros((GEN_LEN, PROMPT_LEN + GEN_LEN))
with policy_backend(model), torch.no_grad():
    model(PROMPTS[:1], kv_cache=one)
    for t in range(GEN_LEN):
        MAP[t, one.kept_positions(LAYER)[0, kv_head].numpy()] = 1
        if t < GEN_LEN - 1:
            model(CONTS[:1, t:t + 1], kv_cache=one)
fig = go.Figure(go.Heatmap(z=MAP, colorscale=[[0, "white"], [1, viz.color("keyformer")]], showscale=False))
viz.apply_template(fig, title=f"Kept tokens, layer {LAYER}, KV head {kv_head} (Keyformer {KV_BUDGET:.0%})",
                   width=980, height=380)
fig.update_layout(xaxis_title="token position", yaxis_title="decode step")
viz.save(fig, SLUG, "kept_token_map")
fig.show()

# %% [markdown]
# ## 6. Decode speed vs KV budget (GPU)
#
# From `python -m mlsys24.kvcache.bench` (7B-shaped random weights, fp16): one decode step captured in a
# CUDA graph and replayed (median, L2 flushed). Full cache: the faster of card 11's split-KV kernel and our
# split-KV kernel without the logits output. Compacted caches (`attn="triton"`, `mlsys24.kvcache.fused_score`):
# one split-KV attention pass that **also writes the logits**, then one kernel per layer that draws the
# Gumbel noise (Philox, in the kernel), adds `softmax((x + g) / τ)` to the scores and evicts the argmin,
# and one that writes the new token into the freed slot; window-50 % runs the same kernels without a score.
# "twopass" is the earlier Keyformer path (logits and P·V in two passes, bookkeeping in PyTorch), measured
# in the same run. Two throughput comparisons: **equal batch** (both at the largest batch the Full cache
# fits) and **equal memory** (each cache at the largest batch it fits in the same GPU memory, the paper's
# mechanism: a smaller cache allows a larger batch). The headline uses equal memory.

# %%
from mlsys24.bench import gpu_results

GPU_RES = gpu_results(SLUG, BENCH)   # live (quick plan) on a GPU, else the committed JSON
if GPU_RES is None:
    print("no GPU results: run `PYTHONPATH=lib python3 -m mlsys24.kvcache.bench` on a GPU machine")
else:
    print(GPU_RES.caption())
    dec = [r for r in GPU_RES.records if r.get("bench") == "decode"]
    SUMMARY = next(r for r in GPU_RES.records if r.get("bench") == "summary")
    choice = next((r for r in GPU_RES.records if r.get("bench") == "kernel_choice"), None)
    for r in GPU_RES.records:
        if r.get("bench") == "kernel_sweep" and "ms" in r and r["kernel"] != "fused_attn_logits":
            cfg_ = (f" block {r['config']['score_block']}, {r['config']['score_warps']} warps"
                    if r["kernel"] == "score_evict" else "")
            print(f"one layer, {r['prompt_len'] // 2 + 1} slots x batch {r['batch']}: {r['kernel'] + cfg_:45s} "
                  f"{r['ms']:.3f} ms ({r['GB_s']:.0f} GB/s)")
    if choice:
        print("launch configuration chosen by the sweep:", choice["config"])
    print(f"{'prompt':>6s} {'batch':>5s} {'policy':14s} {'kernels':8s} {'step ms':>8s} {'tok/s':>8s} {'KV GiB':>7s}")
    for r in dec:
        print(f"{r['prompt_len']:6d} {r['batch']:5d} {r['policy']:14s} {r['attention']:8s} {r['step_ms']:8.2f} "
              f"{r['tokens_per_s']:8.0f} {r['kv_bytes'] / 2**30:7.2f}")

# %%
if GPU_RES is not None:
    lens = sorted({r["prompt_len"] for r in dec})

    def best_rec(n_, name, role):
        rs = [r for r in dec if r["prompt_len"] == n_ and r["policy_name"] == name and r["batch_role"] == role]
        return min(rs, key=lambda r: r["step_ms"]) if rs else None

    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode tokens/s: equal batch (solid), equal memory (dotted)",
                                                        "latency per step vs KV budget (largest prompt)"))
    for name, role, dash, label in (("full", "full_max", None, "full (Full-max batch)"),
                                    ("keyformer", "full_max", None, "keyformer 50 %, same batch"),
                                    ("h2o", "full_max", None, "h2o 50 %, same batch"),
                                    ("window", "full_max", None, "window 50 %, same batch"),
                                    ("keyformer", "half_max", "dot", "keyformer 50 %, largest batch"),
                                    ("keyformer", "full_max_twopass", "dash", "keyformer 50 %, two-pass (before)")):
        pts = [(n_, best_rec(n_, name, role)) for n_ in lens]
        pts = [(n_, r["tokens_per_s"]) for n_, r in pts if r]
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=label,
                            line=dict(color=viz.color(name), dash=dash), row=1, col=1)
    nl = lens[-1]
    bf = best_rec(nl, "full", "full_max")["batch"]
    sweep = sorted([(100 * r["kv_budget"], r["step_ms"]) for r in dec if r["prompt_len"] == nl and r["batch"] == bf
                    and r["policy_name"] == "keyformer" and r["attention"] == "triton"] +
                   [(100.0, best_rec(nl, "full", "full_max")["step_ms"])])
    fig.add_scatter(x=[p[0] for p in sweep], y=[p[1] for p in sweep], mode="lines+markers",
                    name=f"keyformer (100 % = Full), batch {bf}", line_color=viz.color("keyformer"), row=1, col=2)
    fig.update_xaxes(title_text="prompt length (tokens)", row=1, col=1)
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_xaxes(title_text="KV budget (% of prompt)", row=1, col=2)
    fig.update_yaxes(title_text="ms per decode step", row=1, col=2)
    viz.apply_template(fig, title="Decode speed vs KV budget (7B-shaped, fp16)", width=1100, height=450)
    viz.caption(fig, GPU_RES.caption() + "<br>Paper: 2.1x lower latency, 2.4x tokens/s at 50 % KV (A100 80GB, MPT-7B). "
                "Random weights (speed does not depend on them); CUDA-graph replay of one step, median.")
    viz.save(fig, SLUG, "speed_vs_budget")
    fig.show()
    for n_, row in sorted(SUMMARY.items(), key=lambda x: str(x[0])):
        if isinstance(row, dict):
            print(n_, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    WIN_X = {}
    for n_ in lens:
        fb_, wb_ = best_rec(n_, "full", "full_max"), best_rec(n_, "window", "full_max")
        if fb_ and wb_:
            WIN_X[n_] = wb_["tokens_per_s"] / fb_["tokens_per_s"]
            print(f"prompt {n_}: compaction alone (window-50 %) {WIN_X[n_]:.2f}x Full tokens/s at batch {fb_['batch']}; "
                  f"Keyformer scoring overhead {SUMMARY[str(n_)].get('scoring_overhead_pct', float('nan')):.1f} % of its step")
    s_nl = SUMMARY[str(nl)]
    figb = viz.paper_vs_ours(["latency reduction, batch 1", "tokens/s, equal batch", "tokens/s, equal memory"],
                             [s_nl.get("latency_x_batch1"), s_nl.get("throughput_x_full_max_batch"),
                              s_nl.get("throughput_x_equal_memory")], [2.1, 2.4, 2.4],
                             title=f"Keyformer-50 % vs Full at {nl}-token prompts", y="speed-up (x)")
    viz.caption(figb, GPU_RES.caption() + f"<br>equal batch: both at batch {s_nl.get('full_max_batch')}; equal memory: "
                f"Full at {s_nl.get('full_max_batch')}, Keyformer at {s_nl.get('half_max_batch')} sequences. "
                "The paper's 2.4x is at the larger batch its smaller cache allows.")
    viz.save(figb, SLUG, "speedup_paper_vs_ours")
    figb.show()

# %% [markdown]
# **Takeaway.** Taking the logits out of the attention pass instead of re-reading K, and drawing the noise,
# updating the scores and picking the evicted slot in one small kernel, brings Keyformer's scoring cost down
# to a few percent of its step (printed above; the earlier two-pass path, measured in the same run, is
# slower than the Full cache). At the same batch the 50 % cache is now clearly faster than Full, but it
# cannot reach 2x: the weights, the other layers' work and our attention kernel (CUDA cores; card 11's
# tensor-core kernel streams K/V faster, see the one-layer timings) do not shrink with the cache. At equal
# memory the compacted cache holds about twice the sequences, and that is where the paper's throughput
# gain comes from. At batch 1 the weights dominate the bytes of a step (section 3), so halving KV cannot
# give the paper's 2.1x latency reduction here.

# %% [markdown]
# ## 7. Claims

# %%
kb = KV_BUDGET
kf, h2o, win = RES[("keyformer", kb)], RES[("h2o", kb)], RES[("window", kb)]
# 1. a policy that keeps everything = Full
assert FULL_ERR < 1e-4 and float((KF_100 - FULL_LOGITS).abs().max()) < 1e-4
# 2. Keyformer without noise at tau = 1 selects exactly H2O's tokens
assert KF_EQ_H2O
# 3. masked (official-style) and compacted execution agree
assert all(c["max_abs"] < 1e-4 and c["same_sets"] for c in CHECK.values()), CHECK
# 4. invariants were checked at the end of every run above (check_invariants); the budget is exact
assert all(c["k"] == budget_tokens(pol(n), PROMPT_LEN)[0] for n, c in CHECK.items())
# 5. Gumbel sampler moments
assert abs(float(G_DRAWS.mean()) - 0.5772) < 0.01 and abs(float(G_DRAWS.var()) - math.pi ** 2 / 6) < 0.02
# 6. at the claim budget: every policy departs from Full (KL > 0; PPL within 1 % of Full or worse: on a few
#    prompts eviction can lower PPL slightly by chance); Keyformer beats Window on PPL, KL, top-1 with margins
print(f"at {kb:.0%}: PPL Full {FULL_Q['ppl']:.4f}, Keyformer {kf['ppl']:.4f} (replicas {np.round(kf['ppl_seeds'], 4)}), "
      f"H2O {h2o['ppl']:.4f}, Window {win['ppl']:.4f}; KL Keyformer {kf['kl']:.4f} "
      f"(replicas {np.round(kf['kl_seeds'], 4)}) vs Window {win['kl']:.4f}; top-1 {kf['top1_agree']:.3f} vs {win['top1_agree']:.3f}")
for name_, r_ in (("keyformer", kf), ("h2o", h2o), ("window", win)):
    assert r_["kl"] > 0 and FULL_Q["ppl"] <= 1.01 * r_["ppl"], name_
    if r_["ppl"] < FULL_Q["ppl"]:
        print(f"note: {name_} PPL {r_['ppl']:.4f} is below Full's {FULL_Q['ppl']:.4f} on these {N_PROMPTS} prompts "
              f"(KL to Full {r_['kl']:.4f} > 0)")
assert kf["ppl"] <= 0.99 * win["ppl"], "Keyformer mean PPL must beat Window by >= 1 %"
assert max(kf["ppl_seeds"]) < win["ppl"], "every Keyformer replica must beat Window's PPL"
assert kf["kl"] <= 0.95 * win["kl"], "Keyformer KL(Full||.) must be >= 5 % below Window's"
assert kf["top1_agree"] >= win["top1_agree"], "Keyformer top-1 agreement with Full must be >= Window's"
assert kf["ppl"] <= 1.02 * h2o["ppl"]
if ROUGE:
    print(f"ROUGE-L vs Full at {kb:.0%}: Keyformer {ROUGE_RES['keyformer']:.3f}, H2O {ROUGE_RES['h2o']:.3f}, "
          f"Window {ROUGE_RES['window']:.3f}")
    assert ROUGE_RES["keyformer"] >= ROUGE_RES["window"]
# 7. Keyformer PPL non-increasing in budget (1 % tolerance) and equal to Full at 100 %
ppls = [RES[("keyformer", b)]["ppl"] for b in sorted(BUDGETS)] + [FULL_Q["ppl"]]
assert all(b <= a * 1.01 for a, b in zip(ppls, ppls[1:])), ppls
# the paper's own defaults (recent 30 %, plain prompt sums) on this model
pk = PAPER_DEFAULT["keyformer"]
if pk["ppl"] >= win["ppl"]:
    print(f"NOT REPRODUCED with the paper's defaults (recent {PAPER_RECENT_RATIO}, plain sums): Keyformer PPL "
          f"{pk['ppl']:.4f} vs Window {win['ppl']:.4f} at {kb:.0%}; this byte-level model's heads are local, so a "
          f"30 % recent window loses to keeping every recent token (the claims above use recent {RECENT_RATIO}, "
          "chosen on train-split prompts)")
# 8. GPU claims (from the results file, or live)
if GPU_RES is not None:
    s_top = SUMMARY[str(max(int(k) for k in SUMMARY if str(k).isdigit()))]
    thr, lat = s_top.get("throughput_x_full_max_batch"), s_top.get("latency_x_batch1")
    thr_mem = s_top.get("throughput_x_equal_memory")
    print(f"GPU: Keyformer-50 % tokens/s vs Full: equal batch ({s_top.get('full_max_batch')}) {thr:.2f}x, equal memory "
          f"(batch {s_top.get('half_max_batch')} vs {s_top.get('full_max_batch')}) {thr_mem:.2f}x (paper 2.4x, target "
          f">= 1.5x); latency at batch 1 {lat:.2f}x (paper 2.1x); scoring overhead "
          f"{s_top.get('scoring_overhead_pct', float('nan')):.1f} % of the step")
    assert thr is not None and thr_mem is not None
    # the compacted 50 % cache holds <= half the Full cache's bytes (+1 slot)
    for r in dec:
        if r["policy_name"] != "full" and r["kv_budget"] == 0.5 and r["batch_role"] in ("1", "full_max"):
            assert r["kv_bytes"] <= (r["prompt_len"] // 2 + 1) / (r["prompt_len"] + 512) * next(
                f["kv_bytes"] for f in dec if f["policy_name"] == "full" and f["prompt_len"] == r["prompt_len"]
                and f["batch"] == r["batch"]) + 1
    # compaction alone is faster than Full at the Full-max batch, at every prompt length
    assert WIN_X and all(x > 1.0 for x in WIN_X.values()), WIN_X
    # Keyformer-50 %'s decode step (scoring included) is faster than Full's at the Full-max batch, at every
    # prompt length, and its scoring costs < 15 % of its step
    for n_ in lens:
        sn = SUMMARY[str(n_)]
        assert sn["latency_x_full_max_batch"] > 1.05, (n_, sn)
        assert sn["scoring_overhead_pct"] < 15, (n_, sn)
    # the target: >= 1.5x tokens/s at 50 % KV on 8K prompts, at equal memory (the headline)
    assert thr_mem >= 1.5, f"equal-memory throughput {thr_mem:.2f}x < 1.5x"
    if thr < 1.5:
        print(f"NOT REPRODUCED: Keyformer-50 % throughput {thr:.2f}x Full at equal batch (the Full-max batch; target "
              f">= 1.5x, paper 2.4x); at equal memory {thr_mem:.2f}x")
    if thr_mem < 2.4:
        print(f"NOT REPRODUCED: the paper's 2.4x tokens/s (ours {thr_mem:.2f}x at equal memory, target 1.5x met)")
    if lat is not None and lat < 2.1:
        print(f"NOT REPRODUCED: batch-1 latency reduction {lat:.2f}x (paper 2.1x; weights dominate at batch 1)")
else:
    print("GPU claims skipped: run `PYTHONPATH=lib python3 -m mlsys24.kvcache.bench` on a GPU machine")
print(f"notebook ran in {time.time() - T_START:.0f} s")

# %% [markdown]
# ## 8. Explore
#
# Quality at the swept budgets, per policy (precomputed above), and the budget arithmetic for a chosen
# budget / recent ratio / τ schedule: how many tokens are key tokens vs recent, and the τ each step uses.

# %%
# NBVAL_IGNORE_OUTPUT
if INTERACTIVE:
    import ipywidgets as W
    from IPython.display import display

    w_b = W.SelectionSlider(options=[(f"{100 * b:.0f} %", b) for b in BUDGETS], value=KV_BUDGET, description="budget")
    w_r = W.FloatSlider(value=RECENT_RATIO, min=0.0, max=1.0, step=0.05, description="recent ratio")
    w_t0 = W.FloatSlider(value=TAU_INIT, min=0.25, max=4, step=0.25, description="τ_init")
    w_t1 = W.FloatSlider(value=TAU_END, min=0.25, max=4, step=0.25, description="τ_end")
    w_pol = W.SelectMultiple(options=["window", "sink", "h2o", "keyformer"], value=["window", "h2o", "keyformer"],
                             description="policies")
    w_out = W.Output()
    figw = go.FigureWidget()
    figw.add_bar(name="PPL vs Full")
    figw.add_scatter(name="τ schedule", yaxis="y2", mode="lines")
    viz.apply_template(figw, width=900, height=380)
    figw.update_layout(yaxis=dict(title="PPL / PPL_Full"), yaxis2=dict(title="τ", overlaying="y", side="right"))

    def _update(*_):
        b = w_b.value
        names = list(w_pol.value)
        with figw.batch_update():
            figw.data[0].x = names
            figw.data[0].y = [RES[(n, b)]["ppl"] / FULL_Q["ppl"] for n in names]
            steps = np.arange(GEN_LEN + 1)
            figw.data[1].x = [f"step {int(s)}" for s in steps][: len(names)]
            figw.data[1].y = list(w_t0.value + steps * (w_t1.value - w_t0.value) / GEN_LEN)[: len(names)]
        k, w = budget_tokens(KVPolicyConfig("keyformer", kv_budget=b, recent_ratio=w_r.value), PROMPT_LEN)
        with w_out:
            w_out.clear_output()
            print(f"budget {b:.0%} of {PROMPT_LEN}: k = {k} kept tokens = {w} recent + {k - w} key tokens; "
                  f"τ from {w_t0.value} to {w_t1.value} over {GEN_LEN} steps "
                  f"(quality bars: the sweep's recent ratio {RECENT_RATIO})")
            for n in names:
                r = RES[(n, b)]
                print(f"  {n:10s} PPL {r['ppl']:.4f}  KL {r['kl']:.4f}  top-1 {r['top1_agree']:.3f}")

    for w_ in (w_b, w_r, w_t0, w_t1, w_pol):
        w_.observe(_update, names="value")
    _update()
    display(W.VBox([W.HBox([w_b, w_r]), W.HBox([w_t0, w_t1, w_pol]), w_out, figw]))

# %% [markdown]
# ## 9. Going further
#
# - The card's full CPU sweep: `papermill notebooks/09_keyformer.ipynb runs/09_keyformer_full.ipynb
#   -p N_PROMPTS 32 -p GEN_LEN 64 -p BUDGETS "[0.2, 0.3, 0.5, 0.7, 0.9]" -p INTERACTIVE False`.
# - The GPU benchmark: `PYTHONPATH=lib python3 -m mlsys24.kvcache.bench --budget-s 270` (writes
#   `data/results/keyformer/<gpu>.json`; it first sweeps the fused kernels' launch configuration and uses
#   the fastest); with `BENCH="auto"` on a GPU this notebook re-measures it live (quick plan).
# - The decode paths of the compacted cache: `PolicyKVCache(..., attn="triton", rng="philox")` (fused:
#   logits from the attention pass, noise + score + eviction in one kernel), `attn="twopass"` (the earlier
#   two-pass path), `attn="torch"` (reference). Our fused attention uses CUDA cores; a tensor-core variant
#   (rows padded to 16, as card 11's kernel does) is the next step towards 1.5x at equal batch.
# - A real model and text: `-p MODEL_PATH /path/to/Llama-2-7b-hf -p EVAL_TEXT_PATH article.txt
#   -p PROMPT_LEN 2048 -p GEN_LEN 128 -p RECENT_RATIO 0.3 -p PROMPT_NORM False` (the paper's defaults;
#   CNN/DailyMail, SODA and GovReport come from the hub and are not shipped; the official repo's
#   `summarization/` scripts download them).
# - `TUNE_RECENT=True` re-runs the choice of the recent ratio and prompt normalisation on train-split
#   prompts (below).
#
# Questions for a workshop:
# 1. Why do prompt-phase column sums favour early tokens, and when is that bias useful (attention sinks)?
# 2. The official code only *masks* evicted tokens. What does that hide about speed, and what does the
#    compacted cache's in-place slot reuse change for a paged serving engine?
# 3. Gumbel noise makes selection random: is averaging seeds the right way to report it, or should the
#    noise be annealed to zero?
# 4. Eviction is per KV head here; with GQA, one KV head serves several query heads. Which score should it use?

# %%
if TUNE_RECENT:
    from mlsys24.models.corpus import load_split_bytes

    tr = ByteTokenizer().encode_tensor(load_split_bytes("train")[:2_000_000])
    TP, TC = validation_prompts(N_PROMPTS, PROMPT_LEN, GEN_LEN, seed=SEED + 1, ids=tr)
    tfull = teacher_forced(model, TP, TC, KVPolicyConfig("full"))
    print("train split, window:", round(quality_metrics(teacher_forced(model, TP, TC, pol("window")), tfull, TC)["ppl"], 4))
    for r in (0.3, 0.5, 0.7, 0.85):
        for norm in (False, True):
            q = quality_metrics(teacher_forced(model, TP, TC, pol("keyformer", recent=r, norm=norm)), tfull, TC)
            print(f"train split, keyformer recent {r} norm {norm}: PPL {q['ppl']:.4f} KL {q['kl']:.4f}")
