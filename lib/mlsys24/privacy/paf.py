"""Polynomial approximation functions (PAFs) of sign(x), and the ReLU / MaxPool layers built on them.

SmartPAF (Tong et al., MLSys 2024, arXiv 2404.03216; official code: github.com/EfficientFHE/SmartPAF).
CKKS homomorphic encryption evaluates only additions and multiplications, so every non-polynomial
operator of a network is rewritten through sign(x):

    ReLU(x)   = (x + x * sign(x)) / 2
    max(a, b) = ((a + b) + (a - b) * sign(a - b)) / 2          (MaxPool = a pairwise tree of max)

and sign(u) on u in [-1, 1] is replaced by a *composite* odd polynomial

    sign(u) ~ p_K( ... p_2( p_1(u) ) ... ),      p_k(u) = sum_i c_{k,i} u^(2i+1),

where, as in the official ``Sign_minmax_layer``, the first listed component is applied first
(``order="code"``); ``order="g_first"`` reverses the list (Cheon et al.'s f o g, where g runs first).
The input is brought into [-1, 1] by a scale s: u = x / s, with s = max|x| of the current tensor
(Dynamic Scale, DS, training) or a constant collected over the training set (Static Scale, SS,
deployment: FHE cannot compute a data-dependent max).

Coefficient sources:
  f1, f2, g1, g2, g3 — Cheon, Kim, Kim, "Efficient homomorphic comparison methods with optimal
  complexity", IACR ePrint 2019/1234;  p1, p2 (alpha = 7) — Lee et al., "Minimax approximation of
  sign function by composite polynomial for homomorphic comparison".  ``deg27`` is our stand-in for
  the 27-degree minimax PAF that the paper uses as its slow, accurate baseline (its coefficients are
  not published with the code): the odd least-squares fit of sign on [-1, -0.05] U [0.05, 1] of
  degree 27.

Shapes: every module here is elementwise except :class:`MaxPoolPAF` ([B, C, H, W] -> [B, C, Ho, Wo]).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "COMPONENTS", "PAF_FAMILIES", "PAF_LABELS", "SMARTPAF_PAFS", "components_of", "odd_poly", "odd_poly_ref", "odd_poly_fused",
    "paf_numpy", "relu_form_numpy", "lstsq_sign_coeffs", "odd_to_chebyshev", "PafInfo", "paf_info",
    "SignPAF", "ReLUPAF", "MaxPoolPAF", "make_sign", "nonpolynomial_layers", "replace_nonpolynomial",
    "sign_modules", "set_scale_mode", "preceding_parameters",
]

# Odd coefficients: entry i multiplies u^(2i+1).
COMPONENTS: dict[str, tuple[float, ...]] = {
    "f1": (1.5, -0.5),
    "f2": (1.875, -1.25, 0.375),
    "g1": (2.076171875, -1.3271484375),
    "g2": (3.255859375, -5.96484375, 3.70703125),
    "g3": (4.4814453125, -16.1884765625, 25.013671875, -12.55859375),
    "p1": (7.30445164958251, -34.6825871108659, 59.8596518298826, -31.8755225906466),
    "p2": (2.40085652217597, -2.63125454261783, 1.54912674773593, -0.331172956504304),
}

# Named PAFs (official code names) -> component list, applied in list order.
PAF_FAMILIES: dict[str, tuple[str, ...]] = {
    "f1g2": ("f1", "g2"),
    "f2g2": ("f2", "g2"),
    "f2g3": ("f2", "g3"),
    "2f12g1": ("f1", "f1", "g1", "g1"),
    "a7": ("p1", "p2"),
    "deg27": ("ls27",),
}

# The five PAFs of the paper's tables (lowest degree first).
SMARTPAF_PAFS: tuple[str, ...] = ("f1g2", "f2g2", "f2g3", "2f12g1", "a7")

PAF_LABELS: dict[str, str] = {
    "f1g2": "f1∘g2", "f2g2": "f2∘g2", "f2g3": "f2∘g3", "2f12g1": "f1²∘g1²", "a7": "α=7",
    "deg27": "27-degree LS (stand-in for minimax-27)",
}


@lru_cache(maxsize=8)
def lstsq_sign_coeffs(degree: int = 27, eps: float = 0.05, n_points: int = 4000) -> tuple[float, ...]:
    """Odd least-squares fit of sign(u) on [-1, -eps] U [eps, 1] (by symmetry: u on [eps, 1], target 1).

    Solved in the odd Chebyshev basis (well conditioned), returned as monomial odd coefficients.
    Float64; deterministic (uniform grid).
    """
    if degree % 2 == 0 or degree < 1:
        raise ValueError(f"lstsq_sign_coeffs: degree must be odd and >= 1, got {degree}")
    m = (degree + 1) // 2
    u = np.linspace(eps, 1.0, n_points)
    basis = np.stack([np.polynomial.chebyshev.chebval(u, [0.0] * (2 * i + 1) + [1.0]) for i in range(m)], 1)
    a, *_ = np.linalg.lstsq(basis, np.ones_like(u), rcond=None)
    full = np.zeros(degree + 1)
    full[1::2] = a
    mono = np.polynomial.chebyshev.cheb2poly(full)
    return tuple(float(c) for c in mono[1::2])


def components_of(paf: str, order: str = "code") -> list[tuple[float, ...]]:
    """The coefficient tuples of a named PAF, in evaluation order."""
    if paf not in PAF_FAMILIES:
        raise KeyError(f"unknown PAF {paf!r}; known: {', '.join(PAF_FAMILIES)}")
    if order not in ("code", "g_first"):
        raise ValueError(f"order must be 'code' or 'g_first', got {order!r}")
    comps = [lstsq_sign_coeffs() if n == "ls27" else COMPONENTS[n] for n in PAF_FAMILIES[paf]]
    return comps[::-1] if order == "g_first" else comps


def odd_poly_ref(u: torch.Tensor, coeffs: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Reference odd polynomial, evaluated as the official code does: u^2 once, then u^(2i+1) = u^(2i-1) * u^2."""
    u2 = u * u
    p = u
    out = u * coeffs[0]
    for i in range(1, len(coeffs)):
        p = p * u2
        out = out + p * coeffs[i]
    return out


def odd_poly(u: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Odd polynomial sum_i c_i u^(2i+1) by Horner's rule in u^2 (fewer ops than the power chain)."""
    u2 = u * u
    acc = coeffs[-1].expand_as(u) if coeffs.numel() == 1 else coeffs[-1] * u2 + coeffs[-2]
    for i in range(coeffs.numel() - 3, -1, -1):
        acc = acc * u2 + coeffs[i]
    return acc * u


class _OddPolyFn(torch.autograd.Function):
    """Fused odd polynomial: Horner forward, analytic backward (no per-coefficient autograd graph).

    forward  p(u)      = u * sum_i c_i (u^2)^i
    backward dp/du     = sum_i (2i+1) c_i (u^2)^i          (Horner again)
             dL/dc_i   = sum over elements of g * u^(2i+1)
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        u2 = u * u
        cs = c.tolist()
        acc = torch.full_like(u, cs[-1])
        for ci in reversed(cs[:-1]):
            acc = acc.mul_(u2).add_(ci)
        ctx.save_for_backward(u, c)
        return acc.mul_(u)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, c = ctx.saved_tensors
        u2 = u * u
        cs = c.tolist()
        grad_u = grad_c = None
        if ctx.needs_input_grad[0]:
            m = len(cs) - 1
            d = torch.full_like(u, (2 * m + 1) * cs[m])
            for i in range(m - 1, -1, -1):
                d = d.mul_(u2).add_((2 * i + 1) * cs[i])
            grad_u = d.mul_(g)
        if ctx.needs_input_grad[1]:
            gp = g * u
            sums = [gp.sum()]
            for _ in range(1, len(cs)):
                gp = gp.mul_(u2)
                sums.append(gp.sum())
            grad_c = torch.stack(sums).to(c.dtype)
        return grad_u, grad_c


def odd_poly_fused(u: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """:func:`odd_poly` with a fused backward (same values; used by :class:`SignPAF` for training speed)."""
    if u.dtype != coeffs.dtype:
        coeffs = coeffs.to(u.dtype) if coeffs.dtype != torch.float64 else coeffs
    return _OddPolyFn.apply(u, coeffs)


def paf_numpy(u: np.ndarray, components: Sequence[Sequence[float]]) -> np.ndarray:
    """Float64 NumPy evaluation of a composite odd polynomial (np.polynomial, independent of torch)."""
    out = np.asarray(u, dtype=np.float64)
    for c in components:
        full = np.zeros(2 * len(c))
        full[1::2] = c
        out = np.polynomial.polynomial.polyval(out, full)
    return out


def relu_form_numpy(x: np.ndarray, components: Sequence[Sequence[float]]) -> np.ndarray:
    """(x + x * PAF(x)) / 2 for x already in [-1, 1] (scale 1)."""
    return 0.5 * (x + x * paf_numpy(x, components))


def odd_to_chebyshev(coeffs: Sequence[float]) -> np.ndarray:
    """Odd monomial coefficients c_i (of u^(2i+1)) -> odd Chebyshev coefficients a_i (of T_(2i+1)(u))."""
    full = np.zeros(2 * len(coeffs))
    full[1::2] = coeffs
    cheb = np.polynomial.chebyshev.poly2cheb(full)
    return np.asarray(cheb[1::2], dtype=np.float64)


@dataclass(frozen=True)
class PafInfo:
    """Degree and CKKS cost accounting of one PAF (sign part, then the ReLU form).

    Each odd component of degree 2m+1 costs m+1 ciphertext-ciphertext multiplications (one square,
    then one product per higher odd power) and m+2 levels (the highest power sits at depth m+1, its
    scalar coefficient product adds one). The ReLU form x * (1 + sign)/2 adds one product and one level.
    """

    name: str
    component_degrees: tuple[int, ...]
    degree_sum: int          # sum of component degrees (one of the papers' "degree" conventions)
    composed_degree: int     # degree of the composed polynomial
    ct_mults_sign: int
    depth_sign: int
    ct_mults_relu: int
    depth_relu: int
    scalar_mults_relu: int


def paf_info(paf: str) -> PafInfo:
    comps = components_of(paf)
    degs = tuple(2 * len(c) - 1 for c in comps)
    ms = [(d - 1) // 2 for d in degs]
    ct_sign = sum(m + 1 for m in ms)
    depth_sign = sum(m + 2 for m in ms)
    return PafInfo(name=paf, component_degrees=degs, degree_sum=sum(degs),
                   composed_degree=int(np.prod(degs)), ct_mults_sign=ct_sign, depth_sign=depth_sign,
                   ct_mults_relu=ct_sign + 1, depth_relu=depth_sign + 1,
                   scalar_mults_relu=sum(m + 1 for m in ms) + 1)


# ----------------------------------------------------------------------------------------------
# torch modules
# ----------------------------------------------------------------------------------------------

class SignPAF(nn.Module):
    """sign(x) ~ PAF(x / s): trainable composite odd polynomial with Dynamic or Static Scale.

    scale_mode: "dynamic" — s = max|x| over the whole input tensor (no gradient through s), times
    ``scale_ratio``; "static" — s = ``static_scale`` (a buffer) times ``scale_ratio``.
    While ``observing`` is True, the module records the running max of |x| it sees (the SS collector).
    """

    def __init__(self, components: Sequence[Sequence[float]], *, scale_mode: str = "dynamic",
                 scale_ratio: float = 1.0, trainable: bool = True, name: str = "",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        # float64 storage for components whose coefficients float32 cannot hold precisely enough
        # (keep such a module out of a model-wide .to(torch.float32) / .float()).
        self.coeffs = nn.ParameterList(
            [nn.Parameter(torch.tensor(list(c), dtype=torch.float64 if max(map(abs, c)) > 1e3 else dtype),
                          requires_grad=trainable) for c in components])
        self.scale_ratio = float(scale_ratio)
        self.paf_name = name
        self.register_buffer("static_scale", torch.tensor(0.0))
        self.register_buffer("observed_max", torch.tensor(0.0))
        self.observing = False
        self.scale_mode = scale_mode

    @property
    def scale_mode(self) -> str:
        return self._scale_mode

    @scale_mode.setter
    def scale_mode(self, mode: str) -> None:
        if mode not in ("dynamic", "static"):
            raise ValueError(f"scale_mode must be 'dynamic' or 'static', got {mode!r}")
        self._scale_mode = mode

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale_mode == "dynamic":
            s = x.detach().abs().amax()
        else:
            if float(self.static_scale) <= 0:
                raise RuntimeError("SignPAF: static scale not set; run techniques.collect_static_scales first")
            s = self.static_scale
        return torch.clamp(s * self.scale_ratio, min=1e-12)

    def poly(self, u: torch.Tensor) -> torch.Tensor:
        """The composite polynomial on already-scaled input u.

        Monomial coefficients of high-degree fits are huge (the 27-degree least-squares fit reaches
        ~1e8) and cancel catastrophically in float32: such components are evaluated in float64.
        """
        for c in self.coeffs:
            if c.dtype == torch.float64 and u.dtype != torch.float64:
                u = odd_poly_fused(u.double(), c).to(u.dtype)
            else:
                u = odd_poly_fused(u, c)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observed_max = torch.maximum(self.observed_max, x.detach().abs().amax())
        return self.poly(x / self.scale(x))

    def coefficient_lists(self) -> list[list[float]]:
        return [c.detach().double().tolist() for c in self.coeffs]

    def extra_repr(self) -> str:
        degs = [2 * c.numel() - 1 for c in self.coeffs]
        return f"{self.paf_name or 'paf'}: degrees={degs}, scale={self._scale_mode}, ratio={self.scale_ratio}"


class ReLUPAF(nn.Module):
    """ReLU(x) ~ (x + x * sign_paf(x)) / 2."""

    def __init__(self, sign: SignPAF):
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x + x * self.sign(x))


class MaxPoolPAF(nn.Module):
    """MaxPool2d as a pairwise tree of max(a, b) = ((a+b) + (a-b) sign(a-b)) / 2 over each window.

    A k x k window needs k*k - 1 max operations in ceil(log2(k*k)) sequential rounds (2x2: 3 maxes,
    2 rounds); with DS each round scales its own differences. Padding 0, dilation 1 only.
    """

    def __init__(self, sign: SignPAF, kernel_size: int, stride: int | None = None):
        super().__init__()
        self.sign = sign
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size

    def _pair_max(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a - b
        return 0.5 * ((a + b) + d * self.sign(d))

    def _tree(self, w: torch.Tensor) -> torch.Tensor:  # w: [B, C, K, L]
        n = w.shape[2]
        if n == 1:
            return w[:, :, 0]
        half = n // 2
        return self._pair_max(self._tree(w[:, :, :half]), self._tree(w[:, :, half:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        b, c, h, w = x.shape
        k, s = self.kernel_size, self.stride
        ho, wo = (h - k) // s + 1, (w - k) // s + 1
        cols = F.unfold(x, kernel_size=k, stride=s)            # [B, C*k*k, L]
        win = cols.view(b, c, k * k, ho * wo)                  # [B, C, k*k, L]
        return self._tree(win).view(b, c, ho, wo)


def make_sign(paf: str, *, order: str = "code", scale_mode: str = "dynamic", scale_ratio: float = 1.0,
              components: Sequence[Sequence[float]] | None = None, dtype: torch.dtype = torch.float32) -> SignPAF:
    """A fresh :class:`SignPAF` with the initial coefficients of a named PAF (or given components)."""
    comps = components if components is not None else components_of(paf, order)
    return SignPAF(comps, scale_mode=scale_mode, scale_ratio=scale_ratio, name=paf, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# model surgery
# ----------------------------------------------------------------------------------------------

_NONPOLY = (nn.ReLU, nn.MaxPool2d, ReLUPAF, MaxPoolPAF)


def nonpolynomial_layers(model: nn.Module) -> list[str]:
    """Names of the ReLU / MaxPool2d layers (exact or PAF), in registration (= forward, for the models here) order."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, _NONPOLY) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def paf_layer_for(exact: nn.Module, sign: SignPAF) -> nn.Module:
    """The PAF twin of an exact ReLU or MaxPool2d layer."""
    if isinstance(exact, nn.ReLU):
        return ReLUPAF(sign)
    if isinstance(exact, nn.MaxPool2d):
        k = exact.kernel_size if isinstance(exact.kernel_size, int) else exact.kernel_size[0]
        st = exact.stride if isinstance(exact.stride, int) else exact.stride[0]
        pad = exact.padding if isinstance(exact.padding, int) else exact.padding[0]
        if pad != 0:
            raise NotImplementedError("MaxPoolPAF supports padding 0 only")
        return MaxPoolPAF(sign, k, st)
    raise TypeError(f"no PAF twin for {type(exact).__name__}")


def replace_nonpolynomial(model: nn.Module, make: Callable[[], SignPAF] | str, *,
                          layers: Sequence[str] | None = None, inplace: bool = False) -> nn.Module:
    """Replace exact ReLU / MaxPool2d layers by PAF layers (each with its own SignPAF).

    make: a PAF name (initial coefficients, DS) or a factory returning a fresh SignPAF.
    layers: which layers (default: every exact non-polynomial layer).
    """
    m = model if inplace else copy.deepcopy(model)
    factory = (lambda: make_sign(make)) if isinstance(make, str) else make
    targets = list(layers) if layers is not None else [
        n for n in nonpolynomial_layers(m) if isinstance(m.get_submodule(n), (nn.ReLU, nn.MaxPool2d))]
    for name in targets:
        exact = m.get_submodule(name)
        _set_module(m, name, paf_layer_for(exact, factory()))
    return m


def sign_modules(model: nn.Module) -> dict[str, SignPAF]:
    """The SignPAF of every PAF layer, keyed by the layer name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (ReLUPAF, MaxPoolPAF)):
            out[name] = mod.sign
    return out


def set_scale_mode(model: nn.Module, mode: str, ratio: float | None = None) -> nn.Module:
    for s in sign_modules(model).values():
        s.scale_mode = mode
        if ratio is not None:
            s.scale_ratio = float(ratio)
    return model


def preceding_parameters(model: nn.Module, layer: str) -> list[nn.Parameter]:
    """The official code's "up_weight": parameters of the leaf modules registered after the previous
    non-polynomial layer and before ``layer`` (the conv/BN/FC directly feeding it)."""
    nonpoly = set(nonpolynomial_layers(model))
    params: list[nn.Parameter] = []
    for name, mod in model.named_modules():
        if name == layer:
            return params
        if name in nonpoly:
            params = []
            continue
        if any(name.startswith(n + ".") for n in nonpoly):
            continue
        if len(list(mod.children())) == 0:
            params += [p for p in mod.parameters(recurse=False)]
    raise KeyError(f"layer {layer!r} not found")
