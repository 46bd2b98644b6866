"""Before the first training step: fit the teacher's outputs to the dataset's classes, then check the teacher
on labelled data, so a job that cannot produce a useful student fails in seconds instead of hours."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import DatasetSplits
from .errors import TeacherError
from .label_map import MIN_CHECK_SAMPLES, TeacherCheck, check_sample, check_teacher, match_classes
from .progress import Callbacks
from .teachers import LoadedTeacher, check_finite


@dataclass
class Preflight:
    """The teacher as the job uses it (outputs in the dataset's class order) and what its check found."""

    teacher: LoadedTeacher
    check: TeacherCheck | None
    warnings: list[dict[str, str]] = field(default_factory=list)


def fit_teacher_to_classes(teacher: LoadedTeacher, classes: list[str]) -> LoadedTeacher:
    """A named teacher answers the dataset's classes, gathered by name; an unnamed one must match the count."""
    if teacher.classes is None:
        if teacher.num_classes != len(classes):
            raise TeacherError(
                f"the teacher predicts {teacher.num_classes} classes but the dataset has {len(classes)}; use a "
                "teacher trained for this dataset's classes, or give the teacher's class names (`classes`) so "
                "kdistill can pick the dataset's classes out of its outputs",
                code="class_count_mismatch", field="teacher")
        return teacher
    outputs = match_classes(teacher.classes, classes)
    if outputs == list(range(teacher.num_classes)):
        return teacher
    return teacher.restricted_to(outputs)


def preflight(teacher: LoadedTeacher, data: DatasetSplits, *, mode: str, seed: int, predict: Any,
              callbacks: Callbacks) -> Preflight:
    """Map and check the teacher. `mode` is the job's `checks.teacher`: "fail" raises the first problem, "warn"
    records it. `predict(teacher, images)` returns logits; passed in so this module needs no trainer."""
    named = teacher.classes is not None
    fitted = fit_teacher_to_classes(teacher, data.classes)
    if fitted.outputs is not None:
        callbacks.event("info", f"the teacher's {teacher.num_classes} outputs were matched to the dataset's "
                        f"{data.num_classes} classes by name", outputs=fitted.outputs)
    result = Preflight(teacher=fitted, check=None)

    # Labelled training and validation samples; the test split stays unseen until the final score.
    labels = torch.cat([data.train.labels, data.val.labels]).numpy()
    picked = check_sample(labels, data.num_classes, seed)
    if len(picked) < MIN_CHECK_SAMPLES:
        _warn(result, callbacks, "teacher_check_skipped",
              f"only {len(picked)} labelled samples: too few to check the teacher (at least {MIN_CHECK_SAMPLES})")
        return result
    n_train = len(data.train)
    in_train, in_val = picked[picked < n_train], picked[picked >= n_train] - n_train
    images = torch.cat([data.train.images[torch.from_numpy(in_train)], data.val.images[torch.from_numpy(in_val)]])
    logits = predict(fitted, images)
    check_finite(logits, "the labelled samples of the teacher check")
    predictions = logits.argmax(1).cpu().numpy()
    check = check_teacher(predictions, np.concatenate([labels[in_train], labels[n_train + in_val]]), data.classes,
                          check_order=not named)
    result.check = check
    callbacks.event("teacher_check", f"the teacher scores {check.accuracy:.3f} on {check.n} labelled samples "
                    f"(majority-class rate {check.majority_rate:.3f})", **check.to_dict())
    for problem in check.problems:
        if mode == "fail":
            raise problem
        _warn(result, callbacks, problem.code, problem.message)
    return result


def _warn(result: Preflight, callbacks: Callbacks, code: str, message: str) -> None:
    result.warnings.append({"code": code, "message": message})
    callbacks.event("warning", message, code=code)

