"""AWQ: Activation-aware Weight Quantization (Lin et al., MLSys 2024), the search side.

For a group of linears ``y = W x`` that share one input ``X [tokens, C_in]`` and one preceding op,
AWQ picks a per-input-channel scale ``s`` and quantizes ``W diag(s)`` while the previous op absorbs
``diag(s)^-1`` (so nothing changes before quantization)::

    s_X[c] = mean_tokens |X[:, c]|                      (activation_scale)
    s      = s_X^alpha, normalised s / sqrt(max(s) min(s)), clamped >= 1e-4     (scales_for_alpha)
    alpha* = argmin_{alpha in {0, 1/n, .., (n-1)/n}} mean (f(Q(W diag(s)) diag(s)^-1, X) - f(W, X))^2

where ``f`` is the *inspected module* (the whole attention or MLP for the norm-fed groups, the
linear itself otherwise) and ``Q`` round-to-nearest group quantization (:func:`fake_quant`).
``alpha = 0`` gives ``s = 1``: exactly RTN, so the search can only lower the loss on its own data.

Afterwards (official ``auto_clip``) each weight except q/k is clipped: per (output channel, group),
``max_val = absmax * (1 - i/n)``, i < n * max_shrink, minimising the group's output error on up to
512 calibration tokens; ``W <- clamp(W, -max_val, max_val)``.

Scale groups of a Llama block (as the official ``auto_scale.py``): input_layernorm -> q,k,v
(inspect attention); v_proj -> o_proj (only when their weights have the same shape); post-attention
norm -> gate,up (inspect MLP); up_proj -> down_proj. Folding: divide the RMSNorm gain (or the
previous linear's output rows and bias) by ``s``, multiply the weight columns by ``s``.

Post-LN encoders (MiniLM/BERT): a LayerNorm whose output is also the residual cannot absorb ``s``,
so the groups it feeds get an explicit input scale (``x / s`` before the linear, a forward
pre-hook); a GELU predecessor gets an explicit "divide after the activation" (a forward hook).
Both cost one elementwise op per token at run time: a stated deviation from the fold-only Llama case.

Layer-by-layer driver (official ``pre_quant.run_awq``): block inputs come from the *unmodified* FP
block before it; inputs of every linear are captured by hooks; scale search -> fold -> clip search
(on the inputs divided by ``s``) -> clip. The model is modified in place (FP weights, scaled and
clipped); quantize it afterwards with :func:`fake_quantize_linears` or ``QuantLinear``.

Also here: the paper's saliency probes (Table 1: keep 1 % of input channels in FP, chosen by
activation, by weight norm or at random; Table 2: scale the 1 % salient channels by a fixed s).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizer import fake_quant, quant_params

__all__ = [
    "ScaleGroup", "ScaleSearch", "AwqResult", "activation_scale", "scales_for_alpha", "alpha_grid",
    "search_scale", "search_clip", "apply_clip", "fold_scale", "run_awq", "apply_awq", "awq_llama",
    "awq_minilm", "llama_block_groups", "minilm_layer_groups", "fake_quantize_linears", "linear_input_stats",
    "salient_channels", "keep_salient_fp", "scale_salient", "CLIP_SKIP",
]

CLIP_SKIP = ("q_proj", "k_proj", "query", "key")   # QK^T makes output-error clipping meaningless


# ------------------------------------------------------------------------------------------------
# the search primitives
# ------------------------------------------------------------------------------------------------

def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """``s_X[c] = mean |x[..., c]|`` over every token (float32 ``[C]``)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).float().mean(0)


def scales_for_alpha(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_X^alpha`` clamped >= 1e-4 and normalised by ``sqrt(max s * min s)``; alpha=0 gives ones."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def alpha_grid(n_grid: int = 20) -> list[float]:
    """The official grid ``{0, 1/n, ..., (n-1)/n}``."""
    return [i / n_grid for i in range(n_grid)]


@torch.no_grad()
def search_scale(linears: Sequence[nn.Linear], x: torch.Tensor, inspect: Callable[[torch.Tensor], torch.Tensor],
                 bits: int, group_size: int, *, alphas: Sequence[float] | None = None,
                 x_mean: torch.Tensor | None = None, x_loss: torch.Tensor | None = None) -> dict:
    """Grid search of alpha for one scale group; weights are restored afterwards.

    x: the linears' input (for ``s_X`` unless ``x_mean`` is given); x_loss: the input the loss is
    evaluated on (default ``x``; a subset of calibration sequences to save time).
    Returns ``{"alphas", "losses", "best_alpha", "scales", "x_mean"}``.
    """
    alphas = list(alpha_grid() if alphas is None else alphas)
    x_mean = activation_scale(x) if x_mean is None else x_mean
    xl = x if x_loss is None else x_loss
    ref = inspect(xl).float()
    orig = [lin.weight.data.clone() for lin in linears]
    losses = []
    try:
        for a in alphas:
            s = scales_for_alpha(x_mean, a).to(orig[0].device)
            for lin, w in zip(linears, orig):
                lin.weight.data = (fake_quant(w * s.to(w.dtype), bits, group_size) / s.to(w.dtype))
            losses.append(float((inspect(xl).float() - ref).pow(2).mean()))
    finally:
        for lin, w in zip(linears, orig):
            lin.weight.data = w
    best = min(range(len(alphas)), key=lambda i: (losses[i], i))
    return {"alphas": alphas, "losses": losses, "best_alpha": alphas[best],
            "scales": scales_for_alpha(x_mean, alphas[best]), "x_mean": x_mean}


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, *, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512) -> torch.Tensor:
    """Per (output channel, group) clipping threshold ``max_val [C_out, n_groups]`` (official auto_clip).

    The error of a candidate is the mean over up to ``n_tokens`` tokens (every k-th) of
    ``(sum_{c in group} x_c w_hat_c - sum x_c w_c)^2``, computed as one batched matmul per group.
    """
    cout, cin = weight.shape
    g = cin if group_size <= 0 else group_size
    ng = cin // g
    xf = x.detach().reshape(-1, cin).float()
    xf = xf[:: max(1, xf.shape[0] // n_tokens)]
    xg = xf.reshape(-1, ng, g).permute(1, 0, 2)                 # [ng, T, g]
    w = weight.detach().float()
    wg = w.reshape(cout, ng, g)                                 # [cout, ng, g]
    ref = torch.bmm(xg, wg.permute(1, 2, 0))                    # [ng, T, cout]
    absmax = wg.abs().amax(-1)                                   # [cout, ng]
    best_val = absmax.clone()
    best_err = torch.full_like(absmax, math.inf)
    for i in range(int(max_shrink * n_grid)):
        mv = absmax * (1 - i / n_grid)
        wc = torch.maximum(torch.minimum(wg, mv[..., None]), -mv[..., None])
        wq = fake_quant(wc.reshape(cout, cin), bits, g).reshape(cout, ng, g)
        out = torch.bmm(xg, wq.permute(1, 2, 0))                # [ng, T, cout]
        err = (out - ref).pow(2).mean(1).t()                    # [cout, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_val = torch.where(better, mv, best_val)
    return best_val


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor) -> None:
    """``W <- clamp(W, -max_val, max_val)`` per (output channel, group)."""
    w = linear.weight.data
    cout, cin = w.shape
    ng = max_val.shape[1]
    wg = w.reshape(cout, ng, cin // ng)
    mv = max_val.to(w.dtype)[..., None]
    linear.weight.data = torch.maximum(torch.minimum(wg, mv), -mv).reshape(cout, cin)


# ------------------------------------------------------------------------------------------------
# scale groups and folding
# ------------------------------------------------------------------------------------------------

@dataclass
class ScaleGroup:
    """Linears sharing one input, the op that absorbs ``1/s``, and the module the loss inspects.

    prev_kind: "rmsnorm" | "layernorm" | "linear" (fold into weights) or "act" (divide the
    ``prev`` module's output by s, a hook) or "input" (divide each linear's input by s, a pre-hook).
    Names are relative to the block the group lives in.
    """

    name: str
    prev: str | None
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str

    def qualified(self, prefix: str) -> ScaleGroup:
        def q(n):
            return None if n is None else f"{prefix}.{n}" if prefix else n

        return ScaleGroup(q(self.name), q(self.prev), self.prev_kind, tuple(q(n) for n in self.linears), q(self.inspect))


def _divide_input_hook(module, args):
    return (args[0] / module.awq_input_scale.to(args[0].dtype),) + tuple(args[1:])


def _divide_output_hook(module, args, out):
    return out / module.awq_output_scale.to(out.dtype)


@torch.no_grad()
def fold_scale(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Make the previous op produce ``x / s`` and multiply the linears' weight columns by ``s``."""
    s = s.float()
    if group.prev_kind in ("rmsnorm", "layernorm"):
        norm = model.get_submodule(group.prev)
        norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.data.float() / s).to(norm.bias.dtype)
    elif group.prev_kind == "linear":
        prev = model.get_submodule(group.prev)
        prev.weight.data = (prev.weight.data.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    elif group.prev_kind == "act":
        mod = model.get_submodule(group.prev)
        if hasattr(mod, "awq_output_scale"):
            mod.awq_output_scale.mul_(s.to(mod.awq_output_scale.device))
        else:
            mod.register_buffer("awq_output_scale", s.clone())
            mod.register_forward_hook(_divide_output_hook)
    elif group.prev_kind != "input":
        raise ValueError(f"unknown prev_kind {group.prev_kind!r}")
    for name in group.linears:
        lin = model.get_submodule(name)
        lin.weight.data = (lin.weight.data.float() * s[None, :]).to(lin.weight.dtype)
        if group.prev_kind == "input":
            if hasattr(lin, "awq_input_scale"):
                lin.awq_input_scale.mul_(s.to(lin.awq_input_scale.device))
            else:
                lin.register_buffer("awq_input_scale", s.clone())
                lin.register_forward_pre_hook(_divide_input_hook)


def llama_block_groups(block: nn.Module) -> list[ScaleGroup]:
    """The four scale groups of a Llama block (v->o only if the shapes match, i.e. no GQA)."""
    groups = [ScaleGroup("attn_in", "input_layernorm", "rmsnorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj"), "self_attn")]
    attn = block.self_attn
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("attn_out", "self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups += [ScaleGroup("mlp_in", "post_attention_layernorm", "rmsnorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
               ScaleGroup("mlp_out", "mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj")]
    return groups


def minilm_layer_groups(layer: nn.Module) -> list[ScaleGroup]:
    """Scale groups of a post-LN BERT layer (MiniLM): explicit input scales where a LayerNorm feeds."""
    return [
        ScaleGroup("attn_in", None, "input", ("attention.self.query", "attention.self.key", "attention.self.value"),
                   "attention.self"),
        ScaleGroup("attn_out", "attention.self.value", "linear", ("attention.output.dense",),
                   "attention.output.dense"),
        ScaleGroup("ffn_in", None, "input", ("intermediate.dense",), "intermediate"),
        ScaleGroup("ffn_out", "intermediate", "act", ("output.dense",), "output.dense"),
    ]


# ------------------------------------------------------------------------------------------------
# the layer-by-layer driver
# ------------------------------------------------------------------------------------------------

@dataclass
class ScaleSearch:
    group: ScaleGroup            # qualified names
    alphas: list[float]
    losses: list[float]
    best_alpha: float
    scales: torch.Tensor         # [C_in]
    x_mean: torch.Tensor         # [C_in] activation magnitudes s_X

    @property
    def improved(self) -> bool:
        """Strictly lower loss than alpha = 0 (RTN) on the calibration data."""
        return self.losses[self.alphas.index(self.best_alpha)] < self.losses[self.alphas.index(0.0)] \
            if 0.0 in self.alphas else False


@dataclass
class AwqResult:
    bits: int
    group_size: int
    n_grid: int
    max_shrink: float
    searches: list[ScaleSearch] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def improved_count(self) -> tuple[int, int]:
        """(groups whose alpha* beats alpha = 0 strictly, groups searched)."""
        return sum(s.improved for s in self.searches), len(self.searches)

    def summary(self) -> list[dict]:
        rows = []
        for s in self.searches:
            i0 = s.alphas.index(0.0) if 0.0 in s.alphas else 0
            best = s.losses[s.alphas.index(s.best_alpha)]
            rows.append({"group": s.group.name, "best_alpha": s.best_alpha, "loss_rtn": s.losses[i0],
                         "loss_best": best, "reduction": 1 - best / s.losses[i0] if s.losses[i0] > 0 else 0.0})
        return rows


@torch.no_grad()
def run_awq(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], x0: torch.Tensor,
            block_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
            groups_fn: Callable[[nn.Module], list[ScaleGroup]],
            inspect_fn: Callable[[nn.Module, str], Callable[[torch.Tensor], torch.Tensor]],
            bits: int, group_size: int, *, n_grid: int = 20, max_shrink: float = 0.5, scale: bool = True,
            clip: bool = True, loss_rows: int | None = None, clip_tokens: int = 512,
            clip_skip: Sequence[str] = CLIP_SKIP, alphas: Sequence[float] | None = None,
            progress: bool | None = None) -> AwqResult:
    """AWQ over ``blocks`` (``(qualified_prefix, module)`` in forward order) of ``model``, in place.

    x0: calibration input of the first block ``[B, T, d]``; ``block_forward(block, x)`` runs one
    block; ``groups_fn(block)`` lists its scale groups; ``inspect_fn(block, name)`` returns the
    callable ``x -> output`` of the inspected submodule ``name`` (relative to the block).
    loss_rows: evaluate the alpha-search loss on the first ``loss_rows`` sequences only
    (``s_X`` always uses all of ``x0``).
    """
    from mlsys24.models import Capture
    from mlsys24.progress import progress as _progress

    t0 = time.perf_counter()
    res = AwqResult(bits, group_size, n_grid, max_shrink)
    grid = list(alpha_grid(n_grid) if alphas is None else alphas)
    x = x0
    for prefix, block in _progress(blocks, desc="AWQ blocks", enabled=progress):
        lin_names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        with Capture(block, lin_names, []) as cap:
            x_next = block_forward(block, x)            # from the unmodified FP block (official)
        feats = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in cap.inputs[n]]) for n in lin_names}
        shaped = {n: cap.inputs[n][0] for n in lin_names}   # [B, T, C] for the inspected modules
        if scale:
            found = []
            for grp in groups_fn(block):
                lins = [block.get_submodule(n) for n in grp.linears]
                xin = shaped[grp.linears[0]]
                out = search_scale(lins, xin, inspect_fn(block, grp.inspect), bits, group_size, alphas=grid,
                                   x_loss=xin[:loss_rows] if loss_rows else None)
                found.append((grp, out))
            for grp, out in found:                       # fold after all searches (exact in FP)
                fold_scale(block, grp, out["scales"])
                for n in grp.linears:
                    feats[n] = feats[n] / out["scales"]
                res.searches.append(ScaleSearch(grp.qualified(prefix), out["alphas"], out["losses"],
                                                out["best_alpha"], out["scales"], out["x_mean"]))
        if clip:
            for n in lin_names:
                if n.split(".")[-1] in clip_skip:
                    continue
                lin = block.get_submodule(n)
                mv = search_clip(lin.weight.data, feats[n], bits, group_size, n_grid=n_grid, max_shrink=max_shrink,
                                 n_tokens=clip_tokens)
                apply_clip(lin, mv)
                res.clips[f"{prefix}.{n}" if prefix else n] = mv
        x = x_next
    res.seconds = time.perf_counter() - t0
    return res


@torch.no_grad()
def apply_awq(model: nn.Module, result: AwqResult) -> nn.Module:
    """Apply a search result (scales, then clips) to an FP model of the same architecture, in place."""
    for s in result.searches:
        fold_scale(model, s.group, s.scales)
    for name, mv in result.clips.items():
        apply_clip(model.get_submodule(name), mv)
    return model


def awq_llama(model: nn.Module, calib_ids: torch.Tensor, bits: int, group_size: int, **kw) -> AwqResult:
    """AWQ on an ``mlsys24.models.Llama`` (in place). calib_ids ``[B, T]`` from the train split."""
    x0 = model.embed_tokens(calib_ids.to(next(model.parameters()).device))
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]

    def inspect(block, name):
        return block.get_submodule(name)

    return run_awq(model, blocks, x0, lambda b, x: b(x), llama_block_groups, inspect, bits, group_size, **kw)


def awq_minilm(encoder: nn.Module, calib_ids: torch.Tensor, bits: int, group_size: int, **kw) -> AwqResult:
    """AWQ on an ``mlsys24.models.minilm.MiniLMEncoder`` (in place); calib_ids ``[B, T]``, no padding."""
    mask = torch.ones_like(calib_ids, dtype=torch.bool)
    x0 = encoder.embeddings(calib_ids)
    blocks = [(f"encoder.layer.{i}", layer) for i, layer in enumerate(encoder.encoder.layer)]

    def inspect(block, name):
        mod = block.get_submodule(name)
        if name == "attention.self":
            return lambda x: mod(x, mask[: x.shape[0]])
        return mod

    return run_awq(encoder, blocks, x0, lambda b, x: b(x, mask), minilm_layer_groups, inspect, bits, group_size,
                   **kw)


# ------------------------------------------------------------------------------------------------
# quantizing a model; the saliency probes (paper Tables 1 and 2)
# ------------------------------------------------------------------------------------------------

def _linears(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Linear]:
    if names is not None:
        return {n: model.get_submodule(n) for n in names}
    from mlsys24.models import named_linears

    # a Llama's projections (not lm_head); any other model (MiniLM): every nn.Linear
    return named_linears(model) or {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def fake_quantize_linears(model: nn.Module, bits: int, group_size: int, names: Sequence[str] | None = None) -> list[str]:
    """RTN quantize-dequantize, in place, the model's projections (Llama: ``named_linears``; other
    models: every ``nn.Linear``). Applied after :func:`run_awq` this gives the AWQ model."""
    lins = _linears(model, names)
    for lin in lins.values():
        lin.weight.data = fake_quant(lin.weight.data, bits, group_size)
    return list(lins)


@torch.no_grad()
def linear_input_stats(model: nn.Module, inputs: torch.Tensor, names: Sequence[str], forward=None) -> dict:
    """``{name: s_X [C_in]}``: mean |input| of each named linear over a forward pass on ``inputs``."""
    from mlsys24.models import Capture

    with Capture(model, list(names), []) as cap:
        (forward or model)(inputs)
    return {n: activation_scale(torch.cat([t.reshape(-1, t.shape[-1]) for t in cap.inputs[n]])) for n in names}


def salient_channels(rule: str, frac: float, *, x_mean: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Indices of the top ``frac`` input channels by ``rule``: "activation" (largest s_X),
    "weight" (largest L2 norm of the weight column), "random" (seeded)."""
    c = (x_mean if x_mean is not None else weight).shape[-1]
    k = max(1, round(frac * c))
    if rule == "activation":
        return torch.topk(x_mean, k).indices
    if rule == "weight":
        return torch.topk(weight.float().norm(dim=0), k).indices
    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(c, generator=g)[:k]
    raise ValueError(f"rule must be activation, weight or random, got {rule!r}")


@torch.no_grad()
def keep_salient_fp(model: nn.Module, stats: dict, rule: str, frac: float, bits: int, group_size: int,
                    seed: int = 0) -> None:
    """Table 1 probe, in place: RTN everything, then restore the top ``frac`` input channels of every
    linear to FP (mixed precision: the hardware-unfriendly reference point AWQ replaces)."""
    for i, (name, lin) in enumerate(_linears(model, list(stats)).items()):
        w = lin.weight.data
        idx = salient_channels(rule, frac, x_mean=stats[name], weight=w, seed=seed + i)
        wq = fake_quant(w, bits, group_size)
        wq[:, idx] = w[:, idx]
        lin.weight.data = wq


@torch.no_grad()
def scale_salient(model: nn.Module, stats: dict, s: float, frac: float, bits: int, group_size: int) -> dict:
    """Table 2 probe, in place: multiply the top-``frac`` (by activation) input channels of every
    weight by ``s`` before RTN and divide after (what folding a fixed scale would do). Returns the
    paper's statistics over the (row, group) cells that hold a salient channel: the share whose
    step changed (delta' != delta), mean delta'/delta, and mean delta'/(delta s) (the relative error
    of a salient weight)."""
    changed, ratio, n = 0, 0.0, 0
    for name, lin in _linears(model, list(stats)).items():
        w = lin.weight.data.float()
        idx = salient_channels("activation", frac, x_mean=stats[name])
        sv = torch.ones(w.shape[1])
        sv[idx] = s
        d0, _ = quant_params(w, bits, group_size)
        d1, _ = quant_params(w * sv, bits, group_size)
        g = w.shape[1] if group_size <= 0 else group_size
        cells = torch.zeros(d0.shape[1], dtype=torch.bool)
        cells[torch.unique(idx // g)] = True
        r = (d1 / d0)[:, cells]
        changed += int((r != 1).sum())
        ratio += float(r.sum())
        n += r.numel()
        lin.weight.data = (fake_quant(w * sv, bits, group_size) / sv).to(lin.weight.dtype)
    return {"s": s, "frac_delta_changed": changed / n, "mean_delta_ratio": ratio / n,
            "mean_salient_error_ratio": ratio / n / s}
