"""Digits helpers shared by the tests (plain functions: importable from any test folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGITS_MEAN, DIGITS_STD = 0.3, 0.37
TEACHER_ARCH = "resnet20"


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # uint8 [N, 8, 8]
    y_train: np.ndarray
    x_test: np.ndarray  # held out: no run ever sees these during training or model selection
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainedTeacher:
    path: Path
    arch: str
    test_accuracy: float


def teacher_input_spec() -> dict:
    return {"channels": 1, "size": 8, "mean": [DIGITS_MEAN], "std": [DIGITS_STD]}


def few_label_npz(path: Path, digits: Digits, *, labels_per_class: int, val_per_class: int, seed: int = 0,
                  with_test: bool = False) -> Path:
    """`labels_per_class` labelled samples per class, a labelled validation set, and every other training
    image as the unlabeled transfer set (`x_unlabeled`); `with_test` adds the held-out digits as x_test/y_test."""
    rng = np.random.default_rng(seed)
    labelled, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.y_train == c))
        labelled.extend(idx[:labels_per_class])
        val.extend(idx[labels_per_class:labels_per_class + val_per_class])
    rest = np.setdiff1d(np.arange(len(digits.y_train)), np.concatenate([labelled, val]))
    test = {"x_test": digits.x_test, "y_test": digits.y_test} if with_test else {}
    np.savez(path, x=digits.x_train[labelled], y=digits.y_train[labelled], x_val=digits.x_train[val],
             y_val=digits.y_train[val], x_unlabeled=digits.x_train[rest], **test)
    return path
