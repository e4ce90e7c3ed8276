"""KV-cache reduction policies (Keyformer, MLSys 2024, and its baselines) on one interface.

- :mod:`.policies` — :class:`KVPolicyConfig` (full / window / sink / h2o / keyformer), budgets, the
  Gumbel sampler and temperature schedule, chunked prompt scoring, selection and eviction rules.
- :mod:`.compact` — :class:`PolicyKVCache`: per-(layer, KV head) cache, physically compacted (fixed
  budget, in-place slot overwrite, position map) or masked (the official code's simulation), driven
  by the shared Llama through the ``"kv_policy"`` attention backend.
- :mod:`.fused_score` — the compacted cache's decode step in Triton: split-KV attention that also writes
  the logits, the score update (Gumbel noise drawn in the kernel) and eviction in one kernel, the slot
  write (``PolicyKVCache(attn="triton")``); :mod:`.score_attention` — the earlier two-pass variant.
- :mod:`.evaluate` — teacher-forced continuations, greedy generation, PPL / KL / top-1 / ROUGE-L.
- :mod:`.engine_policy` — the same policies as a :class:`~mlsys24.serving.kv_policy.KVPolicy` of the
  serving engine (masked execution over the paged cache).
- :mod:`.bench` — decode latency / throughput vs KV budget on a 7B-shaped model (GPU).
"""

from .compact import PolicyKVCache, policy_attention
from .evaluate import (
    attention_mass_cdf,
    greedy,
    policy_backend,
    quality_metrics,
    rouge_l,
    teacher_forced,
    tokens_for_mass,
    validation_prompts,
)
from .policies import (
    POLICIES,
    KVPolicyConfig,
    budget_tokens,
    evict_one,
    gumbel,
    make_policy,
    prompt_scores,
    prompt_scores_ref,
    select_prompt,
    tau_at,
)

__all__ = [
    "POLICIES", "KVPolicyConfig", "PolicyKVCache", "attention_mass_cdf", "budget_tokens", "evict_one", "greedy",
    "gumbel", "make_policy", "policy_attention", "policy_backend", "prompt_scores", "prompt_scores_ref",
    "quality_metrics", "rouge_l", "select_prompt", "tau_at", "teacher_forced", "tokens_for_mass",
    "validation_prompts",
]
