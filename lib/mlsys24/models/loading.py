"""Checkpoints: save/load in HF Llama layout, load the committed tiny Llama, load user HF checkpoints.

A checkpoint directory holds ``config.json`` (HF ``LlamaConfig`` keys; ours adds an ``"mlsys24"``
entry with the exact :class:`LlamaConfig`) and ``model.safetensors`` — or shards listed in
``model.safetensors.index.json`` — with HF tensor names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight`` ...). Our module uses the same names without the leading ``model.``, so the
mapping is a prefix strip; tied embeddings are restored when ``lm_head.weight`` is absent.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import LlamaConfig
from .llama import Llama

__all__ = ["TINY_LLAMA_DIR", "save_checkpoint", "load_hf_llama", "load_tiny_llama", "read_hf_state_dict",
           "tiny_llama_dir", "random_llama"]


def tiny_llama_dir() -> Path:
    from mlsys24.paths import DATA_DIR

    return DATA_DIR / "models" / "tiny_llama"


TINY_LLAMA_DIR = tiny_llama_dir()


@contextmanager
def _empty_on_meta():
    """Build modules on the meta device without running torch's default initialisers (on meta those
    go through decompositions that import the compiler stack, seconds of start-up for nothing)."""
    from torch import nn

    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = lambda self: None
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def _to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _from_hf_name(name: str) -> str | None:
    if name.startswith("model."):
        name = name[len("model."):]
    if name.endswith("rotary_emb.inv_freq"):
        return None  # old HF checkpoints store the RoPE table; we recompute it
    return name


def save_checkpoint(model: Llama, path: str | Path, *, dtype: torch.dtype = torch.float16,
                    extra: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (weights cast to ``dtype``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = {}
    for name, p in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        tensors[_to_hf_name(name)] = p.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    conf = cfg.to_hf_dict()
    conf["torch_dtype"] = str(dtype).replace("torch.", "")
    conf["mlsys24"] = cfg.to_dict() | ({"extra": extra} if extra else {})
    (path / "config.json").write_text(json.dumps(conf, indent=1) + "\n")
    return path


def read_hf_state_dict(path: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (single file or sharded index), HF names."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(path / f), device=str(device)))
    return sd


def load_hf_llama(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                  strict: bool = True) -> Llama:
    """Build a :class:`Llama` from a HF-format Llama directory (config.json + safetensors)."""
    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    if "mlsys24" in conf:
        d = dict(conf["mlsys24"])
        d.pop("extra", None)
        cfg = LlamaConfig.from_dict(d)
    else:
        if conf.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"model_type {conf.get('model_type')!r} is not a Llama-architecture model")
        cfg = LlamaConfig.from_hf_dict(conf)
    with _empty_on_meta():
        model = Llama(cfg)
    sd = {}
    for k, v in read_hf_state_dict(path).items():
        name = _from_hf_name(k)
        if name is not None:
            sd[name] = v.to(dtype)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    model.load_state_dict(sd, strict=strict, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _rebuild_rope(model)
    return model.to(device).eval()


def _rebuild_rope(model: Llama, device="cpu") -> None:
    # non-persistent buffers (RoPE tables) created on meta: rebuild them
    from .llama import RotaryEmbedding, rope_inv_freq

    cfg = model.cfg
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(cfg.head_dim_, cfg.rope_theta, cfg.rope_scaling).to(device)


def random_llama(cfg: LlamaConfig | str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Llama:
    """A randomly initialised model built directly on ``device`` in ``dtype`` (no fp32 copy first):
    for timing runs at real shapes, e.g. ``random_llama("llama2-7b", "cuda", torch.float16)``."""
    from .config import preset

    if isinstance(cfg, str):
        cfg = preset(cfg)
    with _empty_on_meta():
        model = Llama(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_parameters(seed=seed)
    _rebuild_rope(model, device)
    return model.eval()


def load_tiny_llama(device="cpu", dtype: torch.dtype = torch.float32) -> Llama:
    """The committed, trained tiny Llama (``data/models/tiny_llama``), in eval mode."""
    d = tiny_llama_dir()
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"{d}/model.safetensors missing: train with `python -m mlsys24.models.train`")
    return load_hf_llama(d, device=device, dtype=dtype)
