"""Vidur's operator profiler (Agrawal et al., MLSys 2024, §4.2): time each operator of one decoder
layer in isolation over a grid of input sizes and write a tidy table (one row per measurement).

Operator triage, as in Vidur, but with the shapes *this* engine executes. The serving engine runs a
right-padded ragged batch ``[B, T]`` (B rows, T = the longest row's new tokens), so:

- token-level ops see ``num_tokens = B·T`` tokens: ``rms_norm`` (input / post-attention / final),
  ``attn_pre_proj`` (q, k, v), ``attn_rope``, ``attn_post_proj`` (o), ``add`` (residual),
  ``mlp_up_proj`` (gate, up), ``mlp_act`` (silu · up), ``mlp_down_proj``; ``kv_save`` (the paged-cache
  write) sees only the valid tokens;
- ``attention`` (the engine's paged SDPA: gather of K/V from the block pool, ragged causal mask,
  attention) depends on ``(B, T, S)`` with ``S`` the longest K/V length after the step; ``T = 1`` is a
  decode batch, ``T > 1`` a prefill/mixed batch (Vidur's prefill features ``Σk, Σp²`` and decode
  features ``(batch, mean kv)`` collapse to this for a padded engine);
- ``lm_head`` runs once per step on the rows that sample a token.

Each row: ``op, num_tokens, batch, q_len, kv_len, median_us, p10_us, p90_us`` (unused features 0).
Timing uses :func:`mlsys24.bench.measure` (CUDA events and L2 flush on GPU, perf_counter on CPU).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..bench import measure
from ..models.attention import AttentionCall, sdpa_attention
from ..models.config import LlamaConfig
from ..models.kv_cache import PagedKVCache
from ..models.llama import LlamaBlock, apply_rope

__all__ = ["TOKEN_OPS", "ALL_OPS", "ProfileGrid", "profile_operators", "write_csv", "read_csv", "tp_shard"]

TOKEN_OPS = ("rms_norm", "attn_pre_proj", "attn_rope", "attn_post_proj", "add", "mlp_up_proj", "mlp_act",
             "mlp_down_proj", "kv_save")
ALL_OPS = TOKEN_OPS + ("attention", "lm_head")
FIELDS = ("op", "num_tokens", "batch", "q_len", "kv_len", "median_us", "p10_us", "p90_us")


def tp_shard(cfg: LlamaConfig, tp: int) -> LlamaConfig:
    """The per-GPU layer shapes under tensor parallelism ``tp`` (Megatron split of heads and FFN)."""
    if cfg.n_heads % tp or cfg.n_kv_heads % tp or cfg.ffn_dim % tp:
        raise ValueError(f"tp={tp} must divide heads {cfg.n_heads}, kv heads {cfg.n_kv_heads}, ffn {cfg.ffn_dim}")
    return LlamaConfig(**{**cfg.to_dict(), "n_heads": cfg.n_heads // tp, "n_kv_heads": cfg.n_kv_heads // tp,
                          "head_dim": cfg.head_dim_, "ffn_dim": cfg.ffn_dim // tp})


def _logspace_ints(lo: int, hi: int, n: int) -> list[int]:
    return sorted({int(round(x)) for x in np.geomspace(lo, hi, n)})


@dataclass
class ProfileGrid:
    """Which input sizes to time. Defaults: the CPU smoke grid of the tiny Llama."""

    num_tokens: list[int] = field(default_factory=lambda: _logspace_ints(1, 1024, 24))
    decode_batch: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    decode_kv: list[int] = field(default_factory=lambda: [16, 64, 256, 512, 1024])
    prefill_batch: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    prefill_q: list[int] = field(default_factory=lambda: [16, 64, 128, 256])
    prefill_prefix: list[int] = field(default_factory=lambda: [0, 256])
    lm_rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    warmup: int = 2
    repeats: int = 5

    @classmethod
    def gpu(cls, max_batch: int = 128, max_kv: int = 2048, max_tokens: int = 8192) -> ProfileGrid:
        return cls(num_tokens=_logspace_ints(1, max_tokens, 40),
                   decode_batch=[b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch],
                   decode_kv=[k for k in (64, 128, 256, 512, 1024, 2048, 4096) if k <= max_kv],
                   prefill_batch=[1, 2, 4, 8, 16, 32, 64],
                   prefill_q=[16, 32, 64, 128, 256, 512, 1024],
                   prefill_prefix=[0, 256, 1024],
                   lm_rows=[b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch],
                   warmup=3, repeats=10)


def _row(op, t, num_tokens=0, batch=0, q_len=0, kv_len=0) -> dict:
    return {"op": op, "num_tokens": num_tokens, "batch": batch, "q_len": q_len, "kv_len": kv_len,
            "median_us": t.median_s * 1e6, "p10_us": t.p10_s * 1e6, "p90_us": t.p90_s * 1e6}


def _paged_batch(cfg: LlamaConfig, B: int, T: int, S: int, block_size: int, dtype, device) -> PagedKVCache:
    """A one-layer paged cache holding B sequences of ``S - T`` tokens, set up for a step of T tokens."""
    n_blocks = B * math.ceil(S / block_size) + 1
    cache = PagedKVCache(1, n_blocks, block_size, cfg.n_kv_heads, cfg.head_dim_, dtype=dtype, device=device)
    for b in range(B):
        cache.add_sequence(b)
        cache.reserve(b, S - T)
        cache.lengths[b] = S - T
    cache.set_batch(list(range(B)))
    cache.begin(torch.full((B,), T, dtype=torch.long))
    return cache


@torch.no_grad()
def profile_operators(cfg: LlamaConfig, grid: ProfileGrid | None = None, *, device="cpu",
                      dtype: torch.dtype = torch.float32, block_size: int = 16, seed: int = 0,
                      progress: bool | None = None) -> list[dict]:
    """Time every operator of one layer of ``cfg`` over ``grid``; returns tidy rows (see module doc)."""
    from ..progress import progress_bar

    grid = grid or ProfileGrid()
    dev = torch.device(device)
    torch.manual_seed(seed)
    blk = LlamaBlock(cfg, 0).to(device=dev, dtype=dtype).eval()
    att = blk.self_attn
    d, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    lm_head = torch.nn.Linear(d, cfg.vocab_size, bias=False).to(device=dev, dtype=dtype)
    rows: list[dict] = []
    kw = {"warmup": grid.warmup, "repeats": grid.repeats}
    n_att = (len(grid.decode_batch) * len(grid.decode_kv)
             + len(grid.prefill_batch) * len(grid.prefill_q) * len(grid.prefill_prefix))
    bar = progress_bar(len(grid.num_tokens) + n_att + len(grid.lm_rows), desc="profile", enabled=progress)

    for n in grid.num_tokens:
        x = torch.randn(1, n, d, device=dev, dtype=dtype)
        h = blk.input_layernorm(x)
        q = torch.randn(1, n, H, hd, device=dev, dtype=dtype)
        k = torch.randn(1, n, KV, hd, device=dev, dtype=dtype)
        cos, sin = att.rotary(torch.arange(n, device=dev)[None])
        o_in = torch.randn(1, n, H * hd, device=dev, dtype=dtype)
        g = torch.randn(1, n, cfg.ffn_dim, device=dev, dtype=dtype)
        mlp = blk.mlp
        ops = {
            "rms_norm": lambda: blk.input_layernorm(x),
            "attn_pre_proj": lambda: (att.q_proj(h), att.k_proj(h), att.v_proj(h)),
            "attn_rope": lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
            "attn_post_proj": lambda: att.o_proj(o_in),
            "add": lambda: x + h,
            "mlp_up_proj": lambda: (mlp.gate_proj(h), mlp.up_proj(h)),
            "mlp_act": lambda: F.silu(g) * g,
            "mlp_down_proj": lambda: mlp.down_proj(g),
        }
        for name, fn in ops.items():
            rows.append(_row(name, measure(fn, **kw), num_tokens=n))
        cache = _paged_batch(cfg, 1, n, n, block_size, dtype, dev)
        kv_new = torch.randn(1, n, KV, hd, device=dev, dtype=dtype)
        rows.append(_row("kv_save", measure(lambda: cache.update(0, kv_new, kv_new), **kw), num_tokens=n))

        bar.update(1)

    shapes = [(B, 1, S) for B in grid.decode_batch for S in grid.decode_kv]
    shapes += [(B, T, T + P) for B in grid.prefill_batch for T in grid.prefill_q for P in grid.prefill_prefix]
    for B, T, S in shapes:
        cache = _paged_batch(cfg, B, T, S, block_size, dtype, dev)
        q = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
        k = torch.randn(B, T, KV, hd, device=dev, dtype=dtype)
        cache.update(0, k, k)
        call = AttentionCall(q=q, k_new=k, v_new=k, q_offsets=cache.q_offsets, kv_lens=cache.kv_lens, layer=0,
                             scale=att.scale, cache=cache)
        rows.append(_row("attention", measure(lambda: sdpa_attention(call), **kw), num_tokens=B * T, batch=B,
                         q_len=T, kv_len=S))

        bar.update(1)

    for R in grid.lm_rows:
        hR = torch.randn(R, d, device=dev, dtype=dtype)
        rows.append(_row("lm_head", measure(lambda: lm_head(hR), **kw), num_tokens=R, batch=R))
        bar.update(1)
    bar.close()
    return rows


def write_csv(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.3f}" if isinstance(r[k], float) else r[k]) for k in FIELDS})
    return path


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: (v if k == "op" else (float(v) if k.endswith("_us") else int(v))) for k, v in r.items()}
                for r in csv.DictReader(f)]
