"""Reading `.npz` datasets (x, y, optional x_val/y_val, x_test/y_test, x_unlabeled, classes) without unpickling
anything.

Every array is described from its `.npy` header first (shape, dtype, and that the member holds exactly that many
bytes), and the whole dataset is validated from those headers; inspection then loads only the labels and class
names, never the images.
"""

from __future__ import annotations

import io
import math
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
LABEL_KEYS = ("y", "y_val", "y_test")
CHUNK = 1024  # images per copy/resize step, to bound temporaries
READ_CHUNK = 1 << 20  # bytes per read from a zip member
# numpy's own loader refuses `.npy` headers longer than this (numpy writes ~128 bytes), but only after reading
# the whole header, whose length field may say 4 GiB; here the length is checked before the header is read.
NPY_MAX_HEADER = 10_000
_NPY_VERSIONS = {(1, 0): 2, (2, 0): 4, (3, 0): 4}  # version → bytes of the header-length field


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


@dataclass
class NpzSummary:
    """What inspection reports, from the headers and the labels alone: images are never loaded."""

    y: np.ndarray  # int64 training labels in 0..K-1
    y_val: np.ndarray | None
    y_test: np.ndarray | None
    num_unlabeled: int
    classes: list[str]
    channels: int  # after dropping an alpha channel: 1 or 3
    image_size: tuple[int, int]


@dataclass(frozen=True)
class NpyHeader:
    """One `.npy` member as its header describes it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # where the data starts inside the member

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def count(self) -> int:
        return math.prod(self.shape)  # Python ints: a crafted shape cannot overflow

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def is_npz(path: Path) -> bool:
    """An `.npz` file, or any zip that holds only `.npy` members."""
    if path.suffix.lower() == ".npz":
        return True
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_npz(path: Path, *, max_files: int, max_decoded_bytes: int) -> NpzArrays:
    """Load and validate an `.npz` dataset; arrays are sized from their headers before any is read."""
    name = path.name
    headers = _checked_headers(path, max_files=max_files, max_decoded_bytes=max_decoded_bytes)
    raw = _load(path, headers, list(headers))
    classes, k = _check_values(raw, name)
    x = _nhwc(raw["x"])
    x_val, y_val = _labelled_split(raw, "val")
    x_test, y_test = _labelled_split(raw, "test")
    x_unl = _nhwc(raw["x_unlabeled"]) if "x_unlabeled" in raw else None
    return NpzArrays(x=x, y=raw["y"].astype(np.int64), x_val=x_val, y_val=y_val, x_unlabeled=x_unl,
                     classes=classes or [str(i) for i in range(k)], x_test=x_test, y_test=y_test)


def inspect_npz(path: Path, *, max_files: int, max_decoded_bytes: int) -> NpzSummary:
    """Validate an `.npz` dataset as `read_npz` does, loading only labels and class names (never images)."""
    name = path.name
    headers = _checked_headers(path, max_files=max_files, max_decoded_bytes=max_decoded_bytes)
    raw = _load(path, headers, [k for k in (*LABEL_KEYS, "classes") if k in headers])
    classes, k = _check_values(raw, name)
    _, h, w, c = _image_shape(headers["x"], "x", name)
    n_unl = headers["x_unlabeled"].shape[0] if "x_unlabeled" in headers else 0
    return NpzSummary(y=raw["y"].astype(np.int64), y_val=_int64(raw.get("y_val")), y_test=_int64(raw.get("y_test")),
                      num_unlabeled=n_unl, classes=classes or [str(i) for i in range(k)], channels=c,
                      image_size=(h, w))


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


# ------------------------------------------------------------------------------------------------ headers


def _checked_headers(path: Path, *, max_files: int, max_decoded_bytes: int) -> dict[str, NpyHeader]:
    """The known arrays' headers, after every check that headers allow, the decoded-size limit included."""
    name = path.name
    headers = _peek_headers(path, max_files=max_files)
    missing = [k for k in ("x", "y") if k not in headers]
    if missing:
        raise DatasetError(f"{name} lacks the array(s) {', '.join(missing)} (found: "
                           f"{', '.join(sorted(headers)) or 'none'}); save it with "
                           "numpy.savez(path, x=images, y=labels)", code="missing_array")
    # labels are decoded to int64, whatever their stored width
    need = sum(h.count * 8 if k in LABEL_KEYS else h.nbytes for k, h in headers.items())
    if need > max_decoded_bytes:
        raise DatasetError(f"{name} holds arrays of {need} bytes ({human_bytes(need)}), over the "
                           f"{human_bytes(max_decoded_bytes)} limit; raise data.max_decoded_bytes or use "
                           "fewer images", code="dataset_too_large")
    _check_layout(headers, name)
    return headers


def _peek_headers(path: Path, *, max_files: int) -> dict[str, NpyHeader]:
    """Headers of the known arrays, each checked against the size of its member."""
    name = path.name
    out: dict[str, NpyHeader] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            if len(members) > max_files:
                raise DatasetError(f"{name} holds {len(members)} arrays, more than the {max_files} allowed",
                                   code="archive_too_many_files")
            for key in KNOWN_KEYS:
                if f"{key}.npy" not in members:
                    continue
                info = zf.getinfo(f"{key}.npy")
                with zf.open(info) as f:
                    header = _read_header(f, key, name)
                if header.offset + header.nbytes != info.file_size:
                    raise DatasetError(
                        f"{name}: array {key!r} is damaged: its header describes {header.nbytes} bytes of "
                        f"{header.dtype} {header.shape} but the file holds {info.file_size - header.offset}; "
                        "save it again with numpy.savez", code="unreadable_dataset")
                out[key] = header
    except DatasetError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error, NotImplementedError, RuntimeError) as e:
        raise _unreadable(name, e) from None
    except OSError as e:
        if e.errno is not None:  # a disk error, not the file's fault
            raise
        raise _unreadable(name, e) from None
    return out


def _read_header(f: io.BufferedIOBase, key: str, name: str) -> NpyHeader:
    """Parse one `.npy` header with numpy's own parser, after bounding its length."""
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise DatasetError(f"{name}: member {key}.npy is not a .npy array; save the dataset with numpy.savez",
                           code="unreadable_dataset") from None
    width = _NPY_VERSIONS.get(version)
    if width is None:
        raise DatasetError(f"{name}: array {key!r} uses .npy format version {version[0]}.{version[1]}, which "
                           "this numpy cannot read; save it with numpy.savez", code="unreadable_dataset")
    size_field = _read_exact(f, width)
    length = int.from_bytes(size_field, "little")
    if length > NPY_MAX_HEADER:
        raise DatasetError(f"{name}: array {key!r} has a header of {length} bytes, over the {NPY_MAX_HEADER} "
                           "allowed; save it with numpy.savez", code="unreadable_dataset")
    text = _read_exact(f, length)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(io.BytesIO(size_field + text))
    if dtype.hasobject:
        raise DatasetError(f"{name}: array {key!r} holds pickled Python objects, which kdistill never loads; "
                           "save plain numeric (or, for classes, str) arrays", code="unreadable_dataset")
    return NpyHeader(shape=tuple(int(s) for s in shape), dtype=dtype, fortran_order=bool(fortran_order),
                     offset=len(np.lib.format.MAGIC_PREFIX) + 2 + width + length)


def _read_exact(f: io.BufferedIOBase, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError("the array ends early")
    return data


def _unreadable(name: str, err: BaseException) -> DatasetError:
    """Our own sentence for what zipfile, zlib or numpy's header parser raised."""
    if isinstance(err, zipfile.BadZipFile) and "CRC" in str(err):
        why = "an array's checksum does not match its data"
    elif isinstance(err, EOFError):
        why = "it is truncated"
    elif isinstance(err, ValueError):
        why = "an array header cannot be parsed"
    elif isinstance(err, NotImplementedError):
        why = "it uses a zip compression that cannot be read"
    else:
        why = "its zip structure or compressed data is damaged"
    return DatasetError(f"{name} is not a readable .npz file ({why}); save it with numpy.savez",
                        code="unreadable_dataset")


def _image_shape(h: NpyHeader, key: str, name: str) -> tuple[int, int, int, int]:
    """uint8 NHW or NHWC (C in 1, 3, 4) → (N, H, W, C) with C in (1, 3), as `_nhwc` will make it."""
    if h.dtype != np.uint8:
        raise DatasetError(f"{name}: {key} has dtype {h.dtype}; images must be uint8 pixels 0..255 "
                           "(e.g. (x * 255).round().astype(numpy.uint8))", code="invalid_images")
    if h.ndim == 3:
        n, height, width = h.shape
        return n, height, width, 1
    if h.ndim == 4 and h.shape[3] in (1, 3, 4):
        n, height, width, c = h.shape
        return n, height, width, min(c, 3)
    hint = " (it looks like NCHW; transpose to NHWC)" if h.ndim == 4 and h.shape[1] in (1, 3, 4) else ""
    raise DatasetError(f"{name}: {key} has shape {h.shape}; images must be N x H x W (grey) or "
                       f"N x H x W x C with C in 1, 3, 4{hint}", code="invalid_images")


def _label_shape(h: NpyHeader, key: str, name: str, n: int) -> None:
    if not np.issubdtype(h.dtype, np.integer):
        raise DatasetError(f"{name}: {key} has dtype {h.dtype}; labels must be integers 0..K-1",
                           code="invalid_labels")
    if h.ndim != 1:
        raise DatasetError(f"{name}: {key} has shape {h.shape}; labels must be one integer per image",
                           code="invalid_labels")
    if h.shape[0] != n:
        images = "x" + key[1:]  # y → x, y_val → x_val, y_test → x_test
        raise DatasetError(f"{name}: {key} has {h.shape[0]} labels but {images} has {n} images",
                           code="shape_mismatch")


def _check_layout(headers: dict[str, NpyHeader], name: str) -> None:
    """Everything the headers tell: dtypes, shapes, matching counts, both or neither of each split's pair."""
    x = _image_shape(headers["x"], "x", name)
    _label_shape(headers["y"], "y", name, x[0])
    if x[0] == 0:
        raise DatasetError(f"{name}: x holds no images", code="empty_dataset")
    if "classes" in headers:
        c = headers["classes"]
        if c.dtype.kind != "U" or c.ndim != 1:
            raise DatasetError(f"{name}: classes must be a 1-D array of str (numpy.array(names)), got dtype "
                               f"{c.dtype} and shape {c.shape}", code="invalid_classes")
    for split in ("val", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        if (xk in headers) != (yk in headers):
            have, lack = (xk, yk) if xk in headers else (yk, xk)
            raise DatasetError(f"{name} has {have} but no {lack}; give both or neither", code="missing_array")
        if xk in headers:
            xs = _same_shape(_image_shape(headers[xk], xk, name), x, xk, name)
            _label_shape(headers[yk], yk, name, xs[0])
    if "x_unlabeled" in headers:
        _same_shape(_image_shape(headers["x_unlabeled"], "x_unlabeled", name), x, "x_unlabeled", name)


def _same_shape(a: tuple[int, ...], x: tuple[int, ...], key: str, name: str) -> tuple[int, ...]:
    if a[1:] != x[1:]:
        raise DatasetError(f"{name}: {key} images are {a[1:]} (H, W, C) but x images are {x[1:]}",
                           code="shape_mismatch")
    return a


# ------------------------------------------------------------------------------------------------- values


def _load(path: Path, headers: dict[str, NpyHeader], keys: list[str]) -> dict[str, np.ndarray]:
    """The arrays `keys`, read into arrays allocated from their (already checked) headers."""
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for key in keys:
                out[key] = _read_member(zf, key, headers[key])
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error, NotImplementedError, RuntimeError) as e:
        raise _unreadable(path.name, e) from None
    except OSError as e:
        if e.errno is not None:
            raise
        raise _unreadable(path.name, e) from None
    return out


def _read_member(zf: zipfile.ZipFile, key: str, h: NpyHeader) -> np.ndarray:
    out = np.empty(h.count, dtype=h.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8)) if h.nbytes else memoryview(b"")
    with zf.open(f"{key}.npy") as f:
        _read_exact(f, h.offset)  # the header, already parsed
        pos = 0
        while pos < h.nbytes:
            part = f.read(min(READ_CHUNK, h.nbytes - pos))
            if not part:
                raise EOFError("the array ends early")
            view[pos:pos + len(part)] = part
            pos += len(part)
    return out.reshape(h.shape[::-1]).T if h.fortran_order else out.reshape(h.shape)


def _check_values(raw: dict[str, np.ndarray], name: str) -> tuple[list[str] | None, int]:
    """Class names and label ranges, which headers cannot tell; returns (names or None, class count)."""
    classes = _classes(raw.get("classes"), name)
    y = raw["y"]
    k = len(classes) if classes is not None else int(y.max()) + 1
    _in_range(y, "y", name, k)
    distinct = len(np.unique(y))
    if k < 2 or distinct < 2:
        raise DatasetError(f"{name}: y holds {distinct} distinct label(s) of {k} class(es); "
                           "at least 2 classes are needed", code="too_few_classes")
    for key in ("y_val", "y_test"):
        if key in raw:
            _in_range(raw[key], key, name, k)
    return classes, k


def _in_range(y: np.ndarray, key: str, name: str, k: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= k):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DatasetError(f"{name}: {key} holds label {bad}, outside 0..{k - 1} ({k} classes)",
                           code="invalid_labels")


def _classes(a: np.ndarray | None, name: str) -> list[str] | None:
    if a is None:
        return None
    names = [str(c) for c in a]
    if len(set(names)) != len(names) or any(not c for c in names):
        raise DatasetError(f"{name}: class names must be unique and non-empty", code="invalid_classes")
    for c in names:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"{name}: class name {c!r} is not valid Unicode text (it holds a lone surrogate); "
                               "use plain text names", code="invalid_classes") from None
    return names


def _int64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.astype(np.int64)


def _nhwc(a: np.ndarray) -> np.ndarray:
    """NHW or NHWC (C in 1, 3, 4; checked from the header) → NHWC with C in (1, 3), as a view."""
    return a[..., None] if a.ndim == 3 else a[..., :3]


def _labelled_split(raw: dict[str, np.ndarray], split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    xk, yk = f"x_{split}", f"y_{split}"
    if xk not in raw:
        return None, None
    return _nhwc(raw[xk]), _int64(raw[yk])
