"""Running a model under a KV policy: teacher-forced continuations, greedy generation, quality metrics.

``teacher_forced(model, prompts [B, n], conts [B, T], policy)`` runs the prompt, then feeds the true
continuation one token per step with the policy active, and returns the logits that predict each
continuation token ``[B, T, vocab]`` (the first from the prompt's last position).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..models.llama import Attention
from .compact import PolicyKVCache
from .policies import KVPolicyConfig

__all__ = ["policy_backend", "teacher_forced", "greedy", "quality_metrics", "rouge_l", "validation_prompts",
           "attention_mass_cdf", "tokens_for_mass"]


@contextlib.contextmanager
def policy_backend(model):
    """Route every attention layer of ``model`` through the ``"kv_policy"`` backend for the block."""
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    old = [m.backend for m in mods]
    for m in mods:
        m.backend = "kv_policy"
    try:
        yield
    finally:
        for m, b in zip(mods, old):
            m.backend = b


@torch.no_grad()
def teacher_forced(model, prompts: torch.Tensor, conts: torch.Tensor, policy: KVPolicyConfig, *,
                   mode: str = "compact", return_cache: bool = False, **cache_kw):
    """Logits ``[B, T, vocab]`` (float32) predicting ``conts`` under ``policy`` (see module docstring)."""
    B, n = prompts.shape
    T = conts.shape[1]
    cache = PolicyKVCache.for_model(model, B, n, T, policy, mode=mode, **cache_kw)
    outs = []
    with policy_backend(model):
        outs.append(model(prompts, kv_cache=cache)[:, -1].float())
        for t in range(T - 1):
            outs.append(model(conts[:, t:t + 1], kv_cache=cache)[:, -1].float())
    logits = torch.stack(outs, 1)
    return (logits, cache) if return_cache else logits


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, gen_len: int, policy: KVPolicyConfig, *, mode: str = "compact",
           **cache_kw) -> torch.Tensor:
    """Greedy continuation ``[B, gen_len]`` under ``policy``."""
    B, n = prompts.shape
    cache = PolicyKVCache.for_model(model, B, n, gen_len, policy, mode=mode, **cache_kw)
    toks = []
    with policy_backend(model):
        nxt = model(prompts, kv_cache=cache)[:, -1].argmax(-1)
        toks.append(nxt)
        for _ in range(gen_len - 1):
            nxt = model(nxt[:, None], kv_cache=cache)[:, -1].argmax(-1)
            toks.append(nxt)
    return torch.stack(toks, 1)


def quality_metrics(logits: torch.Tensor, full_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Continuation perplexity, KL(full || policy) per token (nats) and top-1 agreement with full."""
    lp = torch.log_softmax(logits.float(), -1)
    lf = torch.log_softmax(full_logits.float(), -1)
    nll = -lp.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    kl = (lf.exp() * (lf - lp)).sum(-1)
    agree = (logits.argmax(-1) == full_logits.argmax(-1)).float()
    return {"nll": float(nll.mean()), "ppl": math.exp(float(nll.mean())), "kl": float(kl.mean()),
            "top1_agree": float(agree.mean()), "nll_per_prompt": nll.mean(1).tolist()}


def _lcs(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list, reference: list) -> float:
    """Token-level ROUGE-L F1 (longest common subsequence)."""
    if not candidate or not reference:
        return 0.0
    lcs = _lcs(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def validation_prompts(n_prompts: int, prompt_len: int, gen_len: int, *, seed: int = 0,
                       ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_prompts`` windows of ``prompt_len + gen_len`` tokens from the validation split (seeded, non-
    overlapping offsets): (prompts [N, n], continuations [N, T])."""
    if ids is None:
        from ..models.eval import validation_ids

        ids = validation_ids()
    L = prompt_len + gen_len
    n_win = ids.numel() // L
    if n_win < n_prompts:
        raise ValueError(f"validation split holds {n_win} windows of {L} tokens, asked for {n_prompts}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_win, generator=g)[:n_prompts].sort().values
    win = ids[: n_win * L].view(n_win, L)[pick]
    return win[:, :prompt_len].clone(), win[:, prompt_len:].clone()


@torch.no_grad()
def attention_mass_cdf(model, ids: torch.Tensor, *, last_rows: int = 32) -> torch.Tensor:
    """Sorted attention probabilities of the last ``last_rows`` query rows of a full-attention prompt,
    ``[n_layers, B, H, rows, n]`` descending (the cumulative sum over the last dim is the mass CDF)."""
    with model.capture(outputs=["*.attn_probs"]) as cap:
        model(ids)
    probs = torch.stack([cap.outputs[f"layers.{i}.self_attn.attn_probs"][0][:, :, -last_rows:]
                         for i in range(model.cfg.n_layers)])
    return probs.sort(dim=-1, descending=True).values


def tokens_for_mass(sorted_probs: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Fraction of the visible tokens needed to cover ``mass`` of each row's attention (``[..., rows]``)."""
    cdf = sorted_probs.cumsum(-1)
    need = (cdf < mass).sum(-1) + 1
    n = sorted_probs.shape[-1]
    visible = torch.arange(n - sorted_probs.shape[-2] + 1, n + 1, device=sorted_probs.device)
    return need.float() / visible.float()
