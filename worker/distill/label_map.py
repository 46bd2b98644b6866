"""Teacher outputs and dataset classes: matching them by name, and checking an unnamed teacher before training.

A teacher with names is mapped onto the dataset by name, so it may know more classes than the dataset.
A teacher without names is taken as output i = dataset class i; `check_teacher` then proves that on the
labelled training and validation samples before any step, because a teacher in another class order trains a
useless student that still looks like it converged (teacher and student agree with each other).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DistillError

# The label-order check fires when the best one-to-one relabelling of the teacher's outputs both scores
# LABEL_ORDER_MARGIN accuracy points above the outputs as given and cuts their error rate by the factor
# LABEL_ORDER_RATIO. The margin stops small, noisy wins; it grows as 3/sqrt(n) because with few samples a
# relabelling fits noise (a random teacher on 50 labelled digits gains about 0.2 by relabelling, a
# scrambled good one about 0.8). The ratio is taken on errors, not accuracies, so that a good teacher with
# only a few classes swapped (0.7 as given, 1.0 relabelled) is caught, while a weak one that relabelling
# merely nudges (error 0.9 to 0.7) is left to the not-predictive check.
LABEL_ORDER_MARGIN = 0.2
LABEL_ORDER_RATIO = 2.0
# A teacher is "not predictive" when it closes less than this share of the gap between the majority-class
# rate (what always answering the largest class scores) and a perfect score.
PREDICTIVE_SHARE = 0.25
MIN_CHECK_SAMPLES = 20  # below this the checks only warn: too little evidence to stop a job
CHECK_SAMPLES_PER_CLASS = 10
CHECK_SAMPLES_MIN = 1024


def parse_class_names(value: Any) -> list[str]:
    """Names as a list, a JSON list in a string, or a comma-separated string; trimmed, non-empty, unique."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"classes looks like a JSON list but does not parse ({e.msg})") from None
        else:
            value = text.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("classes must be a list of names (or one comma-separated string)")
    names = [v.strip() for v in value]
    if len(names) < 2 or any(not n for n in names):
        raise ValueError(f"classes needs at least 2 non-empty names, got {len(names)}: {names[:5]}")
    seen: dict[str, str] = {}
    for n in names:
        key = normalise(n)
        if key in seen:
            raise ValueError(f"class names must be unique (ignoring case and surrounding spaces): "
                             f"{seen[key]!r} and {n!r}")
        seen[key] = n
    return names


def normalise(name: str) -> str:
    return name.strip().casefold()


def match_classes(teacher_classes: list[str], dataset_classes: list[str]) -> list[int]:
    """For each dataset class in order, the index of the teacher output with the same name."""
    index = {normalise(n): i for i, n in enumerate(teacher_classes)}
    missing = [c for c in dataset_classes if normalise(c) not in index]
    if missing:
        shown = []
        for c in missing[:10]:
            close = difflib.get_close_matches(normalise(c), list(index), n=3, cutoff=0.5)
            near = [teacher_classes[index[k]] for k in close]
            shown.append(f"{c!r} (closest: {', '.join(repr(n) for n in near)})" if near else repr(c))
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DistillError(
            f"the teacher has no output named {', '.join(shown)}{more}; every dataset class must be one of the "
            f"teacher's {len(teacher_classes)} classes (matched by name, ignoring case): rename the dataset's "
            "class folders or give the teacher's `classes`", code="class_mismatch", field="teacher.classes")
    return [index[normalise(c)] for c in dataset_classes]


def check_sample(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Indices of the labelled samples the teacher check runs on: all of them, or a per-class subset."""
    labelled = np.flatnonzero(labels >= 0)
    cap = max(CHECK_SAMPLES_MIN, CHECK_SAMPLES_PER_CLASS * num_classes)
    if len(labelled) <= cap:
        return labelled
    rng = np.random.default_rng(seed)
    per_class = math.ceil(cap / num_classes)
    picked = [rng.permutation(labelled[labels[labelled] == c])[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(picked))


@dataclass
class TeacherCheck:
    """What the teacher scored on labelled training and validation samples, as given and under the best relabelling."""

    n: int
    accuracy: float
    majority_rate: float
    best_accuracy: float
    best_order: list[int]  # best_order[i]: the dataset class that teacher output i seems to mean
    problems: list[DistillError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "majority_rate": self.majority_rate,
                "best_accuracy": self.best_accuracy, "problems": [p.code for p in self.problems]}


def check_teacher(predictions: np.ndarray, labels: np.ndarray, classes: list[str], *,
                  check_order: bool = True) -> TeacherCheck:
    """Score the teacher's predicted classes against labels; collect `teacher_label_order` (outputs fit the
    labels far better under a permutation) and `teacher_not_predictive` (near the majority-class rate)."""
    from scipy.optimize import linear_sum_assignment

    k, n = len(classes), len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: true class, columns: teacher output
    np.add.at(confusion, (labels, predictions), 1)
    accuracy = float(np.trace(confusion)) / n if n else 0.0
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    best = float(confusion[rows, cols].sum()) / n if n else 0.0
    order = [0] * k
    for r, c in zip(rows, cols, strict=True):
        order[c] = int(r)
    majority = float(np.bincount(labels, minlength=k).max()) / n if n else 1.0
    check = TeacherCheck(n=n, accuracy=accuracy, majority_rate=majority, best_accuracy=best, best_order=order)
    margin = max(LABEL_ORDER_MARGIN, 3 / math.sqrt(max(n, 1)))
    if check_order and best - accuracy >= margin and (1 - accuracy) >= LABEL_ORDER_RATIO * (1 - best):
        shown = ", ".join(classes[c] for c in order[:50]) + (", ..." if k > 50 else "")
        check.problems.append(DistillError(
            f"the teacher's outputs seem to be in another class order than the dataset's: on {n} labelled "
            f"samples it scores {accuracy:.3f} with output i read as dataset class i, but {best:.3f} with its "
            f"outputs relabelled. The detected order of its outputs is [{shown}]. Upload the teacher again with "
            "`classes` (the names of its outputs 0..N-1, in order) and kdistill maps them to the dataset by name",
            code="teacher_label_order", field="teacher"))
    threshold = majority + PREDICTIVE_SHARE * (1 - majority)
    if not check.problems and accuracy < threshold:
        check.problems.append(DistillError(
            f"the teacher is near chance on this data: {accuracy:.3f} accuracy on {n} labelled samples, "
            f"where always answering the largest class scores {majority:.3f} (the check asks for at least "
            f"{threshold:.3f}). Check that it was trained for these classes and that its input spec (size, "
            "mean, std) matches how it was trained, or set \"checks\": {\"teacher\": \"warn\"} to distill anyway",
            code="teacher_not_predictive", field="teacher"))
    return check
