"""Unpacking untrusted zip and tar archives: no path escapes, no links, bounded file count and bytes."""

from __future__ import annotations

import errno
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import DatasetError
from .sizes import human_bytes

CHUNK = 1 << 20
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
# errors while creating a file that the archive itself causes (two entries colliding, absurd names)
_ENTRY_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EILSEQ})


def is_junk_name(name: str) -> bool:
    """Dotfiles (`.DS_Store`, `._x` AppleDouble files) and OS clutter such as `__MACOSX/`."""
    return name.startswith(".") or name in JUNK_NAMES


def detect_archive(path: Path) -> str | None:
    """`"zip"`, `"tar"` or None, decided by the file's content rather than its suffix."""
    with path.open("rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    # zips with a prefix (self-extracting) only have their end record to go by
    return "zip" if zipfile.is_zipfile(path) else None


def safe_extract(archive: Path, dest: Path, *, max_files: int, max_unpacked_bytes: int) -> Path:
    """Unpack `archive` into `dest` after checking every entry, and return `dest`.

    On failure `dest` may hold a partial extraction, never more than `max_unpacked_bytes` of it.
    """
    archive = Path(archive)
    kind = detect_archive(archive)
    if kind is None:
        raise DatasetError(
            f"{archive.name} is not a zip, tar or tar.gz archive (nor an .npz file); "
            "upload class folders packed as .zip or .tar.gz, or arrays saved with numpy.savez",
            code="unsupported_dataset_format")
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limit=max_unpacked_bytes, archive=archive.name)
    if kind == "zip":
        _extract_zip(archive, dest, max_files=max_files, budget=budget)
    else:
        _extract_tar(archive, dest, max_files=max_files, budget=budget)
    return dest


@dataclass
class _Budget:
    """Counts bytes as they are really unpacked; header sizes can lie."""

    limit: int
    archive: str
    used: int = 0

    def take(self, n: int, entry: str) -> None:
        self.ensure_room(n, entry)
        self.used += n

    def ensure_room(self, n: int, entry: str) -> None:
        if self.used + n > self.limit:
            raise DatasetError(
                f"{self.archive} unpacks to more than {human_bytes(self.limit)} (the limit), reached at "
                f"entry {_show(entry)}; upload a smaller dataset or raise data.max_unpacked_bytes",
                code="archive_too_large")


def _show(name: str, limit: int = 120) -> str:
    """An untrusted entry name, quoted and cut short enough for a message."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _entry_path(name: str, archive: str) -> PurePosixPath | None:
    """The entry's path inside the destination, or None for junk; raises for names that could escape."""
    norm = name.replace("\\", "/")  # zips made on Windows may use backslashes as separators
    if "\x00" in norm or norm.startswith("/") or _DRIVE.match(norm):
        raise DatasetError(f"{archive} holds an entry with an absolute path ({_show(name)}); "
                           "archive the dataset folder with relative paths", code="unsafe_archive_path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{archive} holds an entry that climbs out of the archive ({_show(name)}); "
                           "entries may not contain '..'", code="unsafe_archive_path")
    if not parts or any(is_junk_name(p) for p in parts):
        return None
    return PurePosixPath(*parts)


def _target(dest: Path, rel: PurePosixPath, archive: str) -> Path:
    # Belt and braces: names were already checked, and nothing here ever creates a link.
    target = dest.joinpath(*rel.parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise DatasetError(f"{archive} entry {_show(rel.as_posix())} would be written outside the dataset "
                           "folder", code="unsafe_archive_path")
    return target


def _refuse_entry(archive: str, name: str, what: str) -> DatasetError:
    return DatasetError(f"{archive} entry {_show(name)} is a {what}; only regular files and folders are "
                        "accepted (replace links by copies of the files)", code="unsafe_archive_entry")


def _too_many(archive: str, max_files: int) -> DatasetError:
    return DatasetError(f"{archive} holds more than {max_files} entries (the limit); upload fewer files "
                        "or raise data.max_files", code="archive_too_many_files")


def _unreadable(archive: str, err: BaseException, entry: str | None = None) -> DatasetError:
    where = f" at entry {_show(entry)}" if entry else ""
    detail = str(err) or type(err).__name__
    return DatasetError(f"{archive} is corrupt or truncated{where} ({detail}); pack it again and re-upload",
                        code="unreadable_archive")


@contextmanager
def _entry_os_errors(archive: str, entry: str) -> Iterator[None]:
    """Blame the archive for errors it causes (colliding entries, absurd names); re-raise the rest."""
    try:
        yield
    except OSError as e:
        if e.errno in _ENTRY_ERRNOS:
            why = "; it collides with another entry" if e.errno != errno.ENAMETOOLONG else ""
            raise DatasetError(f"{archive} entry {_show(entry)} cannot be written ({e.strerror}){why}",
                               code="unreadable_archive") from None
        raise


def _make_dir(target: Path, archive: str, entry: str) -> None:
    with _entry_os_errors(archive, entry):
        target.mkdir(parents=True, exist_ok=True)


def _write(src: IO[bytes], target: Path, budget: _Budget, entry: str) -> None:
    """Stream one entry to disk, refusing before any byte past the budget is written."""
    with _entry_os_errors(budget.archive, entry):
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            while chunk := src.read(CHUNK):
                budget.take(len(chunk), entry)
                out.write(chunk)


def _extract_zip(archive: Path, dest: Path, *, max_files: int, budget: _Budget) -> None:
    name = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _unreadable(name, e) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise _too_many(name, max_files)
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in infos:  # check every entry before writing anything
            rel = _entry_path(info.filename, name)
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix mode bits; 0 for zips made elsewhere
            if kind == stat.S_IFLNK:
                raise _refuse_entry(name, info.filename, "symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse_entry(name, info.filename, "device, fifo or socket")
            if rel is not None:
                if info.flag_bits & 0x1:
                    raise DatasetError(f"{name} entry {_show(info.filename)} is encrypted; upload an archive "
                                       "without a password", code="unreadable_archive")
                plan.append((info, rel))
        for info, rel in plan:
            target = _target(dest, rel, name)
            if info.is_dir() or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR:
                _make_dir(target, name, info.filename)
                continue
            try:
                with zf.open(info) as src:
                    _write(src, target, budget, info.filename)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
                raise _unreadable(name, e, info.filename) from None


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _unreadable(archive.name, e) from None


def _extract_tar(archive: Path, dest: Path, *, max_files: int, budget: _Budget) -> None:
    # Members are checked and streamed by hand; TarFile.extract is never called, so no
    # link, device or permission bit from the archive can reach the disk.
    name = archive.name
    entry: str | None = None
    with _open_tar(archive) as tf:
        try:
            for count, member in enumerate(tf, start=1):
                entry = member.name
                if count > max_files:
                    raise _too_many(name, max_files)
                rel = _entry_path(member.name, name)
                if member.issym():
                    raise _refuse_entry(name, member.name, "symbolic link")
                if member.islnk():
                    raise _refuse_entry(name, member.name, "hard link")
                if not (member.isreg() or member.isdir()):
                    raise _refuse_entry(name, member.name, "device, fifo or other special file")
                if rel is None:
                    if member.isreg():  # skipped data is still decompressed to get past it
                        budget.take(member.size, member.name)
                    continue
                target = _target(dest, rel, name)
                if member.isdir():
                    _make_dir(target, name, member.name)
                    continue
                budget.ensure_room(member.size, member.name)  # fail early; the real count is below
                src = tf.extractfile(member)
                if src is None:
                    raise _unreadable(name, ValueError("entry has no data"), member.name)
                with src:
                    _write(src, target, budget, member.name)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise _unreadable(name, e, entry) from None
        except OSError as e:
            if e.errno is None:  # gzip.BadGzipFile and friends; disk errors carry an errno
                raise _unreadable(name, e, entry) from None
            raise
