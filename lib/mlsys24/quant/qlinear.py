"""``QuantLinear``: a Linear with packed int4 weights (AWQ layout), and AWQ-format checkpoints.

``QuantLinear.from_linear(linear, bits, group_size)`` round-to-nearest quantizes the (already
AWQ-scaled and clipped, if any) weight and packs it (:func:`mlsys24.quant.pack.awq_pack`). Its
forward runs the Triton W4A16 kernels on CUDA (or anywhere with ``use_kernel=True``, e.g. under
``TRITON_INTERPRET=1``): up to ``gemv_max_m`` rows (decode) the GEMV on a K-major copy of the
integers made once on first use (:func:`mlsys24.quant.pack.gemv_repack`, group-major by default,
not part of the state dict), more rows the tensor-core GEMM on the AWQ layout. Elsewhere it dequantizes to the
activation dtype once and caches it (CPU evaluation of a quantized model).

Checkpoint layout (:func:`save_awq_checkpoint`), the tensors an AutoAWQ/transformers "awq" GEMM
checkpoint holds for each quantized linear ``<name>``::

    <name>.qweight int32 [in, out/8]   <name>.qzeros int32 [in/G, out/8]   <name>.scales fp16 [in/G, out]
    <name>.bias    (if any)

every other parameter unchanged, in one ``model.safetensors``, plus ``quant_config.json``
``{"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true, "version": "gemm"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..bench import CUDAGraphed
from .pack import awq_pack, dequantize_awq, gemv_repack

__all__ = ["QuantLinear", "quantize_linears", "save_awq_checkpoint", "load_awq_checkpoint", "QUANT_CONFIG",
           "FusedDecoder"]

QUANT_CONFIG = "quant_config.json"


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as int4 ``qweight/qzeros`` + fp16 ``scales`` (AWQ layout)."""

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, group_size: int = 128,
                 bias: bool = False, device=None):
        super().__init__()
        if bits > 4:
            raise ValueError("QuantLinear stores at most 4 bits per weight")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        kp = -(-in_features // group_size) * group_size
        np_ = -(-out_features // 8) * 8
        self.register_buffer("qweight", torch.zeros(kp, np_ // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(kp // group_size, np_ // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(kp // group_size, np_, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.use_kernel: bool | None = None   # None: kernel on CUDA, cached dequantization elsewhere
        self.config = None                    # optional W4A16Config for the tensor-core kernel
        self.gemv_config = None               # optional GemvConfig for the small-M kernel
        self.gemv_max_m = 8                   # rows up to which the GEMV runs (0: never)
        self.gemv_layout = "group"            # GEMV copy of the integers: "group"- or "row"-major (pack.gemv_repack)
        self._dequant_cache: tuple | None = None
        self._gemv: dict | None = None
        self._gemv_layout: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                bias=linear.bias is not None, device=linear.weight.device)
        packed = awq_pack(linear.weight.detach(), bits, group_size)
        for k, v in packed.items():
            getattr(q, k).copy_(v)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` the packed tensors stand for."""
        return dequantize_awq(self.qweight, self.qzeros, self.scales, self.out_features,
                              self.in_features).to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None
        self._gemv = None
        return super()._load_from_state_dict(*args, **kwargs)

    def gemv_weights(self) -> dict:
        """The GEMV layout of the packed weight (``qweight_t, scales_t, zeros_t``), made once."""
        if (self._gemv is None or self._gemv["qweight_t"].device != self.qweight.device
                or self._gemv_layout != self.gemv_layout):
            self._gemv = gemv_repack(self.qweight, self.qzeros, self.scales, self.out_features,
                                     layout=self.gemv_layout)
            self._gemv_layout = self.gemv_layout
        return self._gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_kernel = x.is_cuda if self.use_kernel is None else self.use_kernel
        if use_kernel:
            from .w4a16 import w4a16_gemm, w4a16_gemv

            if x.numel() // max(1, x.shape[-1]) <= self.gemv_max_m:
                return w4a16_gemv(x, **self.gemv_weights(), bias=self.bias, config=self.gemv_config)
            return w4a16_gemm(x, self.qweight, self.qzeros, self.scales, self.out_features, bias=self.bias,
                              config=self.config)
        key = (x.dtype, x.device, self.qweight.data_ptr())
        if self._dequant_cache is None or self._dequant_cache[0] != key:
            self._dequant_cache = (key, self.dequantized_weight(x.dtype).to(x.device))
        w = self._dequant_cache[1]
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_linears(model: nn.Module, bits: int = 4, group_size: int = 128, names=None) -> list[str]:
    """Replace the model's projections (``mlsys24.models.replace_linears`` names) by ``QuantLinear``."""
    from mlsys24.models import replace_linears

    return replace_linears(model, lambda n, lin: QuantLinear.from_linear(lin, bits, group_size), names)


def save_awq_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write the model's state (``QuantLinear`` buffers in the AWQ layout) to ``path/model.safetensors``."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qls:
        raise ValueError("save_awq_checkpoint: the model has no QuantLinear (call quantize_linears first)")
    groups = {m.group_size for m in qls.values()}
    bits = {m.bits for m in qls.values()}
    if len(groups) != 1 or len(bits) != 1:
        raise ValueError(f"one group size and bit width per checkpoint, got {groups} / {bits}")
    sd = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        if v is None:
            continue
        if v.data_ptr() in seen and v.numel():      # tied weights: keep one copy
            continue
        seen[v.data_ptr()] = k
        sd[k] = v.detach().contiguous().cpu()
    save_file(sd, str(d / "model.safetensors"))
    cfg = {"quant_method": "awq", "bits": bits.pop(), "group_size": groups.pop(), "zero_point": True,
           "version": "gemm", "modules": sorted(qls)}
    (d / QUANT_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    return d


def load_awq_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load :func:`save_awq_checkpoint` output into ``model`` (an FP model of the same architecture):
    the listed projections become ``QuantLinear`` first. Returns ``model``."""
    from safetensors.torch import load_file

    from mlsys24.models import replace_linears

    d = Path(path)
    cfg = json.loads((d / QUANT_CONFIG).read_text())
    if cfg.get("quant_method") != "awq" or cfg.get("version", "gemm").lower() != "gemm":
        raise ValueError(f"{d}: not an AWQ GEMM-layout checkpoint ({cfg})")
    mods = set(cfg["modules"])
    replace_linears(model, lambda n, lin: QuantLinear(lin.in_features, lin.out_features, bits=cfg["bits"],
                                                       group_size=cfg["group_size"], bias=lin.bias is not None,
                                                       device=lin.weight.device) if n in mods else None)
    sd = load_file(str(d / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied parameters are saved once: a missing key is fine only if it shares storage with a loaded one
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in sd if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ------------------------------------------------------------------------------------------------
# Fused batch-1 decode step (TinyChat's system side: fused projections and norms, static buffers)
# ------------------------------------------------------------------------------------------------
#
# One decode step of a Llama for one sequence, per layer 10 launches instead of the ~40 small
# kernels of the module-by-module forward:
#
#   a = RMSNorm1(h += delta)          add + norm          (one kernel; delta = previous down_proj)
#   qkv = a @ [Wq; Wk; Wv]^T          one GEMV / GEMM     (weights concatenated at load time)
#   q, cache[pos] = RoPE(q), (RoPE(k), v)                  (one kernel)
#   o = Attn(q, cache[:pos + 1])      split-KV decode attention (mlsys24.kernels.decode_attention, 2 kernels)
#   delta = o @ Wo^T
#   a = RMSNorm2(h += delta)
#   gu = a @ [Wgate; Wup]^T           one GEMV / GEMM
#   m = silu(gate) * up               (one kernel)
#   delta = m @ Wdown^T
#
# The same kernels run for fp16 weights (projections by cuBLAS) and W4A16 weights (w4a16_gemv), so
# a comparison of the two differs only in the matmuls. Rounding follows the module forward: the
# residual, the normalised activations, RoPE outputs and silu are rounded to the model dtype where
# the modules round them. The three small kernels live in :mod:`.w4a16` (imported on first use, so
# this module still imports without Triton).

class _FusedLayer:
    pass


class FusedDecoder:
    """Batch-1 decode of a :class:`mlsys24.models.Llama` with fused projections (see the comment above).

    ``quantize=True`` stores the concatenated q/k/v, o, gate/up and down weights as W4A16 (round to
    nearest, group ``group_size``, the GEMV layout ``layout``) and runs :func:`w4a16_gemv` with the
    per-shape ``gemv_configs`` (``{(N, K): GemvConfig}``; ``layout`` one name or ``{(N, K): name}``);
    otherwise the fp16 weights (cuBLAS).
    Embedding, final norm and ``lm_head`` stay in the model dtype in both. The KV cache is a static
    ``[n_layers, max_len, kv_heads, head_dim]`` pair. ``step(token, pos)`` runs eagerly;
    :meth:`capture` records one step in a CUDA graph that reads the token and position from static
    buffers (:meth:`set_inputs`). MHA/GQA, bias-free projections only.
    """

    def __init__(self, model: nn.Module, *, max_len: int, quantize: bool = False, group_size: int = 128,
                 gemv_configs: dict | None = None, layout: str | dict = "row", attn_config=None):
        from mlsys24.models.llama import rope_inv_freq

        cfg = model.cfg
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.cfg, self.max_len, self.quantize = cfg, max_len, quantize
        self.H, self.HKV, self.D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
        self.gemv_configs = dict(gemv_configs or {})
        self.attn_config = attn_config
        self.eps = float(cfg.norm_eps)
        with torch.no_grad():
            self.embed = model.embed_tokens.weight
            self.lm_head = model.lm_head.weight
            self.norm_w = model.norm.weight
            self.layers = []
            for blk in model.layers:
                at, mlp = blk.self_attn, blk.mlp
                for lin in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    if type(lin) is not nn.Linear or lin.bias is not None:
                        raise ValueError("FusedDecoder needs bias-free nn.Linear projections")
                L = _FusedLayer()
                L.g1, L.g2 = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
                ws = {"qkv": torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]),
                      "o": at.o_proj.weight,
                      "gu": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                      "down": mlp.down_proj.weight}
                for k, w in ws.items():
                    if quantize:
                        pk = awq_pack(w.float(), 4, group_size)
                        lay = layout.get(tuple(w.shape), "row") if isinstance(layout, dict) else layout
                        t = gemv_repack(pk["qweight"], pk["qzeros"], pk["scales"], w.shape[0], layout=lay)
                        setattr(L, k, (w.shape[0], w.shape[1], t))
                    else:
                        setattr(L, k, w.contiguous())
                self.layers.append(L)
            inv = rope_inv_freq(self.D, cfg.rope_theta, cfg.rope_scaling)
            ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
            self.cos = ang.cos().to(self.device)
            self.sin = ang.sin().to(self.device)
        dev, dt = self.device, self.dtype
        nl, d, F = cfg.n_layers, cfg.d_model, cfg.ffn_dim
        self.k_cache = torch.zeros(nl, 1, max_len, self.HKV, self.D, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.lens = torch.ones(1, dtype=torch.int32, device=dev)
        qkv_n = (self.H + 2 * self.HKV) * self.D
        self.h = torch.zeros(1, d, device=dev, dtype=dt)
        self.a = torch.zeros(1, d, device=dev, dtype=dt)
        self.delta = torch.zeros(1, d, device=dev, dtype=dt)
        self.qkv = torch.zeros(1, qkv_n, device=dev, dtype=dt)
        self.q = torch.zeros(1, self.H, self.D, device=dev, dtype=dt)
        self.attn = torch.zeros(1, self.H * self.D, device=dev, dtype=dt)
        self.gu = torch.zeros(1, 2 * F, device=dev, dtype=dt)
        self.m = torch.zeros(1, F, device=dev, dtype=dt)
        self.logits = torch.zeros(1, cfg.vocab_size, device=dev, dtype=dt)

    # -- pieces --------------------------------------------------------------------------------
    def _lin(self, x, w, out):
        if self.quantize:
            N, K, t = w
            from .w4a16 import w4a16_gemv

            return w4a16_gemv(x, **t, config=self.gemv_configs.get((N, K)), out=out)
        return torch.mm(x, w.t(), out=out)

    def _norm(self, w, add: bool):
        from ..kernels.norm import add_rmsnorm_kernel
        from .w4a16 import triton

        d = self.cfg.d_model
        add_rmsnorm_kernel[(1,)](self.h, self.delta, w, self.a, d, self.eps, HAS_ADD=add,
                                  BLOCK=triton.next_power_of_2(d), num_warps=8 if d >= 2048 else 4)

    def set_inputs(self, token, pos: int) -> None:
        """Token id and position of the next step, copied into the static buffers."""
        if pos >= self.max_len:
            raise ValueError(f"position {pos} >= max_len {self.max_len}")
        self.tok.fill_(int(token))
        self.pos.fill_(int(pos))
        self.lens.fill_(int(pos) + 1)

    def _step(self, linears: bool = True, others: bool = True) -> torch.Tensor:
        """One step from the static buffers; ``linears``/``others`` False leave out the projections or
        everything else (for profiling: each part on its own, static inputs)."""
        from mlsys24.kernels.decode_attention import decode_attention

        from .w4a16 import _rope_kv_kernel, _silu_mul_kernel, triton

        H, HKV, D = self.H, self.HKV, self.D
        if others:
            torch.index_select(self.embed, 0, self.tok, out=self.h)
        for li, L in enumerate(self.layers):
            if others:
                self._norm(L.g1, add=li > 0)
            if linears:
                self._lin(self.a, L.qkv, self.qkv)
            if others:
                kc, vc = self.k_cache[li], self.v_cache[li]          # [1, max_len, HKV, D]
                _rope_kv_kernel[(H + HKV,)](self.qkv, self.cos, self.sin, self.pos, self.q, kc, vc, H, HKV,
                                            kc.stride(1), kc.stride(2), HALF=D // 2, num_warps=1)
                att = decode_attention(self.q, kc, vc, self.lens, mode="sync", layout="blhd",
                                       max_seq_len=self.max_len, config=self.attn_config).reshape(1, H * D)
            else:
                att = self.attn
            if linears:
                self._lin(att, L.o, self.delta)
            if others:
                self._norm(L.g2, add=True)
            if linears:
                self._lin(self.a, L.gu, self.gu)
            if others:
                F = self.cfg.ffn_dim
                _silu_mul_kernel[(triton.cdiv(F, 1024),)](self.gu, self.m, F, BLOCK=1024, num_warps=4)
            if linears:
                self._lin(self.m, L.down, self.delta)
        if others:
            self._norm(self.norm_w, add=True)
        if linears:
            torch.mm(self.a, self.lm_head.t(), out=self.logits)
        return self.logits

    @torch.no_grad()
    def step(self, token, pos: int) -> torch.Tensor:
        """Eager step: append ``token`` at ``pos`` (positions 0 .. pos - 1 already cached); logits ``[1, vocab]``."""
        self.set_inputs(token, pos)
        return self._step().clone()

    @torch.no_grad()
    def capture(self, *, linears: bool = True, others: bool = True, warmup: int = 2):
        """A ``torch.cuda.CUDAGraph`` of one step (inputs from :meth:`set_inputs`)."""
        # the warm-up calls compile every kernel and size the GEMV workspace
        return CUDAGraphed(lambda: self._step(linears, others), warmup=warmup, sync=False).graph

    def weight_bytes(self) -> int:
        """Bytes of the projection weights one step reads (packed ints + steps + zeros, or fp16)."""
        tot = 0
        for L in self.layers:
            for k in ("qkv", "o", "gu", "down"):
                w = getattr(L, k)
                tot += sum(t.numel() * t.element_size() for t in w[2].values()) if self.quantize else \
                    w.numel() * w.element_size()
        return tot
