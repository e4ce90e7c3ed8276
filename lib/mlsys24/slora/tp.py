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

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["CommCounter", "column_lora", "row_lora", "mlp_pair_tp", "mlp_pair_ref", "make_pair_weights",
           "shard_pair", "mlp_pair_tp_sharded", "run_tp_check", "run_tp_bench"]


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


def _column_sharded(x, W_i, A_i, B_i, scale, world, comm: CommCounter | None = None, lora: bool = True):
    """Column-parallel on pre-sharded weights: ``W_i [h, d/N]``, ``A_i [h, r/N]``, ``B_i [r, d/N]``."""
    base = x @ W_i
    if not lora:
        return base
    xa = x @ A_i                                                   # [Bt, r/N]
    parts = torch.empty(world * xa.shape[0], xa.shape[1], dtype=xa.dtype, device=xa.device)
    dist.all_gather_into_tensor(parts, xa.contiguous())             # rank-major [N·Bt, r/N]
    xa_full = parts.view(world, xa.shape[0], xa.shape[1]).permute(1, 0, 2).reshape(xa.shape[0], -1)  # [Bt, r]
    if comm is not None:
        comm.add("lora", "all_gather", xa_full.numel())
    return base + scale * (xa_full @ B_i)


def _row_sharded(z, W_i, A_i, B_i, col_lo, scale, comm: CommCounter | None = None, lora: bool = True):
    """Row-parallel on pre-sharded weights: ``W_i [d/N, h]``, ``A_i [d/N, r]``, ``B_i [r, h/N]`` whose
    output columns start at ``col_lo``; returns the full ``[Bt, h]`` output."""
    partial = z @ W_i                                              # [Bt, h] partial sum
    if lora:
        za = z @ A_i                                               # [Bt, r] partial
        dist.all_reduce(za)
        if comm is not None:
            comm.add("lora", "all_reduce", za.numel())
        partial[:, col_lo:col_lo + B_i.shape[1]] += scale * (za @ B_i)   # fused into the final all-reduce
    dist.all_reduce(partial)
    if comm is not None:
        comm.add("base", "all_reduce", partial.numel())
    return partial


def shard_pair(w: dict[str, torch.Tensor], rank: int, world: int) -> dict:
    """This rank's shards of a (column, row) pair, made once (Megatron split of W1/W2, S-LoRA split of
    the factors) plus the first output column its ``B2`` slice writes."""
    h = w["W2"].shape[1]
    return {"W1": _shard(w["W1"], 1, rank, world), "A1": _shard(w["A1"], 1, rank, world),
            "B1": _shard(w["B1"], 1, rank, world), "W2": _shard(w["W2"], 0, rank, world),
            "A2": _shard(w["A2"], 0, rank, world), "B2": _shard(w["B2"], 1, rank, world),
            "col_lo": sum(c.shape[0] for c in torch.arange(h).chunk(world)[:rank])}


def mlp_pair_tp_sharded(x, ws: dict, world: int, scale: float = 1.0, comm: CommCounter | None = None,
                        lora: bool = True):
    """:func:`mlp_pair_tp` on :func:`shard_pair` output; ``lora=False`` is the base model alone
    (Megatron: no collective but the final all-reduce)."""
    z = F.silu(_column_sharded(x, ws["W1"], ws["A1"], ws["B1"], scale, world, comm, lora))
    return _row_sharded(z, ws["W2"], ws["A2"], ws["B2"], ws["col_lo"], scale, comm, lora)


def column_lora(x, W, A, B, scale, rank, world, comm: CommCounter | None = None):
    """Column-parallel ``x W + s·x A B`` -> this rank's ``[Bt, d/N]`` slice."""
    return _column_sharded(x, _shard(W, 1, rank, world), _shard(A, 1, rank, world), _shard(B, 1, rank, world),
                           scale, world, comm)


def row_lora(z, W, A, B, scale, rank, world, comm: CommCounter | None = None):
    """Row-parallel ``z W + s·z A B`` from ``z`` sharded ``[Bt, d/N]`` -> the full ``[Bt, h]`` output."""
    h = W.shape[1]
    lo = sum(c.shape[0] for c in torch.arange(h).chunk(world)[:rank])
    return _row_sharded(z, _shard(W, 0, rank, world), _shard(A, 0, rank, world), _shard(B, 1, rank, world), lo,
                        scale, comm)


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


# ----------------------------------------------------------------------------------------------
# timing on GPUs (NCCL): the cost of the rank-sized LoRA collectives against the base model's own
def _bench_worker(rank: int, world: int, port: int, cfg: dict, q) -> None:
    from mlsys24.bench import CUDAGraphed, measure

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if cfg["backend"] == "nccl":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
        dev, dtype = torch.device("cuda", rank), torch.float16
    else:   # CPU smoke run of the same code (gloo, fp32)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dev, dtype = torch.device("cpu"), torch.float32
    recs = []

    def timed(fn) -> float:
        # every rank times the same calls; the slower rank sets the step
        dist.barrier()
        tm = measure(fn, warmup=cfg["warmup"], repeats=cfg["repeats"], flush_l2=False)
        v = torch.tensor([tm.median_s], device=dev, dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    try:
        h, d = cfg["h"], cfg["d"]
        for r in cfg["ranks"]:
            w = {k: v.to(dev, dtype) for k, v in make_pair_weights(h, d, r, seed=r).items()}
            ws = shard_pair(w, rank, world)
            for bt in cfg["tokens"]:
                x = torch.randn(bt, h, generator=torch.Generator().manual_seed(bt), dtype=torch.float32).to(dev, dtype)
                comm = CommCounter()
                y = mlp_pair_tp_sharded(x, ws, world, 0.5, comm)
                ref = mlp_pair_ref(x.float(), {k: v.float() for k, v in w.items()}, 0.5)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                fns = (("base_tp", lambda: mlp_pair_tp_sharded(x, ws, world, 0.5, lora=False)),
                       ("slora_tp", lambda: mlp_pair_tp_sharded(x, ws, world, 0.5)),
                       ("slora_1gpu", lambda: mlp_pair_ref(x, w, 0.5)))
                t = {name: timed(fn) for name, fn in fns}
                if cfg["backend"] == "nccl":
                    # the same calls captured in CUDA graphs (collectives included), as a serving engine's
                    # decode step runs: device time alone, without the host's launch cost and rank skew
                    for name, fn in fns:
                        dist.barrier()
                        g = CUDAGraphed(fn)
                        t[f"{name}_graph"] = timed(g.replay)
                        del g
                rec = {"h": h, "d": d, "rank": r, "tokens": bt, "world": world, "rel_err": err,
                       "lora_elems": comm.lora_elems, "base_elems": comm.base_elems,
                       "lora_bytes": 2 * comm.lora_elems, "base_bytes": 2 * comm.base_elems,
                       **{f"{k}_us": v * 1e6 for k, v in t.items()}}
                rec["lora_overhead"] = t["slora_tp"] / t["base_tp"] - 1
                rec["tp_speedup_vs_1gpu"] = t["slora_1gpu"] / t["slora_tp"]
                if "slora_tp_graph" in t:
                    rec["lora_overhead_graph"] = t["slora_tp_graph"] / t["base_tp_graph"] - 1
                    rec["tp_speedup_vs_1gpu_graph"] = t["slora_1gpu_graph"] / t["slora_tp_graph"]
                recs.append(rec)
        if rank == 0:
            q.put(recs)
    finally:
        dist.destroy_process_group()


def run_tp_bench(*, world: int | None = None, h: int = 4096, d: int = 11008, ranks=(8, 16, 32, 64),
                 tokens=(1, 16, 64, 256), warmup: int = 10, repeats: int = 50, port: int = 29541,
                 backend: str = "nccl") -> list[dict]:
    """Time one LoRA (column, row) pair of Llama-7B MLP shapes (``h``→``d``→``h``, fp16) on ``world`` GPUs
    with NCCL: the base model alone (Megatron, one all-reduce), with S-LoRA's TP LoRA (two extra
    rank-sized collectives) and the same pair on one GPU. Returns one record per (rank, tokens).
    ``backend="gloo"`` runs the same code on CPU processes (fp32; a smoke test, not a timing)."""
    import multiprocessing as mp

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"run_tp_bench(backend={backend!r}): expected 'nccl' or 'gloo'")
    if backend == "nccl":
        world = world or torch.cuda.device_count()
        if world < 2 or torch.cuda.device_count() < world:
            raise RuntimeError(f"run_tp_bench(world={world}): needs >= 2 CUDA devices, found "
                               f"{torch.cuda.device_count()}")
    elif (world or 2) < 2:
        raise ValueError(f"run_tp_bench(world={world}): expected >= 2 processes")
    world = world or 2
    cfg = {"h": h, "d": d, "ranks": list(ranks), "tokens": list(tokens), "warmup": warmup, "repeats": repeats,
           "backend": backend}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bench_worker, args=(i, world, port, cfg, q)) for i in range(world)]
    for p in procs:
        p.start()
    try:
        recs = q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return recs


def main(argv=None) -> Path:
    """``python -m mlsys24.slora.tp --out DIR``: the NCCL timing, written to ``<device>.tp.json``."""
    from mlsys24.bench import save_results

    ap = argparse.ArgumentParser(prog="python -m mlsys24.slora.tp", description=main.__doc__)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args(argv)
    if a.repeats < 1:
        raise SystemExit(f"--repeats {a.repeats}: expected a positive integer")
    t0 = time.perf_counter()
    recs = run_tp_bench(world=a.world, repeats=a.repeats)
    for r in recs:
        print(f"r={r['rank']:3d} B={r['tokens']:4d}: eager base TP {r['base_tp_us']:7.1f} us  S-LoRA TP "
              f"{r['slora_tp_us']:7.1f} us (+{100 * r['lora_overhead']:5.1f}%)  1 GPU {r['slora_1gpu_us']:7.1f} us | graphs "
              f"{r.get('base_tp_graph_us', float('nan')):7.1f} / {r.get('slora_tp_graph_us', float('nan')):7.1f} us "
              f"(+{100 * r.get('lora_overhead_graph', float('nan')):5.1f}%) 1 GPU {r.get('slora_1gpu_graph_us', float('nan')):7.1f}"
              f" us | LoRA bytes {r['lora_bytes']:>7,d} vs base {r['base_bytes']:>9,d}  rel err {r['rel_err']:.1e}",
              flush=True)
    key = "lora_overhead_graph" if "lora_overhead_graph" in recs[0] else "lora_overhead"
    worst = max(recs, key=lambda r: r[key])
    headline = {"name": "S-LoRA TP LoRA overhead over the base TP pair (worst rank/tokens, "
                        f"{'CUDA graphs' if key.endswith('graph') else 'eager'}), Llama-7B MLP shapes",
                "ours": worst[key], "unit": "fraction", "paper": None,
                "paper_source": "paper Fig. 4 / §6: the LoRA collectives are rank-sized, small against the base all-reduce"}
    path = save_results("slora", recs, headline=headline, out_dir=a.out, suffix="tp",
                        config={"world": recs[0]["world"], "h": 4096, "d": 11008, "dtype": "float16",
                                "repeats": a.repeats, "wall_s": time.perf_counter() - t0})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
