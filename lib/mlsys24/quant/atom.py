"""Atom (Zhao et al., MLSys 2024): W4A4 + KV4 with reordered INT8 outlier channels, fine-grained group
quantization, clipping and GPTQ — the accuracy (fake-quant) pipeline and the packed real path.

For a linear ``y = x W^T`` with input ``x [tokens, C]`` and weight ``W [N, C]``:

1. **Reordering.** Each input channel gets a score (``hessian``: ``h_c = sum_t x[t, c]^2``, the GPTQ
   Hessian diagonal; ``abs_mean``: mean ``|x[:, c]|``). Channels are sorted *ascending*, so the
   ``keeper`` outliers land last. The permutation is applied offline to ``W``'s columns and to the
   producer of ``x``: RMSNorm's output (``RMSNorm.set_output_permutation``; one index shared by q/k/v,
   one by gate/up), gate/up output rows for down_proj, and an explicit gather in front of o_proj
   (what the fused reorder+quantize kernel does). The FP function is unchanged.
2. **Mixed precision.** The last ``keeper`` channels: INT8, symmetric, per token (activations) and per
   output row (weights); ``keeper_bits=16`` keeps them in floating point.
3. **Groups.** The first ``C - keeper`` channels: symmetric INT4 in groups of ``group_size`` consecutive
   channels, per token / per output row. ``C - keeper`` is rarely a multiple of the group size
   (tiny Llama: 248 = 3 x 64 + 56): the ragged last group is masked — its scale comes from its own
   entries only. ``group_size <= 0``: one group over all normal channels (per-token / per-channel RTN).
4. **Clipping.** Symmetric ``b``-bit: ``delta = clip * max|x| / (2^(b-1) - 1)``,
   ``q = clamp(round(x / delta), -2^(b-1), 2^(b-1) - 1)``, ``x_hat = q delta``.
   ``a_clip`` (activations, per token per group, computed at run time: *dynamic* quantization),
   ``w_clip`` (weights). ``static=True`` uses one per-tensor activation scale from calibration instead.
5. **GPTQ** (:func:`gptq_quantize`) in the reordered layout, Hessians collected with activation
   quantization active, layer by layer on the already-quantized model; group scales recomputed at
   group boundaries from the error-updated weights; outlier columns at INT8.
6. **KV cache**: asymmetric INT4 per token per head over ``head_dim``
   (:func:`quantize_kv_asym`); K quantized before RoPE (the official simulation's choice,
   ``k_pre_rope=True``) or after it (what a real cache stores).

:func:`inject_outliers` is the FP-preserving transform that gives a small model LLM-like activation
outliers: it multiplies ``n`` RMSNorm gains by ``beta`` and divides the matching weight columns by it.

Packed (real) path: :class:`AtomPackedLinear` stores int4 codes two per int8 plus fp32 group scales and
an int8 outlier block, and runs :mod:`mlsys24.quant.w4a4`'s kernels (fused reorder+quantize, W4A4 GEMM).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import pad_cols, quant_params, quantize

__all__ = [
    "AtomConfig", "AtomLinear", "AtomPackedLinear", "STAIRCASE", "apply_atom", "channel_scores",
    "fake_quant_act", "fake_quant_weight", "gptq_hinv", "gptq_quantize", "inject_outliers", "install_kv_quant",
    "quantize_kv_asym", "reorder_llama", "staircase_configs", "sym_group_quant",
]


@dataclass(frozen=True)
class AtomConfig:
    """One point of the design space (the ablation staircase moves along it)."""

    wbits: int = 4
    abits: int = 4
    kv_bits: int = 16            # 16 = no KV quantization
    group_size: int = 64         # <= 0: one group over all normal channels (per token / per row)
    keeper: int = 8              # outlier channels kept at keeper_bits (0 = none)
    keeper_bits: int = 8         # 8 (INT8) or 16 (floating point)
    a_clip: float = 1.0
    w_clip: float = 1.0
    kv_clip: float = 1.0
    use_gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block: int = 64
    sort_metric: str = "hessian"  # "hessian" | "abs_mean"
    static: bool = False          # per-tensor activation scales from calibration instead of dynamic
    k_pre_rope: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


ATOM = AtomConfig(kv_bits=4, a_clip=0.9, w_clip=0.85, use_gptq=True)

#: The ablation of the official ``run_atom_ablation.sh``, in order: (label, config).
STAIRCASE_STEPS = ("RTN W4A4", "+ outliers FP16", "+ outliers INT8", "+ groups", "+ clipping", "+ GPTQ", "+ KV4")


def staircase_configs(base: AtomConfig = ATOM) -> list[tuple[str, AtomConfig]]:
    """The seven rungs; ``base`` supplies group size, keeper count, clip ratios, KV bits."""
    rtn = replace(base, keeper=0, group_size=0, a_clip=1.0, w_clip=1.0, use_gptq=False, kv_bits=16)
    s1 = replace(rtn, keeper=base.keeper, keeper_bits=16)
    s2 = replace(s1, keeper_bits=8)
    s3 = replace(s2, group_size=base.group_size)
    s4 = replace(s3, a_clip=base.a_clip, w_clip=base.w_clip)
    s5 = replace(s4, use_gptq=True)
    s6 = replace(s5, kv_bits=base.kv_bits)
    return list(zip(STAIRCASE_STEPS, (rtn, s1, s2, s3, s4, s5, s6)))


STAIRCASE = staircase_configs()


# ----------------------------------------------------------------------------------------------
# quantizers (plain PyTorch; these are the references of the kernels)
def sym_group_quant(x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization along the last dim of ``x [..., K]`` (ragged last group masked).

    Returns ``(q, delta)``: int codes ``q [..., K]`` (int16) and steps ``delta [..., n_groups]``
    (float32), ``n_groups = ceil(K / group_size)`` (1 if ``group_size <= 0``)."""
    K = x.shape[-1]
    g = K if group_size <= 0 else group_size
    lead = x.shape[:-1]
    x2 = pad_cols(x.reshape(-1, K).float(), g)                       # zero pad: absmax unchanged
    delta, _ = quant_params(x2, bits, g, sym=True)
    delta = delta * clip
    q, _, _ = quantize(x2, bits, g, sym=True, delta=delta)
    return q[:, :K].reshape(*lead, K), delta.reshape(*lead, -1)


def _fq_sym(x: torch.Tensor, bits: int, group_size: int, clip: float) -> torch.Tensor:
    """Quantize-dequantize with :func:`sym_group_quant`'s arithmetic, fused (the fake-quant hot path)."""
    K = x.shape[-1]
    g = K if group_size <= 0 else group_size
    pad = (-K) % g
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, pad))
    xg = xf.reshape(*xf.shape[:-1], -1, g)
    qmax = 2 ** (bits - 1) - 1
    d = xg.abs().amax(-1, keepdim=True).clamp_(min=1e-5).div_(qmax).mul_(clip)
    y = (xg / d).round_().clamp_(-qmax - 1, qmax).mul_(d)
    y = y.reshape(xf.shape)
    return y[..., :K] if pad else y


def fake_quant_act(x: torch.Tensor, cfg: AtomConfig, static_scale: tuple | None = None) -> torch.Tensor:
    """Atom's activation quantizer on reordered ``x [..., C]`` (outliers last); same shape, float32."""
    if cfg.abits >= 16:
        return x.float()
    C = x.shape[-1]
    k = min(cfg.keeper, C)
    xn, xo = x[..., : C - k].float(), x[..., C - k:].float()
    if static_scale is not None:     # per-tensor steps from calibration
        dn, do = static_scale
        qmax = 2 ** (cfg.abits - 1) - 1
        yn = torch.clamp(torch.round(xn / dn), -qmax - 1, qmax) * dn
        yo = xo if cfg.keeper_bits >= 16 else torch.clamp(torch.round(xo / do), -128, 127) * do
    else:
        yn = _fq_sym(xn, cfg.abits, cfg.group_size, cfg.a_clip)
        yo = xo if (k == 0 or cfg.keeper_bits >= 16) else _fq_sym(xo, cfg.keeper_bits, 0, 1.0)
    return torch.cat([yn, yo], dim=-1)


def fake_quant_weight(w: torch.Tensor, cfg: AtomConfig) -> torch.Tensor:
    """RTN weight quantizer on reordered ``w [N, C]`` (outlier columns last); float32."""
    if cfg.wbits >= 16:
        return w.float()
    C = w.shape[1]
    k = min(cfg.keeper, C)
    wn = _fq_sym(w[:, : C - k], cfg.wbits, cfg.group_size, cfg.w_clip)
    wo = w[:, C - k:].float()
    if k and cfg.keeper_bits < 16:
        wo = _fq_sym(wo, cfg.keeper_bits, 0, 1.0)
    return torch.cat([wn, wo], dim=1)


def quantize_kv_asym(x: torch.Tensor, bits: int = 4, clip: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-vector quantization over the last dim (``head_dim``) of ``x [..., d]``.

    ``delta = clip (max - min) / (2^b - 1)``, ``z = round(-min / delta)``, ``q = clamp(round(x/delta) + z)``
    in ``[0, 2^b - 1]``. Returns ``(q uint8, delta [...] fp32, zero [...] fp32)``."""
    xf = x.float()
    qmax = 2 ** bits - 1
    mn, mx = xf.amin(-1), xf.amax(-1)
    delta = ((mx - mn) * clip).clamp(min=1e-5) / qmax
    zero = torch.round(-mn * clip / delta)
    q = torch.clamp(torch.round(xf / delta[..., None]) + zero[..., None], 0, qmax)
    return q.to(torch.uint8), delta, zero


def _fq_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    q, d, z = quantize_kv_asym(x, bits, clip)
    return ((q.float() - z[..., None]) * d[..., None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# outlier injection and reordering of a Llama (mlsys24.models.Llama)
def _norm_consumers(layer) -> list[tuple[nn.Module, list[nn.Linear]]]:
    a, m = layer.self_attn, layer.mlp
    return [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
            (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]


@torch.no_grad()
def inject_outliers(model: nn.Module, n: int = 8, beta: float = 20.0, seed: int = 0) -> dict:
    """Multiply ``n`` random gains of every RMSNorm feeding linears by ``beta`` and divide the matching
    weight columns of its consumers by ``beta``: FP outputs are unchanged (up to rounding), the
    linears' inputs now carry ``n`` outlier channels. Returns ``{norm name: channel index}``."""
    if n <= 0:
        return {}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for li, layer in enumerate(model.layers):
        for ni, (norm, lins) in enumerate(_norm_consumers(layer)):
            C = norm.weight.numel()
            idx = torch.randperm(C, generator=g)[:n].to(norm.weight.device)
            norm.weight[idx] *= beta
            for lin in lins:
                lin.weight[:, idx] /= beta
            out[f"layers.{li}.{'input' if ni == 0 else 'post_attention'}_layernorm"] = idx.cpu()
    return out


def _linear_inputs(layer) -> dict[str, nn.Linear]:
    a, m = layer.self_attn, layer.mlp
    return {"qkv": a.q_proj, "o": a.o_proj, "gate_up": m.gate_proj, "down": m.down_proj}


@torch.no_grad()
def channel_scores(model: nn.Module, calib_ids: torch.Tensor, metric: str = "hessian", batch: int = 8
                   ) -> list[dict[str, torch.Tensor]]:
    """Per layer, per input site (``qkv, o, gate_up, down``): the channel score ``[C]`` (float64)."""
    if metric not in ("hessian", "abs_mean"):
        raise ValueError(f"sort_metric must be 'hessian' or 'abs_mean', got {metric!r}")
    acc: list[dict[str, torch.Tensor]] = [dict() for _ in model.layers]
    cnt = [0]
    hooks = []
    for li, layer in enumerate(model.layers):
        for site, lin in _linear_inputs(layer).items():
            def hook(mod, args, _li=li, _s=site):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                v = x.pow(2).sum(0) if metric == "hessian" else x.abs().mean(0)
                prev = acc[_li].get(_s)
                if metric == "hessian":
                    acc[_li][_s] = v if prev is None else prev + v
                else:  # max over batches of the batch mean |x| (official abs_mean)
                    acc[_li][_s] = v if prev is None else torch.maximum(prev, v)
            hooks.append(lin.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for i in range(0, calib_ids.shape[0], batch):
            model(calib_ids[i: i + batch].to(dev))
            cnt[0] += 1
    finally:
        for h in hooks:
            h.remove()
    if metric == "hessian":
        for d in acc:
            for k in d:
                d[k] = d[k] * (2.0 / calib_ids.shape[0])
    return acc


@torch.no_grad()
def reorder_llama(model: nn.Module, scores: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Permute input channels of every linear ascending by score (outliers last), in place.

    Norm-fed linears: the norm's output permutation + weight columns; down_proj: gate/up output rows
    + down columns (SiLU(gate)*up is elementwise, so its output comes out ordered); o_proj: weight
    columns + ``o_proj.in_index`` (a gather of the attention output that the quantized linear fuses
    into its quantize step; on a plain ``nn.Linear`` a pre-hook applies it). Returns the indices."""
    out = []
    for layer, sc in zip(model.layers, scores):
        idx = {k: torch.argsort(v, stable=True).to(layer.self_attn.q_proj.weight.device) for k, v in sc.items()}
        a, m = layer.self_attn, layer.mlp
        layer.input_layernorm.set_output_permutation(idx["qkv"])
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight.data = lin.weight.data[:, idx["qkv"]].contiguous()
        layer.post_attention_layernorm.set_output_permutation(idx["gate_up"])
        for lin in (m.gate_proj, m.up_proj):
            lin.weight.data = lin.weight.data[:, idx["gate_up"]].contiguous()
        d = idx["down"]
        m.gate_proj.weight.data = m.gate_proj.weight.data[d].contiguous()
        m.up_proj.weight.data = m.up_proj.weight.data[d].contiguous()
        m.down_proj.weight.data = m.down_proj.weight.data[:, d].contiguous()
        a.o_proj.weight.data = a.o_proj.weight.data[:, idx["o"]].contiguous()
        _set_in_index(a, "o_proj", idx["o"])
        out.append(idx)
    return out


def _gather_pre_hook(mod, args):
    return (args[0].index_select(-1, mod.in_index),) + tuple(args[1:])


def _set_in_index(parent: nn.Module, name: str, index: torch.Tensor) -> None:
    lin = getattr(parent, name)
    lin.in_index = index
    if isinstance(lin, nn.Linear) and not getattr(lin, "_atom_gather", False):
        lin.register_forward_pre_hook(_gather_pre_hook)
        lin._atom_gather = True


# ----------------------------------------------------------------------------------------------
class AtomLinear(nn.Module):
    """Fake-quant W4A4 linear in the reordered layout: ``y = Q_a(x[..., in_index]) @ W_hat^T``.

    ``weight`` is the already-dequantized weight ``[N, C]`` (RTN or GPTQ). ``in_index`` (optional) is
    the gather fused into the activation quantizer (o_proj). With ``collect_hessian`` set, the
    quantized inputs accumulate ``H = 2/n X^T X`` for GPTQ."""

    def __init__(self, weight: torch.Tensor, cfg: AtomConfig, bias: torch.Tensor | None = None,
                 in_index: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_index = in_index
        self.static_scale: tuple | None = None
        self.collect_hessian = False
        self.H: torch.Tensor | None = None
        self.n_h = 0
        self.observe_static = False
        self._amax = [0.0, 0.0]

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        if self.observe_static:   # calibration pass for static scales: record per-tensor absmax
            C, k = x.shape[-1], min(self.cfg.keeper, x.shape[-1])
            self._amax[0] = max(self._amax[0], float(x[..., : C - k].abs().max()))
            if k:
                self._amax[1] = max(self._amax[1], float(x[..., C - k:].abs().max()))
            return x.float()
        return fake_quant_act(x, self.cfg, self.static_scale)

    def finish_static(self) -> None:
        qmax = 2 ** (self.cfg.abits - 1) - 1
        self.static_scale = (max(self._amax[0], 1e-8) / qmax, max(self._amax[1], 1e-8) / 127)
        self.observe_static = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xq = self.quant_input(x)
        if self.collect_hessian:
            x2 = xq.reshape(-1, xq.shape[-1]).double()
            H = x2.t() @ x2
            self.H = H if self.H is None else self.H + H
            self.n_h += x2.shape[0]
        y = F.linear(xq, self.weight, self.bias)
        return y.to(dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, W{c.wbits}A{c.abits}, g={c.group_size}, "
                f"keeper={c.keeper}@{c.keeper_bits}b, clip a/w={c.a_clip}/{c.w_clip}")


# ----------------------------------------------------------------------------------------------
def gptq_hinv(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp mean(diag H) I)^-1`` (float64); dead channels get ``H_jj = 1``."""
    H = H.double().clone()
    C = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_solve(eye, L), upper=True)   # cholesky_solve: much faster on CPU


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, cfg: AtomConfig, Hinv: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023) of ``w [N, C]`` in the reordered layout, Hessian ``H [C, C]``.

    Columns are quantized left to right in blocks of ``gptq_block``; each column's error
    ``(w - q) / [H^-1]_jj`` (upper Cholesky factor of the damped inverse) updates the columns to its
    right. A group's scale is computed from the error-updated weights when its first column comes;
    the ragged last normal group has its own (masked) width; the ``keeper`` outlier columns share one
    INT8 scale per row (or stay FP). Returns the dequantized weight (float32)."""
    W = w.detach().float().clone()
    N, C = W.shape
    W[:, torch.diag(H) == 0] = 0
    Hinv = (gptq_hinv(H, cfg.gptq_damp) if Hinv is None else Hinv).float()
    k = min(cfg.keeper, C)
    Cn = C - k
    g = Cn if cfg.group_size <= 0 else cfg.group_size
    Q = torch.zeros_like(W)
    delta = None
    for b0 in range(0, C, cfg.gptq_block):
        b1 = min(b0 + cfg.gptq_block, C)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        diag = Hinv1.diagonal().tolist()
        for i in range(b1 - b0):
            j = b0 + i
            col = W1[:, i].clone()
            if j < Cn:
                bits, qmax_clip = cfg.wbits, cfg.w_clip
                if (j % g) == 0 or delta is None:   # group start: scale from the current weights
                    hi = min(j + g, Cn)
                    cur = torch.cat([W1[:, i: i + (hi - j)], W[:, b1:hi]], 1) if hi > b1 else W1[:, i: i + (hi - j)]
                    delta = cur.abs().amax(1).clamp(min=1e-5) * qmax_clip / (2 ** (bits - 1) - 1)
            else:
                bits = cfg.keeper_bits
                if j == Cn:
                    cur = torch.cat([W1[:, i:], W[:, b1:]], 1)
                    delta = cur.abs().amax(1).clamp(min=1e-5) / (2 ** (bits - 1) - 1) if bits < 16 else None
            if j >= Cn and bits >= 16:
                q = col
            else:
                qm = 2 ** (bits - 1) - 1
                q = col.div(delta).round_().clamp_(-qm - 1, qm).mul_(delta)
            Q[:, j] = q
            err = col.sub_(q).div_(diag[i])                  # (w - q) / [H^-1]_jj
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return Q.float()


@torch.no_grad()
def _gptq_sequential(m: nn.Module, lins: dict, calib_ids: torch.Tensor, cfg: AtomConfig, batch: int,
                     progress: bool) -> None:
    """Block by block: the block's inputs come from the already-quantized blocks before it; its
    Hessians are collected with FP weights and quantized activations (q/k/v share one, gate/up one);
    then all seven linears are GPTQ-quantized at once."""
    dev = next(m.parameters()).device
    T = calib_ids.shape[1]
    pos = torch.arange(T, device=dev)[None]
    rope = m.layers[0].self_attn.rotary(pos)
    hs = [m.embed_tokens(calib_ids[i: i + batch].to(dev)) for i in range(0, calib_ids.shape[0], batch)]
    layers = range(len(m.layers))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, leave=False, desc="GPTQ")
    share = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    for li in layers:
        layer = m.layers[li]
        mine = {n.rsplit(".", 1)[-1]: al for n, al in lins.items() if n.startswith(f"layers.{li}.")}
        for short, al in mine.items():
            al.weight.copy_(al.fp_weight)
            al.collect_hessian, al.H, al.n_h = short not in share, None, 0
        for h in hs:
            layer(h, pos.expand(h.shape[0], -1), None, None, None, rope)
        hinv = {}
        for short, al in mine.items():
            key = share.get(short, short)
            src = mine[key]
            al.collect_hessian = False
            H = src.H * (2.0 / max(src.n_h, 1))
            if key not in hinv:
                hinv[key] = gptq_hinv(H, cfg.gptq_damp)
            al.weight.copy_(gptq_quantize(al.fp_weight, H, cfg, Hinv=hinv[key]))
        for al in mine.values():
            al.H = None
        hs = [layer(h, pos.expand(h.shape[0], -1), None, None, None, rope) for h in hs]


# ----------------------------------------------------------------------------------------------
def install_kv_quant(model: nn.Module, bits: int = 4, clip: float = 1.0, k_pre_rope: bool = True) -> list:
    """Fake-quantize K (before or after RoPE) and V per token per head (asymmetric ``bits``) through the
    attention probes. Returns the hook handles (``h.remove()`` to undo)."""
    hs = []
    if bits >= 16:
        return hs
    for layer in model.layers:
        a = layer.self_attn
        hook = lambda m, args, out: _fq_kv(out, bits, clip)  # noqa: E731
        hs.append((a.k_raw if k_pre_rope else a.k_rot).register_forward_hook(hook))
        hs.append(a.v_new.register_forward_hook(hook))
    return hs


def _replace_linears(model: nn.Module, cfg: AtomConfig, weights: dict[str, torch.Tensor] | None = None) -> dict:
    from mlsys24.models import named_linears

    new = {}
    for name, lin in named_linears(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        w = weights[name] if weights is not None and name in weights else fake_quant_weight(lin.weight, cfg)
        al = AtomLinear(w, cfg, lin.bias, getattr(lin, "in_index", None))
        al.fp_weight = lin.weight.detach()
        setattr(parent, name.rsplit(".", 1)[-1], al)
        new[name] = al
    return new


@torch.no_grad()
def apply_atom(model: nn.Module, calib_ids: torch.Tensor, cfg: AtomConfig, *, reorder: bool = True,
               scores: list | None = None, batch: int = 8, progress: bool = False) -> nn.Module:
    """A fake-quantized copy of ``model`` (a Llama) under ``cfg``: reorder (if ``keeper > 0`` and
    ``reorder``), RTN or GPTQ weights, dynamic (or static) activation quantization, KV cache
    quantization. ``calib_ids [n, T]`` come from the train split; ``scores`` (from
    :func:`channel_scores` on the same model) skips recomputing the channel statistics."""
    m = copy.deepcopy(model).eval()
    dev = next(m.parameters()).device
    if cfg.keeper > 0 and reorder:
        reorder_llama(m, scores if scores is not None else channel_scores(m, calib_ids, cfg.sort_metric, batch))
    lins = _replace_linears(m, cfg)
    if cfg.use_gptq:
        _gptq_sequential(m, lins, calib_ids, cfg, batch, progress)
    if cfg.static:
        for al in lins.values():
            al.observe_static = True
        for i in range(0, calib_ids.shape[0], batch):
            m(calib_ids[i: i + batch].to(dev))
        for al in lins.values():
            al.finish_static()
    for al in lins.values():
        del al.fp_weight
    m._atom_kv_hooks = install_kv_quant(m, cfg.kv_bits, cfg.kv_clip, cfg.k_pre_rope)
    m.atom_config = cfg
    return m


# ----------------------------------------------------------------------------------------------
class AtomPackedLinear(nn.Module):
    """The real W4A4 linear: packed int4 normal part + int8 outlier part (reordered layout).

    Buffers (K4 = C - keeper normal channels, Kp = ceil(K4 / G) G, zero codes in the padding)::

        qw   int8 [N, Kp/2]     two int4 codes per byte (byte j of a group: channel j low, j + G/2 high)
        sw   fp32 [Kp/G, N]     weight group steps
        qw8  int8 [N, keeper]   outlier columns, per-row INT8 ;  sw8 fp32 [N]

    ``forward(x)``: the fused reorder+quantize kernel (``in_index`` gather, optional), then the
    W4A4 GEMM (:func:`mlsys24.quant.w4a4.w4a4_gemm`); ``use_kernel=False`` runs the PyTorch references."""

    def __init__(self, weight: torch.Tensor, cfg: AtomConfig, in_index: torch.Tensor | None = None):
        super().__init__()
        from .w4a4 import pack_weight_w4a4

        self.cfg = cfg
        self.N, self.C = weight.shape
        p = pack_weight_w4a4(weight.float(), cfg.group_size, cfg.keeper, clip=cfg.w_clip)
        for k, v in p.items():
            self.register_buffer(k, v)
        self.register_buffer("in_index", None if in_index is None else in_index.long())
        self.use_kernel: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .w4a4 import quantize_act_w4a4, quantize_act_w4a4_ref, w4a4_gemm, w4a4_gemm_ref

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        use = x.is_cuda if self.use_kernel is None else self.use_kernel
        qf = quantize_act_w4a4 if use else quantize_act_w4a4_ref
        gf = w4a4_gemm if use else w4a4_gemm_ref
        qa, sa, qa8, sa8 = qf(x2, self.cfg.group_size, self.cfg.keeper, index=self.in_index, clip=self.cfg.a_clip)
        y = gf(qa, sa, qa8, sa8, self.qw, self.sw, self.qw8, self.sw8, self.cfg.group_size)
        return y.to(x.dtype).reshape(*lead, self.N)


def n_bytes_per_param(group_size: int, scale_bytes: int = 2, outlier_frac: float = 0.0) -> float:
    """Storage of W4-gG with one ``scale_bytes`` scale per group: 0.5 + scale/G, plus INT8 outliers."""
    return (1 - outlier_frac) * (0.5 + scale_bytes / group_size) + outlier_frac * 1.0


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bits: int, meta_bytes: int = 4) -> float:
    """KV-cache bytes per token: K and V, ``bits`` per element plus ``meta_bytes`` (scale + zero, fp16)
    per token per head when quantized."""
    per = n_kv_heads * (head_dim * bits / 8 + (meta_bytes if bits < 16 else 0))
    return 2 * n_layers * per


def max_batch(mem_bytes: float, n_params: float, w_bytes_per_param: float, kv_per_token: float,
              seq_len: int) -> int:
    """Largest batch whose weights + KV cache (``seq_len`` tokens per request) fit ``mem_bytes``."""
    free = mem_bytes - n_params * w_bytes_per_param
    return max(int(math.floor(free / (kv_per_token * seq_len))), 0)
