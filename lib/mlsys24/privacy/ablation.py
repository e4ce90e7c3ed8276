"""The digits study: float CNN, then every (PAF, technique set) at DS and SS — one function for the
notebook's live run and for the committed full run.

    PYTHONPATH=lib python -m mlsys24.privacy.ablation [--out DIR]

writes ``data/results/smartpaf/cpu.ablation.json``: the records of :func:`digits_study` for the default
configuration (all five PAFs, six technique sets) and for the official learning rates (lr_c 1e-4,
lr_w 1e-5). CPU only, one thread, deterministic: the notebook re-runs a subset live and checks it
against this file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from .digits import DigitsCNN, evaluate, load_digits_split, train_float
from .techniques import TechniqueConfig, run_ablation

__all__ = ["StudyConfig", "digits_study", "float_model", "single_thread", "DEFAULT_STUDY", "OFFICIAL_LR_STUDY"]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    widths: tuple[int, int] = (8, 16)    # conv widths (card: 16/32; halved so PAF errors show, see notebook)
    depth: int = 1                       # conv blocks per stage
    float_epochs: int = 15
    float_lr: float = 3e-3
    seed: int = 0
    order: str = "code"
    technique: TechniqueConfig = dataclasses.field(default_factory=lambda: TechniqueConfig(
        lr_c=1e-3, lr_w=1e-3, max_groups=3))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_STUDY = StudyConfig()
OFFICIAL_LR_STUDY = dataclasses.replace(DEFAULT_STUDY, technique=TechniqueConfig(lr_c=1e-4, lr_w=None, max_groups=3))


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine a spinning second
    OpenMP thread costs far more than it gives; results are also identical run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def float_model(cfg: StudyConfig, data=None, factory=None):
    """The float model of a study configuration (seeded), and the data split.

    factory: builds the untrained model (default: the digits CNN of ``cfg.widths`` / ``cfg.depth``);
    the VGG study passes a VGG-11-bn on its device and its own ``data``.
    """
    data = data if data is not None else load_digits_split(cfg.seed)
    with single_thread():
        torch.manual_seed(cfg.seed)
        model = factory() if factory is not None else DigitsCNN(*cfg.widths, depth=cfg.depth)
        train_float(model, data, epochs=cfg.float_epochs, lr=cfg.float_lr, seed=cfg.seed)
    return model, data


def digits_study(cfg: StudyConfig, pafs, techniques, *, progress: bool = False, keep_models: bool = False,
                 model=None, data=None) -> tuple[list[dict], dict, dict]:
    """(records, models, summary) for the given PAFs and technique sets.

    Runs with one intra-op thread (results identical run to run on a given machine).
    """
    with single_thread():
        t0 = time.perf_counter()
        if model is None:
            model, data = float_model(cfg, data)
        acc, ce = evaluate(model, data.x_test, data.y_test, cfg.technique.eval_batch)
        recs, models = run_ablation(model, data, list(pafs), list(techniques), cfg.technique, order=cfg.order,
                                    progress=progress, keep_models=keep_models)
        for r in recs:
            r["float_test_acc"] = acc
        summary = {"float_test_acc": acc, "float_test_ce": ce, "seconds": time.perf_counter() - t0,
                   "sizes": data.sizes()}
        return recs, models, summary


ALL_TECHNIQUES = ("direct", "ct", "baseline_ds", "ct_pa_at", "pa_at", "ct_pa")


def main(argv=None) -> None:
    from mlsys24.bench import save_results

    from .paf import SMARTPAF_PAFS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    records, studies = [], {}
    for name, cfg, techs in (("default", DEFAULT_STUDY, ALL_TECHNIQUES),
                             ("official_lr", OFFICIAL_LR_STUDY, ("direct", "ct", "baseline_ds", "ct_pa_at"))):
        recs, _, summary = digits_study(cfg, SMARTPAF_PAFS, techs, progress=True)
        for r in recs:
            r["study"] = name
        records += recs
        studies[name] = {"config": cfg.as_dict(), **summary}
        print(f"{name}: {summary['seconds']:.0f} s, float {summary['float_test_acc']:.2f} %", flush=True)
    path = save_results("smartpaf", records, config={"studies": studies, "threads": 1}, out_dir=args.out,
                        suffix="ablation",
                        meta={"command": "PYTHONPATH=lib python -m mlsys24.privacy.ablation"})
    print(path)


if __name__ == "__main__":
    main()
