"""VGG-11-bn (CIFAR variant) and a 32x32, 3-channel version of sklearn's digits for the GPU-scale study.

Model: the VGG-11 configuration [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M] of conv3x3
(pad 1) - BN - ReLU blocks and 2x2 MaxPools, then one linear classifier on the 1x1x512 map (the
common CIFAR variant, no dropout / hidden FC layers): 8 ReLU + 5 MaxPool = 13 non-polynomial ops,
registered in forward order (``features.0`` ... ``features.28``) so Progressive Approximation walks
them front to back. ``width`` scales every channel count (1.0 = VGG-11; smaller for CPU tests).
Input [B, 3, 32, 32], output logits [B, n_classes].

Data: no CIFAR here (nothing is downloaded). :func:`digits32` takes the seeded digits split of
:func:`mlsys24.privacy.digits.load_digits_split` (1149 train / 288 validation / 360 test) and
upsamples each 8x8 image bilinearly to 32x32, replicated over 3 channels — a stand-in with CIFAR's
tensor shape, far easier than CIFAR-10.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import DigitsData, load_digits_split

__all__ = ["VGG11_CFG", "VGG", "vgg11_bn", "digits32", "data_to"]

VGG11_CFG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """conv-BN-ReLU / MaxPool stack from a VGG configuration, then a linear classifier."""

    def __init__(self, cfg=VGG11_CFG, *, width: float = 1.0, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, round(v * width))
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # [B, 3, 32, 32]
        return self.classifier(self.features(x).flatten(1))  # features: [B, C, 1, 1] -> [B, n_classes]


def vgg11_bn(width: float = 1.0, n_classes: int = 10) -> VGG:
    return VGG(VGG11_CFG, width=width, n_classes=n_classes)


def _up(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.expand(-1, channels, -1, -1).contiguous()


def digits32(seed: int = 0, size: int = 32, channels: int = 3) -> DigitsData:
    """The digits split of ``load_digits_split(seed)`` upsampled to [N, channels, size, size] in [0, 1]."""
    d = load_digits_split(seed)
    return DigitsData(_up(d.x_train, size, channels), d.y_train, _up(d.x_val, size, channels), d.y_val,
                      _up(d.x_test, size, channels), d.y_test)


def data_to(data: DigitsData, device) -> DigitsData:
    """The split with every tensor moved to ``device``."""
    return DigitsData(*(getattr(data, f).to(device) for f in
                        ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")))
