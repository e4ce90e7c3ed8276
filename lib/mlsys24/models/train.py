"""Train the workbench's tiny Llama on the committed stdlib corpus (one seeded GPU run of minutes).

    PYTHONPATH=lib python3 -m mlsys24.models.train --out data/models/tiny_llama --time-budget-s 360

Recipe: next-byte prediction on random 512-byte windows of the train split (documents joined by
NUL), AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to
``min_lr_ratio * lr``, gradient clipping, bf16 autocast on GPU (fp32 master weights), optional dropout (``--dropout``).
Data order and initialisation come from ``--seed``.

``--steps N`` fixes the schedule length. With ``--steps 0`` the run times steps 10..30 (inside the
warm-up, before the schedule length matters) and sets ``N = time budget / step time``; the chosen N is
logged, and rerunning with ``--steps N`` reproduces the same schedule (bit-exactness on GPU is not
guaranteed: cuBLAS/flash kernels may pick different reductions).

Writes to ``--out``: ``model.safetensors`` (fp16) + ``config.json`` (HF Llama layout),
``train_log.json`` (arguments, environment, curve, final metrics, samples), ``curve.csv``.
Imports only torch, numpy, safetensors and mlsys24.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import LlamaConfig
from .corpus import load_split_bytes, manifest
from .eval import generate, sliding_window_nll
from .llama import Llama
from .loading import load_hf_llama, save_checkpoint
from .tokenizer import ByteTokenizer


def _args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mlsys24.models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="0: plan from --time-budget-s")
    ap.add_argument("--time-budget-s", type=float, default=360.0, help="training-loop time when --steps 0")
    ap.add_argument("--hard-limit-s", type=float, default=480.0, help="stop (and save) past this loop time")
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-bytes", type=int, default=0, help="limit the validation bytes (0 = all)")
    ap.add_argument("--eval-stride", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    # model shape (defaults: the workbench's tiny Llama)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=768)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0, help="attention-prob and residual dropout")
    return ap.parse_args(argv)


def _reproduce_command(a, steps: int) -> str:
    parts = ["python -m mlsys24.models.train"]
    for k, v in vars(a).items():
        if k == "steps":
            v = steps
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts += [flag] if v else []
        else:
            parts += [flag, str(v)]
    return " ".join(parts)


def _lr_at(step: int, total: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def _val_loss(model, val: torch.Tensor, T: int, amp: dict, batch: int = 128) -> float:
    """Mean next-byte loss over non-overlapping T-byte windows of ``val`` (the curve's metric)."""
    n = (val.numel() - 1) // T
    tot, cnt = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch), device=val.device)[:, None] * T + torch.arange(T + 1, device=val.device)
        chunk = val[idx].long()
        with torch.autocast(**amp):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        tot += float(loss)
        cnt += chunk[:, 1:].numel()
    model.train(was_training)
    return tot / max(cnt, 1)


def main(argv=None) -> int:
    a = _args(argv)
    if a.steps <= 0 and a.warmup < 30:
        raise SystemExit("--steps 0 plans the schedule at step 30: it needs --warmup >= 30")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dev = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if a.device == "auto" else a.device))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    amp = {"device_type": dev.type, "dtype": torch.bfloat16, "enabled": dev.type == "cuda"}

    cfg = LlamaConfig(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                      ffn_dim=a.ffn_dim, max_seq_len=a.seq_len, rope_theta=a.rope_theta,
                      tie_embeddings=a.tie_embeddings, dropout=a.dropout)
    model = Llama(cfg).to(dev).train()
    fwd = torch.compile(model) if a.compile else model

    tok = ByteTokenizer()
    train = tok.encode_tensor(load_split_bytes("train")).to(torch.uint8).to(dev)
    val_b = load_split_bytes("validation")
    if a.val_bytes:
        val_b = val_b[: a.val_bytes]
    val = tok.encode_tensor(val_b).to(torch.uint8).to(dev)
    T, B = a.seq_len, a.batch_size

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(a.seed + 1)
    offs = torch.arange(T + 1, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    curve, planned = [], a.steps if a.steps > 0 else None
    t0 = time.perf_counter()
    tv = time.perf_counter()
    v0 = _val_loss(model, val, T, amp)
    sync()
    eval_s = time.perf_counter() - tv
    curve.append({"step": 0, "lr": 0.0, "train_loss": None, "val_loss": v0, "tokens": 0, "elapsed_s": 0.0})
    print(f"step 0 val {v0:.4f} (eval {eval_s:.2f}s)", flush=True)
    t_loop = time.perf_counter()
    run_loss, run_n, step, stopped_early, t_probe = 0.0, 0, 0, False, None
    while True:
        total = planned if planned is not None else a.max_steps
        if step >= total:
            break
        lr = _lr_at(step, total, a)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train.numel() - T - 1, (B,), generator=gen).to(dev)
        chunk = train[starts[:, None] + offs].long()
        with torch.autocast(**amp):
            logits = fwd(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        run_loss = run_loss + loss.detach()  # stays on the device: no sync per step
        run_n += 1
        step += 1
        if step == 10:
            sync()
            t_probe = time.perf_counter()
        if step == 30 and planned is None:
            sync()
            step_s = (time.perf_counter() - t_probe) / 20
            n_evals_est = a.time_budget_s / step_s / a.eval_every
            budget = a.time_budget_s - (time.perf_counter() - t_loop) - n_evals_est * eval_s
            planned = int(min(a.max_steps, max(step + 1, 30 + budget / step_s)))
            planned = max(planned, a.warmup + 1)
            print(f"step time {step_s * 1e3:.2f} ms -> planned steps {planned}", flush=True)
        if step % a.eval_every == 0 or step == (planned or a.max_steps):
            vl = _val_loss(model, val, T, amp)
            el = time.perf_counter() - t_loop
            tl = float(run_loss) / max(run_n, 1)
            curve.append({"step": step, "lr": lr, "train_loss": tl, "val_loss": vl, "tokens": step * B * T,
                          "elapsed_s": el})
            run_loss, run_n = 0.0, 0
            print(f"step {step}/{planned} lr {lr:.2e} train {tl:.4f} val {vl:.4f} ({el:.0f}s)", flush=True)
        if time.perf_counter() - t_loop > a.hard_limit_s:
            stopped_early = True
            print(f"hard time limit reached at step {step}", flush=True)
            break
    sync()
    loop_s = time.perf_counter() - t_loop

    extra = {"trained_steps": step, "planned_steps": planned, "seed": a.seed, "corpus": "stdlib_py311"}
    save_checkpoint(model, out, dtype=torch.float16, extra=extra)
    # evaluate exactly the saved (fp16-rounded) weights, in float32
    saved = load_hf_llama(out, device=dev, dtype=torch.float32)
    stride = min(a.eval_stride, T // 2)
    final = {
        "validation_sliding": sliding_window_nll(saved, tok.encode_tensor(val_b), window=T, stride=stride,
                                                 batch_size=64),
        "validation_subset_8192": sliding_window_nll(saved, tok.encode_tensor(val_b[:8192]), window=T,
                                                     stride=stride),
        "dtype": "float32 (weights as saved in float16)",
    }
    samples = []
    from .corpus import iter_documents

    docs = list(iter_documents("validation"))
    for i in range(3):
        path, text = docs[(i * 7) % len(docs)]
        cut = text.find("\ndef ", len(text) // 3)
        cut = cut + 1 if cut > 0 else len(text) // 2
        prompt = text[max(0, cut - 200): cut + 40]
        ids = tok.encode(prompt)
        samples.append({"doc": path, "prompt": prompt,
                        "greedy": tok.decode(generate(saved, [ids], 300)[0]),
                        "sampled_t0.8_k40": tok.decode(generate(saved, [ids], 300, temperature=0.8, top_k=40,
                                                                seed=a.seed)[0])})
    try:
        from mlsys24.bench import environment

        env = environment()
    except Exception as e:  # noqa: BLE001 - provenance is best effort, never fatal
        env = {"error": repr(e)}
    env.update({"torch": torch.__version__, "device": str(dev),
                "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
                "python": sys.version.split()[0]})
    cmd = ["python", "-m", "mlsys24.models.train"] + (argv if argv is not None else sys.argv[1:])
    log = {
        "args": vars(a), "config": cfg.to_dict(), "n_params": model.num_parameters,
        "environment": env, "command": " ".join(cmd),
        "reproduce": _reproduce_command(a, step),
        "corpus": {"train_bytes": int(train.numel()), "validation_bytes": len(val_b),
                   "train_stream_sha256": manifest()["splits"]["train"]["stream_sha256"]},
        "trained_steps": step, "planned_steps": planned, "stopped_early_by_time_limit": stopped_early,
        "tokens_seen": step * B * T, "epochs": step * B * T / train.numel(),
        "loop_seconds": loop_s, "seconds_per_step": loop_s / max(step, 1), "total_seconds": time.perf_counter() - t0,
        "curve": curve, "final": final, "samples": samples,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curve[0]))
        w.writeheader()
        w.writerows(curve)
    print(json.dumps({"trained_steps": step, "final_val": final["validation_sliding"],
                      "subset": final["validation_subset_8192"], "gpu": env.get("gpu"),
                      "loop_seconds": loop_s}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
