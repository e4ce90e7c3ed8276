"""Data-parallel training with layer-wise gradient compression on ``torch.distributed``.

- CPU: ``backend="gloo"``, ``world_size`` processes started with ``torch.multiprocessing`` (spawn),
  one thread each. GPU: ``backend="nccl"``, one process per GPU.
- Task: a small CNN on scikit-learn's bundled digits (8×8 images; a fixed stratified 80/20 split,
  the 20 % held out for accuracy). Layers conv 1→32, conv 32→64, conv 64→64, FC 1024→256,
  FC 256→10: deliberately heterogeneous shapes for per-layer compression.
- Schemes: ``"none"`` (uncompressed all-reduce through the same hook, bytes counted),
  ``"uniform"`` (one parameter c0 for every layer), ``"lgreco"`` (per-layer parameters re-tuned by
  the DP every ``adjust_freq`` iterations).

:func:`run_distributed` runs a list of :class:`RunConfig` inside ONE set of worker processes (process
start-up dominates on CPU), plus a calibration of the step-time model: local compute time, gloo
all-reduce time vs message size, and per-scheme codec time, all timed with ``mlsys24.bench.measure``.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .compressors import (
    CompressionState,
    FlatBucket,
    PowerSGD,
    layerwise_compression_hook,
    make_compressor,
    powersgd_allreduce_ref,
    shared_randn,
)
from .lgreco import LGreCoTuner, codec_fn

__all__ = ["DigitsCNN", "load_digits_split", "RunConfig", "HookCheck", "run_distributed", "free_port", "train_one",
           "hook_check"]


class DigitsCNN(nn.Module):
    """conv(1→32) → pool → conv(32→64) → conv(64→64) → FC(1024→256) → FC(256→10). Input [B, 1, 8, 8].

    The card's layer shapes (its version upsamples the digits to 16×16 and pools twice); here the
    native 8×8 images are pooled once, which keeps every weight shape and costs ~1.8× fewer FLOPs.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):                                       # x: [B, 1, 8, 8]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)              # [B, 32, 4, 4]
        x = F.relu(self.conv2(x))                               # [B, 64, 4, 4]
        x = F.relu(self.conv3(x))                               # [B, 64, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))                      # [B, 256]
        return self.fc2(x)                                      # [B, 10]


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0):
    """(x_train [N,1,8,8], y_train, x_test, y_test): sklearn digits in [-1, 1], stratified fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0     # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=split_seed,
                                      stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


@dataclass
class RunConfig:
    """One training run (every rank gets the same config)."""

    scheme: str = "lgreco"          # "none" | "uniform" | "lgreco"
    family: str = "powersgd"        # "powersgd" | "topk" | "quant"
    c0: float = 2                   # uniform parameter: rank r0 / density k0 / bits b0
    alpha: float = 1.0              # L-GreCo error budget factor
    buckets: int = 10_000           # DP discretisation D
    warmup_iters: int = 20          # uncompressed iterations first
    adjust_freq: int = 40           # re-tune period (iterations)
    acc_iters: int = 10             # iterations averaged into the reference gradient
    epochs: int = 3
    batch: int = 16                 # per worker
    optimizer: str = "adam"         # "adam" | "sgd" (momentum 0.9)
    lr: float = 3e-3
    lr_schedule: str = "cosine"     # "cosine" (to 0 over the run) | "constant"
    seed: int = 0
    error_method: str = "power"     # PowerSGD error: "power" (5 iterations) or "svd"
    gamma: float = 0.5              # PowerSGD candidate ranks floor(gamma r0)..ceil(beta r0)
    beta: float = 2.0
    keep_reference: bool = False    # keep rank 0's last reference gradients (for offline DP what-ifs)
    keep_params: bool = False       # return the final parameters (flat float32)
    time_steps: int = 0             # after training, time this many extra steps (0 = skip)
    max_steps: int = 0              # stop after this many steps (0 = all epochs)

    def label(self) -> str:
        return self.scheme if self.scheme == "none" else f"{self.scheme}-{self.family}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_state(cfg: RunConfig, model: nn.Module, group=None) -> CompressionState | None:
    if cfg.scheme == "ddp":                       # DDP's built-in all-reduce, no hook
        return None
    if cfg.scheme == "none":
        return CompressionState(model, None, None, process_group=group, seed=cfg.seed)
    if cfg.family == "powersgd":
        comp = make_compressor("powersgd", gamma=cfg.gamma, beta=cfg.beta, error_method=cfg.error_method,
                               seed=cfg.seed)
    else:
        comp = make_compressor(cfg.family)
    tuner = None
    if cfg.scheme == "lgreco":
        tuner = LGreCoTuner(cfg.alpha, cfg.buckets, cfg.adjust_freq, cfg.acc_iters, keep_reference=cfg.keep_reference)
    elif cfg.scheme != "uniform":
        raise ValueError(f"unknown scheme {cfg.scheme!r}; expected 'none', 'uniform' or 'lgreco'")
    c0 = int(cfg.c0) if cfg.family in ("powersgd", "quant") else float(cfg.c0)
    return CompressionState(model, comp, c0, process_group=group, warmup_iters=cfg.warmup_iters, tuner=tuner,
                            seed=cfg.seed)


def train_one(cfg: RunConfig, data, rank: int, world: int, device: torch.device) -> dict:
    """Train one config on this rank (process group already initialised). Returns rank-local results."""
    from mlsys24.bench import measure

    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(cfg.seed)
    model = DigitsCNN().to(device)
    state = _build_state(cfg, model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if state is not None:
        ddp.register_comm_hook(state, layerwise_compression_hook)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(ddp.parameters(), lr=cfg.lr, foreach=True)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'sgd'")
    n = len(y_tr)
    global_batch = cfg.batch * world
    steps_per_epoch = n // global_batch
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    elif cfg.lr_schedule == "constant":
        sched = None
    else:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'cosine' or 'constant'")
    losses = []
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(cfg.epochs):
        if cfg.max_steps and done >= cfg.max_steps:
            break
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        ep_loss = 0.0
        for step in range(steps_per_epoch):
            if cfg.max_steps and done >= cfg.max_steps:
                break
            done += 1
            idx = perm[step * global_batch + rank * cfg.batch: step * global_batch + (rank + 1) * cfg.batch]
            xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            ep_loss += float(loss.detach())
        losses.append(ep_loss / max(1, min(steps_per_epoch, done - epoch * steps_per_epoch)))
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te.to(device)).argmax(1).cpu() == y_te).float().mean())
    model.train()

    tuner = state.tuner if state is not None else None
    out = dict(config=asdict(cfg), label=cfg.label(), accuracy=acc, losses=losses, train_s=train_s,
               train_cpu_s=train_cpu_s,
               steps=done,
               history=[(r.iteration, r.phase, r.allreduce_bytes, r.allgather_bytes, r.collectives)
                        for r in state.history] if state is not None else [],
               choice_log=state.choice_log if state is not None else [],
               layers=[dict(name=s.name, rows=s.rows, cols=s.cols, numel=s.numel, compressed=s.compressed,
                            choice=s.choice) for s in state.layers] if state is not None else [],
               events=[e.as_dict() for e in tuner.events] if tuner is not None else [],
               reference={k: v.numpy() for k, v in tuner.reference.items()} if tuner is not None else {})
    if cfg.keep_params:
        out["params"] = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]).numpy()
    if cfg.time_steps > 0 and state is not None:
        state.freeze_tuning = True
        xb, yb = x_tr[: cfg.batch].to(device), y_tr[: cfg.batch].to(device)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()

        dev = "cpu" if device.type == "cpu" else device
        t = measure(step, warmup=2, repeats=cfg.time_steps, flush_l2=False, device=dev)
        out["step_s"] = t.median_s
        slots = state.compressed_layers
        fn = codec_fn(state.compressor, [s.shape for s in slots], [s.choice for s in slots], device=device)
        tc = measure(fn, warmup=2, repeats=max(20, cfg.time_steps), flush_l2=False, device=dev)
        out["step_min_s"] = t.min_s
        out["codec_s"], out["codec_min_s"] = tc.median_s, tc.min_s
        last = state.history[-1]
        out["last_step"] = dict(allreduce_bytes=last.allreduce_bytes, allgather_bytes=last.allgather_bytes,
                                collectives=last.collectives)
    return out


@dataclass
class HookCheck:
    """Run the real hook on fixed per-rank gradients and compare it with the plain-PyTorch reference.

    Step 0, 1: warm-up (uncompressed): result must equal the mean over workers.
    Step 2: PowerSGD at rank ``rank`` (error feedback still zero): result must equal
    :func:`powersgd_allreduce_ref` on all workers' matrices, and a layer compressed at full rank
    min(n, m) must reproduce the mean exactly.
    """

    shapes: tuple = ((48, 80), (6, 3, 3, 3), (7,), (5, 40))
    rank: int = 3
    full_rank_layer: int = 3        # index in ``shapes`` of a layer compressed at full rank min(n, m)
    seed: int = 0


def hook_check(chk: HookCheck, rank: int, world: int, device: torch.device) -> dict:
    params = nn.ParameterList([nn.Parameter(torch.zeros(s, device=device)) for s in chk.shapes])
    holder = nn.Module()
    holder.p = params
    comp = PowerSGD(min_compression_rate=0.0)
    state = CompressionState(holder, comp, chk.rank, warmup_iters=2, seed=chk.seed)
    full = state.layers[chk.full_rank_layer]
    full.choice = min(full.rows, full.cols)                 # force a full-rank layer

    def grads_of(w: int, t: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(chk.seed * 1000 + 10 * w + t)
        return [torch.randn(s, generator=g).to(device) for s in chk.shapes]

    out = dict(warmup_max_rel=0.0, powersgd_vs_ref_max_rel=0.0, full_rank_vs_mean_rel=0.0, uncompressed_max_rel=0.0)
    for t in range(3):
        all_g = [grads_of(w, t) for w in range(world)]
        bucket = FlatBucket(list(params), all_g[rank])
        result = layerwise_compression_hook(state, bucket).wait()
        views = bucket.gradients()
        for i, (s, v) in enumerate(zip(state.layers, views)):
            mean = sum(g[i] for g in all_g) / world
            rel = float((v - mean).norm() / mean.norm())
            if t < 2:
                out["warmup_max_rel"] = max(out["warmup_max_rel"], rel)
            elif not s.compressed:
                out["uncompressed_max_rel"] = max(out["uncompressed_max_rel"], rel)
            elif i == chk.full_rank_layer:
                out["full_rank_vs_mean_rel"] = rel
            else:
                q0 = shared_randn(s.cols, s.choice, state.q_seed(s, 1), device, torch.float32)
                ref, _ = powersgd_allreduce_ref([g[i].reshape(s.rows, s.cols) for g in all_g], q0)
                rel_ref = float((v.reshape(s.rows, s.cols) - ref).norm() / ref.norm())
                out["powersgd_vs_ref_max_rel"] = max(out["powersgd_vs_ref_max_rel"], rel_ref)
        assert result.data_ptr() == bucket.buffer().data_ptr()
    out["bytes"] = [(r.phase, r.allreduce_bytes) for r in state.history]
    return out


def _calibrate(data, rank: int, world: int, device: torch.device, sizes: list[int], repeats: int,
               batch: int = 16) -> dict:
    """Local compute time of one step and all-reduce time vs message size (same counts on every rank).

    Both the median and the minimum of the repeats are returned: on a shared CPU the minimum is the
    uncontended cost, the better constant for a model.
    """
    from mlsys24.bench import measure

    x_tr, y_tr, _, _ = data
    torch.manual_seed(0)
    model = DigitsCNN().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.0, foreach=True)
    xb, yb = x_tr[:batch].to(device), y_tr[:batch].to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()

    dev = "cpu" if device.type == "cpu" else device
    compute = measure(step, warmup=3, repeats=repeats, flush_l2=False, device=dev)
    ar = []
    for n in sizes:
        buf = torch.ones(n, device=device)
        ar.append(measure(lambda b=buf: dist.all_reduce(b), warmup=2, repeats=repeats, flush_l2=False, device=dev))
    return dict(compute_s=compute.median_s, compute_min_s=compute.min_s, allreduce_sizes_bytes=[4 * n for n in sizes],
                allreduce_s=[t.median_s for t in ar], allreduce_min_s=[t.min_s for t in ar], batch_for_compute=batch)


def _worker(rank: int, world: int, port: int, backend: str, configs: list[RunConfig], out_path: str,
            threads: int, timeout_s: float, calibrate: bool, calib_sizes: list[int], calib_repeats: int,
            calib_batch: int = 16):
    status = 0
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        data = load_digits_split()
        results = dict(runs=[], calibration=None, world=world, backend=backend)
        for cfg in configs:
            if isinstance(cfg, HookCheck):
                results["runs"].append(hook_check(cfg, rank, world, device))
            else:
                results["runs"].append(train_one(cfg, data, rank, world, device))
        if calibrate:   # after training: warm caches and allocator, like the timed steps
            results["calibration"] = _calibrate(data, rank, world, device, calib_sizes, calib_repeats, calib_batch)
        results["cpu_s"] = time.process_time()          # this worker's CPU seconds, start-up included
        with open(f"{out_path}.rank{rank}", "wb") as f:
            pickle.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        traceback.print_exc()
        with open(f"{out_path}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        status = 1
    # Skip the interpreter's slow teardown of torch in the child (seconds on a small machine).
    os._exit(status)


def run_distributed(configs: list[RunConfig | HookCheck], *, world_size: int = 2, backend: str = "gloo", threads: int = 1,
                    timeout_s: float = 300.0, calibrate: bool = True,
                    calib_sizes: tuple[int, ...] = (1 << 12, 1 << 16, 1 << 18, 1 << 20),
                    calib_repeats: int = 10, calib_batch: int = 16, all_ranks: bool = False) -> dict:
    """Run ``configs`` in ``world_size`` spawned processes; returns rank 0's results (and every rank's
    under ``"ranks"`` when ``all_ranks``). Processes that outlive ``timeout_s`` are killed and an error raised."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result")
        ctx = mp.start_processes(_worker, args=(world_size, port, backend, list(configs), out_path, threads,
                                                timeout_s, calibrate, list(calib_sizes), calib_repeats, calib_batch),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s + 30
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: workers still running after {timeout_s + 30:.0f} s")
        except Exception as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            errs = [open(f).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")
                    for f in [os.path.join(tmp, f)]]
            raise RuntimeError(f"distributed run failed: {e}\n" + "\n".join(errs)) from None
        ranks = []
        for r in range(world_size):
            with open(f"{out_path}.rank{r}", "rb") as f:
                ranks.append(pickle.load(f))
    res = ranks[0]
    if all_ranks:
        res["ranks"] = ranks
    return res
