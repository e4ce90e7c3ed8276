"""Calibration and evaluation text from the committed corpus (never the running interpreter's stdlib).

- :func:`calibration_ids` — byte windows of the **train** split for the tiny Llama (AWQ's official
  recipe concatenates Pile samples and cuts 512-token blocks; here: bytes of Python source).
- :func:`docstrings` — docstrings of the corpus's files (``ast``), e.g. texts for the MiniLM encoder:
  calibration from the train split, evaluation from the validation split.
"""

from __future__ import annotations

import ast

import torch

__all__ = ["calibration_ids", "docstrings"]


def calibration_ids(n_blocks: int = 16, seqlen: int = 256, seed: int = 0, split: str = "train") -> torch.Tensor:
    """``[n_blocks, seqlen]`` byte ids: windows at seeded random offsets of ``split``'s byte stream."""
    from mlsys24.models import load_split_bytes

    data = load_split_bytes(split)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seqlen, (n_blocks,), generator=g).tolist()
    return torch.tensor([list(data[s: s + seqlen]) for s in starts], dtype=torch.long)


def docstrings(split: str, n: int, *, min_chars: int = 40, max_chars: int = 600) -> list[str]:
    """The first ``n`` docstrings (module, class, function; in file order, files in path order) of
    ``split`` with at least ``min_chars`` characters, each cut to ``max_chars``."""
    from mlsys24.models import iter_documents

    out: list[str] = []
    for _, text in iter_documents(split):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc[:max_chars])
                    if len(out) >= n:
                        return out
    return out
