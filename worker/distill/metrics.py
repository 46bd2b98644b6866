"""Classification metrics computed from logits: accuracy, top-k, agreement, per-class precision/recall, the
confusion matrix."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float | None:
    """Top-k accuracy, or None when there are no more than k classes (it would always be 1)."""
    if logits.shape[1] <= k or not len(labels):
        return None
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """How often the student's top-1 equals the teacher's, whatever the label."""
    return float((student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean())


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class): rows are labels, columns predictions."""
    k = num_classes
    return torch.bincount(labels * k + logits.argmax(dim=1), minlength=k * k).reshape(k, k)


def per_class_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall and support per class; precision is None for a class never predicted."""
    confusion = confusion_matrix(logits, labels, len(classes))
    tp = confusion.diag().double()
    predicted = confusion.sum(dim=0).double()
    support = confusion.sum(dim=1).double()
    report = []
    for c, name in enumerate(classes):
        report.append({
            "class": name,
            "precision": float(tp[c] / predicted[c]) if predicted[c] else None,
            "recall": float(tp[c] / support[c]) if support[c] else None,
            "support": int(support[c]),
        })
    return report
