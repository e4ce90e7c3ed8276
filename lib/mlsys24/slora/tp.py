"""S-LoRA's tensor-parallel LoRA layout (paper §6, Fig. 4) on ``torch.distributed``.

The base model follows Megatron-LM: ``W1 [h, d]`` column-split, ``W2 [d, h]`` row-split over N ranks.
The LoRA factors are split so that every extra collective is *rank-sized* (B tokens):

- column-parallel ``x W1 + s·x A1 B1``: ``A1 [h, r]`` split by columns -> ``x A1_i`` is ``[B, r/N]``;
  **all-gather** -> ``[B, r]``; ``B1 [r, d]`` split by columns like W1 -> ``[B, d/N]``, added to the base
  shard. Extra traffic: ``B·r`` elements (the gathered result).
- row-parallel ``z W2 + s·z A2 B2`` with ``z`` sharded ``[B, d/N]``: ``A2 [d, r]`` split by rows ->
  partial ``[B, r]``; **all-reduce** -> ``[B, r]``; ``B2 [r, h]`` split by columns -> ``[B, h/N]``, written
  into this rank's columns of the base partial sum *before* the base model's final all-reduce (which
  then also assembles the LoRA output: no separate all-gather). Extra traffic: ``B·r``.

So LoRA on q, k, v (column) and o (row) adds ``4·B·r`` per layer, and an MLP pair ``2·B·r``, against the
base all-reduce of ``B·h``. :class:`CommCounter` records the elements of every LoRA collective.

:func:`mlp_pair_tp` / :func:`mlp_pair_ref` are one (column, row) pair with LoRA on both, e.g. q -> o or
up -> down (the nonlinearity between them is elementwise, so it runs on shards unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["CommCounter", "column_lora", "row_lora", "mlp_pair_tp", "mlp_pair_ref", "make_pair_weights",
           "run_tp_check"]


@dataclass
class CommCounter:
    lora_elems: int = 0
    base_elems: int = 0
    log: list = field(default_factory=list)

    def add(self, kind: str, what: str, n: int) -> None:
        if kind == "lora":
            self.lora_elems += n
        else:
            self.base_elems += n
        self.log.append((kind, what, n))


def _shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=dim)[rank].contiguous()


def column_lora(x, W, A, B, scale, rank, world, comm: CommCounter | None = None):
    """Column-parallel ``x W + s·x A B`` -> this rank's ``[Bt, d/N]`` slice."""
    base = x @ _shard(W, 1, rank, world)
    xa = x @ _shard(A, 1, rank, world)                             # [Bt, r/N]
    parts = [torch.empty_like(xa) for _ in range(world)]
    dist.all_gather(parts, xa)
    xa_full = torch.cat(parts, dim=1)                              # [Bt, r]
    if comm is not None:
        comm.add("lora", "all_gather", xa_full.numel())
    return base + scale * (xa_full @ _shard(B, 1, rank, world))


def row_lora(z, W, A, B, scale, rank, world, comm: CommCounter | None = None):
    """Row-parallel ``z W + s·z A B`` from ``z`` sharded ``[Bt, d/N]`` -> the full ``[Bt, h]`` output."""
    partial = z @ _shard(W, 0, rank, world)                        # [Bt, h] partial sum
    za = z @ _shard(A, 0, rank, world)                             # [Bt, r] partial
    dist.all_reduce(za)
    if comm is not None:
        comm.add("lora", "all_reduce", za.numel())
    out_cols = _shard(B, 1, rank, world)                           # [r, h/N]
    h = W.shape[1]
    lo = sum(c.shape[0] for c in torch.arange(h).chunk(world)[:rank])
    partial[:, lo:lo + out_cols.shape[1]] += scale * (za @ out_cols)   # fused into the final all-reduce
    dist.all_reduce(partial)
    if comm is not None:
        comm.add("base", "all_reduce", partial.numel())
    return partial


def make_pair_weights(h: int, d: int, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(h, d, generator=g) / h**0.5, "A1": torch.randn(h, r, generator=g) / h**0.5,
            "B1": torch.randn(r, d, generator=g) * 0.1, "W2": torch.randn(d, h, generator=g) / d**0.5,
            "A2": torch.randn(d, r, generator=g) / d**0.5, "B2": torch.randn(r, h, generator=g) * 0.1}


def mlp_pair_ref(x, w, scale: float = 1.0):
    """Single-process ``silu(x W1 + s x A1 B1) W2 + s (...) A2 B2``."""
    z = F.silu(x @ w["W1"] + scale * (x @ w["A1"]) @ w["B1"])
    return z @ w["W2"] + scale * (z @ w["A2"]) @ w["B2"]


def mlp_pair_tp(x, w, rank: int, world: int, scale: float = 1.0, comm: CommCounter | None = None):
    z = F.silu(column_lora(x, w["W1"], w["A1"], w["B1"], scale, rank, world, comm))
    return row_lora(z, w["W2"], w["A2"], w["B2"], scale, rank, world, comm)


def _worker(rank: int, world: int, port: int, shapes: tuple[int, int, int, int], q) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        Bt, h, d, r = shapes
        w = make_pair_weights(h, d, r)
        x = torch.randn(Bt, h, generator=torch.Generator().manual_seed(1))
        comm = CommCounter()
        y = mlp_pair_tp(x, w, rank, world, 0.5, comm)
        q.put((rank, y.numpy(), comm.lora_elems, comm.base_elems, comm.log))   # numpy: no shared-memory fd
    finally:
        dist.destroy_process_group()


def run_tp_check(world: int = 2, *, tokens: int = 5, h: int = 64, d: int = 96, r: int = 8, port: int = 29531,
                 start_method: str = "fork") -> dict:
    """Start ``world`` gloo processes on CPU (forked: no re-import; "spawn" also works), run one LoRA column/row pair, compare with one process.

    Returns max abs error per rank, the LoRA elements each rank's collectives carried, and the expected
    ``2·B·r`` (one column-parallel + one row-parallel projection)."""
    import multiprocessing as mp

    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, world, port, (tokens, h, d, r), q)) for i in range(world)]
    for p in procs:
        p.start()
    res = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    w = make_pair_weights(h, d, r)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(1))
    ref = mlp_pair_ref(x, w, 0.5)
    res.sort(key=lambda t: t[0])
    return {"max_abs_err": [float((torch.from_numpy(y) - ref).abs().max()) for _, y, *_ in res],
            "lora_elems": [c for _, _, c, _, _ in res], "base_elems": [b for _, _, _, b, _ in res],
            "expected_lora_elems": 2 * tokens * r, "base_allreduce_elems": tokens * h,
            "log": res[0][4], "exitcodes": [p.exitcode for p in procs]}
