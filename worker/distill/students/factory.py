"""Building a student by name: `create_model`, in the spirit of timm's."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import StudentError
from .catalog import resolve_arch
from .cifar import SMALL_MODELS
from .stem import replace_first_conv
from .timm_models import create_timm_model, is_timm_arch, timm_params
from .weights import load_student_weights

# Aux heads make train-mode forward return a namedtuple; students must always return plain logits.
# init_weights=True is the builders' intended init and silences their FutureWarning about the default.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True, "transform_input": False},
    "inception_v3": {"aux_logits": False, "init_weights": True, "transform_input": False},
}


def create_model(arch: str, *, num_classes: int, in_channels: int = 3,
                 weights: str | Path | None = None) -> nn.Module:
    """A randomly initialised `arch` for `num_classes` outputs on `in_channels` inputs, optionally loaded
    from a weights file (safetensors or a torch state dict) with strict key and shape checks."""
    name = resolve_arch(arch)
    _check_args(num_classes, in_channels)
    if name in SMALL_MODELS:
        model = SMALL_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    elif is_timm_arch(name):
        model = create_timm_model(name, num_classes=num_classes, in_channels=in_channels)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                             **_EXTRA_KWARGS.get(name, {}))
        if in_channels != 3:
            replace_first_conv(model, in_channels)
    if weights is not None:
        load_student_weights(model, weights, arch=name)
    return model


CHEAP_BUILD = 50_000_000  # parameters: a real build this small takes a fraction of a second


def model_params(arch: str, num_classes: int = 1000) -> int:
    """Parameter count of `arch` with a `num_classes` head on 3-channel inputs; built on the meta device (no
    memory, no init compute) where the architecture allows it, and cached."""
    name = resolve_arch(arch)
    count = cheap_params(name, num_classes)
    return count if count is not None else _built_params(name, num_classes)


def cheap_params(arch: str, num_classes: int = 1000) -> int | None:
    """model_params where it needs no real build, else None: a listing of every architecture (the API's
    /v1/students) must not build regnet_y_128gf (2.6 GB, seconds of CPU) to show one number."""
    name = resolve_arch(arch)
    _check_args(num_classes, 3)
    # The class count only sizes the head (a Linear or 1x1 conv): the count is linear in it, so two meta
    # builds per architecture answer every class count.
    two, three = _meta_count(name, 2), _meta_count(name, 3)
    if two is None or three is None:
        return _recorded_params(name) if num_classes == 1000 else None
    return two + (three - two) * (num_classes - 2)


def _meta_count(name: str, num_classes: int) -> int | None:
    if is_timm_arch(name):
        return timm_params(name, num_classes)
    count = _meta_params(name, num_classes)
    if count is None and (_recorded_params(name) or CHEAP_BUILD) < CHEAP_BUILD:  # the smaller RegNets
        count = _built_params(name, num_classes)
    return count


@cache
def _meta_params(name: str, num_classes: int) -> int | None:
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
    except (RuntimeError, NotImplementedError):  # torchvision's RegNets compute their widths with tensor values
        return None
    return sum(p.numel() for p in model.parameters())


@cache
def _built_params(name: str, num_classes: int) -> int:
    return sum(p.numel() for p in create_model(name, num_classes=num_classes).parameters())


def _recorded_params(name: str) -> int | None:
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except (ValueError, AttributeError, KeyError):
        return None


def _check_args(num_classes: int, in_channels: int) -> None:
    # bool is an int subclass; True classes or channels is always a caller bug.
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise StudentError(f"a student needs at least 2 classes, got num_classes={num_classes!r}",
                           code="invalid_student")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or not 1 <= in_channels <= 4:
        raise StudentError(f"student input channels must be 1 to 4, got {in_channels!r}",
                           code="invalid_student", field="student.input.channels")
