"""The CPU-scale testbed for SmartPAF: sklearn's bundled 8x8 digits and a small CNN with 4 non-polynomial ops.

Split (seeded, stratified): 360 test images, and of the remaining 1437 a 20 % validation split (used by
Alternate Training's model selection) and the rest for training / calibration (CT inputs, SS scales).

Model (default, the paper card's): conv(1->16, 3x3, pad 1) - BN - ReLU - MaxPool2 -> conv(16->32) - BN - ReLU
- MaxPool2 -> FC(32*2*2 -> 10): 4 non-polynomial ops. Widths and the number of conv blocks per stage are
arguments. Input [B, 1, 8, 8] (pixels / 16), output logits [B, 10].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DigitsData", "load_digits_split", "DigitsCNN", "train_float", "evaluate"]


@dataclass
class DigitsData:
    x_train: torch.Tensor   # [N, 1, 8, 8] float32 in [0, 1]
    y_train: torch.Tensor   # [N] int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_digits_split(seed: int = 0, n_test: int = 360, val_fraction: float = 0.2) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]          # [1797, 1, 8, 8]
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y)
    x_tr, x_val, y_tr, y_val = train_test_split(x_rest, y_rest, test_size=val_fraction, random_state=seed,
                                                stratify=y_rest)
    t = torch.from_numpy
    return DigitsData(t(x_tr), t(y_tr), t(x_val), t(y_val), t(x_test), t(y_test))


class DigitsCNN(nn.Module):
    """Two stages of [conv3x3 - BN - ReLU] x ``depth`` + MaxPool2, then FC.  [B, 1, 8, 8] -> [B, 10].

    Modules are registered in forward order (PA replaces the non-polynomial layers in that order).
    """

    def __init__(self, c1: int = 16, c2: int = 32, depth: int = 1, n_classes: int = 10):
        super().__init__()
        self.c1, self.c2, self.depth = c1, c2, depth
        cin = 1
        for stage, cout in enumerate((c1, c2), start=1):
            for j in range(1, depth + 1):
                sfx = f"{stage}" if depth == 1 else f"{stage}{chr(ord('a') + j - 1)}"
                setattr(self, f"conv{sfx}", nn.Conv2d(cin, cout, 3, padding=1))
                setattr(self, f"bn{sfx}", nn.BatchNorm2d(cout))
                setattr(self, f"relu{sfx}", nn.ReLU())
                cin = cout
            setattr(self, f"pool{stage}", nn.MaxPool2d(2))
        self.fc = nn.Linear(c2 * 2 * 2, n_classes)
        self._order = [n for n, _ in self.named_children() if n != "fc"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:         # [B, 1, 8, 8]
        for name in self._order:                                 # -> [B, c1, 4, 4] -> [B, c2, 2, 2]
            x = getattr(self, name)(x)
        return self.fc(x.flatten(1))                             # [B, 10]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 120) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) in eval mode, in fixed-size batches (DS scales are per batch)."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(logits, y[i:i + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    n = max(len(y), 1)
    acc, ce = 100.0 * correct / n, loss / n
    if not np.isfinite(ce):
        ce = float("inf")
    return acc, ce


def train_float(model: nn.Module, data: DigitsData, *, epochs: int = 15, lr: float = 3e-3, batch_size: int = 64,
                seed: int = 0) -> nn.Module:
    """Plain float training (Adam, cosine schedule), seeded and deterministic on CPU."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.y_train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model
