"""`LlamaConfig`: the shape of a Llama-architecture decoder, and its mapping to/from HF ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["LlamaConfig", "TINY_LLAMA", "PRESETS", "preset"]


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads: grouped-query attention (n_heads % n_kv_heads == 0)
    head_dim: int | None = None  # default d_model // n_heads
    ffn_dim: int = 768  # SwiGLU hidden size
    max_seq_len: int = 512  # trained context (RoPE itself works at any position id)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style: {"rope_type": "linear"|"llama3", "factor": ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    dropout: float = 0.0  # training only: on attention probabilities and both residual branches
    extra: dict = field(default_factory=dict)  # free-form provenance (not used by the module)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads when head_dim is not given")
        if self.head_dim_ % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs)")

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def n_params(self) -> int:
        d, hd = self.d_model, self.head_dim_
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim_ * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # HF transformers' LlamaConfig keys ------------------------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim_,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "initializer_range": self.init_std,
            "attention_dropout": self.dropout,
            "bos_token_id": None,
            "eos_token_id": None,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlamaConfig:
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}: only SwiGLU (silu) Llama models are supported")
        n_heads = d["num_attention_heads"]
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta", 10000.0)
        rp = d.get("rope_parameters")  # newer transformers keep theta + scaling together here
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = rp
        return cls(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            ffn_dim=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            init_std=d.get("initializer_range", 0.02),
            dropout=float(d.get("attention_dropout", 0.0) or 0.0),
        )


#: The workbench's trained checkpoint: d_model 256, 4 layers, 4 heads x 64 (MHA), FFN 768, bytes.
TINY_LLAMA = LlamaConfig()


#: Shapes of public Llama-family models (for random-weight timing runs; weights are never bundled).
PRESETS: dict[str, dict] = {
    "tiny": {},
    "llama2-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                       max_seq_len=4096, norm_eps=1e-5),
    "llama2-70b": dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       max_seq_len=4096, norm_eps=1e-5),
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """``LlamaConfig`` of a named shape (``PRESETS``), e.g. ``preset("llama2-7b", n_layers=2)``."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; have {sorted(PRESETS)}") from None
    return LlamaConfig(**(base | overrides))
