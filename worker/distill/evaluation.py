"""Scoring a split with honest error bars: accuracies with Wilson intervals, the distillation gain with a
paired bootstrap interval and McNemar's exact test (student and baseline answer the same samples)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .metrics import agreement, topk_accuracy

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
BOOTSTRAP_RESAMPLES = 10_000


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927): unlike the normal approximation it stays inside
    [0, 1] and keeps its coverage for small n and accuracies near 0 or 1."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_gain_interval(a_correct: np.ndarray, b_correct: np.ndarray, *, level: float = 0.95,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(a) - accuracy(b) on the same samples (Efron & Tibshirani
    1993). Resampling pairs only moves the counts of the two kinds of disagreement, so the bootstrap
    draws those counts from a multinomial: exact, and O(resamples) whatever the split's size."""
    n = len(a_correct)
    if n == 0:
        return (-1.0, 1.0)
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return (float(lo), float(hi))


def mcnemar_p_value(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided exact McNemar test (McNemar 1947): are the samples only `a` gets right as common as the
    ones only `b` gets right? A binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def split_report(labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None = None,
                 baseline: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracies (with 95% intervals) of the student, teacher and baseline logits on one labelled split,
    the student's agreement with the teacher, and the gain over the baseline with its paired interval."""
    y = labels.cpu()
    n = len(y)
    s_ok = (student.cpu().argmax(1) == y).numpy()
    out: dict[str, Any] = {"n": n, **_accuracy("student", s_ok),
                           "student_top5": topk_accuracy(student.cpu(), y)}
    if teacher is not None:
        out |= _accuracy("teacher", (teacher.cpu().argmax(1) == y).numpy())
        out["agreement"] = agreement(student.cpu(), teacher.cpu())
    if baseline is not None:
        b_ok = (baseline.cpu().argmax(1) == y).numpy()
        out |= _accuracy("baseline", b_ok)
        out["gain"] = float(s_ok.mean() - b_ok.mean()) if n else None
        lo, hi = paired_gain_interval(s_ok, b_ok)
        out["gain_ci"] = [lo, hi]
        out["gain_p_value"] = mcnemar_p_value(s_ok, b_ok)
        # "helped" only when the whole interval lies above zero; a user can act on that sentence
        out["distillation_helped"] = bool(lo > 0)
    return out


def _accuracy(who: str, correct: np.ndarray) -> dict[str, Any]:
    n, k = len(correct), int(correct.sum())
    return {f"{who}_accuracy": k / n if n else None, f"{who}_accuracy_ci": list(wilson_interval(k, n))}
