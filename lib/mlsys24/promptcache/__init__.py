"""Prompt Cache (Gim et al., MLSys 2024): modular attention reuse across prompts.

- :mod:`.pml` — the Prompt Markup Language: :func:`parse_schema`, :func:`parse_prompt`, located
  :class:`ParseError`;
- :mod:`.layout` — schema position ids (:func:`layout`), prompt resolution (:class:`Selection`);
- :mod:`.cache` — module K/V precomputation (scaffold / independent / naive encode modes), host and
  device tiers, staging buffer with use-count ordering, :class:`PromptCache` (prefill, generate);
- :mod:`.accuracy` — KL / top-1 agreement of reuse variants against full recompute;
- :mod:`.bench` — TTFT sweeps (CPU and GPU), copy-vs-recompute crossover.

Imports torch only (plus the shared models).
"""

from .cache import (
    ENCODE_MODES,
    TIERS,
    ModuleKV,
    ModuleStore,
    PrefillResult,
    PromptCache,
    bytes_per_token,
    encode_modules,
    full_prefill,
    run_kv,
)
from .layout import ROOT, ModuleSpan, SchemaLayout, Segment, Selection, layout
from .pml import (
    CHAT_TEMPLATES,
    Import,
    Module,
    Parameter,
    ParseError,
    Prompt,
    Schema,
    Text,
    Union,
    escape,
    parse_prompt,
    parse_schema,
)

__all__ = [
    "CHAT_TEMPLATES", "ENCODE_MODES", "Import", "Module", "ModuleKV", "ModuleSpan", "ModuleStore", "Parameter",
    "ParseError", "PrefillResult", "Prompt", "PromptCache", "ROOT", "Schema", "SchemaLayout", "Segment", "Selection",
    "TIERS", "Text", "Union", "bytes_per_token", "encode_modules", "escape", "full_prefill", "layout", "parse_prompt",
    "parse_schema", "run_kv",
]
