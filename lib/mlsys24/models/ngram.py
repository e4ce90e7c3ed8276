"""Count-based byte 3-gram language models: the baseline the trained model must beat.

Two smoothings, both fitted on the train split only:

- ``"kn"`` — interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount per order,
  ``D = n1 / (n1 + 2 n2)`` from the counts-of-counts::

      P3(c|ab) = max(C(abc) - D3, 0) / C(ab.) + D3 N1+(ab.) / C(ab.) * P2(c|b)
      P2(c|b)  = max(N1+(.bc) - D2, 0) / N1+(.b.) + D2 N1+(b.)' / N1+(.b.) * P1(c)
      P1(c)    = (N1+(.c) + 1) / (N1+(..) + 256)          (continuation counts, add-one)

  where ``N1+(.bc)`` counts distinct bytes seen before ``bc``; an unseen context falls back to the
  lower order.
- ``"add_k"`` — ``(C(abc) + k) / (C(ab.) + 256 k)``.

Scored positions: every byte after the first (position 1 uses the bigram level), the same positions
:func:`mlsys24.models.eval.sliding_window_nll` scores.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ByteTrigram"]

V = 256


def _as_array(data: bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8)


def _discount(counts: np.ndarray) -> float:
    n1 = int((counts == 1).sum())
    n2 = int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.75


class ByteTrigram:
    def __init__(self, method: str = "kn", k: float = 0.1):
        if method not in ("kn", "add_k"):
            raise ValueError("method must be 'kn' or 'add_k'")
        self.method, self.k = method, k

    def fit(self, data: bytes | np.ndarray) -> ByteTrigram:
        x = _as_array(data).astype(np.int64)
        idx = (x[:-2] * V + x[1:-1]) * V + x[2:]
        c3 = np.bincount(idx, minlength=V ** 3).astype(np.int32).reshape(V, V, V)
        self.c3 = c3
        self.c_ab = c3.sum(axis=2, dtype=np.int64)  # C(ab.)
        self.n_ab = (c3 > 0).sum(axis=2)  # N1+(ab.)
        bigram_types = (c3 > 0).sum(axis=0)  # N1+(.bc) [b, c]
        self.n_bc = bigram_types
        self.n_b = bigram_types.sum(axis=1)  # N1+(.b.)
        self.t_b = (bigram_types > 0).sum(axis=1)  # N1+(b.)'
        c2 = np.bincount(x[:-1] * V + x[1:], minlength=V * V).reshape(V, V)
        n_c = (c2 > 0).sum(axis=0)  # N1+(.c)
        self.p1 = (n_c + 1.0) / (n_c.sum() + V)
        self.d3 = _discount(c3)
        self.d2 = _discount(bigram_types)
        return self

    def _p2(self, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        nb = self.n_b[b].astype(np.float64)
        safe = np.maximum(nb, 1)
        p = (np.maximum(self.n_bc[b, c] - self.d2, 0) + self.d2 * self.t_b[b] * self.p1[c]) / safe
        return np.where(nb > 0, p, self.p1[c])

    def prob(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        """P(c | a b) for arrays of byte values."""
        cab = self.c_ab[a, b].astype(np.float64)
        safe = np.maximum(cab, 1)
        if self.method == "add_k":
            return (self.c3[a, b, c] + self.k) / (cab + V * self.k)
        p2 = self._p2(b, c)
        p = (np.maximum(self.c3[a, b, c] - self.d3, 0) + self.d3 * self.n_ab[a, b] * p2) / safe
        return np.where(cab > 0, p, p2)

    def nll(self, data: bytes | np.ndarray) -> np.ndarray:
        """Per-byte negative log-likelihood (nats) of bytes 1..N-1."""
        x = _as_array(data).astype(np.int64)
        if len(x) < 2:
            return np.zeros(0)
        first = -np.log(self._p2(x[:1], x[1:2])) if self.method == "kn" else \
            -np.log((self.c_ab[x[0], x[1]] + self.k) / (self.c_ab[x[0]].sum() + V * self.k))[None]
        rest = -np.log(self.prob(x[:-2], x[1:-1], x[2:]))
        return np.concatenate([np.atleast_1d(first), rest])

    def evaluate(self, data: bytes | np.ndarray) -> dict:
        nll = self.nll(data)
        loss = float(nll.mean())
        return {"method": self.method, "n_tokens": int(nll.size), "loss": loss, "ppl": math.exp(loss),
                "bpb": loss / math.log(2)}

    def sample(self, prompt: bytes, n: int, seed: int = 0) -> bytes:
        """Sample ``n`` bytes after ``prompt`` (shows what a 3-gram 'writes')."""
        rng = np.random.default_rng(seed)
        out = bytearray(prompt)
        cs = np.arange(V)
        for _ in range(n):
            a, b = (out[-2], out[-1]) if len(out) >= 2 else (0, out[-1] if out else 0)
            p = self.prob(np.full(V, a), np.full(V, b), cs)
            out.append(int(rng.choice(V, p=p / p.sum())))
        return bytes(out[len(prompt):])
