"""Small helpers for tests that build models (plain functions: importable from any test folder)."""

from __future__ import annotations

import torch
from torch import nn


def scramble_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-default statistics and affine terms, so that a file that lost its buffers
    cannot match the model's logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
