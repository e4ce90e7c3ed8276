"""The KV policies inside the serving engine: a :class:`~mlsys24.serving.kv_policy.KVPolicy` that
applies Full / Window / sinks / H2O / Keyformer to each running sequence of :class:`~mlsys24.serving.Engine`.

Execution is *masked* over the engine's paged cache (as the official Keyformer code does over HF's
cache): a forward hook on every layer's ``attn_logits`` probe (which switches the layer to the eager
backend, see :mod:`mlsys24.models.attention`) sets the logits of evicted tokens to the dtype minimum
and accumulates each sequence's scores; ``after_step`` selects the kept set once the prompt is
complete (any prefill chunking) and evicts one token per (layer, KV head) per decode step, with the
same rules as :class:`~mlsys24.kvcache.compact.PolicyKVCache`. The paged pool still holds the evicted
slots, so this gives the policy's accuracy under continuous batching, not its memory saving (the
compacted cache does that).

State per sequence and layer: ``keep [KV, n]`` (bool) and ``score [KV, n]`` (float32).
"""

from __future__ import annotations

import torch

from ..serving.kv_policy import KVPolicy
from .policies import (
    KVPolicyConfig,
    _group_sum,
    budget_tokens,
    draw_noise,
    evict_one,
    n_sinks,
    score_probs,
    select_prompt,
    tau_at,
)

__all__ = ["EngineKVPolicy"]


class EngineKVPolicy(KVPolicy):
    """``Engine(model, ..., kv_policy=EngineKVPolicy(KVPolicyConfig("keyformer", kv_budget=0.5), gen_len=64))``.

    gen_len: T of Keyformer's temperature schedule (a request's ``max_new_tokens`` when None).
    """

    def __init__(self, policy: KVPolicyConfig, gen_len: int | None = None):
        self.policy = policy
        self.name = policy.label
        self.gen_len = gen_len
        self.state: dict[int, dict] = {}
        self._engine = None
        self._handles: list = []

    # engine hooks ----------------------------------------------------------------------------
    def on_admit(self, engine, seq) -> None:
        if self._engine is not engine:
            self._attach(engine)
        cfg = engine.model.cfg
        n = seq.prompt_len
        k, w = budget_tokens(self.policy, n)
        dev = engine.cache.device
        self.state[seq.rid] = dict(
            n_prompt=n, k=k, w=w, n_sink=n_sinks(self.policy, k), evicting=self.policy.evicts and k < n,
            T=self.gen_len or seq.request.max_new_tokens,
            keep=[torch.ones(cfg.n_kv_heads, 0, dtype=torch.bool, device=dev) for _ in range(cfg.n_layers)],
            score=[torch.zeros(cfg.n_kv_heads, 0, device=dev) for _ in range(cfg.n_layers)],
            gen=torch.Generator(device=dev).manual_seed(self.policy.seed + seq.rid), selected=False)

    def on_finish(self, engine, seq) -> None:
        self.state.pop(seq.rid, None)

    def after_step(self, engine, rows) -> None:
        for seq, _ in rows:
            st = self.state.get(seq.rid)
            if st is None or not st["evicting"]:
                continue
            done = seq.num_computed
            if not st["selected"]:
                if done < st["n_prompt"]:
                    continue
                n = st["n_prompt"]
                for layer, S in enumerate(st["score"]):
                    kept = select_prompt(S[None, :, :n], n, st["k"], st["w"], st["n_sink"], self.policy)
                    kept = (kept.expand(1, S.shape[0], -1) if kept.dim() == 1 else kept)[0]
                    keep = torch.zeros_like(st["keep"][layer])
                    keep.scatter_(-1, kept, True)
                    keep[:, n:] = True  # tokens after the prompt (none yet unless prompt and decode merged)
                    st["keep"][layer] = keep
                st["selected"] = True
                continue
            for layer in range(len(st["keep"])):
                keep = st["keep"][layer]
                if int(keep[0].sum()) <= st["k"]:
                    continue
                pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
                sc = st["score"][layer] if self.policy.needs_scores else None
                e = evict_one(sc, pos, keep, done - 1, st["w"], st["n_sink"], self.policy)  # [KV]
                keep.scatter_(-1, e[:, None], False)
                st["score"][layer].scatter_(-1, e[:, None], 0.0)

    # the logits hook ---------------------------------------------------------------------------
    def _attach(self, engine) -> None:
        for h in self._handles:
            h.remove()
        self._engine = engine
        self._handles = [blk.self_attn.attn_logits.register_forward_hook(self._make_hook(i))
                         for i, blk in enumerate(engine.model.layers)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._engine = [], None

    def _make_hook(self, layer: int):
        def hook(_module, _args, logits):  # logits [B, H, T, S], masked by the causal rule already
            cache = self._engine.cache
            out = logits.clone()
            for b, rid in enumerate(cache.batch_ids):
                st = self.state.get(rid)
                if st is None:
                    continue
                n_b, t_b = int(cache.kv_lens[b]), int(cache.input_lens[b])
                keep = st["keep"][layer]
                if keep.shape[1] < n_b:  # new tokens are kept
                    grow = n_b - keep.shape[1]
                    st["keep"][layer] = keep = torch.cat(
                        [keep, torch.ones(keep.shape[0], grow, dtype=torch.bool, device=keep.device)], 1)
                    st["score"][layer] = torch.cat(
                        [st["score"][layer], torch.zeros(keep.shape[0], grow, device=keep.device)], 1)
                H, KV = out.shape[1], keep.shape[0]
                hk = keep[:, :n_b].repeat_interleave(H // KV, dim=0)  # [H, n_b]
                out[b, :, :, :n_b] = out[b, :, :, :n_b].masked_fill(~hk[:, None, :], torch.finfo(out.dtype).min)
                if self.policy.needs_scores and st["evicting"]:
                    x = out[b:b + 1, :, :t_b, :n_b]  # [1, H, t, n]
                    q0 = int(cache.q_offsets[b])
                    allowed = hk[None, :, None, :] & (torch.arange(n_b, device=x.device)[None, :]
                                                      <= (q0 + torch.arange(t_b, device=x.device))[:, None])
                    step = max(0, q0 + t_b - st["n_prompt"]) if st["selected"] else 0
                    tau = tau_at(self.policy, step, st["T"])
                    g = draw_noise(self.policy, x.shape, st["gen"], x.device)
                    f = score_probs(x, allowed, tau, g).sum(2)  # [1, H, n]
                    st["score"][layer][:, :n_b] += _group_sum(f, KV)[0] * keep[:, :n_b]
            return out
        return hook
