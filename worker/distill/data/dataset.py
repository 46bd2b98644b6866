"""The in-memory dataset the trainer uses: uint8 image tensors, labels, and the train/val split."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..spec import DataSpec
from .imagefolder import FolderListing, decode_images, plan_images, scan_image_folder, verify_images
from .npz import NpzArrays, read_npz, to_nchw
from .sizes import ensure_decoded_fits
from .source import open_source
from .split import split_indices


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
    """Train (labelled samples first, then the unlabeled ones) and a labelled-only validation set."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    format: str  # "imagefolder" | "npz"
    val_source: str  # "given" | "split"

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
                           image_size=self.image_size, val_source=self.val_source)


@dataclass
class DatasetInfo:
    """What an upload holds, as `load_dataset` would; `num_train` counts labelled samples after the split."""

    format: str
    classes: list[str]
    num_classes: int
    num_train: int
    num_val: int
    num_unlabeled: int
    channels: int
    image_size: tuple[int, int]
    val_source: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        return out


def load_dataset(path: str | Path, spec: DataSpec, *, seed: int, target_size: tuple[int, int] | None = None,
                 workdir: Path | None = None) -> DatasetSplits:
    """Read an `.npz`, an archive or a folder into memory, splitting off validation data if none is given."""
    with open_source(path, spec, workdir=workdir) as src:
        if src.format == "npz":
            arrays = read_npz(src.path, max_files=spec.max_files, max_decoded_bytes=spec.max_decoded_bytes)
            return _npz_splits(arrays, spec, seed=seed, target_size=target_size)
        return _folder_splits(scan_image_folder(src.path), spec, seed=seed, target_size=target_size)


def inspect_dataset(path: str | Path, spec: DataSpec, *, workdir: Path | None = None) -> DatasetInfo:
    """Describe a dataset without keeping it: decodes every image once to prove it readable."""
    with open_source(path, spec, workdir=workdir) as src:
        if src.format == "npz":
            a = read_npz(src.path, max_files=spec.max_files, max_decoded_bytes=spec.max_decoded_bytes)
            n_unl = 0 if a.x_unlabeled is None else len(a.x_unlabeled)
            train, val, val_source = _counts(a.y, a.y_val, spec.val_fraction)
            return DatasetInfo(format="npz", classes=a.classes, num_classes=len(a.classes), num_train=train,
                               num_val=val, num_unlabeled=n_unl, channels=a.channels,
                               image_size=a.image_size, val_source=val_source)
        listing = scan_image_folder(src.path)
        files = listing.train_files + listing.val_files + listing.unlabeled_files
        plan = plan_images(files, listing.root)
        verify_images(files, listing.root, plan)
        y_val = np.array(listing.val_labels, dtype=np.int64) if listing.val_files else None
        train, val, val_source = _counts(np.array(listing.train_labels, dtype=np.int64), y_val,
                                         spec.val_fraction)
        return DatasetInfo(format="imagefolder", classes=listing.classes, num_classes=len(listing.classes),
                           num_train=train, num_val=val, num_unlabeled=len(listing.unlabeled_files),
                           channels=plan.channels, image_size=plan.size, val_source=val_source)


def _counts(y: np.ndarray, y_val: np.ndarray | None, val_fraction: float) -> tuple[int, int, str]:
    if y_val is not None and len(y_val):
        return len(y), len(y_val), "given"
    train, val = split_indices(y, val_fraction, seed=0)  # the counts do not depend on the seed
    return len(train), len(val), "split"


def _folder_splits(listing: FolderListing, spec: DataSpec, *, seed: int,
                   target_size: tuple[int, int] | None) -> DatasetSplits:
    y = np.array(listing.train_labels, dtype=np.int64)
    if listing.val_files:
        keep, val_files, y_val, val_source = np.arange(len(y)), listing.val_files, listing.val_labels, "given"
    else:
        keep, val_idx = split_indices(y, spec.val_fraction, seed)
        val_files = [listing.train_files[i] for i in val_idx]
        y_val, val_source = y[val_idx].tolist(), "split"
    # Decoded once, in final order, so train and val are views of one tensor and nothing is copied.
    train_files = [listing.train_files[i] for i in keep]
    files = train_files + listing.unlabeled_files + val_files
    plan = plan_images(files, listing.root, target_size=target_size)
    images = decode_images(files, listing.root, plan, max_decoded_bytes=spec.max_decoded_bytes)
    n_train = len(train_files) + len(listing.unlabeled_files)
    train_labels = torch.cat([torch.from_numpy(y[keep]),
                              torch.full((len(listing.unlabeled_files),), -1, dtype=torch.int64)])
    return DatasetSplits(train=ImageSet(images[:n_train], train_labels),
                         val=ImageSet(images[n_train:], torch.tensor(y_val, dtype=torch.int64).reshape(-1)),
                         classes=listing.classes, format="imagefolder", val_source=val_source)


def _npz_splits(a: NpzArrays, spec: DataSpec, *, seed: int,
                target_size: tuple[int, int] | None) -> DatasetSplits:
    if a.x_val is not None and a.y_val is not None and len(a.x_val):
        keep = np.arange(len(a.y))
        val_parts: list[tuple[np.ndarray, np.ndarray | None]] = [(a.x_val, None)]
        y_val, val_source = a.y_val, "given"
    else:
        keep, val_idx = split_indices(a.y, spec.val_fraction, seed)
        val_parts, y_val, val_source = [(a.x, val_idx)], a.y[val_idx], "split"
    train_parts: list[tuple[np.ndarray, np.ndarray | None]] = [(a.x, keep)]
    n_unl = 0
    if a.x_unlabeled is not None:
        train_parts.append((a.x_unlabeled, None))
        n_unl = len(a.x_unlabeled)
    train_labels = np.concatenate([a.y[keep], np.full(n_unl, -1, dtype=np.int64)])
    # the arrays already passed the byte limit, but a larger target size can still blow it up
    ensure_decoded_fits(len(keep) + n_unl + len(y_val), a.channels,
                        target_size or a.image_size, spec.max_decoded_bytes)
    return DatasetSplits(train=ImageSet(to_nchw(train_parts, target_size), torch.from_numpy(train_labels)),
                         val=ImageSet(to_nchw(val_parts, target_size), torch.from_numpy(np.array(y_val))),
                         classes=a.classes, format="npz", val_source=val_source)
