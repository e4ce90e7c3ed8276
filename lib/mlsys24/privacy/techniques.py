"""SmartPAF's four training techniques: CT, PA, AT and DS/SS (Tong et al., MLSys 2024, Sec. 4).

- Coefficient Tuning (CT): per non-polynomial layer, collect its inputs x from the model on the
  training set, then fit only the PAF coefficients to minimise MSE(PAF-layer(x), exact-layer(x))
  (Adam lr 0.01, ReduceLROnPlateau(patience 2, threshold 1e-8, min_lr 1e-4), batch 100, DS on),
  keeping the best-so-far coefficients (the initial ones included).
- Progressive Approximation (PA): replace the layers one at a time in forward order; each step
  collects its CT inputs from the current, partly replaced model and fine-tunes before the next.
- Alternate Training (AT), inside each PA step: two parameter groups — the new PAF's coefficients
  (Adam lr_c, wd 0.01) and the linear layers since the previous non-polynomial layer ("up_weight",
  lr_w = lr_c / 10, wd 0.1) — trained one at a time for ``group_epochs`` epochs, BN frozen, SWA over
  the epochs, keeping the better of best-epoch and SWA model on the validation split. Switch group
  when a group brings no improvement or its best epoch is in the first half; stop when a whole
  switch brings no improvement or the layer has no preceding weights (the official ``PA_AT.py`` rules),
  or after ``max_groups`` groups (our budget cap).
- Dynamic Scale (DS, training: s = max|x| of the current tensor) vs Static Scale (SS, deployment:
  s = running max of |x| over the training set, per sign module).

Technique sets (names used in records): "direct" (initial coefficients, DS, no training), "ct" (CT on
the float model's inputs, no training), "baseline_ds" (direct + joint fine-tuning of all weights and
coefficients for the same number of epochs as "ct_pa_at" used), "ct_pa_at" (SmartPAF), "pa_at" (no CT),
"ct_pa" (PA with joint instead of alternating training). Each is evaluated at DS and at SS.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import DigitsData, evaluate
from .paf import (
    MaxPoolPAF,
    ReLUPAF,
    SignPAF,
    make_sign,
    nonpolynomial_layers,
    paf_layer_for,
    preceding_parameters,
    set_scale_mode,
    sign_modules,
)

__all__ = [
    "TECHNIQUES", "TechniqueConfig", "CTResult", "collect_layer_inputs", "coefficient_tuning",
    "train_params", "alternate_training", "apply_technique", "collect_static_scales", "to_static",
    "run_ablation", "freeze_bn",
]

TECHNIQUES: dict[str, str] = {
    "direct": "direct replacement (initial coefficients), no training",
    "ct": "CT only, no fine-tuning",
    "baseline_ds": "direct + fine-tuning (same epochs as CT+PA+AT)",
    "ct_pa_at": "CT + PA + AT (SmartPAF)",
    "pa_at": "PA + AT (no CT)",
    "ct_pa": "CT + PA, joint training (no AT)",
}


@dataclass
class TechniqueConfig:
    ct_epochs: int = 10          # CT epochs per layer
    ct_lr: float = 0.01          # CT Adam learning rate (official)
    ct_min_lr: float = 1e-4
    ct_batch: int = 100          # samples per CT batch (official: 100 for CIFAR)
    ct_samples: int | None = 300  # training images whose layer inputs CT fits (None = all)
    group_epochs: int = 2        # AT epochs per parameter group (official: 20)
    max_groups: int = 4          # AT groups per layer at most (budget cap; not in the official code)
    lr_c: float = 1e-4           # coefficient learning rate in AT (official default)
    lr_w: float | None = None    # weight learning rate in AT; None = lr_c / 10 (official)
    wd_c: float = 0.01
    wd_w: float = 0.1
    batch_size: int = 64         # training batch
    eval_batch: int = 120        # evaluation batch (DS scales are per batch)
    swa: bool = True
    seed: int = 0

    @property
    def lr_weights(self) -> float:
        return self.lr_w if self.lr_w is not None else self.lr_c / 10


def freeze_bn(model: nn.Module) -> None:
    """BN layers in eval mode: no running-statistics updates (the official trainer does this in AT)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _exact_twin(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(layer, (nn.ReLU, ReLUPAF)):
        return F.relu
    if isinstance(layer, nn.MaxPool2d):
        return lambda x: F.max_pool2d(x, layer.kernel_size, layer.stride)
    if isinstance(layer, MaxPoolPAF):
        return lambda x: F.max_pool2d(x, layer.kernel_size, layer.stride)
    raise TypeError(f"no exact twin for {type(layer).__name__}")


@torch.no_grad()
def collect_layer_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor,
                         batch_size: int = 120) -> dict[str, torch.Tensor]:
    """Inputs of the named layers over ``x`` (eval mode), concatenated over batches."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: store[n].append(inp[0].detach().clone())) for n in names]
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: torch.cat(v) for n, v in store.items()}


@dataclass
class CTResult:
    layer: str
    mse_init: float
    mse_best: float
    history: list[float] = field(default_factory=list)


def _layer_mse(layer: nn.Module, exact, inputs: torch.Tensor, batch: int) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            xb = inputs[i:i + batch]
            out = layer(xb)
            tot += float(F.mse_loss(out, exact(xb), reduction="sum"))
            n += out.numel()
    mse = tot / max(n, 1)
    return mse if mse == mse else float("inf")


def coefficient_tuning(layer: nn.Module, inputs: torch.Tensor, cfg: TechniqueConfig, *, name: str = "",
                       exact: Callable | None = None) -> CTResult:
    """Fit the coefficients of ``layer.sign`` to the exact layer on ``inputs`` (in place; best-so-far kept)."""
    exact = exact or _exact_twin(layer)
    sign: SignPAF = layer.sign
    params = list(sign.coeffs)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.ct_lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=2, threshold=1e-8,
                                                       min_lr=cfg.ct_min_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    mse0 = _layer_mse(layer, exact, inputs, cfg.ct_batch)
    best, best_state = mse0, [p.detach().clone() for p in params]
    hist = [mse0]
    n = len(inputs)
    for _ in range(cfg.ct_epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.ct_batch):
            xb = inputs[perm[i:i + cfg.ct_batch]]
            loss = F.mse_loss(layer(xb), exact(xb))
            if not torch.isfinite(loss):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mse = _layer_mse(layer, exact, inputs, cfg.ct_batch)
        hist.append(mse)
        sched.step(mse if mse == mse else float("inf"))
        if mse < best:
            best, best_state = mse, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, best_state):
            p.copy_(s)
    return CTResult(layer=name, mse_init=mse0, mse_best=best, history=hist)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def _key(acc_loss: tuple[float, float]) -> tuple[float, float]:
    """Model-selection key: validation accuracy, then lower loss (the official trainer's tie-break)."""
    return (acc_loss[0], -acc_loss[1])


@dataclass
class GroupResult:
    best_state: dict
    best_key: tuple[float, float]
    best_index: int
    swa_state: dict | None
    swa_key: tuple[float, float] | None
    epochs: int


def train_params(model: nn.Module, params: Sequence[nn.Parameter], data: DigitsData, *, epochs: int,
                 lr: float | Sequence[float], wd: float | Sequence[float], cfg: TechniqueConfig,
                 groups: Sequence[Sequence[nn.Parameter]] | None = None, seed_offset: int = 0) -> GroupResult:
    """Train only ``params`` (or several ``groups`` with their own lr/wd) for ``epochs``, BN frozen.

    Returns the best-epoch state (validation) and the SWA-averaged state with their keys.
    """
    groups = [list(params)] if groups is None else [list(g) for g in groups]
    lrs = [lr] * len(groups) if isinstance(lr, (int, float)) else list(lr)
    wds = [wd] * len(groups) if isinstance(wd, (int, float)) else list(wd)
    train_ids = {id(p) for grp in groups for p in grp}
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
    opt = torch.optim.Adam([{"params": grp, "lr": lr_, "weight_decay": wd_}
                            for grp, lr_, wd_ in zip(groups, lrs, wds) if grp])
    swa_model = torch.optim.swa_utils.AveragedModel(model) if cfg.swa else None
    g = torch.Generator().manual_seed(cfg.seed * 1000 + seed_offset)
    n = len(data.y_train)
    best_key, best_state, best_index = None, None, -1
    for ep in range(epochs):
        model.train()
        freeze_bn(model)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        key = _key(evaluate(model, data.x_val, data.y_val, cfg.eval_batch))
        if best_key is None or key > best_key:
            best_key, best_state, best_index = key, copy.deepcopy(model.state_dict()), ep
        if swa_model is not None:
            swa_model.update_parameters(model)
    swa_state, swa_key = None, None
    if swa_model is not None and epochs > 0:
        swa_state = copy.deepcopy(swa_model.module.state_dict())
        swa_key = _key(evaluate(swa_model.module, data.x_val, data.y_val, cfg.eval_batch))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return GroupResult(best_state, best_key, best_index, swa_state, swa_key, epochs)


def alternate_training(model: nn.Module, layer: str, data: DigitsData, cfg: TechniqueConfig,
                       log: list | None = None) -> int:
    """AT for one (just replaced) layer, in place. Returns the number of epochs trained."""
    coef = list(model.get_submodule(layer).sign.coeffs)
    weights = preceding_parameters(model, layer)
    best_key = _key(evaluate(model, data.x_val, data.y_val, cfg.eval_batch))
    best_state = copy.deepcopy(model.state_dict())
    group, improvement, epochs = "coef", True, 0
    for gi in range(cfg.max_groups):
        params, lr, wd = ((coef, cfg.lr_c, cfg.wd_c) if group == "coef" else (weights, cfg.lr_weights, cfg.wd_w))
        model.load_state_dict(best_state)
        res = train_params(model, params, data, epochs=cfg.group_epochs, lr=lr, wd=wd, cfg=cfg, seed_offset=gi + 1)
        epochs += res.epochs
        use_swa = res.swa_key is not None and res.swa_key > res.best_key
        cand_key, cand_state = (res.swa_key, res.swa_state) if use_swa else (res.best_key, res.best_state)
        switch = False
        if cand_key > best_key:
            best_key, best_state, improvement = cand_key, cand_state, True
            if not use_swa and res.best_index < 0.5 * cfg.group_epochs:
                switch = True
        else:
            switch = True
        if log is not None:
            log.append({"layer": layer, "group": group, "val_acc": cand_key[0], "kept": cand_key == best_key,
                        "swa": use_swa})
        if switch:
            if not improvement:
                break
            improvement = False
            group = "weight" if group == "coef" else "coef"
            if group == "weight" and not weights:
                break
    model.load_state_dict(best_state)
    return epochs


def _joint_finetune(model: nn.Module, coef: list, weights: list, data: DigitsData, cfg: TechniqueConfig,
                    epochs: int, seed_offset: int) -> int:
    """Joint training of coefficients (lr_c) and weights (lr_w) for ``epochs``; keep best of best-epoch / SWA /
    the starting point on validation."""
    if epochs <= 0:
        return 0
    start_key = _key(evaluate(model, data.x_val, data.y_val, cfg.eval_batch))
    start = copy.deepcopy(model.state_dict())
    res = train_params(model, [], data, epochs=epochs, lr=[cfg.lr_c, cfg.lr_weights], wd=[cfg.wd_c, cfg.wd_w],
                       cfg=cfg, groups=[coef, weights], seed_offset=seed_offset)
    cands = [(start_key, start), (res.best_key, res.best_state)]
    if res.swa_key is not None:
        cands.append((res.swa_key, res.swa_state))
    model.load_state_dict(max(cands, key=lambda kv: kv[0])[1])
    return epochs


# ----------------------------------------------------------------------------------------------
# technique sets
# ----------------------------------------------------------------------------------------------

@dataclass
class TechniqueResult:
    paf: str
    technique: str
    model: nn.Module                  # DS model
    epochs: int
    ct: list[CTResult] = field(default_factory=list)
    at_log: list[dict] = field(default_factory=list)


def apply_technique(float_model: nn.Module, paf: str, technique: str, data: DigitsData, cfg: TechniqueConfig, *,
                    order: str = "code", budget_epochs: int | None = None) -> TechniqueResult:
    """Replace every ReLU / MaxPool of ``float_model`` by PAF layers with one technique set (DS)."""
    if technique not in TECHNIQUES:
        raise KeyError(f"unknown technique {technique!r}; known: {', '.join(TECHNIQUES)}")
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(float_model).eval()
    layers = [n for n in nonpolynomial_layers(model) if isinstance(model.get_submodule(n), (nn.ReLU, nn.MaxPool2d))]
    dev = next(model.parameters()).device   # new PAF layers live where the model does (CPU or GPU)
    new = lambda n: paf_layer_for(model.get_submodule(n), make_sign(paf, order=order)).to(dev)
    res = TechniqueResult(paf=paf, technique=technique, model=model, epochs=0)

    if technique in ("direct", "baseline_ds", "ct"):
        inputs = collect_layer_inputs(model, layers, _ct_images(data, cfg), cfg.eval_batch) if technique == "ct" else {}
        for n in layers:
            layer = new(n)
            if technique == "ct":
                res.ct.append(coefficient_tuning(layer, inputs[n], cfg, name=n))
            _set(model, n, layer)
        if technique == "baseline_ds":
            budget = budget_epochs if budget_epochs is not None else len(layers) * 2 * cfg.group_epochs
            coef = [p for s in sign_modules(model).values() for p in s.coeffs]
            ids = {id(p) for p in coef}
            weights = [p for p in model.parameters() if id(p) not in ids]
            res.epochs = _joint_finetune(model, coef, weights, data, cfg, budget, seed_offset=7)
        return res

    # progressive: one layer at a time, in forward order
    use_ct = technique in ("ct_pa_at", "ct_pa")
    for li, n in enumerate(layers):
        layer = new(n)
        if use_ct:
            x_in = collect_layer_inputs(model, [n], _ct_images(data, cfg), cfg.eval_batch)[n]
            res.ct.append(coefficient_tuning(layer, x_in, cfg, name=n))
        _set(model, n, layer)
        if technique in ("ct_pa_at", "pa_at"):
            res.epochs += alternate_training(model, n, data, cfg, res.at_log)
        else:
            res.epochs += _joint_finetune(model, list(layer.sign.coeffs), preceding_parameters(model, n), data, cfg,
                                          2 * cfg.group_epochs, seed_offset=100 + li)
    return res


def _ct_images(data: DigitsData, cfg: TechniqueConfig) -> torch.Tensor:
    """CT calibration images: the first ``ct_samples`` of the (already shuffled) training split."""
    return data.x_train if cfg.ct_samples is None else data.x_train[:cfg.ct_samples]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def collect_static_scales(model: nn.Module, x: torch.Tensor, batch_size: int = 120) -> dict[str, float]:
    """SS: run the DS model over ``x`` and set each sign module's static scale to the max |input| it saw."""
    signs = sign_modules(model)
    for s in signs.values():
        s.observing = True
        s.observed_max.zero_()
        s.scale_mode = "dynamic"
    was = model.training
    model.eval()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.train(was)
    out = {}
    for name, s in signs.items():
        s.observing = False
        s.static_scale.copy_(s.observed_max)
        out[name] = float(s.observed_max)
    return out


def to_static(model: nn.Module, x_calib: torch.Tensor, batch_size: int = 120) -> tuple[nn.Module, dict[str, float]]:
    """A copy of a DS model switched to Static Scale collected on ``x_calib`` (the training split)."""
    m = copy.deepcopy(model)
    scales = collect_static_scales(m, x_calib, batch_size)
    set_scale_mode(m, "static")
    return m, scales


def run_ablation(float_model: nn.Module, data: DigitsData, pafs: Sequence[str], techniques: Sequence[str],
                 cfg: TechniqueConfig, *, order: str = "code", progress: bool = False,
                 keep_models: bool = False) -> tuple[list[dict], dict]:
    """Accuracy of every (PAF, technique) at DS and SS. Returns (records, models keyed (paf, technique, scale))."""
    techniques = list(techniques)
    # ct_pa_at first: baseline_ds borrows its epoch budget
    ordered = sorted(techniques, key=lambda t: 0 if t == "ct_pa_at" else 1)
    jobs = [(p, t) for p in pafs for t in ordered]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, leave=False, desc="PAF x technique")
    records, models, budget = [], {}, {}
    for paf, tech in it:
        r = apply_technique(float_model, paf, tech, data, cfg, order=order, budget_epochs=budget.get(paf))
        if tech == "ct_pa_at":
            budget[paf] = r.epochs
        ss_model, scales = to_static(r.model, data.x_train, cfg.eval_batch)
        for scale, m in (("DS", r.model), ("SS", ss_model)):
            acc, ce = evaluate(m, data.x_test, data.y_test, cfg.eval_batch)
            vacc, _ = evaluate(m, data.x_val, data.y_val, cfg.eval_batch)
            records.append({"paf": paf, "technique": tech, "scale": scale, "test_acc": acc, "test_ce": ce,
                            "val_acc": vacc, "epochs": r.epochs,
                            "ct_mse_init": [c.mse_init for c in r.ct], "ct_mse_best": [c.mse_best for c in r.ct],
                            "ss_scales": scales if scale == "SS" else None})
            if keep_models:
                models[(paf, tech, scale)] = m
    return records, models
