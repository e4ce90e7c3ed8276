"""GPU benchmark for L-GreCo: data-parallel step time and bytes for uncompressed / uniform PowerSGD / L-GreCo.

``PYTHONPATH=lib python3 -m mlsys24.bench lgreco [--quick] [--out DIR] [-- --transports socket,default]``

On a machine with >= 2 CUDA GPUs: one process per GPU (NCCL), for each transport
- ``socket``: NCCL over loopback TCP sockets (``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1
  NCCL_SOCKET_IFNAME=lo``, one socket on one thread), a bandwidth-limited link where compression matters;
- ``default``: NCCL's own choice (NVLink/P2P on an H100 box), where it usually does not;
and for each model
- ``gpt2``: a GPT-2-small-shaped decoder (12 layers, d=768, 12 heads, vocab 50257, untied head) on
  random tokens (batch 4 × 256), bf16 autocast, PowerSGD base rank r0 = 32 (the authors' Transformer setting);
- ``resnet18``: a CIFAR-style ResNet-18 on random 32×32 images, r0 = 4 (reported only).

Per (transport, model, scheme): median step time (fwd + bwd + hook + SGD step) with
``mlsys24.bench.measure``, the no-communication step time (``DDP.no_sync``: compute only), the
measured time of the all-reduces the scheme issues (its pure communication), bytes per step, and
the per-layer ranks L-GreCo chose. Without 2 GPUs it runs a tiny config on CPU with gloo (a smoke
test of the same code path; its numbers are not GPU numbers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .compressors import CompressionState, PowerSGD, layerwise_compression_hook
from .lgreco import LGreCoTuner
from .train import free_port

__all__ = ["run", "GPT", "ResNet18", "BenchConfig"]

PAPER_SPEEDUP = 2.5          # abstract: "up to 2.5x training speedup" (their GPUs/links; not this setup)
PAPER_COMPRESSION = 5.0      # abstract: "up to 5x compression improvement"

# NCCL over loopback TCP with one socket on one thread: a bandwidth-limited link (stated with the results).
SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1",
              "NCCL_SOCKET_IFNAME": "lo", "NCCL_NET": "Socket", "NCCL_SOCKET_NTHREADS": "1",
              "NCCL_NSOCKS_PERTHREAD": "1"}


# ----------------------------------------------------------------------------------------------
# Models (plain torch, so the GPU machine needs nothing else)
# ----------------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):                                          # x: [B, T, d]
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, d/heads]
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-shaped decoder: token + position embeddings, ``layers`` pre-LN blocks, untied LM head."""

    def __init__(self, vocab: int = 50257, d: int = 768, layers: int = 12, heads: int = 12, max_len: int = 1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):                                        # idx: [B, T] int64
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))                               # [B, T, vocab]


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.short(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, widths w, 2w, 4w, 8w; w = 64 is the standard one)."""

    def __init__(self, classes: int = 100, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            layers += [_Basic(cin, cout, 1 if i == 0 else 2), _Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):                                          # x: [B, 3, 32, 32]
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    name: str
    r0: int
    batch: int
    seq: int = 0                     # tokens per sample (GPT) or 0
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return GPT(**self.kwargs) if self.name.startswith("gpt") else ResNet18(**self.kwargs)

    def batch_on(self, device, gen: torch.Generator):
        if self.name.startswith("gpt"):
            vocab = self.kwargs.get("vocab", 50257)
            x = torch.randint(0, vocab, (self.batch, self.seq + 1), generator=gen).to(device)
            return x[:, :-1], x[:, 1:]
        classes = self.kwargs.get("classes", 100)
        return (torch.randn(self.batch, 3, 32, 32, generator=gen).to(device),
                torch.randint(0, classes, (self.batch,), generator=gen).to(device))

    def loss(self, model, xb, yb):
        # bf16 autocast on GPUs (as the authors' AMP runs); parameters and gradients stay fp32.
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=xb.device.type == "cuda"):
            out = model(xb)
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), yb.reshape(-1))


@dataclass
class BenchConfig:
    models: list[ModelSpec]
    schemes: tuple = ("none", "uniform", "lgreco")
    warmup_iters: int = 10           # uncompressed iterations before compression starts
    adjust_freq: int = 10            # L-GreCo re-tunes at iterations 10, 20, ...
    acc_iters: int = 5
    pre_iters: int = 25              # iterations run before timing (re-tunes at 10 and 20 happen)
    repeats: int = 10
    alpha: float = 1.0
    buckets: int = 10_000
    error_method: str = "svd"        # exact tail-energy errors: one svdvals per layer at a re-tune
    lr: float = 1e-4


def _configs(quick: bool, gpu: bool) -> BenchConfig:
    if not gpu:        # CPU smoke test: the same code path at toy sizes
        return BenchConfig(models=[ModelSpec("gpt2-tiny", 4, 2, 16, dict(vocab=256, d=64, layers=2, heads=4,
                                                                           max_len=64)),
                                   ModelSpec("resnet18-tiny", 2, 4, 0, dict(classes=10, width=8))],
                           warmup_iters=4, adjust_freq=4, acc_iters=2, pre_iters=10, repeats=3)
    if quick:
        return BenchConfig(models=[ModelSpec("gpt2-4layer", 32, 4, 256, dict(layers=4)),
                                   ModelSpec("resnet18", 4, 64, 0, {})],
                           warmup_iters=6, adjust_freq=6, acc_iters=3, pre_iters=14, repeats=5)
    return BenchConfig(models=[ModelSpec("gpt2", 32, 4, 256, {}), ModelSpec("resnet18", 4, 128, 0, {})])


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------

def _bench_scheme(spec: ModelSpec, cfg: BenchConfig, scheme: str, rank: int, device) -> dict:
    from mlsys24.bench import measure

    dev = device if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    model = spec.build().to(device)
    comp = None if scheme == "none" else PowerSGD(error_method=cfg.error_method)
    tuner = LGreCoTuner(cfg.alpha, cfg.buckets, cfg.adjust_freq, cfg.acc_iters) if scheme == "lgreco" else None
    state = CompressionState(model, comp, None if comp is None else spec.r0, warmup_iters=cfg.warmup_iters,
                             tuner=tuner)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(state, layerwise_compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [spec.batch_on(device, gen) for _ in range(4)]
    it = [0]

    def step(sync: bool = True):
        xb, yb = batches[it[0] % len(batches)]
        it[0] += 1
        opt.zero_grad(set_to_none=True)
        if sync:
            spec.loss(ddp, xb, yb).backward()
        else:
            with ddp.no_sync():                       # no hook, no communication: compute only
                spec.loss(ddp, xb, yb).backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(cfg.pre_iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    pre_s = time.perf_counter() - t0
    state.freeze_tuning = True
    t_step = measure(step, warmup=2, repeats=cfg.repeats, flush_l2=False, device=dev)
    t_compute = measure(lambda: step(False), warmup=1, repeats=cfg.repeats, flush_l2=False, device=dev)
    last = state.history[-1]
    # Pure communication: the same all-reduce messages as the last step, timed alone.
    msgs = _last_messages(state, last)
    bufs = [torch.ones(max(1, n // 4), device=device) for n in msgs]

    def comm():
        for b in bufs:
            dist.all_reduce(b)

    t_comm = measure(comm, warmup=1, repeats=cfg.repeats, flush_l2=False, device=dev)
    slots = state.compressed_layers
    ev = tuner.events[-1] if tuner is not None and tuner.events else None
    return dict(
        model=spec.name, scheme=scheme, r0=spec.r0 if comp is not None else None, batch=spec.batch,
        seq=spec.seq, params=sum(p.numel() for p in model.parameters()),
        step_ms=t_step.median_ms, step_p10_ms=t_step.p10_s * 1e3, step_p90_ms=t_step.p90_s * 1e3,
        compute_ms=t_compute.median_ms, comm_ms=t_comm.median_ms,
        comm_share=t_comm.median_s / t_step.median_s,
        exchange_share=max(0.0, 1 - t_compute.median_s / t_step.median_s),
        bytes_per_step=last.allreduce_bytes + last.allgather_bytes, collectives=last.collectives,
        messages_bytes=msgs, pre_iters_s=pre_s,
        ranks=[s.choice for s in slots], layer_names=[s.name for s in slots],
        layer_shapes=[list(s.shape) for s in slots],
        retunes=len(tuner.events) if tuner is not None else 0,
        budget=ev.budget if ev else None, chosen_error=ev.chosen_error if ev else None,
        uniform_words=ev.uniform_size if ev else None, chosen_words=ev.chosen_size if ev else None,
        table_ms=ev.table_ms if ev else None, solve_ms=ev.solve_ms if ev else None,
    )


def _bench_model(spec: ModelSpec, cfg: BenchConfig, rank: int, world: int, device) -> list[dict]:
    recs = []
    for scheme in cfg.schemes:
        recs.append(_bench_scheme(spec, cfg, scheme, rank, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["scheme"]: r for r in recs}
    for r in recs:
        r["speedup_vs_none"] = base["none"]["step_ms"] / r["step_ms"] if "none" in base else None
        r["speedup_vs_uniform"] = base["uniform"]["step_ms"] / r["step_ms"] if "uniform" in base else None
    return recs


def _last_messages(state: CompressionState, last) -> list[int]:
    """All-reduce message sizes (bytes) of the last step, in the order the hook issued them."""
    return [n for kind, n in last.messages if kind == "allreduce"]


def _worker(rank: int, world: int, port: int, backend: str, cfg: BenchConfig, out_path: str, timeout_s: float):
    status = 0
    try:
        torch.set_num_threads(1 if backend == "gloo" else max(1, (os.cpu_count() or 2) // world))
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        recs = []
        for spec in cfg.models:
            recs += _bench_model(spec, cfg, rank, world, device)
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(recs, f)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        traceback.print_exc()
        status = 1
    os._exit(status)


def _spawn(cfg: BenchConfig, world: int, backend: str, env: dict, timeout_s: float) -> list[dict]:
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "recs.pkl")
            ctx = mp.start_processes(_worker, args=(world, free_port(), backend, cfg, out, timeout_s), nprocs=world,
                                     join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s + 60
            try:
                while not ctx.join(timeout=0.5):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"benchmark workers still running after {timeout_s + 60:.0f} s")
            except Exception:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise
            with open(out, "rb") as f:
                return pickle.load(f)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse_extra(extra) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lgreco bench")
    p.add_argument("--transports", default=None, help="comma list of socket,default (GPU) [socket,default]")
    p.add_argument("--models", default=None, help="comma list of model names to keep (e.g. gpt2)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--force-cpu", action="store_true", help="run the CPU/gloo smoke config even with GPUs")
    p.add_argument("--r0", default=None,
                   help="comma list of PowerSGD base ranks for the GPT model, one run each (e.g. 32,256; a "
                        "large r0 makes the uncompressed-ish traffic, hence the communication share, larger)")
    return p.parse_args([a for a in (extra or []) if a != "--"])


def run(args) -> Path:
    """Entry point of ``python -m mlsys24.bench lgreco``; returns the results file written."""
    from mlsys24.bench import save_results

    opts = _parse_extra(getattr(args, "extra", None))
    quick = bool(getattr(args, "quick", False))
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= opts.world and not opts.force_cpu
    cfg = _configs(quick, gpu)
    if opts.models:
        keep = set(opts.models.split(","))
        cfg.models = [m for m in cfg.models if m.name in keep or m.name.split("-")[0] in keep]
    if opts.r0:
        try:
            r0s = [int(v) for v in opts.r0.split(",")]
        except ValueError:
            raise SystemExit(f"--r0 {opts.r0!r}: expected a comma list of positive integers") from None
        if not r0s or min(r0s) < 1:
            raise SystemExit(f"--r0 {opts.r0!r}: expected a comma list of positive integers")
        models = []
        for m in cfg.models:
            if m.name.startswith("gpt"):
                models += [replace(m, r0=r, name=m.name if i == 0 else f"{m.name}-r{r}") for i, r in enumerate(r0s)]
            else:
                models.append(m)
        cfg.models = models
    backend = "nccl" if gpu else "gloo"
    transports = (opts.transports.split(",") if opts.transports else ["socket", "default"]) if gpu else ["gloo-loopback"]
    records = []
    for tr in transports:
        env = dict(SOCKET_ENV) if tr == "socket" else {}
        t0 = time.perf_counter()
        recs = _spawn(cfg, opts.world, backend, env, opts.timeout)
        for r in recs:
            r.update(transport=tr, world=opts.world, backend=backend,
                     nccl_env=" ".join(f"{k}={v}" for k, v in env.items()) or None)
        records += recs
        print(f"[lgreco bench] transport={tr}: {len(recs)} records in {time.perf_counter() - t0:.0f} s", flush=True)
        for r in recs:
            print(f"  {r['model']:<14} {r['scheme']:<8} step {r['step_ms']:8.2f} ms  compute {r['compute_ms']:8.2f} ms"
                  f"  comm {r['comm_ms']:8.2f} ms ({100 * r['comm_share']:.0f}%)  bytes/step {r['bytes_per_step']:>12,d}"
                  f"  x{r['speedup_vs_uniform'] or float('nan'):.2f} vs uniform", flush=True)
    headline = None
    main = [r for r in records if r["model"].startswith("gpt2") and r["scheme"] == "lgreco"
            and r["transport"] in ("socket", "gloo-loopback")]
    if main:
        r = max(main, key=lambda r: r["r0"])   # the most communication-bound GPT run
        headline = dict(name=f"L-GreCo step-time speedup over uniform PowerSGD (r0={r['r0']}), {r['model']}, "
                             f"{r['world']} workers, {r['transport']}",
                        ours=r["speedup_vs_uniform"], paper=PAPER_SPEEDUP, unit="x",
                        baseline="uniform PowerSGD at the same r0")
    config = dict(quick=quick, gpu=gpu, transports=transports, world=opts.world, schemes=list(cfg.schemes),
                  warmup_iters=cfg.warmup_iters, adjust_freq=cfg.adjust_freq, acc_iters=cfg.acc_iters,
                  pre_iters=cfg.pre_iters, repeats=cfg.repeats, alpha=cfg.alpha, buckets=cfg.buckets,
                  error_method=cfg.error_method, models=[asdict(m) for m in cfg.models])
    out_dir = getattr(args, "out", None)
    return save_results("lgreco", records, headline=headline, config=config, out_dir=out_dir)

