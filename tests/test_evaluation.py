"""Intervals: Wilson for accuracies, a paired bootstrap and McNemar's test for the gain over the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from worker.distill.evaluation import mcnemar_p_value, paired_gain_interval, split_report, wilson_interval
from worker.distill.metrics import confusion_matrix, per_class_report


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    # reference values from the closed form, as in Newcombe (1998), table I
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-4)


def test_wilson_interval_stays_in_range_and_narrows_with_n():
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] > 0.6
    assert wilson_interval(0, 0) == (0.0, 1.0)
    small, large = wilson_interval(9, 10), wilson_interval(900, 1000)
    assert large[1] - large[0] < (small[1] - small[0]) / 5


def test_paired_interval_covers_the_gain_and_tightens_when_answers_agree():
    rng = np.random.default_rng(0)
    b = rng.random(500) < 0.7
    a = b.copy()
    flip = rng.choice(np.flatnonzero(~b), 60, replace=False)
    a[flip] = True  # the student gets 60 more right and nothing worse: a clear, paired gain of 0.12
    lo, hi = paired_gain_interval(a, b)
    assert 0 < lo < 0.12 < hi < 0.2
    # the same marginal accuracies with independent errors: a wider interval that now reaches zero-ish
    c = rng.permutation(a)
    lo2, hi2 = paired_gain_interval(c, b)
    assert hi2 - lo2 > (hi - lo) * 1.5


def test_mcnemar_is_the_binomial_test_on_disagreements():
    a = np.array([True] * 12 + [False] * 3 + [True] * 50)
    b = np.array([False] * 12 + [True] * 3 + [True] * 50)
    assert mcnemar_p_value(a, b) == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert mcnemar_p_value(a, a) == 1.0


def test_split_report_scores_each_model_on_the_same_labels():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    eye = torch.eye(3)
    student = eye[torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])]  # 7/8
    teacher = eye[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])]  # 8/8
    baseline = eye[torch.tensor([0, 1, 0, 0, 2, 2, 1, 0])]  # 4/8
    r = split_report(y, student, teacher, baseline)
    assert r["n"] == 8 and r["student_accuracy"] == 7 / 8 and r["teacher_accuracy"] == 1.0
    assert r["baseline_accuracy"] == 0.5 and r["gain"] == pytest.approx(3 / 8)
    assert r["agreement"] == 7 / 8
    assert r["student_accuracy_ci"] == pytest.approx(list(wilson_interval(7, 8)))
    lo, hi = r["gain_ci"]
    assert lo <= 3 / 8 <= hi and r["gain_p_value"] == pytest.approx(binomtest(3, 3, 0.5).pvalue)
    assert r["distillation_helped"] is (lo > 0)
    alone = split_report(y, student)
    assert "gain" not in alone and "teacher_accuracy" not in alone


def test_confusion_matrix_and_per_class_report_count_by_hand():
    # labels 0 0 1 1 2; predictions 0 1 1 1 0
    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 3).float()
    assert confusion_matrix(logits, labels, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    report = per_class_report(logits, labels, ["a", "b", "c"])
    assert report == [
        {"class": "a", "precision": 0.5, "recall": 0.5, "support": 2},
        {"class": "b", "precision": 2 / 3, "recall": 1.0, "support": 2},
        {"class": "c", "precision": None, "recall": 0.0, "support": 1}]  # never predicted: no precision
