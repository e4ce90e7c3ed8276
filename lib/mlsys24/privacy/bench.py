"""SmartPAF's training techniques at GPU scale: VGG-11-bn with all 13 ReLU / MaxPool layers replaced.

    PYTHONPATH=lib python -m mlsys24.privacy.bench [--quick] [--out DIR] [--budget 220] [--seeds 0,1,2]
                                                   [--pafs 2f12g1,f1g2,a7] [--device cuda|cpu]
    PYTHONPATH=lib python -m mlsys24.bench smartpaf [--quick]          (the same, through the registry)

For each seed: train the float VGG-11-bn (:mod:`.vgg`) on the 32x32, 3-channel upsampled digits
split, then run the same technique ablation as the CPU digits study (:func:`.ablation.digits_study`,
same code and the same technique configuration as ``DEFAULT_STUDY``): "direct", "ct", "baseline_ds"
(equal epoch budget), "ct_pa_at" (SmartPAF), each evaluated at Dynamic and at Static Scale, for PAFs of
different degree. Scale-downs (stated in the results): digits instead of CIFAR-10, VGG-11-bn instead
of VGG-19-bn, AT groups of 2 epochs (official 20), at most 3 groups per layer, CT 10 epochs on 300
images, learning rates 10x the official lr_c. A (seed, PAF) job starts only while the elapsed time plus
the slowest job so far fits ``--budget`` seconds; the file is rewritten after every job, so a run cut
short still leaves its finished jobs.

Writes ``data/results/smartpaf/<gpu>.json`` (``cpu.vgg.json`` on a CPU; ``<device>.quick.json`` with ``--quick``, which runs a
tiny configuration on the CPU in seconds). Imports only torch, numpy, sklearn and mlsys24.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ..bench import save_results
from .ablation import DEFAULT_STUDY, StudyConfig, digits_study, float_model
from .digits import DigitsData
from .paf import paf_info
from .vgg import data_to, digits32, vgg11_bn

__all__ = ["run", "FULL", "QUICK", "PAPER_VGG19_CIFAR10"]

SLUG = "smartpaf"
TECHS = ("direct", "ct", "baseline_ds", "ct_pa_at")
FULL = dict(width=1.0, float_epochs=30, float_lr=1e-3, pafs=("2f12g1", "f1g2", "a7"), seeds=(0, 1, 2),
            budget_s=220.0, subset=None, technique={})
QUICK = dict(width=1 / 16, float_epochs=1, float_lr=3e-3, pafs=("f1g2",), seeds=(0,), budget_s=60.0,
             subset=(128, 32, 64), technique=dict(ct_epochs=1, ct_samples=32, group_epochs=1, max_groups=1,
                                                  batch_size=32, eval_batch=32))

# VGG-19-bn / CIFAR-10, all non-polynomial ops replaced (README of EfficientFHE/SmartPAF; plaintext 93.95 %)
PAPER_VGG19_CIFAR10 = {
    "plaintext": 93.95,
    "direct SS (prior work)": {"2f12g1": 91.06, "a7": 81.35, "f2g3": 76.58, "f2g2": 58.11, "f1g2": 43.84},
    "ct DS": {"2f12g1": 93.39, "a7": 93.6, "f2g3": 93.3, "f2g2": 92.4, "f1g2": 91.53},
    "ct_pa_at DS": {"2f12g1": 93.6, "a7": 93.81, "f2g3": 93.59, "f2g2": 91.49, "f1g2": 91.51},
    "ct_pa_at SS": {"2f12g1": 92.16, "a7": 92.62, "f2g3": 91.51, "f2g2": 88.45, "f1g2": 76.93},
}


def _subset(d: DigitsData, n_train: int, n_val: int, n_test: int) -> DigitsData:
    return DigitsData(d.x_train[:n_train], d.y_train[:n_train], d.x_val[:n_val], d.y_val[:n_val],
                      d.x_test[:n_test], d.y_test[:n_test])


def _parse_extra(extra) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="smartpaf bench")
    ap.add_argument("--budget", type=float, default=None, help="seconds; no new (seed, PAF) job starts past it")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds")
    ap.add_argument("--pafs", default=None, help="comma-separated PAF names")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu for --quick)")
    return ap.parse_args(list(extra or []))


def _headline(records: list[dict]) -> dict | None:
    """Mean over seeds of the accuracy drop of CT+PA+AT+DS with f1²∘g1² vs the float VGG."""
    rs = [r for r in records if r["paf"] == "2f12g1" and r["technique"] == "ct_pa_at" and r["scale"] == "DS"]
    if not rs:
        return None
    drop = sum(r["float_test_acc"] - r["test_acc"] for r in rs) / len(rs)
    paper = PAPER_VGG19_CIFAR10
    return {"name": "accuracy drop vs plaintext, CT+PA+AT+DS, f1²∘g1², every ReLU/MaxPool replaced "
                    f"(VGG-11-bn on 32x32 digits, mean of {len(rs)} seed(s))",
            "ours": drop, "unit": "points", "paper": paper["plaintext"] - paper["ct_pa_at DS"]["2f12g1"],
            "baseline": "paper: VGG-19-bn / CIFAR-10 (93.95 -> 93.6 %)"}


def run(args) -> Path:
    quick = bool(getattr(args, "quick", False))
    opts = _parse_extra(getattr(args, "extra", None))
    p = dict(QUICK if quick else FULL)
    if opts.budget is not None:
        p["budget_s"] = opts.budget
    if opts.seeds:
        p["seeds"] = tuple(int(s) for s in opts.seeds.split(","))
    if opts.pafs:
        p["pafs"] = tuple(opts.pafs.split(","))
    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() and not quick else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False       # plain float32 convs: PAF errors are not hidden by TF32
        torch.backends.cuda.matmul.allow_tf32 = False
    tcfg = dataclasses.replace(DEFAULT_STUDY.technique, **p["technique"])
    t0 = time.perf_counter()
    records: list[dict] = []
    floats: dict[int, float] = {}
    jobs_s: list[float] = []
    skipped: list[list] = []
    path = None

    def config() -> dict:
        return {"quick": quick, "device": str(dev), "model": f"VGG-11-bn (CIFAR variant), width x{p['width']:g}",
                "dataset": "sklearn digits 8x8 upsampled bilinearly to 32x32, 3 channels",
                "sizes": sizes, "width": p["width"], "float_epochs": p["float_epochs"], "float_lr": p["float_lr"],
                "pafs": list(p["pafs"]), "seeds": list(p["seeds"]), "techniques": list(TECHS),
                "technique": dataclasses.asdict(tcfg), "order": DEFAULT_STUDY.order, "budget_s": p["budget_s"],
                "float_test_acc": floats, "job_seconds": jobs_s, "skipped": skipped,
                "wall_s": time.perf_counter() - t0, "tf32": False,
                "paf_degree_sum": {q: paf_info(q).degree_sum for q in p["pafs"]},
                "paper_vgg19_cifar10": PAPER_VGG19_CIFAR10,
                "scale_down": "digits (1149 train / 288 val / 360 test) instead of CIFAR-10; VGG-11-bn instead of "
                              "VGG-19-bn; AT group_epochs 2 (official 20), <= 3 groups per layer; CT 10 epochs on "
                              "300 images (official 40 on the training set); lr_c = lr_w = 1e-3 (official 1e-4 / 1e-5)"}

    sizes = None
    # a full run on the CPU must not overwrite cpu.json (the CKKS timings): it writes cpu.vgg.json
    suffix = "quick" if quick else ("vgg" if dev.type == "cpu" else None)
    for seed in p["seeds"]:
        data = digits32(seed)
        if p["subset"]:
            data = _subset(data, *p["subset"])
        data = data_to(data, dev)
        sizes = data.sizes()
        study = StudyConfig(float_epochs=p["float_epochs"], float_lr=p["float_lr"], seed=seed,
                            order=DEFAULT_STUDY.order, technique=dataclasses.replace(tcfg, seed=seed))
        net = None
        for paf in p["pafs"]:
            elapsed = time.perf_counter() - t0
            if jobs_s and elapsed + max(jobs_s) > p["budget_s"]:
                skipped.append([seed, paf])
                print(f"seed {seed} {paf}: skipped ({elapsed:.0f} s elapsed, budget {p['budget_s']:.0f} s)", flush=True)
                continue
            tj = time.perf_counter()
            if net is None:
                torch.manual_seed(seed)
                net, _ = float_model(study, data, factory=lambda: vgg11_bn(p["width"]).to(dev))
            recs, _, summary = digits_study(study, [paf], TECHS, model=net, data=data)
            floats[str(seed)] = summary["float_test_acc"]
            secs = time.perf_counter() - tj
            jobs_s.append(secs)
            for r in recs:
                r.update(seed=seed, model="vgg11_bn", dataset="digits32", job_seconds=secs)
            records += recs
            row = {(r["technique"], r["scale"]): r["test_acc"] for r in recs}
            print(f"seed {seed} {paf}: float {floats[str(seed)]:.2f} | " + " ".join(
                f"{t}/{s} {a:.2f}" for (t, s), a in sorted(row.items())) + f" | {secs:.1f} s", flush=True)
            path = save_results(SLUG, records, headline=_headline(records), config=config(), out_dir=args.out,
                                device=dev, suffix=suffix,
                                meta={"command": "PYTHONPATH=lib python -m mlsys24.privacy.bench"
                                                 + (" --quick" if quick else "")})
    if path is None:
        raise RuntimeError("smartpaf bench: no job fitted the budget")
    return path


def _main(argv=None) -> None:  # pragma: no cover - python -m mlsys24.privacy.bench
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a, extra = ap.parse_known_args(argv)
    a.extra = extra
    print(run(a))


if __name__ == "__main__":  # pragma: no cover
    _main()
