"""Accuracy of attention reuse: next-token distributions of reuse variants vs full recompute.

The example schema ("codeqa") is cut from the committed validation split of the workbench corpus:
a system line, a union of three personas, ``n_docs`` document modules (one function each, 48–80
bytes, cut at line ends) and a task module with an 8-token parameter. Each prompt selects a persona,
2–3 documents and the task, and asks about a function of one of them; the answer is the full
recompute's 8 greedy tokens, teacher-forced for every variant.

Variants (over the question tokens and the answer tokens):

- ``full``: every token recomputed with contiguous positions — the reference;
- ``scaffold`` / ``independent``: Prompt Cache in both encode modes (schema positions, gaps);
- ``naive``: modules cached alone at positions ``0..n-1`` and concatenated as is;
- ``full_schema_pos``: every token recomputed but at schema positions — isolates the effect of
  discontinuous positions from the effect of missing cross-module attention.

Metrics: mean KL(variant ‖ full) over positions, and top-1 agreement with full.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

import torch
import torch.nn.functional as F

from .cache import PromptCache, StagingKVCache, encode_modules, full_prefill
from .layout import SchemaLayout, Selection, layout
from .pml import escape

__all__ = ["codeqa_documents", "codeqa_schema", "codeqa_prompts", "compare_variants", "VARIANTS", "kl_top1",
           "PERSONAS"]

VARIANTS = ("scaffold", "independent", "naive", "full_schema_pos")
PERSONAS = ("# You review Python code.\n", "# You teach Python to students.\n", "# You write tests.\n")


def codeqa_documents(n_docs: int = 4, min_len: int = 48, max_len: int = 80, seed: int = 0) -> list[dict]:
    """``n_docs`` function snippets (``{"path", "name", "text"}``) from the validation split."""
    from ..models import iter_documents

    rng = random.Random(seed)
    files = list(iter_documents("validation"))
    rng.shuffle(files)
    out, seen = [], set()
    for path, text in files:
        for m in re.finditer(r"^def ([A-Za-z_][A-Za-z0-9_]*)\(", text, flags=re.M):
            name = m.group(1)
            if name in seen or not text[m.start():].isascii():
                continue
            chunk, lines = "", text[m.start():].split("\n")
            for ln in lines:
                if len(chunk) + len(ln) + 1 > max_len:
                    break
                chunk += ln + "\n"
            if len(chunk) >= min_len and "return" in chunk:
                out.append({"path": path, "name": name, "text": chunk})
                seen.add(name)
                break
        if len(out) == n_docs:
            return out
    raise RuntimeError(f"only {len(out)} documents of {min_len}-{max_len} bytes found")


def codeqa_schema(docs: list[dict]) -> str:
    parts = ['<schema name="codeqa">', "<system>Read the code.</system>", '<union scaffold="persona0">']
    parts += [f'<module name="persona{i}">{escape(p)}</module>' for i, p in enumerate(PERSONAS)]
    parts.append("</union>")
    parts += [f'<module name="doc{i}">{escape(d["text"])}</module>' for i, d in enumerate(docs)]
    parts.append('<module name="task"># Answer in <parameter name="style" length="8" scaffold="brief"/> form.\n'
                 "</module></schema>")
    return "".join(parts)


def codeqa_prompts(docs: list[dict], n: int, seed: int = 0) -> list[str]:
    """``n`` prompts: a persona, 2–3 documents, the task with an argument, a question."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice((2, 3))
        pick = sorted(rng.sample(range(len(docs)), k))
        about = docs[rng.choice(pick)]["name"]
        style = rng.choice(("short", "code", "one line"))
        body = f"<persona{rng.randrange(len(PERSONAS))}/>" + "".join(f"<doc{i}/>" for i in pick)
        body += f'<task style="{style}"/>' + escape(f"# Q: what does {about}() return?\n# A:")
        out.append(f'<prompt schema="codeqa">{body}</prompt>')
    return out


def kl_top1(logits: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(p ‖ p_ref) and top-1 agreement; logits ``[m, vocab]``."""
    lp, lr = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
    kl = (lp.exp() * (lp - lr)).sum(-1)
    return kl, (logits.argmax(-1) == ref.argmax(-1)).float()


@torch.no_grad()
def _greedy_with_logits(model, ids: list[int], n_user: int, n: int) -> tuple[list[int], torch.Tensor]:
    """Full recompute (contiguous positions) + ``n`` greedy tokens; returns the answer and the logits
    at the last ``n_user`` prompt tokens and the ``n`` answer tokens (teacher forcing = greedy here)."""
    p = next(model.parameters())
    cache = StagingKVCache.for_model(model.cfg, len(ids) + n, dtype=p.dtype, device=p.device)
    logits = [full_prefill(model, ids, cache=cache)[0, -n_user:]]
    out = [int(logits[0][-1].argmax())]
    for i in range(n):
        x = torch.tensor([[out[-1]]], device=p.device)
        lg = model(x, torch.tensor([[len(ids) + i]], device=p.device), kv_cache=cache)[0]
        logits.append(lg)
        if i < n - 1:
            out.append(int(lg[-1].argmax()))
    return out, torch.cat(logits)


@torch.no_grad()
def compare_variants(model, lay: SchemaLayout | str, prompts: list[str], *, answer_len: int = 8,
                     variants=VARIANTS) -> list[dict]:
    """One record per (prompt, variant): mean KL vs full recompute, top-1 agreement, lengths."""
    lay = layout(lay) if isinstance(lay, str) else lay
    caches = {m: PromptCache(model, lay, store=encode_modules(model, lay, m, "host"))
              for m in ("scaffold", "independent", "naive") if m in variants}
    rows = []
    for pi, src in enumerate(prompts):
        sel = lay.resolve(src)
        ids, pos = sel.full_sequence(lay)
        answer, ref = _greedy_with_logits(model, ids, sel.n_user, answer_len)
        m = sel.n_user + answer_len
        full_ids = ids + answer
        last = pos[-1]
        sel_a: Selection = replace(sel, uncached_ids=sel.uncached_ids + answer,
                                   uncached_pos=sel.uncached_pos + list(range(last + 1, last + 1 + answer_len)),
                                   n_user=m)
        for v in variants:
            if v == "full_schema_pos":
                lg = full_prefill(model, full_ids, pos + list(range(last + 1, last + 1 + answer_len)))[0, -m:]
            else:
                lg = caches[v].prefill(sel_a).logits[0, -m:]
            kl, agree = kl_top1(lg, ref)
            rows.append({"prompt": pi, "variant": v, "kl": float(kl.mean()), "top1": float(agree.mean()),
                         "n_scored": m, "n_tokens": len(full_ids), "max_position": last + answer_len,
                         "modules": ",".join(sel.modules[1:])})
    return rows
