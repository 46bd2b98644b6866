"""Optimisers and per-step learning-rate schedules (cosine, step, one-cycle, constant) with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .spec import Hyperparameters


def build_optimizer(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    """Weight decay applies to weights only: decaying BatchNorm scales and biases hurts small models."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.learning_rate, momentum=hp.momentum,
                               nesterov=hp.nesterov and hp.momentum > 0)
    if hp.optimizer == "adam":
        return torch.optim.Adam(groups, lr=hp.learning_rate)
    return torch.optim.AdamW(groups, lr=hp.learning_rate)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, hp: Hyperparameters) -> float:
    """The multiplier on the base learning rate at `step` (0-based) of `total_steps`."""
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if hp.scheduler == "constant":
        return 1.0
    if hp.scheduler == "step":
        return hp.gamma ** (step // (hp.step_size * steps_per_epoch))
    progress = (step - warmup) / max(1, total_steps - warmup)
    if hp.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    # one-cycle (Smith & Topin 2017): ramp up for 30% of the steps from lr/25, then cosine down to lr/1e4.
    # An explicit warm-up replaces the ramp.
    if warmup == 0 and progress < 0.3:
        return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / 0.3))
    start = 0.0 if warmup else 0.3
    down = (progress - start) / (1 - start)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, down)))


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters, *, total_steps: int,
                    steps_per_epoch: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, hp))
