"""Carving a validation set out of labelled training samples: seeded and stratified by class."""

from __future__ import annotations

import math

import numpy as np


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices into `labels`; every class with >= 2 samples puts >= 1 in val."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2:  # a single sample stays in train, where it teaches something
            picked.append(rng.permutation(idx)[:_val_count(len(idx), val_fraction)])
    val = np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
    if len(val) == 0 and len(labels) >= 2:
        # every class has a single sample: a plain random split still gives a validation set
        val = np.sort(rng.permutation(len(labels))[:_val_count(len(labels), val_fraction)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train.astype(np.int64), val.astype(np.int64)


def _val_count(n: int, fraction: float) -> int:
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))
