"""Loading initial student weights strictly, with an actionable message when they do not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import DistillError, StudentError
from ..statedict import load_state_dict_file

_SHOWN = 4  # keys listed per kind of mismatch; enough to recognise the problem, short enough to read


def load_student_weights(model: nn.Module, path: str | Path, *, arch: str) -> None:
    """Load the state dict at `path` into `model` with strict=True, or raise StudentError(mismatch)."""
    try:
        state = load_state_dict_file(path, what="student weights")
    except DistillError as e:
        if e.field is None:
            e.field = "student.weights"
        raise
    problems = describe_mismatch(model.state_dict(), state)
    if problems:
        raise StudentError(_mismatch_message(arch, Path(path).name, problems),
                           code="student_weights_mismatch", field="student.weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StudentError(_mismatch_message(arch, Path(path).name, [str(e).splitlines()[0]]),
                           code="student_weights_mismatch", field="student.weights") from None


def describe_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable lines for missing, unexpected and shape-mismatched keys; empty when they fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} (file {list(given[k].shape)}, model {list(v.shape)})"
              for k, v in expected.items() if k in given and given[k].shape != v.shape]
    lines = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            lines.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOWN])}{more}")
    return lines


def _mismatch_message(arch: str, filename: str, problems: list[str]) -> str:
    return (f"student weights file {filename} does not fit architecture {arch!r} as configured: "
            f"{'; '.join(problems)}. Check that student.arch, the number of classes and the input "
            "channels match the model the weights were saved from.")
