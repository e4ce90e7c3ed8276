"""``QuantLinear``: a Linear with packed int4 weights (AWQ layout), and AWQ-format checkpoints.

``QuantLinear.from_linear(linear, bits, group_size)`` round-to-nearest quantizes the (already
AWQ-scaled and clipped, if any) weight and packs it (:func:`mlsys24.quant.pack.awq_pack`). Its
forward runs the Triton W4A16 kernels on CUDA (or anywhere with ``use_kernel=True``, e.g. under
``TRITON_INTERPRET=1``): up to ``gemv_max_m`` rows (decode) the GEMV on a K-major copy of the
integers made once on first use (:func:`mlsys24.quant.pack.gemv_repack`, not part of the state
dict), more rows the tensor-core GEMM on the AWQ layout. Elsewhere it dequantizes to the
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

from .pack import awq_pack, dequantize_awq, gemv_repack

__all__ = ["QuantLinear", "quantize_linears", "save_awq_checkpoint", "load_awq_checkpoint", "QUANT_CONFIG"]

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
        self._dequant_cache: tuple | None = None
        self._gemv: dict | None = None

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
        if self._gemv is None or self._gemv["qweight_t"].device != self.qweight.device:
            self._gemv = gemv_repack(self.qweight, self.qzeros, self.scales, self.out_features)
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
