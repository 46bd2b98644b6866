"""Distillation losses, each a small module with a reference to its paper.

Label convention everywhere: `labels[i] == -1` marks an unlabeled (transfer-set) sample, which learns
from the teacher alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

UNLABELED = -1


def standardize_logits(z: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score over the classes: (z - mean) / (std + 1e-7), with the unbiased std as in the
    reference code of Sun et al. 2024 ("Logit Standardization in Knowledge Distillation", arXiv:2403.01427)."""
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + 1e-7)


class SoftTargetLoss(nn.Module):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).

    KL(softmax(t/T) || softmax(s/T)) averaged over the batch and scaled by T^2, so the gradient's size
    does not shrink as 1/T^2 when the temperature rises (section 2 of the paper).

    With `standardize`, both logit vectors are z-scored first (Sun et al. 2024, arXiv:2403.01427): the student
    then matches the teacher's logit *relations* rather than their scale and shift, and T is the paper's
    "base temperature".
    """

    def __init__(self, temperature: float, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        s, te = student_logits.float(), teacher_logits.detach().float()
        if self.standardize:
            s, te = standardize_logits(s), standardize_logits(te)
        log_p_s = F.log_softmax(s / t, dim=1)
        log_p_t = F.log_softmax(te / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class DecoupledKDLoss(nn.Module):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR, arXiv:2203.08679):
    alpha * TCKD + beta * NCKD, each a batch-mean KL scaled by T^2.

    TCKD compares the binary (target, not-target) distributions; NCKD compares the distributions over the
    non-target classes alone. Classical KD is TCKD + (1 - p_target_teacher) * NCKD per sample (eq. 1), so NCKD
    is suppressed exactly where the teacher is confident; DKD's beta frees it. `standardize` z-scores both
    logit vectors first (Sun et al. 2024, arXiv:2403.01427).
    """

    def __init__(self, temperature: float, alpha: float = 1.0, beta: float = 8.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if alpha < 0 or beta < 0:
            raise ValueError("DKD's alpha and beta must be >= 0")
        self.temperature, self.alpha, self.beta, self.standardize = temperature, alpha, beta, standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        s, te = student_logits.float(), teacher_logits.detach().float()
        if self.standardize:
            s, te = standardize_logits(s), standardize_logits(te)
        gt = F.one_hot(target, s.shape[1]).bool()
        tckd = _binary_kl(s / t, te / t, gt) * (t * t)
        nckd = _non_target_kl(s / t, te / t, gt) * (t * t)
        return self.alpha * tckd + self.beta * nckd


def _binary_kl(s: torch.Tensor, t: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL between the teacher's and student's (p_target, 1 - p_target), in log space: mdistiller
    takes log(1 - p_target) of a probability, which is -inf once p_target rounds to 1."""
    def log_binary(z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.masked_fill(~gt, -math.inf).logsumexp(dim=1)
        log_other = log_p.masked_fill(gt, -math.inf).logsumexp(dim=1)
        return torch.stack([log_target, log_other], dim=1)

    return F.kl_div(log_binary(s), log_binary(t), reduction="batchmean", log_target=True)


def _non_target_kl(s: torch.Tensor, t: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL between the distributions over the non-target classes. mdistiller subtracts 1000 from
    the target logit; dropping the target column is the same number without the magic constant."""
    n, k = s.shape
    others = ~gt
    return F.kl_div(F.log_softmax(s[others].view(n, k - 1), dim=1), F.log_softmax(t[others].view(n, k - 1), dim=1),
                    reduction="batchmean", log_target=True)


class AttentionTransferLoss(nn.Module):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR, arXiv:1612.03928), in
    RepDistiller's form: sum over stage pairs of mean((q_s - q_t)^2), q = l2-normalised flat mean_c(|f|^p).

    Attention maps average over channels, so channel counts may differ; when spatial sizes differ, the larger
    map is average-pooled to the smaller one's size before flattening. Teacher features are detached.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        if len(student_feats) != len(teacher_feats) or not student_feats:
            raise ValueError(f"attention transfer needs matching, non-empty lists of stage features; got "
                             f"{len(student_feats)} student and {len(teacher_feats)} teacher stages")
        losses = []
        for f_s, f_t in zip(student_feats, teacher_feats, strict=True):
            a_s, a_t = self._attention(f_s), self._attention(f_t.detach())
            size = (min(a_s.shape[-2], a_t.shape[-2]), min(a_s.shape[-1], a_t.shape[-1]))
            a_s, a_t = F.adaptive_avg_pool2d(a_s, size), F.adaptive_avg_pool2d(a_t, size)
            q_s, q_t = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.flatten(1), dim=1)
            losses.append((q_s - q_t).pow(2).mean())
        return torch.stack(losses).sum()

    def _attention(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 4:
            raise ValueError(f"attention transfer needs [N, C, H, W] features, got shape {tuple(f.shape)}")
        # float32: |f|^p of half-precision activations overflows easily. [N, 1, H, W] so pooling sees one channel.
        return f.float().abs().pow(self.p).mean(dim=1, keepdim=True)


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
    # Feature term, for logging; DistillationLoss leaves it at zero (the trainer adds the weighted feature loss).
    feature: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.feature is None:
            self.feature = torch.zeros_like(self.total.detach())


KINDS = ("soft", "hard", "dkd")


class DistillationLoss(nn.Module):
    """total = alpha * distill + (1 - alpha) * label_ce.

    Class weights, when given, weight the label term only (see HardDistillationLoss for why).

    The distillation term (soft, hard or dkd) averages over every sample of the batch, labelled or not; the
    label term averages over the labelled ones. So a transfer set teaches through the teacher alone.
    With the teacher's logits absent (`teacher_logits=None`) this is plain label cross-entropy: the
    baseline that distillation has to beat.

    A feature term (attention transfer) is not computed here: the caller adds `weight * AttentionTransferLoss`
    to `total` itself, since only it holds the stage features. `LossParts.feature` stays zero.
    """

    def __init__(self, *, kind: str = "soft", temperature: float = 4.0, alpha: float = 0.9,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 standardize: bool = False, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
                 dkd_warmup: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if standardize and kind == "hard":
            raise ValueError("standardize applies to soft and dkd distillation; the teacher's argmax ignores it")
        if dkd_warmup < 0:
            raise ValueError("dkd_warmup must be >= 0")
        self.kind, self.alpha, self.dkd_warmup = kind, alpha, dkd_warmup
        self.distill: nn.Module
        if kind == "soft":
            self.distill = SoftTargetLoss(temperature, standardize)
        elif kind == "hard":
            self.distill = HardDistillationLoss(label_smoothing)
        else:
            self.distill = DecoupledKDLoss(temperature, dkd_alpha, dkd_beta, standardize)
        self.label = LabelCrossEntropy(label_smoothing, class_weights)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, *,
                epoch: float = math.inf, mixed_labels: torch.Tensor | None = None, lam: float = 1.0) -> LossParts:
        """The loss of one batch at training position `epoch` (fractional epochs; DKD's warm-up reads it).

        For a mixup/cutmix batch (input lam * x + (1 - lam) * x[perm]) pass `mixed_labels = labels[perm]`:
        the label term mixes both labels' cross-entropies over the samples where both are known.
        """
        if mixed_labels is None:
            label = self.label(student_logits, labels)
        else:
            label = self._mixed_label(student_logits, labels, mixed_labels, lam)
        if teacher_logits is None:
            return LossParts(total=label, distill=torch.zeros_like(label), label=label)
        if self.kind == "dkd":
            distill = self.distill(student_logits, teacher_logits,
                                   _dkd_target(labels, teacher_logits, mixed_labels, lam))
            if self.dkd_warmup > 0:  # mdistiller ramps DKD in: its NCKD weight is large against a random student
                distill = distill * min(epoch / self.dkd_warmup, 1.0)
        else:
            distill = self.distill(student_logits, teacher_logits)
        return LossParts(total=self.alpha * distill + (1.0 - self.alpha) * label, distill=distill, label=label)

    def _mixed_label(self, logits: torch.Tensor, labels: torch.Tensor, mixed_labels: torch.Tensor,
                     lam: float) -> torch.Tensor:
        if mixed_labels.shape != labels.shape:
            raise ValueError("mixed_labels must have the shape of labels")
        if not 0.0 <= lam <= 1.0:
            raise ValueError("lam must be in [0, 1]")
        # A sample mixed with an unlabeled one has only part of a label: it learns from the teacher alone.
        both = (labels != UNLABELED) & (mixed_labels != UNLABELED)
        a = labels.masked_fill(~both, UNLABELED)
        b = mixed_labels.masked_fill(~both, UNLABELED)
        return lam * self.label(logits, a) + (1.0 - lam) * self.label(logits, b)


def _dkd_target(labels: torch.Tensor, teacher_logits: torch.Tensor, mixed_labels: torch.Tensor | None,
                lam: float) -> torch.Tensor:
    """DKD's target class per sample: the dominant label of a (mixed) sample, else the teacher's argmax."""
    target = labels if mixed_labels is None or lam >= 0.5 else mixed_labels
    return torch.where(target != UNLABELED, target, teacher_logits.argmax(dim=1))


def inverse_frequency_weights(class_counts: torch.Tensor) -> torch.Tensor:
    """Weights n / (k * n_c) (King & Zeng's "balanced" heuristic, as scikit-learn uses); empty classes get 0."""
    counts = class_counts.double()
    present = counts > 0
    k = int(present.sum())
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (k * counts[present])
    return weights.float()
