"""A per-(layer, KV head) KV cache that applies an eviction policy: compacted (memory really freed) or
masked (the official code's simulation: the cache keeps growing, evicted slots are masked).

Layout per layer (head-major, so one head's slots are contiguous for the decode kernel)::

    k_buf, v_buf  [n_layers, B, KV, C, d]    C = k + 1 (compacted, budget k + one slot for the new token)
                                             C = n + T (masked, and the full cache): slot = position
    pos           [n_layers, B, KV, C] int64  absolute position held by each slot, -1 = empty/evicted
    score         [n_layers, B, KV, C] f32    accumulated policy score (h2o, keyformer)
    free          [n_layers, B, KV]   int64   compacted: the slot the next decode token overwrites

Prompt (``T = n`` tokens, uniform over the batch): causal attention over all ``n`` tokens (SDPA), scores
accumulated in query chunks (:func:`~.policies.prompt_scores`, never an ``n x n`` block per head),
then the kept ``k`` tokens are gathered into slots ``0..k-1``; only one layer's full K/V exists at a
time. Decode (``T = 1``): the new token is written into ``free`` (in place, per (layer, head)), the
query attends to all valid slots, the scores are updated, and the evicted slot becomes the next
``free`` slot: O(1) data movement per step, no re-gather. Tokens keep their absolute RoPE positions
(keys are cached post-RoPE; ``q_offsets`` is the number of tokens seen, so the model's default
position ids stay absolute).

Driven by the shared Llama through the cache protocol (``begin / update / end``) and the attention
backend ``"kv_policy"`` (registered here), which delegates to :meth:`PolicyKVCache.attend`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..models.attention import AttentionCall, register_attention_backend, sdpa_attention
from ..models.kv_cache import KVCache
from .policies import (
    KVPolicyConfig,
    budget_tokens,
    draw_noise,
    evict_one,
    n_sinks,
    prompt_scores,
    score_probs,
    select_prompt,
    tau_at,
)

__all__ = ["PolicyKVCache", "policy_attention"]


class PolicyKVCache(KVCache):
    """KV cache of one batch of equal-length prompts under ``policy``.

    mode: "compact" (physically compacted, fixed budget) or "masked" (growing buffer + mask).
    attn: decode attention implementation of a compacted cache: "torch" (logits materialised in
    PyTorch); "triton" (:mod:`.fused_score`: split-KV attention that also writes the logits, then the
    score update and the eviction in one kernel, and the new token written into the free slot by a
    kernel); "twopass" (the earlier path: card 11's fused kernel when no score is needed, else two
    Triton passes over K and V (:mod:`.score_attention`) and the policy bookkeeping in PyTorch);
    "card11" (:func:`mlsys24.kernels.decode_attention.decode_attention_sync` for caches that need no
    scores, e.g. the full cache; as "twopass" otherwise).
    noise_by_position: draw decode-step noise per absolute position (identical across the compact
    and masked layouts: used to check they agree); False draws per slot (cheaper at scale).
    rng: "own" (a seeded torch.Generator), "global" (the device's default generator, the one CUDA-graph
    capture supports) or "philox" (attn="triton" only: Gumbel noise drawn inside the score kernel,
    keyed by the policy seed and the position of the new token; other paths use the global generator).
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, batch: int, prompt_len: int,
                 gen_len: int, policy: KVPolicyConfig, *, mode: str = "compact", dtype=torch.float32, device="cpu",
                 score_chunk: int = 512, attn: str = "torch", noise_by_position: bool = True,
                 rng: str = "own"):
        if mode not in ("compact", "masked"):
            raise ValueError(f"mode must be 'compact' or 'masked', got {mode!r}")
        if attn not in ("torch", "triton", "twopass", "card11"):
            raise ValueError(f"attn must be torch, triton, twopass or card11, got {attn!r}")
        if rng not in ("own", "global", "philox"):
            raise ValueError(f"rng must be own, global or philox, got {rng!r}")
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = n_layers, n_heads, n_kv_heads, head_dim
        self.batch, self.prompt_len, self.gen_len = batch, prompt_len, gen_len
        self.policy, self.mode, self.attn, self.score_chunk = policy, mode, attn, score_chunk
        self.noise_by_position = noise_by_position
        self.rng = rng
        self.device = torch.device(device)
        # Triton kernels run on a GPU, or on CPU under Triton's interpreter
        self.on_triton = self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        self.k_budget, self.w = budget_tokens(policy, prompt_len)
        self.n_sink = n_sinks(policy, self.k_budget)
        self.evicting = policy.evicts and self.k_budget < prompt_len
        self.max_tokens = prompt_len + gen_len
        C = self.k_budget + 1 if (mode == "compact" and self.evicting) else self.max_tokens
        self.capacity = C
        shape = (n_layers, batch, n_kv_heads, C, head_dim)
        self.k_buf = torch.zeros(shape, dtype=dtype, device=device)
        self.v_buf = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full(shape[:4], -1, dtype=torch.long, device=device)
        self.score = torch.zeros(shape[:4], dtype=torch.float32, device=device) if policy.needs_scores else None
        self.free = torch.zeros(shape[:3], dtype=torch.long, device=device)
        # rng="own": a dedicated, seeded generator; "global": the device's default generator (the one
        # CUDA-graph capture supports), seeded by the caller
        self.gen = torch.Generator(device=self.device).manual_seed(policy.seed) if rng == "own" else None
        # device-side copies of the step state, advanced in place, so that a decode step can be
        # captured in a CUDA graph and replayed (steady state of a compacted cache)
        self._pos_t = torch.zeros((), dtype=torch.long, device=device)   # = n_seen
        self._step_t = torch.zeros((), dtype=torch.float32, device=device)  # = step
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._len_t = torch.ones((), dtype=torch.long, device=device)    # = n_seen + 1 during a decode step
        self.n_seen = 0      # tokens processed (= next absolute position)
        self.n_valid = 0     # kept tokens per (layer, sequence, head), the same everywhere
        self.step = 0        # decode steps done (Keyformer's t)
        self.taus: list[float] = []
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._T = 0
        z = torch.zeros(batch, dtype=torch.long, device=device)
        self.q_offsets, self.kv_lens, self.input_lens = z, z, z
        self._bi = torch.arange(batch, device=device)[:, None]
        self._hi = torch.arange(n_kv_heads, device=device)[None, :]

    @classmethod
    def for_model(cls, model, batch: int, prompt_len: int, gen_len: int, policy: KVPolicyConfig, **kw):
        cfg = model.cfg
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, batch, prompt_len, gen_len, policy, **kw)

    # cache protocol ------------------------------------------------------------------------
    def begin(self, input_lens: torch.Tensor) -> None:
        lens = input_lens.tolist()
        T = int(lens[0])
        if len(lens) != self.batch or any(int(x) != T for x in lens):
            raise ValueError(f"PolicyKVCache needs {self.batch} rows of equal length, got {lens}")
        if self.n_seen == 0:
            if T != self.prompt_len:
                raise ValueError(f"prompt of {T} tokens, cache built for {self.prompt_len}")
        elif T != 1:
            raise ValueError("after the prompt, PolicyKVCache takes one token per step")
        if self.n_seen + T > self.max_tokens:
            raise ValueError(f"cache overflow: {self.n_seen + T} > {self.max_tokens} tokens")
        self._T = T
        if self.n_seen > 0:
            torch.add(self._pos_t, 1, out=self._len_t)
        self.q_offsets = self._pos_t.expand(self.batch)  # absolute position of the first new token
        self.kv_lens = self.q_offsets + T
        self.input_lens = input_lens

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [B, T, KV, d] post-RoPE
        if self.n_seen == 0:
            self._stash[layer] = (k, v)
            return
        if self.mode == "compact" and self.evicting and self._fused():
            from .fused_score import write_slot

            sc = self.score[layer] if self.score is not None else None
            write_slot(k[:, 0], v[:, 0], self.k_buf[layer], self.v_buf[layer], self.pos[layer], sc, self.free[layer],
                       self._pos_t)
        elif self.mode == "compact" and self.evicting:
            slot = self.free[layer]  # [B, KV]
            self.k_buf[layer][self._bi, self._hi, slot] = k[:, 0].to(self.k_buf.dtype)
            self.v_buf[layer][self._bi, self._hi, slot] = v[:, 0].to(self.v_buf.dtype)
            self.pos[layer][self._bi, self._hi, slot] = self._pos_t
            if self.score is not None:  # (a device zero: no host->device copy inside a captured graph)
                self.score[layer][self._bi, self._hi, slot] = self._zero
        else:  # slot = position
            s = self._pos_t.view(1)
            self.k_buf[layer].index_copy_(2, s, k[:, :1].transpose(1, 2).to(self.k_buf.dtype))
            self.v_buf[layer].index_copy_(2, s, v[:, :1].transpose(1, 2).to(self.v_buf.dtype))
            self.pos[layer].index_copy_(2, s, self._pos_t.expand(self.batch, self.n_kv_heads, 1))

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, KV, d]`` views (slot order is not position order: use :meth:`attend`)."""
        return self.k_buf[layer].transpose(1, 2), self.v_buf[layer].transpose(1, 2)

    def end(self) -> None:
        if self.n_seen == 0:
            self.n_seen = self._T
            self.n_valid = min(self._T, self.k_budget) if self.evicting else self._T
            self._stash.clear()
            self._pos_t.fill_(self._T)
        else:
            self.n_seen += 1
            self.step += 1
            self._pos_t.add_(1)
            self._step_t.add_(1.0)
            self.n_valid = min(self.n_valid + 1, self.k_budget) if self.evicting else self.n_valid + 1

    # attention -----------------------------------------------------------------------------
    def attend(self, call: AttentionCall) -> torch.Tensor:
        if self.n_seen == 0:
            return self._prefill(call)
        return self._decode(call)

    def _prefill(self, call: AttentionCall) -> torch.Tensor:
        layer = call.layer
        k, v = self._stash[layer]  # [B, n, KV, d]
        q = call.q  # [B, n, H, d]
        B, n, H, d = q.shape
        KV = k.shape[2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        if KV != H:
            kh, vh = kh.repeat_interleave(H // KV, dim=1), vh.repeat_interleave(H // KV, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=call.scale).transpose(1, 2)
        S = None
        if self.policy.needs_scores and self.evicting:
            S = prompt_scores(q, k, call.scale, self.policy, chunk=self.score_chunk, generator=self.gen)
        if self.policy.name == "keyformer" and layer == 0:
            self.taus.append(tau_at(self.policy, 0, self.gen_len))
        kb, vb = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, n, d]
        pos_all = torch.arange(n, device=q.device)
        if not self.evicting:
            self.k_buf[layer, :, :, :n] = kb.to(self.k_buf.dtype)
            self.v_buf[layer, :, :, :n] = vb.to(self.v_buf.dtype)
            self.pos[layer, :, :, :n] = pos_all
            self.free[layer] = n
            return out
        kept = select_prompt(S, n, self.k_budget, self.w, self.n_sink, self.policy)
        kept = kept.expand(B, KV, -1) if kept.dim() == 1 else kept  # [B, KV, k]
        kk = self.k_budget
        if self.mode == "compact":
            idx = kept[..., None].expand(-1, -1, -1, d)
            self.k_buf[layer, :, :, :kk] = kb.gather(2, idx).to(self.k_buf.dtype)
            self.v_buf[layer, :, :, :kk] = vb.gather(2, idx).to(self.v_buf.dtype)
            self.pos[layer, :, :, :kk] = kept
            if S is not None:
                self.score[layer, :, :, :kk] = S.gather(2, kept)
            self.free[layer] = kk
        else:
            self.k_buf[layer, :, :, :n] = kb.to(self.k_buf.dtype)
            self.v_buf[layer, :, :, :n] = vb.to(self.v_buf.dtype)
            self.pos[layer, :, :, :n].scatter_(-1, kept, kept)
            if S is not None:
                self.score[layer, :, :, :n].scatter_(-1, kept, S.gather(2, kept))
        return out

    def _width(self) -> int:
        # slots in use after this step's write
        if self.mode == "masked":
            return self.n_seen + 1
        return min(self.capacity, self.n_valid + 1)

    def _fused(self) -> bool:
        return self.attn == "triton" and self.mode == "compact" and self.on_triton

    def _decode_fused(self, call: AttentionCall) -> torch.Tensor:
        """attn="triton": one attention pass that writes the logits, one score/evict sweep (:mod:`.fused_score`)."""
        from .fused_score import attn_logits, score_evict

        layer = call.layer
        q = call.q[:, 0]  # [B, H, d]
        B, H, d = q.shape
        KV, G = self.n_kv_heads, H // self.n_kv_heads
        if not self.evicting:  # slot = position, the first n_seen + 1 slots are valid
            out, _, _ = attn_logits(q, self.k_buf[layer], self.v_buf[layer], self.capacity, call.scale,
                                    w_dev=self._len_t, write_logits=False)
            return out[:, None]
        W = self._width()  # = k + 1: every slot valid (the evicted one was just overwritten)
        pol = self.policy
        need_logits = pol.needs_scores
        out, x, lse = attn_logits(q, self.k_buf[layer], self.v_buf[layer], W, call.scale, write_logits=need_logits)
        noise: str | torch.Tensor = "none"
        if pol.name == "keyformer":
            if layer == 0:
                self.taus.append(tau_at(pol, self.step + 1, self.gen_len))
            if pol.noise != "none":
                if self.rng == "philox" and pol.noise == "gumbel":
                    noise = "philox"
                else:  # the same draws as the PyTorch path
                    pos = self.pos[layer, :, :, :W]
                    if self.noise_by_position:
                        g = draw_noise(pol, (B, KV, G, self.max_tokens), self.gen, q.device)
                        g = g.gather(-1, pos.clamp(min=0)[:, :, None, :].expand(-1, -1, G, -1))
                    else:
                        g = draw_noise(pol, (B, KV, G, W), self.gen, q.device)
                    noise = g.reshape(B, H, W).contiguous()
        mode = pol.name if pol.needs_scores else "oldest"
        score = self.score[layer] if self.score is not None else None
        score_evict(score, self.pos[layer], self.free[layer], self._pos_t, W, mode=mode, w_recent=self.w,
                    n_sink=self.n_sink, x=x, lse2=lse, step=self._step_t, tau_init=pol.tau_init,
                    dtau=(pol.tau_end - pol.tau_init) / max(1, self.gen_len), noise=noise, seed=pol.seed)
        return out[:, None]

    def _decode(self, call: AttentionCall) -> torch.Tensor:
        if self._fused():
            return self._decode_fused(call)
        layer = call.layer
        q = call.q[:, 0]  # [B, H, d]
        B, H, d = q.shape
        KV, G = self.n_kv_heads, H // self.n_kv_heads
        W = self._width()
        kb, vb = self.k_buf[layer, :, :, :W], self.v_buf[layer, :, :, :W]  # [B, KV, W, d]
        pos = self.pos[layer, :, :, :W]
        valid = pos >= 0  # [B, KV, W]
        need_logits = self.policy.needs_scores and self.evicting
        vmask = valid[:, :, None, :]
        # Triton on a GPU, compacted cache: every slot < W is valid once the budget is full (the evicted
        # slot was just overwritten), so the kernels need no mask
        kernels = self.attn in ("twopass", "card11") and self.mode == "compact" and self.on_triton and (
            not self.evicting or self.n_valid + 1 >= W)
        if kernels and not need_logits:  # the fused split-KV kernel of card 11 (FlashDecoding)
            from ..kernels.decode_attention import decode_attention_sync

            if self.evicting:
                lens = W
            else:  # slot = position
                lens = (self._pos_t + 1).to(torch.int32).expand(B).contiguous()
            out = decode_attention_sync(q.contiguous(), self.k_buf[layer], self.v_buf[layer], lens, scale=call.scale,
                                        layout="bhld", max_seq_len=W if self.evicting else self.capacity)
            out = out[:, None]
        elif kernels:  # two passes that write the logits the score needs (score_attention)
            from .score_attention import score_attention

            o, x, p = score_attention(q, self.k_buf[layer], self.v_buf[layer], W, call.scale)
            out = o[:, None]
            x, p = x.view(B, KV, G, W), p.view(B, KV, G, W)
        else:
            qg = q.view(B, KV, G, d)
            x = torch.matmul(qg, kb.to(q.dtype).transpose(-1, -2)).float() * call.scale  # [B, KV, G, W]
            p = torch.softmax(x.masked_fill(~vmask, float("-inf")), dim=-1)
            out = torch.matmul(p.to(vb.dtype), vb).to(q.dtype).reshape(B, 1, H, d)  # [B, 1, H, d]
        if need_logits:
            if layer == 0 and self.policy.name == "keyformer":
                self.taus.append(tau_at(self.policy, self.step + 1, self.gen_len))
            pol = self.policy  # decode step t = step + 1 (t = 0 is the prompt)
            tau = pol.tau_init + (self._step_t + 1.0) * ((pol.tau_end - pol.tau_init) / max(1, self.gen_len))
            if self.policy.name == "h2o":
                f = p  # H2O accumulates the attention probabilities themselves
            else:
                if self.noise_by_position:
                    g = draw_noise(self.policy, (B, KV, G, self.max_tokens), self.gen, q.device)
                    if g is not None:
                        g = g.gather(-1, pos.clamp(min=0)[:, :, None, :].expand(-1, -1, G, -1))
                else:
                    g = draw_noise(self.policy, (B, KV, G, W), self.gen, q.device)
                f = score_probs(x, vmask, tau, g)
            self.score[layer, :, :, :W] += f.sum(2)
        if self.evicting and self.n_valid + 1 > self.k_budget:
            sc = self.score[layer, :, :, :W] if self.score is not None else None
            e = evict_one(sc, pos, valid, self._pos_t, self.w, self.n_sink, self.policy)  # [B, KV]
            self.pos[layer].scatter_(-1, e[..., None], -1)
            if self.score is not None:
                self.score[layer].scatter_(-1, e[..., None], 0.0)
            self.free[layer] = e
        return out

    # inspection ----------------------------------------------------------------------------
    def kept_positions(self, layer: int) -> torch.Tensor:
        """Sorted kept positions ``[B, KV, n_valid]`` of one layer."""
        p = self.pos[layer]
        return p.masked_fill(p < 0, torch.iinfo(torch.long).max).sort(dim=-1).values[..., : self.n_valid]

    def check_invariants(self) -> None:
        """|K| = n_valid (= k once full) per (layer, sequence, head); the recent window and sinks are kept."""
        cnt = (self.pos >= 0).sum(-1)
        assert bool((cnt == self.n_valid).all()), f"kept counts {cnt.unique().tolist()} != {self.n_valid}"
        if self.evicting:
            assert self.n_valid <= self.k_budget
            newest = self.n_seen - 1
            for layer in range(self.n_layers):
                kp = self.kept_positions(layer)
                lo = max(0, newest - self.w + 1)
                need = torch.arange(lo, newest + 1, device=kp.device)
                if self.n_sink:
                    need = torch.cat([torch.arange(self.n_sink, device=kp.device), need])
                hit = (kp[..., None, :] == need[:, None]).any(-1)  # [B, KV, |need|]
                assert bool(hit.all()), f"layer {layer}: a protected position was evicted"

    def nbytes(self) -> int:
        return self.k_buf.nbytes + self.v_buf.nbytes


def policy_attention(call: AttentionCall) -> torch.Tensor:
    """Attention backend for :class:`PolicyKVCache` (``model.set_attention_backend("kv_policy")``)."""
    cache = call.cache
    if not isinstance(cache, PolicyKVCache):  # any other cache (or none): the default backend
        return sdpa_attention(call)
    return cache.attend(call)


register_attention_backend("kv_policy", policy_attention)
