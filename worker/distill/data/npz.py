"""Reading `.npz` datasets (x, y, optional x_val/y_val, x_test/y_test, x_unlabeled, classes) without unpickling
anything."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetError
from .sizes import human_bytes

KNOWN_KEYS = ("x", "y", "x_val", "y_val", "x_test", "y_test", "x_unlabeled", "classes")
IMAGE_KEYS = ("x", "x_val", "x_test", "x_unlabeled")
CHUNK = 1024  # images per copy/resize step, to bound temporaries


@dataclass
class NpzArrays:
    """Validated arrays: images uint8 [N, H, W, C] with C in (1, 3), labels int64 in 0..K-1."""

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_unlabeled: np.ndarray | None
    classes: list[str]
    x_test: np.ndarray | None = None  # a held-out test split, labelled like val
    y_test: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.x.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[1]), int(self.x.shape[2])


def is_npz(path: Path) -> bool:
    """An `.npz` file, or any zip that holds only `.npy` members."""
    if path.suffix.lower() == ".npz":
        return True
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_npz(path: Path, *, max_files: int, max_decoded_bytes: int) -> NpzArrays:
    """Load and validate an `.npz` dataset; arrays are sized from their headers before any is read."""
    name = path.name
    shapes = _peek_headers(path, max_files=max_files)
    missing = [k for k in ("x", "y") if k not in shapes]
    if missing:
        raise DatasetError(f"{name} lacks the array(s) {', '.join(missing)} (found: "
                           f"{', '.join(sorted(shapes)) or 'none'}); save it with "
                           "numpy.savez(path, x=images, y=labels)", code="missing_array")
    need = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in shapes.values())
    if need > max_decoded_bytes:
        raise DatasetError(f"{name} holds arrays of {need} bytes ({human_bytes(need)}), over the "
                           f"{human_bytes(max_decoded_bytes)} limit; raise data.max_decoded_bytes or use "
                           "fewer images", code="dataset_too_large")
    raw = _load(path, [k for k in KNOWN_KEYS if k in shapes])
    return _validate(raw, name)


def to_nchw(parts: list[tuple[np.ndarray, np.ndarray | None]],
            size: tuple[int, int] | None = None) -> torch.Tensor:
    """Gather NHWC images (optionally by index) into one uint8 NCHW tensor, resized to `size` if given."""
    c = parts[0][0].shape[3]
    hw = size or (parts[0][0].shape[1], parts[0][0].shape[2])
    total = sum(len(x) if idx is None else len(idx) for x, idx in parts)
    out = torch.empty((total, c, *hw), dtype=torch.uint8)
    pos = 0
    for x, idx in parts:
        rows = np.arange(len(x)) if idx is None else idx
        for start in range(0, len(rows), CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(x[rows[start:start + CHUNK]])).permute(0, 3, 1, 2)
            if tuple(chunk.shape[2:]) != tuple(hw):
                chunk = F.interpolate(chunk.float(), size=hw, mode="bilinear", antialias=True,
                                      align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
            out[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    return out


def _peek_headers(path: Path, *, max_files: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the known arrays, read from the `.npy` headers alone."""
    name = path.name
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            if len(members) > max_files:
                raise DatasetError(f"{name} holds {len(members)} arrays, more than the {max_files} allowed",
                                   code="archive_too_many_files")
            for key in KNOWN_KEYS:
                if f"{key}.npy" not in members:
                    continue
                with zf.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = reader(f)
                if dtype.hasobject:
                    raise DatasetError(f"{name}: array {key!r} holds pickled Python objects, which kdistill "
                                       "never loads; save plain numeric (or, for classes, str) arrays",
                                       code="unreadable_dataset")
                out[key] = (tuple(shape), dtype)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise DatasetError(f"{name} is not a readable .npz file ({e}); save it with numpy.savez",
                           code="unreadable_dataset") from None
    return out


def _load(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{path.name} cannot be loaded ({e}); save it with numpy.savez and no object "
                           "arrays", code="unreadable_dataset") from None


def _validate(raw: dict[str, np.ndarray], name: str) -> NpzArrays:
    x = _images(raw["x"], "x", name)
    y = _labels(raw["y"], "y", name, len(x))
    if len(x) == 0:
        raise DatasetError(f"{name}: x holds no images", code="empty_dataset")
    classes = _classes(raw.get("classes"), name)
    k = len(classes) if classes is not None else int(y.max()) + 1
    _in_range(y, "y", name, k)
    if k < 2 or len(np.unique(y)) < 2:
        raise DatasetError(f"{name}: y holds {len(np.unique(y))} distinct label(s) of {k} class(es); "
                           "at least 2 classes are needed", code="too_few_classes")
    x_val, y_val = _labelled_split(raw, "val", x, k, name)
    x_test, y_test = _labelled_split(raw, "test", x, k, name)
    x_unl = None
    if "x_unlabeled" in raw:
        x_unl = _same_shape(_images(raw["x_unlabeled"], "x_unlabeled", name), x, "x_unlabeled", name)
    names = classes if classes is not None else [str(i) for i in range(k)]
    return NpzArrays(x=x, y=y, x_val=x_val, y_val=y_val, x_unlabeled=x_unl, classes=names, x_test=x_test,
                     y_test=y_test)


def _labelled_split(raw: dict[str, np.ndarray], split: str, x: np.ndarray, k: int,
                    name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """x_<split> and y_<split> (val or test): both or neither, images shaped like x, labels in 0..k-1."""
    xk, yk = f"x_{split}", f"y_{split}"
    if (xk in raw) != (yk in raw):
        have, lack = (xk, yk) if xk in raw else (yk, xk)
        raise DatasetError(f"{name} has {have} but no {lack}; give both or neither", code="missing_array")
    if xk not in raw:
        return None, None
    xs = _same_shape(_images(raw[xk], xk, name), x, xk, name)
    ys = _labels(raw[yk], yk, name, len(xs))
    _in_range(ys, yk, name, k)
    return xs, ys


def _images(a: np.ndarray, key: str, name: str) -> np.ndarray:
    """uint8 NHW or NHWC (C in 1, 3, 4) → NHWC with C in (1, 3)."""
    if a.dtype != np.uint8:
        raise DatasetError(f"{name}: {key} has dtype {a.dtype}; images must be uint8 pixels 0..255 "
                           "(e.g. (x * 255).round().astype(numpy.uint8))", code="invalid_images")
    if a.ndim == 3:
        return a[..., None]
    if a.ndim == 4 and a.shape[3] in (1, 3, 4):
        return a[..., :3]
    hint = " (it looks like NCHW; transpose to NHWC)" if a.ndim == 4 and a.shape[1] in (1, 3, 4) else ""
    raise DatasetError(f"{name}: {key} has shape {a.shape}; images must be N x H x W (grey) or "
                       f"N x H x W x C with C in 1, 3, 4{hint}", code="invalid_images")


def _labels(a: np.ndarray, key: str, name: str, n: int) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{name}: {key} has dtype {a.dtype}; labels must be integers 0..K-1",
                           code="invalid_labels")
    if a.ndim != 1:
        raise DatasetError(f"{name}: {key} has shape {a.shape}; labels must be one integer per image",
                           code="invalid_labels")
    if len(a) != n:
        images = "x" + key[1:]  # y → x, y_val → x_val, y_test → x_test
        raise DatasetError(f"{name}: {key} has {len(a)} labels but {images} has {n} images",
                           code="shape_mismatch")
    return a.astype(np.int64)


def _in_range(y: np.ndarray, key: str, name: str, k: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= k):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DatasetError(f"{name}: {key} holds label {bad}, outside 0..{k - 1} ({k} classes)",
                           code="invalid_labels")


def _classes(a: np.ndarray | None, name: str) -> list[str] | None:
    if a is None:
        return None
    if a.dtype.kind != "U" or a.ndim != 1:
        raise DatasetError(f"{name}: classes must be a 1-D array of str (numpy.array(names)), got dtype "
                           f"{a.dtype} and shape {a.shape}", code="invalid_classes")
    names = [str(c) for c in a]
    if len(set(names)) != len(names) or any(not c for c in names):
        raise DatasetError(f"{name}: class names must be unique and non-empty", code="invalid_classes")
    return names


def _same_shape(a: np.ndarray, x: np.ndarray, key: str, name: str) -> np.ndarray:
    if a.shape[1:] != x.shape[1:]:
        raise DatasetError(f"{name}: {key} images are {a.shape[1:]} (H, W, C) but x images are {x.shape[1:]}",
                           code="shape_mismatch")
    return a
