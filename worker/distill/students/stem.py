"""Adapting a model's stem to another number of input channels."""

from __future__ import annotations

import torch
from torch import nn


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Conv2d:
    """Swap the first nn.Conv2d (in module order) for one taking `in_channels`; returns the new conv."""
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d to adapt to {in_channels} input channels")
    name, old = found
    if old.in_channels == in_channels:
        return old
    if old.groups != 1:
        raise ValueError(f"first conv {name} is grouped (groups={old.groups}); cannot change its in_channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=1, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        # Cycle the model's own freshly initialised filters over the new channels, so the new stem keeps the
        # init scheme the architecture chose; rescale so the output variance stays as with 3 channels.
        idx = torch.arange(in_channels, device=old.weight.device) % old.in_channels
        new.weight.copy_(old.weight[:, idx] * (old.in_channels / in_channels) ** 0.5)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return new
