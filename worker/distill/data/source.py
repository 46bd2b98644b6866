"""Resolving a dataset path to something readable: an `.npz` file or a folder, extracting archives."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..spec import DataSpec
from .archive import safe_extract
from .npz import is_npz


@dataclass(frozen=True)
class Source:
    """Where the samples are: `format` is "npz" (path is the file) or "imagefolder" (path is a folder)."""

    format: str
    path: Path


@contextmanager
def open_source(path: str | Path, spec: DataSpec, *, workdir: Path | None = None) -> Iterator[Source]:
    """Yield the dataset's source; an archive is extracted into a temporary folder removed on exit."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p.name} does not exist", code="dataset_not_found", field="data.path")
    if p.is_dir():
        yield Source("imagefolder", p)
        return
    if is_npz(p):
        yield Source("npz", p)
        return
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdistill-data-", dir=workdir) as tmp:
        root = safe_extract(p, Path(tmp) / "dataset", max_files=spec.max_files,
                            max_unpacked_bytes=spec.max_unpacked_bytes)
        yield Source("imagefolder", root)
