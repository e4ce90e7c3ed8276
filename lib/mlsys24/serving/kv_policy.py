"""KV-policy hooks of the engine: what happens to a sequence's cache beyond append-only.

- ``on_admit(engine, seq)``: before a sequence's first forward. Prompt Cache imports precomputed
  module K/V here (``engine.cache.append_kv``) and advances ``seq.num_computed`` past them.
- ``after_step(engine, rows)``: after each forward. Keyformer/H2O score tokens and evict or compact
  slots here (``rows`` are the ``(seq, n_tokens)`` of the step).
- ``on_finish(engine, seq)``: before the sequence's blocks are freed.

The default :class:`KVPolicy` does nothing (a plain append-only cache).
"""

from __future__ import annotations

__all__ = ["KVPolicy"]


class KVPolicy:
    name = "full"

    def on_admit(self, engine, seq) -> None:
        pass

    def after_step(self, engine, rows) -> None:
        pass

    def on_finish(self, engine, seq) -> None:
        pass
