"""Teacher names versus dataset classes, and the pre-training teacher check (margins tested at their edges)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.distill.errors import DistillError
from worker.distill.label_map import (
    LABEL_ORDER_MARGIN,
    LABEL_ORDER_RATIO,
    PREDICTIVE_SHARE,
    check_sample,
    check_teacher,
    match_classes,
    parse_class_names,
)

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


@pytest.mark.parametrize("value", ["a,b, c", '["a", "b", "c"]', ["a", " b ", "c"], (" a", "b", "c")])
def test_names_come_as_a_list_json_or_csv(value):
    assert parse_class_names(value) == ["a", "b", "c"]


@pytest.mark.parametrize(("value", "says"), [
    ("a,A", "unique"), (["x", " x "], "unique"), ("a,,b", "non-empty"), ("solo", "at least 2"),
    ('["a", 3]', "list of names"), ("[1, 2", "does not parse"), (7, "list of names")])
def test_bad_names_say_what_is_wrong(value, says):
    with pytest.raises(ValueError, match=says):
        parse_class_names(value)


def test_dataset_classes_are_gathered_from_the_teacher_by_name_ignoring_case_and_spaces():
    assert match_classes(CLASSES, ["Boot ", "t-shirt", "BAG"]) == [9, 0, 8]
    assert match_classes(CLASSES, CLASSES) == list(range(10))


def test_a_missing_class_names_it_and_the_closest_teacher_names():
    with pytest.raises(DistillError) as err:
        match_classes(CLASSES, ["boot", "sneakers", "ankle-boot", "xylophone"])
    e = err.value
    assert e.code == "class_mismatch"
    assert "'sneakers' (closest: 'sneaker'" in e.message
    assert "'ankle-boot' (closest: " in e.message and "'boot'" in e.message
    assert "'xylophone'" in e.message and "'xylophone' (closest" not in e.message


def _predictions(labels: np.ndarray, accuracy: float, k: int, seed: int = 0) -> np.ndarray:
    """Predictions right on the first `accuracy` share of each class, uniformly wrong elsewhere."""
    rng = np.random.default_rng(seed)
    pred = labels.copy()
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        wrong = idx[round(accuracy * len(idx)):]
        pred[wrong] = (labels[wrong] + rng.integers(1, k, len(wrong))) % k
    return pred


def test_a_good_teacher_passes():
    labels = np.repeat(np.arange(10), 30)
    check = check_teacher(_predictions(labels, 0.95, 10), labels, CLASSES)
    assert check.problems == [] and check.accuracy == pytest.approx(0.95, abs=0.02)
    assert check.best_order == list(range(10))


def test_a_teacher_in_another_class_order_is_caught_with_the_order_it_detected():
    labels = np.repeat(np.arange(10), 30)
    perm = np.roll(np.arange(10), 3)  # teacher output perm[c] means class c
    check = check_teacher(perm[_predictions(labels, 0.9, 10)], labels, CLASSES)
    assert [p.code for p in check.problems] == ["teacher_label_order"]
    assert check.best_accuracy == pytest.approx(0.9, abs=0.01) and check.accuracy < 0.05
    assert check.best_order == [int(np.flatnonzero(perm == o)[0]) for o in range(10)]
    message = check.problems[0].message
    assert "[" + ", ".join(CLASSES[c] for c in check.best_order) + "]" in message
    assert "`classes`" in message


def test_the_order_check_is_off_for_named_teachers():
    labels = np.repeat(np.arange(4), 30)
    check = check_teacher((labels + 1) % 4, labels, CLASSES[:4], check_order=False)
    assert [p.code for p in check.problems] == ["teacher_not_predictive"]


def test_a_random_teacher_on_few_samples_is_not_mistaken_for_a_reordered_one():
    # 50 samples: relabelling a random teacher gains ~0.2 by chance, under the sample-size margin of 3/sqrt(50)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        labels = np.repeat(np.arange(10), 5)
        check = check_teacher(rng.integers(0, 10, 50), labels, CLASSES)
        assert [p.code for p in check.problems] == ["teacher_not_predictive"], seed


def _partly_swapped(right: int, cycled: int, on_cycle: float, k: int = 10, per_class: int = 300) -> list[str]:
    """`right` classes always right; `cycled` classes predicted as the next one in their cycle `on_cycle` of
    the time and right otherwise; the remaining classes right half the time."""
    labels = np.repeat(np.arange(k), per_class)
    pred = labels.copy()
    cycle = list(range(right, right + cycled))
    for i, c in enumerate(cycle):
        idx = np.flatnonzero(labels == c)
        pred[idx[:int(on_cycle * per_class)]] = cycle[(i + 1) % cycled]
    for c in range(right + cycled, k):
        idx = np.flatnonzero(labels == c)
        pred[idx[:per_class // 2]] = (c + 1 - right - cycled) % (k - right - cycled) + right + cycled
    return [p.code for p in check_teacher(pred, labels, CLASSES[:k]).problems]


def test_label_order_needs_both_the_margin_and_the_error_ratio():
    assert (LABEL_ORDER_MARGIN, LABEL_ORDER_RATIO, PREDICTIVE_SHARE) == (0.2, 2.0, 0.25)
    # 7 classes right, 3 in a cycle: 0.7 as given, 1.0 relabelled; margin 0.3, error 0.3 -> 0: caught
    assert _partly_swapped(right=7, cycled=3, on_cycle=1.0) == ["teacher_label_order"]
    # 8 right, 2 swapped 60% of the time: 0.88 -> 0.92; the error ratio is met, the margin (0.04) is not
    assert _partly_swapped(right=8, cycled=2, on_cycle=0.6) == []
    # 4 right, 6 in a cycle 40% of the time: 0.76 -> ...: a relabelling cannot beat the outputs as given
    assert _partly_swapped(right=4, cycled=6, on_cycle=0.4) == []


def test_the_error_ratio_spares_a_weak_teacher_that_relabelling_only_nudges():
    # 3 classes; every class predicted as itself 35% of the time and as the next one 60%: given 0.35, relabelled
    # 0.6: a margin of 0.25, but the error only falls from 0.65 to 0.4 (x1.6): weak, not reordered, and
    # reported as such
    labels = np.repeat(np.arange(3), 400)
    pred = labels.copy()
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        pred[idx[:240]] = (c + 1) % 3
        pred[idx[240:260]] = (c + 2) % 3
    check = check_teacher(pred, labels, CLASSES[:3])
    assert check.accuracy == pytest.approx(0.35) and check.best_accuracy == pytest.approx(0.6)
    assert [p.code for p in check.problems] == ["teacher_not_predictive"]


def test_a_teacher_near_the_majority_rate_is_not_predictive_and_the_threshold_follows_imbalance():
    labels = np.array([0] * 80 + [1] * 20)
    always_zero = np.zeros(100, dtype=np.int64)
    check = check_teacher(always_zero, labels, ["a", "b"])
    assert check.majority_rate == 0.8 and check.accuracy == 0.8
    assert [p.code for p in check.problems] == ["teacher_not_predictive"]
    assert "0.800" in check.problems[0].message and '"warn"' in check.problems[0].message
    better = always_zero.copy()
    better[80:95] = 1  # 0.95 accuracy: well above 0.8 + 0.25 * 0.2 = 0.85
    assert check_teacher(better, labels, ["a", "b"]).problems == []


def test_the_check_sample_is_all_labels_or_a_per_class_subset():
    labels = np.array([-1, 0, 1, -1, 1, 0])
    assert check_sample(labels, 2, seed=0).tolist() == [1, 2, 4, 5]
    many = np.repeat(np.arange(3), 2000)
    picked = check_sample(many, 3, seed=0)
    assert len(picked) == 1026 and np.bincount(many[picked]).tolist() == [342, 342, 342]
    assert picked.tolist() == check_sample(many, 3, seed=0).tolist()
