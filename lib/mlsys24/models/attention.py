"""Attention backends: the one place where ``softmax(q k^T / sqrt(d)) v`` is computed.

Every attention layer builds an :class:`AttentionCall` and hands it to its backend, a callable
``backend(call) -> out [B, T, n_heads, head_dim]``. Built-ins:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention``; uses ``is_causal=True`` without a mask
  when there is no cache, no padding and no extra mask (the training path, flash kernels on GPU).
- ``"eager"``: explicit ``q k^T``, mask, softmax, ``p v``; passes the pre-softmax logits and the
  probabilities through the layer's probes (``attn_logits``, ``attn_probs``) so hooks can read or
  rewrite them (H2O/Keyformer scores). A layer switches to it by itself when one of those probes is
  observed.

A kernel that reads a paged cache directly (a Triton decode kernel) registers itself with
:func:`register_attention_backend` and reads ``call.cache.block_tables``, ``call.cache.kv_lens`` and
``call.cache.k_pool`` instead of calling :meth:`AttentionCall.keys_values` (which gathers).

Masking rule (shapes: q ``[B, T, H, d]``, keys ``[B, S, KV, d]``): query ``i`` of row ``b`` attends
to slot ``j`` iff ``j <= q_offsets[b] + i`` and ``j < kv_lens[b]`` and the optional user mask
allows it (bool, True = attend, broadcastable to ``[B, H, T, S]``; or a float mask added to the
logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionCall", "attention_mask", "eager_attention", "sdpa_attention", "register_attention_backend",
    "get_attention_backend", "ATTENTION_BACKENDS",
]


@dataclass
class AttentionCall:
    """Everything a backend needs for one layer's attention."""

    q: torch.Tensor  # [B, T, H, d] post-RoPE queries
    k_new: torch.Tensor  # [B, T, KV, d] post-RoPE keys of this step (already written to the cache)
    v_new: torch.Tensor  # [B, T, KV, d]
    q_offsets: torch.Tensor  # [B] slot of the first query in its row
    kv_lens: torch.Tensor  # [B] valid key slots per row (after this step)
    layer: int
    scale: float
    cache: object | None = None  # a KVCache, or None (keys = this step's keys)
    mask: torch.Tensor | None = None  # optional user mask, see module docstring
    full_causal: bool = False  # True: no cache, no padding, no user mask -> plain causal attention
    dropout_p: float = 0.0  # attention-probability dropout (training only)
    probes: dict = field(default_factory=dict)  # {"attn_logits": Probe, "attn_probs": Probe}

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, S, KV, d]`` with ``S = max(kv_lens)``."""
        if self.cache is None:
            return self.k_new, self.v_new
        return self.cache.kv(self.layer)


def attention_mask(q_offsets: torch.Tensor, kv_lens: torch.Tensor, T: int, S: int,
                   user_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask ``[B, 1 or H, T, S]`` (True = attend) from the ragged causal rule and a user mask."""
    dev = kv_lens.device
    i = torch.arange(T, device=dev)
    j = torch.arange(S, device=dev)
    allowed = (j[None, None, :] <= (q_offsets[:, None, None] + i[None, :, None])) & (
        j[None, None, :] < kv_lens[:, None, None])
    allowed = allowed[:, None]  # [B, 1, T, S]
    if user_mask is not None and user_mask.dtype == torch.bool:
        um = user_mask
        if um.dim() == 2:  # [B, S] padding-style mask
            um = um[:, None, None, :]
        allowed = allowed & um[..., :S]
    return allowed


def _user_bias(call: AttentionCall, S: int) -> torch.Tensor | None:
    m = call.mask
    if m is None or m.dtype == torch.bool:
        return None
    if m.dim() == 2:
        m = m[:, None, None, :]
    return m[..., :S]


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # [B, S, KV, d] -> [B, H, S, d] (grouped-query attention: each KV head serves H/KV query heads)
    kvh = x.shape[2]
    x = x.transpose(1, 2)
    return x if kvh == n_heads else x.repeat_interleave(n_heads // kvh, dim=1)


def eager_attention(call: AttentionCall) -> torch.Tensor:
    q = call.q.transpose(1, 2)  # [B, H, T, d]
    B, H, T, _ = q.shape
    k, v = call.keys_values()
    S = k.shape[1]
    k, v = _expand_kv(k, H), _expand_kv(v.to(q.dtype), H)
    logits = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)).float() * call.scale  # [B, H, T, S]
    bias = _user_bias(call, S)
    if bias is not None:
        logits = logits + bias.float()
    allowed = attention_mask(call.q_offsets, call.kv_lens, T, S, call.mask)
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    if "attn_logits" in call.probes:
        logits = call.probes["attn_logits"](logits)
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~allowed, 0.0)  # rows with nothing to attend give zeros, not NaN
    if "attn_probs" in call.probes:
        probs = call.probes["attn_probs"](probs)
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)  # [B, H, T, d]
    return out.transpose(1, 2)


def sdpa_attention(call: AttentionCall) -> torch.Tensor:
    q = call.q.transpose(1, 2)  # [B, H, T, d]
    H, T = q.shape[1], q.shape[2]
    k, v = call.keys_values()
    k, v = _expand_kv(k.to(q.dtype), H), _expand_kv(v.to(q.dtype), H)
    if call.full_causal:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=call.scale, dropout_p=call.dropout_p)
        return out.transpose(1, 2)
    S = k.shape[2]
    allowed = attention_mask(call.q_offsets, call.kv_lens, T, S, call.mask)
    bias = _user_bias(call, S)
    if bias is not None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, torch.finfo(q.dtype).min) + bias.to(q.dtype)
    else:
        # a row that may attend to nothing (a padded row of an empty sequence) would give NaN
        mask = allowed | ~allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale, dropout_p=call.dropout_p)
    if bias is None:
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return out.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, Callable[[AttentionCall], torch.Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
}


def register_attention_backend(name: str, fn: Callable[[AttentionCall], torch.Tensor]) -> None:
    """Make ``fn`` selectable with ``model.set_attention_backend(name)``."""
    ATTENTION_BACKENDS[name] = fn


def get_attention_backend(backend: str | Callable) -> Callable[[AttentionCall], torch.Tensor]:
    if callable(backend):
        return backend
    try:
        return ATTENTION_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; have {sorted(ATTENTION_BACKENDS)}") from None


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
