"""Feature distillation wiring: taps on the student and teacher stages that attention transfer compares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .features import FeatureTap, pair_stages, stage_nodes
from .losses import AttentionTransferLoss
from .teachers import LoadedTeacher

# Only a teacher built from the registry is an nn.Module whose graph torch.fx can trace; ONNX and TorchScript
# teachers are opaque functions.
FEATURE_TEACHER_FORMATS = ("safetensors", "state_dict")
STAGES = 3


@dataclass
class FeatureTaps:
    """`student(x)` and `teacher(x)` give (logits, stage features); `loss` compares the features pairwise."""

    student: nn.Module
    teacher: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
    loss: nn.Module
    student_nodes: list[str]
    teacher_nodes: list[str]


def check_feature_teacher(method: str | None, teacher_format: str) -> None:
    """ConfigError(feature_distillation_unsupported) when `method` needs inner layers this teacher cannot give."""
    if method and teacher_format not in FEATURE_TEACHER_FORMATS:
        raise ConfigError(f"feature distillation ({method!r}) reads the teacher's inner layers, which kdistill can "
                          "only do for a teacher given as a state dict of a registry architecture; this teacher is "
                          f"{teacher_format}. Use logit distillation (soft or dkd) with it, or upload the teacher's "
                          "state dict with its arch", field="hyperparameters.feature_distillation",
                          code="feature_distillation_unsupported")


def attach_feature_taps(student: nn.Module, teacher: LoadedTeacher, student_example: torch.Tensor,
                        teacher_example: torch.Tensor) -> FeatureTaps:
    """Taps on the last stages of both models, paired deepest first; ConfigError for a teacher without a graph."""
    check_feature_teacher("attention", teacher.format if teacher.module is not None else "opaque function")
    try:
        pairs = pair_stages(stage_nodes(student, student_example, STAGES),
                            stage_nodes(teacher.module, teacher_example, STAGES))
    except ValueError as e:
        raise ConfigError(f"feature distillation cannot find the stages of the models: {e}",
                          field="hyperparameters.feature_distillation",
                          code="feature_distillation_unsupported") from None
    s_nodes, t_nodes = [s for s, _ in pairs], [t for _, t in pairs]
    s_tap = FeatureTap(student, s_nodes)
    t_tap = FeatureTap(teacher.module, t_nodes).eval()
    outputs = None if teacher.outputs is None else torch.tensor(teacher.outputs, dtype=torch.long)

    def teacher_answer(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():  # not inference_mode: the features enter the student's loss graph
            logits, feats = t_tap(x)
        if outputs is not None:  # the teacher restricted to the dataset's classes, as LoadedTeacher.logits does
            logits = logits[:, outputs.to(logits.device)]
        return logits, feats

    return FeatureTaps(s_tap, teacher_answer, AttentionTransferLoss(), s_nodes, t_nodes)
