"""A Llama-architecture decoder in plain PyTorch (Touvron et al. 2023; module names as in HF).

Per block (pre-norm)::

    h   = x + o_proj(Attn(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))     n1 = input_layernorm
    out = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))                        n2 = post_attention_layernorm

- RMSNorm: ``y = g * x / sqrt(mean(x^2) + eps)`` computed in float32.
- RoPE (rotate-half convention, as HF Llama): for position ``p`` and pair ``(x_i, x_{i+d/2})`` the
  angle is ``p * theta^(-2i/d)``; computed from explicit ``position_ids`` (any ids, also gaps).
- Grouped-query attention: ``n_kv_heads`` key/value heads, each shared by ``n_heads / n_kv_heads``
  query heads.

Shapes: ``input_ids [B, T]`` -> ``logits [B, T, vocab]``; inside attention ``q [B, T, H, d]``,
``k, v [B, T, KV, d]``.

Extension points used by the paper notebooks:

- every projection is an ``nn.Linear`` named ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
  down_proj``; :func:`replace_linears` swaps them (quantized / LoRA layers);
- :class:`Probe` modules (identity) mark tensors inside attention: ``q_rot``, ``k_raw`` (pre-RoPE),
  ``k_rot`` (post-RoPE, what is cached), ``v_new``, ``attn_logits`` (pre-softmax, masked),
  ``attn_probs``. A forward hook on a probe reads the tensor; a hook that returns a tensor replaces it
  (KV fake-quantization, score masking);
- :meth:`Llama.capture` records inputs/outputs of named modules (calibration, attention maps);
- ``RMSNorm.out_index`` permutes a norm's output channels (Atom's reordering);
- the attention backend is pluggable (:mod:`mlsys24.models.attention`).
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionCall, get_attention_backend
from .config import LlamaConfig

__all__ = [
    "Llama", "LlamaBlock", "Attention", "MLP", "RMSNorm", "RotaryEmbedding", "Probe", "Capture",
    "replace_linears", "named_linears", "apply_rope", "rope_inv_freq",
]

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Probe(nn.Module):
    """Identity that marks a tensor for hooks. ``observed`` is True while anything hooks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def observed(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks) or type(self) is not Probe


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.out_index: torch.Tensor | None = None  # optional output-channel permutation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and self.out_index is None and self.weight.dtype == x.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            from ..kernels.norm import rmsnorm  # one launch, the same rounding as below

            return rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        if self.out_index is not None:
            y = y.index_select(-1, self.out_index.to(y.device))
        return y

    def set_output_permutation(self, index: torch.Tensor | None) -> None:
        self.out_index = None if index is None else index.long()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """``theta^(-2i/d)`` for ``i < d/2``, with HF's "linear" and "llama3" scalings."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    else:
        raise NotImplementedError(f"rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, d/2] (float32)
        ang = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, d]`` (rotate-half pairing) by angles ``cos, sin [B, T, d/2]``."""
    d2 = x.shape[-1] // 2
    if (x.is_cuda and x.shape[-1] % 2 == 0 and d2 & (d2 - 1) == 0
            and not (torch.is_grad_enabled() and x.requires_grad)):
        from ..kernels.norm import rope  # one launch, the same float32 rotation as below

        return rope(x, cos, sin)
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
        d, hd = cfg.d_model, cfg.head_dim_
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.attention_bias)
        self.rotary = RotaryEmbedding(hd, cfg.rope_theta, cfg.rope_scaling)
        self.q_rot, self.k_raw, self.k_rot, self.v_new = Probe(), Probe(), Probe(), Probe()
        self.attn_logits, self.attn_probs = Probe(), Probe()
        self.backend: str | Callable = "sdpa"
        self.dropout = cfg.dropout
        self.scale = 1.0 / math.sqrt(hd)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache=None,
                attention_mask: torch.Tensor | None = None, input_lens: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if position_ids is None:
            start = kv_cache.q_offsets if kv_cache is not None else torch.zeros(B, dtype=torch.long)
            position_ids = start.to(x.device)[:, None] + torch.arange(T, device=x.device)[None]
        cos, sin = rope if rope is not None else self.rotary(position_ids)
        packed = _packed_weight(self, ("q_proj", "k_proj", "v_proj"))
        if packed is not None:  # one GEMM over the packed [q; k; v] weight (see pack_projections)
            dq, dk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, packed).split([dq, dk, dk], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = self.k_raw(k.view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_new(v.view(B, T, self.n_kv_heads, self.head_dim))
        q = self.q_rot(apply_rope(q, cos, sin))
        k = self.k_rot(apply_rope(k, cos, sin))

        if kv_cache is not None:
            kv_cache.update(self.layer_idx, k, v)
            q_off, kv_lens = kv_cache.q_offsets, kv_cache.kv_lens
        else:
            q_off = torch.zeros(B, dtype=torch.long, device=x.device)
            kv_lens = torch.full((B,), T, dtype=torch.long, device=x.device) if input_lens is None else input_lens
        observed = self.attn_logits.observed or self.attn_probs.observed
        call = AttentionCall(
            q=q, k_new=k, v_new=v, q_offsets=q_off, kv_lens=kv_lens, layer=self.layer_idx,
            scale=self.scale, cache=kv_cache, mask=attention_mask,
            # (short-circuits before the host sync on input_lens whenever a cache is used)
            full_causal=kv_cache is None and attention_mask is None and (
                input_lens is None or bool((input_lens == T).all())),
            dropout_p=self.dropout if self.training else 0.0,
            probes={"attn_logits": self.attn_logits, "attn_probs": self.attn_probs} if observed else {},
        )
        backend = get_attention_backend("eager" if observed else self.backend)
        out = backend(call)  # [B, T, H, d]
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = _packed_weight(self, ("gate_proj", "up_proj"))
        if packed is not None:  # one GEMM over the packed [gate; up] weight (see pack_projections)
            gate, up = F.linear(x, packed).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def _packed_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """The packed weight of ``names`` if :func:`pack_projections` made one and it is still valid:
    the projections are plain bias-free ``nn.Linear`` whose weights are views of it, and no hook
    observes them (capture and quantized/LoRA replacements take the per-projection path)."""
    packed = getattr(module, "_packed", None)
    if packed is None:
        return None
    for n in names:
        lin = getattr(module, n)
        if (type(lin) is not nn.Linear or lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks
                or lin.weight.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()):
            return None
    return packed


@torch.no_grad()
def pack_projections(model: nn.Module) -> nn.Module:
    """Store q/k/v and gate/up weights of every layer contiguously, as one ``[q; k; v]`` and one
    ``[gate; up]`` matrix, and make each projection's weight a view into it (no extra memory).

    Decoding then runs one GEMV per group instead of three (two), which reads the same bytes at a
    higher achieved bandwidth. Inference only: the views share storage (safetensors refuses to save
    them; reload the checkpoint instead).
    """
    for m in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if not all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
                continue
            lins = [getattr(m, n) for n in names]
            if any(lin.bias is not None for lin in lins):
                continue
            packed = torch.cat([lin.weight for lin in lins], dim=0).contiguous()
            start = 0
            for lin in lins:
                rows = lin.weight.shape[0]
                lin.weight = nn.Parameter(packed[start:start + rows], requires_grad=False)
                start += rows
            m._packed = packed
    return model


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, position_ids=None, kv_cache=None, attention_mask=None, input_lens=None, rope=None):
        a = self.self_attn(self.input_layernorm(x), position_ids, kv_cache, attention_mask, input_lens, rope)
        x = x + F.dropout(a, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class Llama(nn.Module):
    """Decoder-only Llama. ``forward(input_ids, position_ids=None, kv_cache=None, attention_mask=None,
    input_lens=None) -> logits [B, T, vocab]``.

    - ``position_ids [B, T]``: RoPE positions; default ``q_offsets[b] + t`` (cache) or ``t``.
    - ``kv_cache``: a :class:`~mlsys24.models.kv_cache.KVCache`; this step's K/V are appended to it.
    - ``attention_mask``: extra mask, bool (True = attend) or additive float, broadcastable to
      ``[B, H, T, S]`` with ``S`` = max cached length after this step (``[B, S]`` also accepted).
    - ``input_lens [B]``: valid (right-padded) tokens per row; rows of a ragged batch. Logits of
      padding positions are garbage and must be ignored.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled by 1/sqrt(2 n_layers).

        ``seed=None`` draws from the global RNG (the training script seeds it); tensors on the meta
        device are skipped.
        """
        g = None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            if seed is not None and (g is None or g.device != p.device):
                g = torch.Generator(device=p.device).manual_seed(seed)
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * s)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache=None,
                attention_mask: torch.Tensor | None = None, input_lens: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        dev = input_ids.device
        if kv_cache is not None:
            lens = input_lens if input_lens is not None else torch.full((B,), T, dtype=torch.long)
            kv_cache.begin(lens.to(torch.long))
        if position_ids is None:
            start = kv_cache.q_offsets.to(dev) if kv_cache is not None else torch.zeros(B, dtype=torch.long, device=dev)
            position_ids = start[:, None] + torch.arange(T, device=dev)[None]
        rope = self.layers[0].self_attn.rotary(position_ids) if len(self.layers) else None
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, position_ids, kv_cache, attention_mask, input_lens, rope)
        if kv_cache is not None:
            kv_cache.end()
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    # ---------------------------------------------------------------------------------------
    def set_attention_backend(self, backend: str | Callable) -> None:
        get_attention_backend(backend)  # validates the name
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    def new_cache(self, kind: str = "contiguous", *, batch: int = 1, max_len: int | None = None,
                  n_blocks: int | None = None, block_size: int = 16, dtype=None, device=None):
        """A KV cache sized for this model: ``kind`` "contiguous" or "paged"."""
        from .kv_cache import ContiguousKVCache, PagedKVCache

        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        max_len = max_len or self.cfg.max_seq_len
        if kind == "contiguous":
            return ContiguousKVCache.for_model(self.cfg, batch, max_len, dtype=dtype, device=device)
        if kind == "paged":
            n_blocks = n_blocks or batch * (-(-max_len // block_size))
            return PagedKVCache.for_model(self.cfg, n_blocks, block_size, dtype=dtype, device=device)
        raise ValueError(f"kind must be 'contiguous' or 'paged', got {kind!r}")

    def capture(self, inputs: Iterable[str] = (), outputs: Iterable[str] = (), *, detach: bool = True,
                to_cpu: bool = False) -> Capture:
        """Record module inputs/outputs by name pattern (fnmatch over ``named_modules``).

        ``with model.capture(inputs=["*_proj"], outputs=["*.attn_probs"]) as cap: model(x)`` gives
        ``cap.inputs["layers.0.self_attn.q_proj"]`` and ``cap.outputs["layers.0.self_attn.attn_probs"]``,
        lists with one tensor per call. Patterns: ``"*_proj"`` every linear, ``"layers.1.*"`` ...
        """
        return Capture(self, list(inputs), list(outputs), detach=detach, to_cpu=to_cpu)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class Capture:
    """Context manager behind :meth:`Llama.capture` (works on any ``nn.Module``)."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str], *, detach=True, to_cpu=False):
        self.model, self.in_pats, self.out_pats = model, inputs, outputs
        self.detach, self.to_cpu = detach, to_cpu
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._handles = []

    def _keep(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if self.detach:
            t = t.detach()
        return t.cpu() if self.to_cpu else t

    def __enter__(self) -> Capture:
        for name, mod in self.model.named_modules():
            if not name:
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.in_pats):
                self._handles.append(mod.register_forward_pre_hook(
                    lambda m, args, _n=name: self.inputs[_n].append(self._keep(args[0]))))
            if any(fnmatch.fnmatchcase(name, p) for p in self.out_pats):
                self._handles.append(mod.register_forward_hook(
                    lambda m, args, out, _n=name: self.outputs[_n].append(self._keep(out))))
        if not self._handles:
            raise ValueError(f"no module matches inputs={self.in_pats} outputs={self.out_pats}")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` projection (not ``lm_head``) by qualified name, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in LINEAR_NAMES}


def replace_linears(model: nn.Module, fn: Callable[[str, nn.Linear], nn.Module | None],
                    names: Iterable[str] | None = None) -> list[str]:
    """Swap projections: ``fn(qualified_name, linear)`` returns a replacement module (or None to keep).

    ``names``: optional fnmatch patterns (e.g. ``["*.q_proj", "*.v_proj"]``). Returns replaced names.
    """
    pats = list(names) if names is not None else None
    done = []
    for name, lin in list(named_linears(model).items()):
        if pats is not None and not any(fnmatch.fnmatchcase(name, p) for p in pats):
            continue
        new = fn(name, lin)
        if new is None or new is lin:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        done.append(name)
    return done
