"""Reading class-folder datasets: finding the layout, then decoding every image into one uint8 tensor."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError
from .archive import is_junk_name
from .sizes import ensure_decoded_fits

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
MAX_PIXELS = 1 << 26  # 67 Mpx per image (8192 x 8192); beyond that a file is far more likely a bomb
SPLIT_DIRS = ("train", "val", "test", "unlabeled")
# Pillow warns past this and refuses past twice this; our own check refuses past it.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_T = TypeVar("_T")


@dataclass
class FolderListing:
    """What a dataset folder holds, before decoding: paths lie under `root`, labels index `classes`."""

    root: Path  # the folder as given; error messages name files relative to it
    layout: str  # "split" (train/ [val/] [test/] [unlabeled/]) or "flat" (class folders at the top)
    classes: list[str]
    train_files: list[Path] = field(default_factory=list)
    train_labels: list[int] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    test_files: list[Path] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    unlabeled_files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ImagePlan:
    """How every image of a dataset is decoded: 1 (all grey) or 3 channels, one (h, w)."""

    channels: int
    size: tuple[int, int]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_junk_name(path.name)


def scan_image_folder(root: Path) -> FolderListing:
    """Find the layout under `root` and list its images; reads no pixels."""
    base = _unwrap(root)
    if (base / "train").is_dir():
        layout, class_root = "split", base / "train"
    elif lone := next((d for d in ("val", "test") if (base / d).is_dir()), None):
        raise DatasetError(f"{_rel(base / lone, root)}/ needs a train/ folder beside it holding one folder "
                           "per class", code="invalid_layout")
    else:
        layout, class_root = "flat", base
    classes = [d.name for d in _subdirs(class_root) if layout == "split" or d.name not in SPLIT_DIRS]
    listing = FolderListing(root=root, layout=layout, classes=classes)
    index = {c: i for i, c in enumerate(classes)}
    empty_classes = []
    for c in classes:
        files = _images_under(class_root / c)
        if not files:
            empty_classes.append(c)
        listing.train_files += files
        listing.train_labels += [index[c]] * len(files)
    if layout == "split":
        listing.val_files, listing.val_labels = _held_out(base / "val", "validation", index, root)
        listing.test_files, listing.test_labels = _held_out(base / "test", "test", index, root)
    if (base / "unlabeled").is_dir():
        listing.unlabeled_files = _images_under(base / "unlabeled")
    _check_listing(listing, class_root, empty_classes)
    return listing


def _held_out(folder: Path, what: str, index: dict[str, int], root: Path) -> tuple[list[Path], list[int]]:
    """The images and labels of a labelled split beside train/ (val/ or test/); its classes are train's."""
    files: list[Path] = []
    labels: list[int] = []
    if not folder.is_dir():
        return files, labels
    for d in _subdirs(folder):
        if d.name not in index:
            raise DatasetError(
                f"{_rel(d, root)}/ is a {what} class with no folder in train/ "
                f"(train classes: {', '.join(index) or 'none'}); {what} classes must be a subset",
                code="class_mismatch")
        found = _images_under(d)
        files += found
        labels += [index[d.name]] * len(found)
    return files, labels


def plan_images(files: list[Path], root: Path, *, target_size: tuple[int, int] | None = None) -> ImagePlan:
    """Read only the headers: grey if every image is grey, and the target or most common (h, w)."""
    headers = _parallel(lambda p: _header(p, root), files)
    channels = 1 if all(mode in GREY_MODES for mode, _ in headers) else 3
    size = target_size or Counter(hw for _, hw in headers).most_common(1)[0][0]
    return ImagePlan(channels=channels, size=(int(size[0]), int(size[1])))


def decode_images(files: list[Path], root: Path, plan: ImagePlan, *, max_decoded_bytes: int) -> torch.Tensor:
    """Decode `files` into one uint8 [N, C, H, W] tensor, resizing (bilinear) images of another size."""
    ensure_decoded_fits(len(files), plan.channels, plan.size, max_decoded_bytes)
    out = torch.empty((len(files), plan.channels, *plan.size), dtype=torch.uint8)

    def fill(i: int) -> None:
        out[i] = torch.from_numpy(_pixels(files[i], root, plan))

    _parallel(fill, range(len(files)))
    return out


def verify_images(files: list[Path], root: Path, plan: ImagePlan) -> None:
    """Decode every image and throw the pixels away: proves readability in constant memory."""
    _parallel(lambda p: _pixels(p, root, plan), files)


def _check_listing(listing: FolderListing, class_root: Path, empty_classes: list[str]) -> None:
    root = listing.root
    if not (listing.train_files or listing.val_files or listing.test_files or listing.unlabeled_files):
        raise DatasetError(f"no images found in the dataset (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                           "files in train/<class>/ or <class>/ folders)", code="empty_dataset")
    if len(listing.classes) < 2:
        where = "train/" if listing.layout == "split" else "the top of the dataset"
        found = ", ".join(listing.classes) or "none"
        raise DatasetError(f"found {len(listing.classes)} class folder(s) in {where} ({found}); "
                           "at least 2 classes are needed, one folder each", code="too_few_classes")
    if empty_classes:
        names = ", ".join(f"{_rel(class_root / c, root)}/" for c in empty_classes[:10])
        names += f" and {len(empty_classes) - 10} more" if len(empty_classes) > 10 else ""
        raise DatasetError(f"class folder(s) {names} hold no images (accepted: "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))})", code="empty_class")


def _unwrap(root: Path) -> Path:
    """Step into a single wrapping folder (an archive of `mydata/...`) when it holds folders itself."""
    entries = [e for e in root.iterdir() if not is_junk_name(e.name)]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in SPLIT_DIRS:
        inner = entries[0]
        if _subdirs(inner):
            return inner
    return root


def _subdirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not is_junk_name(d.name)),
                  key=lambda d: d.name)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_junk_name(d)]
        found += [Path(dirpath, f) for f in filenames if is_image_file(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


class _OverLimit(ValueError):
    """Our own refusal of an image, whose text is safe to show."""


def _unreadable(path: Path, root: Path, err: BaseException) -> DatasetError:
    # Decoders' own texts name server paths (the unpack folder) and library internals; only ours is shown.
    detail = str(err) if isinstance(err, _OverLimit) else "it is not a readable image, or it is truncated"
    return DatasetError(f"image {_rel(path, root)} cannot be read ({detail}); remove or replace the file",
                        code="unreadable_image")


def _open(path: Path, root: Path) -> Image.Image:
    try:
        img = Image.open(path)
    except Exception as e:  # decoders raise a zoo of exception types on hostile files
        raise _unreadable(path, root, e) from None
    w, h = img.size
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        img.close()
        raise _unreadable(path, root, _OverLimit(f"{w}x{h} pixels, the limit is {MAX_PIXELS} pixels"))
    return img


def _header(path: Path, root: Path) -> tuple[str, tuple[int, int]]:
    with _open(path, root) as img:
        return img.mode, (img.size[1], img.size[0])


def _pixels(path: Path, root: Path, plan: ImagePlan) -> np.ndarray:
    """One image as uint8 [C, H, W] in the plan's channels and size."""
    with _open(path, root) as img:
        try:
            img.load()
            conv = _to_grey(img) if img.mode in GREY_MODES else img
            conv = conv.convert("L" if plan.channels == 1 else "RGB")
            h, w = plan.size
            if conv.size != (w, h):
                conv = conv.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.array(conv, dtype=np.uint8)
        except Exception as e:  # truncated or corrupt data only shows up while decoding
            raise _unreadable(path, root, e) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _to_grey(img: Image.Image) -> Image.Image:
    """8-bit grey; 16-bit images are scaled down, where Pillow's convert would clip them."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr // 257
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("L")


def _parallel(fn: Callable[[_T], object], items: Iterable[_T]) -> list:
    """Map over a thread pool (Pillow decodes without the GIL); the first failure in order is raised."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
