"""Carving test and validation sets out of labelled training samples: seeded and stratified by class."""

from __future__ import annotations

import math

import numpy as np

# The test split is carved with this fixed seed, never the job's: every job on the same dataset with the same
# test_fraction is then scored on the same held-out samples, so results compare across seeds and sweeps (and a
# sweep over seeds cannot leak one job's test images into another job's training set).
TEST_SPLIT_SEED = 20240229


def split_indices(labels: np.ndarray, val_fraction: float, seed: int, *,
                  fallback: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices into `labels`; every class with >= 2 samples puts >= 1 in val.

    A class with a single sample stays in train; only when every class has one sample, and `fallback` is set,
    does a plain random split take some of them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2:  # a single sample stays in train, where it teaches something
            picked.append(rng.permutation(idx)[:_val_count(len(idx), val_fraction)])
    val = np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
    if len(val) == 0 and len(labels) >= 2 and fallback:
        # every class has a single sample: a plain random split still gives a validation set
        val = np.sort(rng.permutation(len(labels))[:_val_count(len(labels), val_fraction)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train.astype(np.int64), val.astype(np.int64)


def carve_splits(labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int,
                 carve_val: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted, disjoint (train, val, test) indices into the labelled training samples `labels`.

    Test first, `test_fraction` of each class with TEST_SPLIT_SEED (0: no test carved; a class with a single
    sample always stays in train, there is no random fallback: a test set is optional, a validation set is
    not). Then, when `carve_val`, validation from what remains with the job's `seed`, its fraction scaled so
    that it is still about `val_fraction` of all of `labels`. Either carved part is empty when not carved.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rest, test = np.arange(len(labels), dtype=np.int64), np.empty(0, dtype=np.int64)
    if test_fraction > 0:
        rest, test = split_indices(labels, test_fraction, TEST_SPLIT_SEED, fallback=False)
    if not carve_val:
        return rest, np.empty(0, dtype=np.int64), test
    fraction = val_fraction / (1 - test_fraction) if len(test) else val_fraction
    keep, val = split_indices(labels[rest], min(fraction, 1.0), seed)
    return rest[keep], rest[val], test


def _val_count(n: int, fraction: float) -> int:
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))
