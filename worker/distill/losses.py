"""Distillation losses, each a small module with a reference to its paper.

Label convention everywhere: `labels[i] == -1` marks an unlabeled (transfer-set) sample, which learns
from the teacher alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

UNLABELED = -1


class SoftTargetLoss(nn.Module):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).

    KL(softmax(t/T) || softmax(s/T)) averaged over the batch and scaled by T^2, so the gradient's size
    does not shrink as 1/T^2 when the temperature rises (section 2 of the paper).
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class LabelCrossEntropy(nn.Module):
    """Cross-entropy on the labelled samples of a batch, with optional label smoothing
    (Szegedy et al. 2016, arXiv:1512.00567) and class weights; unlabeled samples are masked out.

    With class weights the mean is weighted, as `F.cross_entropy` does. A batch with no labelled sample
    gives 0 (with a gradient path, so autocast and DDP see the same graph every step).
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != UNLABELED
        if not bool(mask.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[mask].float(), labels[mask], weight=self.class_weights,
                               label_smoothing=self.label_smoothing)


class HardDistillationLoss(nn.Module):
    """Touvron et al. 2021, "Training data-efficient image transformers" (DeiT, arXiv:2012.12877):
    cross-entropy against the teacher's argmax, on every sample (labelled or not).

    Unweighted on purpose: class weights rebalance the *labels*, and a class with few or no labels is
    exactly where the teacher's answers matter most. Weighting them would silently drop those samples.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ce = LabelCrossEntropy(label_smoothing)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.ce(student_logits, teacher_logits.argmax(dim=1))


@dataclass
class LossParts:
    total: torch.Tensor
    distill: torch.Tensor
    label: torch.Tensor


class DistillationLoss(nn.Module):
    """total = alpha * distill + (1 - alpha) * label_ce.

    Class weights, when given, weight the label term only (see HardDistillationLoss for why).

    The distillation term (soft or hard) averages over every sample of the batch, labelled or not; the
    label term averages over the labelled ones. So a transfer set teaches through the teacher alone.
    With the teacher's logits absent (`teacher_logits=None`) this is plain label cross-entropy: the
    baseline that distillation has to beat.
    """

    def __init__(self, *, kind: str = "soft", temperature: float = 4.0, alpha: float = 0.9,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if kind not in ("soft", "hard"):
            raise ValueError("kind must be 'soft' or 'hard'")
        self.alpha = alpha
        self.distill = SoftTargetLoss(temperature) if kind == "soft" else HardDistillationLoss(label_smoothing)
        self.label = LabelCrossEntropy(label_smoothing, class_weights)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None) -> LossParts:
        label = self.label(student_logits, labels)
        if teacher_logits is None:
            return LossParts(total=label, distill=torch.zeros_like(label), label=label)
        distill = self.distill(student_logits, teacher_logits)
        return LossParts(total=self.alpha * distill + (1.0 - self.alpha) * label, distill=distill, label=label)


def inverse_frequency_weights(class_counts: torch.Tensor) -> torch.Tensor:
    """Weights n / (k * n_c) (King & Zeng's "balanced" heuristic, as scikit-learn uses); empty classes get 0."""
    counts = class_counts.double()
    present = counts > 0
    k = int(present.sum())
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (k * counts[present])
    return weights.float()
