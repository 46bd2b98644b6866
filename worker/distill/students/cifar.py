"""CIFAR-style ResNets and wide-ResNets as used across the KD literature (CRD / RepDistiller).

3x3 stride-1 stem, no max pool, adaptive average pool: they run on inputs from 8x8 to large images.
Forwards are plain tensor code so TorchScript, torch.export and ONNX export all work.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    # The references' init: kaiming fan-out for convs, identity BatchNorm, zero linear bias.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block of two 3x3 convs (He et al. 2016, CIFAR variant)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2: stem, three stages of n BasicBlocks (stride 1, 2, 2), pool, linear head."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], *, num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(widths[0], widths[1], n, stride=1)
        self.layer2 = _stage(widths[1], widths[2], n, stride=2)
        self.layer3 = _stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(cin: int, cout: int, n: int, *, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *(BasicBlock(cout, cout) for _ in range(n - 1)))


class WideBasicBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis' WRN; identity shortcuts take the raw input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.equal_in_out = cin == cout and stride == 1
        self.shortcut: nn.Module = nn.Identity()
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place on x: the identity shortcut still needs it.
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.equal_in_out:
            return x + out
        return self.shortcut(pre) + out


class WideResNet(nn.Module):
    """WRN-depth-k: stem, three stages of (depth-4)/6 pre-activation blocks of width 16k/32k/64k."""

    def __init__(self, depth: int, widen_factor: int, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = _wide_stage(widths[0], widths[1], n, stride=1)
        self.block2 = _wide_stage(widths[1], widths[2], n, stride=2)
        self.block3 = _wide_stage(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _wide_stage(cin: int, cout: int, n: int, *, stride: int) -> nn.Sequential:
    return nn.Sequential(WideBasicBlock(cin, cout, stride),
                         *(WideBasicBlock(cout, cout) for _ in range(n - 1)))


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# name → builder taking (num_classes=, in_channels=); the names match RepDistiller's.
SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, d, _THIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(CifarResNet, 8, _X4),
    "resnet32x4": partial(CifarResNet, 32, _X4),
    **{f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
}
