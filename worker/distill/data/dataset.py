"""The in-memory dataset the trainer uses: uint8 image tensors, labels, and the train/val(/test) split."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..spec import DataSpec
from .imagefolder import FolderListing, decode_images, plan_images, scan_image_folder, verify_images
from .npz import NpzArrays, inspect_npz, read_npz, to_nchw
from .sizes import ensure_decoded_fits
from .source import open_source
from .split import carve_splits


@dataclass
class ImageSet:
    """Images as stored, uint8 [N, C, H, W], and int64 labels [N] where -1 marks unlabeled."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """Train (labelled samples first, then the unlabeled ones), a labelled-only validation set and, optionally,
    a labelled-only held-out test set that never overlaps train or val."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    format: str  # "imagefolder" | "npz"
    val_source: str  # "given" | "split"
    test: ImageSet | None = None  # None: the dataset has no test split and data.test_fraction is 0
    test_source: str | None = None  # "given" | "split" | None (no test split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train_labelled(self) -> int:
        return int((self.train.labels >= 0).sum())

    @property
    def num_unlabeled(self) -> int:
        return int((self.train.labels < 0).sum())

    @property
    def num_val(self) -> int:
        return len(self.val)

    @property
    def num_test(self) -> int:
        return 0 if self.test is None else len(self.test)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def class_counts(self) -> torch.Tensor:
        """Labelled training samples per class, int64 [num_classes] (for automatic class weights)."""
        labels = self.train.labels
        return torch.bincount(labels[labels >= 0], minlength=self.num_classes)

    def info(self) -> DatasetInfo:
        return DatasetInfo(format=self.format, classes=list(self.classes), num_classes=self.num_classes,
                           num_train=self.num_train_labelled, num_val=self.num_val,
                           num_unlabeled=self.num_unlabeled, channels=self.channels,
                           image_size=self.image_size, val_source=self.val_source, num_test=self.num_test,
                           test_source=self.test_source)


@dataclass
class DatasetInfo:
    """What an upload holds, as `load_dataset` would; `num_train` counts labelled samples after the splits."""

    format: str
    classes: list[str]
    num_classes: int
    num_train: int
    num_val: int
    num_unlabeled: int
    channels: int
    image_size: tuple[int, int]
    val_source: str
    num_test: int  # labelled held-out test samples; 0 when there is no test split
    test_source: str | None  # "given" | "split" | None (no test split)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        return out


def load_dataset(path: str | Path, spec: DataSpec, *, seed: int, target_size: tuple[int, int] | None = None,
                 workdir: Path | None = None) -> DatasetSplits:
    """Read an `.npz`, an archive or a folder into memory, splitting off test data (when the dataset has none
    and `spec.test_fraction` > 0) and validation data (when none is given)."""
    with open_source(path, spec, workdir=workdir) as src:
        if src.format == "npz":
            arrays = read_npz(src.path, max_files=spec.max_files, max_decoded_bytes=spec.max_decoded_bytes)
            return _npz_splits(arrays, spec, seed=seed, target_size=target_size)
        return _folder_splits(scan_image_folder(src.path), spec, seed=seed, target_size=target_size)


def inspect_dataset(path: str | Path, spec: DataSpec, *, workdir: Path | None = None) -> DatasetInfo:
    """Describe a dataset without keeping it.

    Image files are decoded once to prove them readable; `.npz` images are only described from their array
    headers (their shapes, dtypes and sizes are checked, their pixels never loaded), and only labels are read."""
    with open_source(path, spec, workdir=workdir) as src:
        if src.format == "npz":
            a = inspect_npz(src.path, max_files=spec.max_files, max_decoded_bytes=spec.max_decoded_bytes)
            plan = _plan(a.y, n_val=_len(a.y_val), n_test=_len(a.y_test), spec=spec, seed=0)
            return DatasetInfo(format="npz", classes=a.classes, num_classes=len(a.classes),
                               num_train=len(plan.keep), num_val=plan.num_val, num_unlabeled=a.num_unlabeled,
                               channels=a.channels, image_size=a.image_size, val_source=plan.val_source,
                               num_test=plan.num_test, test_source=plan.test_source)
        listing = scan_image_folder(src.path)
        files = listing.train_files + listing.val_files + listing.test_files + listing.unlabeled_files
        image_plan = plan_images(files, listing.root)
        verify_images(files, listing.root, image_plan)
        # the counts do not depend on the seed: per-class sizes are fixed, only which samples move is seeded
        plan = _plan(np.array(listing.train_labels, dtype=np.int64), n_val=len(listing.val_files),
                     n_test=len(listing.test_files), spec=spec, seed=0)
        return DatasetInfo(format="imagefolder", classes=listing.classes, num_classes=len(listing.classes),
                           num_train=len(plan.keep), num_val=plan.num_val,
                           num_unlabeled=len(listing.unlabeled_files), channels=image_plan.channels,
                           image_size=image_plan.size, val_source=plan.val_source, num_test=plan.num_test,
                           test_source=plan.test_source)


@dataclass
class _SplitPlan:
    """Which labelled training samples stay in train, and which are carved off for val and test."""

    keep: np.ndarray  # indices into the training labels that stay in train
    val: np.ndarray  # carved validation indices; empty when the dataset gives its own
    test: np.ndarray  # carved test indices; empty when the dataset gives its own or none is wanted
    val_source: str  # "given" | "split"
    test_source: str | None  # "given" | "split" | None
    n_val_given: int
    n_test_given: int

    @property
    def num_val(self) -> int:
        return self.n_val_given or len(self.val)

    @property
    def num_test(self) -> int:
        return self.n_test_given or len(self.test)


def _plan(y: np.ndarray, *, n_val: int, n_test: int, spec: DataSpec, seed: int) -> _SplitPlan:
    """The split for training labels `y` when the dataset gives `n_val` validation and `n_test` test samples.

    A given (non-empty) split is used as is; otherwise test is carved first (with a fixed seed, only when
    `spec.test_fraction` > 0), then validation from what remains with the job's `seed`."""
    keep, val, test = carve_splits(y, val_fraction=spec.val_fraction, test_fraction=0.0 if n_test else
                                   spec.test_fraction, seed=seed, carve_val=not n_val)
    test_source = "given" if n_test else ("split" if len(test) else None)
    return _SplitPlan(keep=keep, val=val, test=test, val_source="given" if n_val else "split",
                      test_source=test_source, n_val_given=n_val, n_test_given=n_test)


def _len(a: np.ndarray | None) -> int:
    return 0 if a is None else len(a)


def _folder_splits(listing: FolderListing, spec: DataSpec, *, seed: int,
                   target_size: tuple[int, int] | None) -> DatasetSplits:
    y = np.array(listing.train_labels, dtype=np.int64)
    plan = _plan(y, n_val=len(listing.val_files), n_test=len(listing.test_files), spec=spec, seed=seed)
    if plan.n_val_given:
        val_files, y_val = listing.val_files, np.array(listing.val_labels, dtype=np.int64)
    else:
        val_files, y_val = [listing.train_files[i] for i in plan.val], y[plan.val]
    if plan.n_test_given:
        test_files, y_test = listing.test_files, np.array(listing.test_labels, dtype=np.int64)
    else:
        test_files, y_test = [listing.train_files[i] for i in plan.test], y[plan.test]
    # Decoded once, in final order, so train, val and test are views of one tensor and nothing is copied.
    train_files = [listing.train_files[i] for i in plan.keep]
    files = train_files + listing.unlabeled_files + val_files + test_files
    image_plan = plan_images(files, listing.root, target_size=target_size)
    images = decode_images(files, listing.root, image_plan, max_decoded_bytes=spec.max_decoded_bytes)
    n_train = len(train_files) + len(listing.unlabeled_files)
    n_seen = n_train + len(val_files)
    train_labels = torch.cat([torch.from_numpy(y[plan.keep]),
                              torch.full((len(listing.unlabeled_files),), -1, dtype=torch.int64)])
    test = ImageSet(images[n_seen:], torch.from_numpy(y_test)) if plan.test_source else None
    return DatasetSplits(train=ImageSet(images[:n_train], train_labels),
                         val=ImageSet(images[n_train:n_seen], torch.from_numpy(y_val)),
                         classes=listing.classes, format="imagefolder", val_source=plan.val_source,
                         test=test, test_source=plan.test_source)


_Parts = list[tuple[np.ndarray, np.ndarray | None]]  # arrays to gather, each with optional row indices


def _npz_splits(a: NpzArrays, spec: DataSpec, *, seed: int,
                target_size: tuple[int, int] | None) -> DatasetSplits:
    plan = _plan(a.y, n_val=_len(a.y_val), n_test=_len(a.y_test), spec=spec, seed=seed)
    val_parts: _Parts
    test_parts: _Parts
    if plan.n_val_given and a.x_val is not None and a.y_val is not None:
        val_parts, y_val = [(a.x_val, None)], a.y_val
    else:
        val_parts, y_val = [(a.x, plan.val)], a.y[plan.val]
    if plan.n_test_given and a.x_test is not None and a.y_test is not None:
        test_parts, y_test = [(a.x_test, None)], a.y_test
    else:
        test_parts, y_test = [(a.x, plan.test)], a.y[plan.test]
    train_parts: _Parts = [(a.x, plan.keep)]
    n_unl = 0
    if a.x_unlabeled is not None:
        train_parts.append((a.x_unlabeled, None))
        n_unl = len(a.x_unlabeled)
    train_labels = np.concatenate([a.y[plan.keep], np.full(n_unl, -1, dtype=np.int64)])
    # the arrays already passed the byte limit, but a larger target size can still blow it up
    ensure_decoded_fits(len(plan.keep) + n_unl + len(y_val) + len(y_test), a.channels,
                        target_size or a.image_size, spec.max_decoded_bytes)
    test = None
    if plan.test_source:
        test = ImageSet(to_nchw(test_parts, target_size), torch.from_numpy(np.array(y_test)))
    return DatasetSplits(train=ImageSet(to_nchw(train_parts, target_size), torch.from_numpy(train_labels)),
                         val=ImageSet(to_nchw(val_parts, target_size), torch.from_numpy(np.array(y_val))),
                         classes=a.classes, format="npz", val_source=plan.val_source,
                         test=test, test_source=plan.test_source)
