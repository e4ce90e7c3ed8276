"""KV-cache eviction policies on one interface: Full, Window, StreamingLLM sinks, H2O, Keyformer.

Keyformer (Adnan et al., MLSys 2024, arXiv 2403.09054). A prompt of ``n`` tokens gets a KV budget of
``k = floor(n * kv_budget)`` tokens per (sequence, layer, KV head): a recent window of
``w = floor(k * recent_ratio)`` positions plus ``k - w`` *key tokens* chosen by an accumulated score

    f(x_j) = exp((x_j + g_j) / tau) / sum_{i in K} exp((x_i + g_i) / tau),   g ~ Gumbel(0, 1) i.i.d.,
    tau_t  = tau_init + t * (tau_end - tau_init) / T          (t = decode step, T = tokens to generate)

over the pre-softmax logits ``x_j = q . k_j / sqrt(d)``; ``S_j`` sums ``f`` over every query row of
the prompt and every decode step. The noise only steers *selection*: attention itself is the
ordinary softmax over the kept tokens.

The baselines differ only in the score and the protected set:

============  ======================================  ==============================
policy        score accumulated per token             always kept
============  ======================================  ==============================
full          none (nothing is evicted)               everything
window        none                                    the last ``k`` positions
sink          none                                    ``n_sink`` first + last ``k - n_sink``
h2o           softmax(x) (attention probabilities)    the last ``w`` positions
keyformer     softmax((x + g) / tau)                  the last ``w`` positions
============  ======================================  ==============================

Eviction rule shared by all (so that a discarded token never returns and ``|K| = k`` exactly):
after the prompt keep the protected positions plus the top ``k - |protected|`` of the others by
score; after each decode step (the new token is always kept) evict the one unprotected token with
the lowest score (ties: the oldest position), i.e. re-select the top ``k - w``.

GQA: a KV head is shared by ``G = n_heads / n_kv_heads`` query heads; its score is the sum of
theirs, so the memory saved is per KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["KVPolicyConfig", "POLICIES", "make_policy", "gumbel", "tau_at", "budget_tokens", "score_probs",
           "prompt_scores", "prompt_scores_ref", "select_prompt", "evict_one"]

POLICIES = ("full", "window", "sink", "h2o", "keyformer")


@dataclass(frozen=True)
class KVPolicyConfig:
    """One policy with its knobs (budgets as fractions of the prompt length)."""

    name: str = "keyformer"          # one of POLICIES
    kv_budget: float = 0.5           # k = floor(n * kv_budget) tokens kept per (layer, KV head)
    recent_ratio: float = 0.3        # w = floor(k * recent_ratio) (h2o, keyformer)
    n_sink: int = 4                  # attention-sink tokens (sink)
    tau_init: float = 1.0            # keyformer temperature at the prompt / first decode step
    tau_end: float = 2.0             # keyformer temperature after T decode steps
    noise: str = "gumbel"            # keyformer: "gumbel" | "gaussian" | "none"
    seed: int = 0                    # seed of the noise generator
    prompt_norm: bool = False        # divide prompt-phase column sums by the rows that see each token

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; have {POLICIES}")
        if not 0.0 < self.kv_budget <= 1.0:
            raise ValueError(f"kv_budget must be in (0, 1], got {self.kv_budget}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.noise not in ("gumbel", "gaussian", "none"):
            raise ValueError(f"noise must be gumbel, gaussian or none, got {self.noise!r}")
        if self.tau_init <= 0 or self.tau_end <= 0:
            raise ValueError("temperatures must be positive")

    @property
    def needs_scores(self) -> bool:
        return self.name in ("h2o", "keyformer")

    @property
    def evicts(self) -> bool:
        return self.name != "full" and self.kv_budget < 1.0

    @property
    def label(self) -> str:
        return self.name if self.name == "full" else f"{self.name}-{round(100 * self.kv_budget)}%"


def make_policy(name: str, **kw) -> KVPolicyConfig:
    return KVPolicyConfig(name=name, **kw)


def budget_tokens(policy: KVPolicyConfig, n_prompt: int) -> tuple[int, int]:
    """(k, protected recent window w) for a prompt of ``n_prompt`` tokens; k >= 1 and w >= 1 when evicting
    (the newest token is always kept)."""
    if not policy.evicts:
        return n_prompt, n_prompt
    k = max(1, int(math.floor(n_prompt * policy.kv_budget)))
    if policy.name == "window":
        w = k
    elif policy.name == "sink":
        w = max(1, k - policy.n_sink)
    else:
        w = max(1, min(k, int(math.floor(k * policy.recent_ratio))))
    return k, w


def n_sinks(policy: KVPolicyConfig, k: int) -> int:
    return min(policy.n_sink, max(0, k - 1)) if policy.name == "sink" else 0


def tau_at(policy: KVPolicyConfig, step: int, gen_len: int) -> float:
    """Keyformer's temperature at decode step ``step`` (0 during the prompt); 1 for h2o."""
    if policy.name != "keyformer":
        return 1.0
    return policy.tau_init + step * (policy.tau_end - policy.tau_init) / max(1, gen_len)


def gumbel(shape, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard Gumbel(0, 1) draws ``-log(-log U)`` (float32), U uniform in (0, 1)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def draw_noise(policy: KVPolicyConfig, shape, generator, device) -> torch.Tensor | None:
    if policy.name != "keyformer" or policy.noise == "none":
        return None
    if policy.noise == "gumbel":
        return gumbel(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def score_probs(logits: torch.Tensor, valid: torch.Tensor | None, tau,
                noise: torch.Tensor | None) -> torch.Tensor:
    """``f = softmax((x + g) / tau)`` over the last dim (masked entries get 0). float32."""
    x = logits.float()
    if noise is not None:
        x = x + noise
    x = x / tau  # (exact for tau = 1; a 0-d tensor keeps a captured CUDA graph valid as tau changes)
    if valid is not None:
        x = x.masked_fill(~valid, float("-inf"))
    p = torch.softmax(x, dim=-1)
    return p.nan_to_num(0.0) if valid is not None else p


def _group_sum(s: torch.Tensor, n_kv: int) -> torch.Tensor:
    # [B, H, ...] -> [B, KV, ...]: a KV head's score is the sum over the query heads that share it
    B, H = s.shape[:2]
    return s.view(B, n_kv, H // n_kv, *s.shape[2:]).sum(2)


def prompt_scores(q: torch.Tensor, k: torch.Tensor, scale: float, policy: KVPolicyConfig, *,
                  chunk: int = 512, generator: torch.Generator | None = None) -> torch.Tensor:
    """Accumulated prompt scores ``S [B, KV, n]`` = column sums of ``f`` over all causal query rows.

    q ``[B, n, H, d]`` (post-RoPE), k ``[B, n, KV, d]``. Query rows are processed ``chunk`` at a time,
    so at most a ``[B, H, chunk, n]`` block of logits exists (never ``n x n`` per head).
    """
    B, n, H, d = q.shape
    KV = k.shape[2]
    G = H // KV
    kt = k.permute(0, 2, 3, 1)  # [B, KV, d, n]
    tau = tau_at(policy, 0, 1)
    S = torch.zeros(B, KV, n, dtype=torch.float32, device=q.device)
    cols = torch.arange(n, device=q.device)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        qc = q[:, i0:i1].permute(0, 2, 1, 3).reshape(B, KV, G * (i1 - i0), d)  # [B, KV, G*c, d]
        x = torch.matmul(qc, kt.to(qc.dtype)).float().view(B, H, i1 - i0, n) * scale  # [B, H, c, n]
        valid = cols[None, :] <= torch.arange(i0, i1, device=q.device)[:, None]  # [c, n] causal
        g = draw_noise(policy, x.shape, generator, q.device)
        f = score_probs(x, valid, tau, g)
        S += _group_sum(f.sum(2), KV)
    if policy.prompt_norm:  # token j is seen by n - j causal query rows (the paper keeps this bias)
        S /= (n - cols).float()
    return S


def prompt_scores_ref(q: torch.Tensor, k: torch.Tensor, scale: float, policy: KVPolicyConfig, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference: the whole ``[B, H, n, n]`` score matrix at once (small n only)."""
    return prompt_scores(q, k, scale, policy, chunk=q.shape[1], generator=generator)


def select_prompt(scores: torch.Tensor | None, n: int, k: int, w: int, n_sink: int,
                  policy: KVPolicyConfig) -> torch.Tensor:
    """Kept positions after the prompt, ``[B, KV, k]`` sorted ascending (or all n if k >= n).

    Protected: the last ``w`` positions and the first ``n_sink``; the rest of the budget goes to the
    top scores among the others (window/sink have no free budget)."""
    if k >= n:
        raise ValueError("select_prompt needs k < n")
    pos = torch.arange(n, device=scores.device if scores is not None else None)
    protected = (pos >= n - w) | (pos < n_sink)
    prot = pos[protected]
    n_free = k - prot.numel()
    if n_free <= 0 or scores is None:
        return prot[-k:]  # [k] shared by every (sequence, head)
    B, KV = scores.shape[:2]
    pri = scores.masked_fill(protected, float("-inf"))
    top = torch.topk(pri, n_free, dim=-1, sorted=False).indices  # [B, KV, k - |protected|]
    return torch.cat([top, prot.expand(B, KV, -1)], dim=-1).sort(dim=-1).values


def evict_one(scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, cur_pos, w: int,
              n_sink: int, policy: KVPolicyConfig) -> torch.Tensor:
    """Slot ``[B, KV]`` of the token to evict: among valid, unprotected slots the lowest score, ties to
    the oldest position (window/sink: simply the oldest unprotected). ``cur_pos``: newest position."""
    protected = (pos > cur_pos - w) | (pos < n_sink)
    cand = valid & ~protected
    big = torch.iinfo(torch.long).max
    if policy.needs_scores:
        s = scores.masked_fill(~cand, float("inf"))
        m = s.min(dim=-1, keepdim=True).values
        cand = cand & (s == m)
    return torch.where(cand, pos, big).argmin(dim=-1)


def with_budget(policy: KVPolicyConfig, kv_budget: float) -> KVPolicyConfig:
    return replace(policy, kv_budget=kv_budget)
