"""Requests and their life in the engine.

A :class:`Sequence` is one request being served. Its tokens are ``prompt + output``; the first
``num_computed`` of them have K/V in the cache, the rest are *pending*. A step processes ``n``
pending tokens of a sequence (a prefill chunk, a whole prompt, or the one newest token of a
decode); when it reaches the last pending token, the logits give the next output token. Preemption
by recompute only resets ``num_computed`` to 0 (outputs are kept and re-prefilled, never re-sampled),
so no request is lost or duplicated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Request", "Sequence", "SeqStatus"]


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # not admitted, or preempted by recompute (no K/V held)
    RUNNING = "running"      # admitted, holds K/V blocks
    SWAPPED = "swapped"      # preempted by swap: K/V lives in host memory
    FINISHED = "finished"


@dataclass
class Request:
    """What a client asks for. ``prompt`` is a list of token ids.

    adapter_id: LoRA adapter of this request (-1: the base model).
    position_ids: RoPE positions of the prompt tokens (Prompt Cache layouts); None = 0..P-1.
    temperature: 0 = greedy; top_k: None = full vocabulary; seed: per-request sampling seed.
    """

    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    adapter_id: int = -1
    position_ids: list[int] | None = None
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    eos_token: int | None = None

    def __post_init__(self):
        if not self.prompt:
            raise ValueError(f"request {self.rid}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.rid}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.position_ids is not None and len(self.position_ids) != len(self.prompt):
            raise ValueError(f"request {self.rid}: position_ids has {len(self.position_ids)} entries for "
                             f"{len(self.prompt)} prompt tokens")
        if self.temperature < 0:
            raise ValueError(f"request {self.rid}: temperature must be >= 0")


@dataclass(eq=False)
class Sequence:
    request: Request
    status: SeqStatus = SeqStatus.WAITING
    output: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose K/V are in the cache
    admit_order: int = -1            # increasing with each admission (preemption victims: the latest)
    n_preemptions: int = 0
    # times (seconds on the engine's clock)
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    logits: list = field(default_factory=list)  # per output token, when the engine records them

    @property
    def rid(self) -> int:
        return self.request.rid

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (>= 1 for every unfinished sequence)."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.pending > 1

    def token(self, i: int) -> int:
        p = self.request.prompt
        return p[i] if i < len(p) else self.output[i - len(p)]

    def position(self, i: int) -> int:
        """RoPE position of token ``i`` (custom prompt positions continue after their maximum)."""
        pos = self.request.position_ids
        if pos is None:
            return i
        if i < len(pos):
            return pos[i]
        return max(pos) + 1 + (i - len(pos))

    @property
    def finished(self) -> bool:
        if len(self.output) >= self.request.max_new_tokens:
            return True
        eos = self.request.eos_token
        return eos is not None and bool(self.output) and self.output[-1] == eos
