"""FlashDecoding++'s decode path for the shared Llama: paged split-KV decode attention and
heuristically dispatched linear layers (Hong et al., MLSys 2024, sections 3 and 4-5).

- :class:`PagedDecodeAttention` is an attention backend (``model.set_attention_backend(...)``): a
  decode step (one query per row) over a :class:`~.kv_cache.PagedKVCache` runs the Triton kernel of
  :mod:`mlsys24.kernels.decode_attention` on the block pool in place (no gather of K/V), either
  asynchronous with a unified max ``phi`` (FlashDecoding++) or synchronized (FlashDecoding). Every
  other call (prefill, a contiguous cache, a user mask) goes to SDPA, as FlashDecoding++ does for
  its prefill phase with its own kernels.
- :class:`DispatchedLinear` replaces ``nn.Linear`` and routes ``x @ W^T`` through
  :class:`~mlsys24.kernels.dispatch.GemmDispatcher` (GEMV / flat GEMM / cuBLAS per (M, N, K)).
- :func:`calibrate_model_phi` picks ``phi`` from the softmax inputs of a calibration prompt, the
  paper's offline statistic.
- :func:`use_fdpp` applies all three to a model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.decode_attention import PhiCalibration, calibrate_phi, decode_attention
from ..kernels.dispatch import GemmDispatcher
from .attention import AttentionCall, sdpa_attention
from .kv_cache import PagedKVCache

__all__ = ["PagedDecodeAttention", "DispatchedLinear", "calibrate_model_phi", "use_fdpp"]


class PagedDecodeAttention:
    """Attention backend: split-KV decode kernel on the paged pool for decode steps, SDPA otherwise.

    mode: ``"async"`` (unified max ``phi``, natural-log units of ``q.k * scale``; rows whose max
    leaves the safe band are recomputed exactly inside the kernel) or ``"sync"``.
    """

    def __init__(self, mode: str = "async", phi: float | None = None, config=None):
        if mode not in ("async", "sync"):
            raise ValueError(f"PagedDecodeAttention: mode must be 'async' or 'sync', got {mode!r}")
        if mode == "async" and phi is None:
            raise ValueError("PagedDecodeAttention: mode='async' needs phi (see calibrate_model_phi)")
        self.mode, self.phi, self.config = mode, phi, config
        self.calls = {"kernel": 0, "sdpa": 0}

    @staticmethod
    def _paged(cache) -> bool:
        """A paged pool read in place: a :class:`PagedKVCache` or a view of one exposing the same
        ``k_pool``/``v_pool`` ``[layers, blocks, block_size, kv_heads, d]`` and ``block_tables``."""
        return isinstance(cache, PagedKVCache) or (
            getattr(cache, "block_tables", None) is not None and getattr(cache, "k_pool", None) is not None)

    def handles(self, call: AttentionCall) -> bool:
        return (call.q.shape[1] == 1 and self._paged(call.cache) and call.mask is None
                and not call.probes and call.q.dtype == call.cache.k_pool.dtype)

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if not self.handles(call):
            self.calls["sdpa"] += 1
            return sdpa_attention(call)
        self.calls["kernel"] += 1
        cache = call.cache
        # rows of a padded decode batch (kv_len 0) are garbage by contract; the kernel needs >= 1
        lens = call.kv_lens.clamp_min(1)
        kw = dict(block_table=cache.block_tables, scale=call.scale, config=self.config)
        if self.mode == "async":
            out = decode_attention(call.q[:, 0], cache.k_pool[call.layer], cache.v_pool[call.layer], lens,
                                   mode="async", phi=self.phi, **kw)
        else:
            out = decode_attention(call.q[:, 0], cache.k_pool[call.layer], cache.v_pool[call.layer], lens,
                                   mode="sync", **kw)
        return out[:, None]


class DispatchedLinear(nn.Module):
    """``nn.Linear`` whose product goes through a :class:`GemmDispatcher` (same parameters)."""

    def __init__(self, linear: nn.Linear, dispatcher: GemmDispatcher):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dispatcher.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dispatched"


@torch.no_grad()
def calibrate_model_phi(model: nn.Module, input_ids: torch.Tensor, *, quantile: float = 0.9999,
                        p_dtype: torch.dtype = torch.float16) -> PhiCalibration:
    """``phi`` from the attention logits of every layer on ``input_ids`` ``[B, T]`` (causally
    masked entries excluded), as FlashDecoding++ chooses it from offline statistics."""
    with model.capture(outputs=["*.attn_logits"]) as cap:
        model(input_ids)
    rows = [t.float().flatten(0, -2) for ts in cap.outputs.values() for t in ts]
    if not rows:
        raise ValueError("calibrate_model_phi: the model exposed no attention logits")
    width = max(r.shape[-1] for r in rows)
    logits = torch.cat([F.pad(r, (0, width - r.shape[-1]), value=float("-inf")) for r in rows])
    return calibrate_phi(logits, quantile=quantile, p_dtype=p_dtype)


def use_fdpp(model: nn.Module, *, mode: str = "async", phi: float | None = None,
             dispatcher: GemmDispatcher | None = None, config=None) -> PagedDecodeAttention:
    """Switch ``model`` to the FlashDecoding++ decode path: the paged decode backend and, when a
    ``dispatcher`` is given, dispatched linears (``lm_head`` included). Returns the backend (its
    ``calls`` counts kernel vs SDPA calls)."""
    from .llama import replace_linears

    backend = PagedDecodeAttention(mode, phi, config)
    model.set_attention_backend(backend)
    if dispatcher is not None:
        replace_linears(model, lambda name, lin: DispatchedLinear(lin, dispatcher))
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            model.lm_head = DispatchedLinear(model.lm_head, dispatcher)
    return backend
