"""Unpacking untrusted zip and tar archives: no path escapes, no links, bounded file count, bytes and headers.

Tar archives are read by a small reader of our own rather than `tarfile`: `tarfile` reads a GNU long-name or pax
record whole, whatever size its header claims, so one header in a small upload could make it allocate gigabytes
(already in `tarfile.is_tarfile`). Only `tarfile.TarInfo.frombuf`, which parses one 512-byte block, is used.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
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

# The largest GNU long-name ('L') or long-link ('K') record and pax extended ('x') or global ('g') header that is
# read. Such a record is held in memory whole, and real ones hold one path (Linux allows 4 KiB) or a few
# attributes, so anything larger is refused from its header, before a byte of it is read.
MAX_TAR_EXTENDED_HEADER = 64 << 10
# Extended headers in a row before one entry: tar programs write at most four (global, pax, long name, long link).
MAX_TAR_HEADER_CHAIN = 16
# An xz stream chooses its own dictionary size (up to 4 GiB) and the decoder fills that much memory; `xz -9`
# needs 65 MiB to decode, so streams that need more than this are refused.
XZ_MEMLIMIT = 128 << 20

TAR_BLOCK = tarfile.BLOCKSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE)
_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"


def is_junk_name(name: str) -> bool:
    """Dotfiles (`.DS_Store`, `._x` AppleDouble files) and OS clutter such as `__MACOSX/`."""
    return name.startswith(".") or name in JUNK_NAMES


def detect_archive(path: Path) -> str | None:
    """`"zip"`, `"tar"` or None, decided by the file's content rather than its suffix.

    A tar (plain, gzip, bzip2 or xz) is recognised by its first 512-byte header block, read through the
    decompressor; nothing past that block is read.
    """
    with path.open("rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _starts_like_tar(path):
        return "tar"
    # zips with a prefix (self-extracting) only have their end record to go by
    return "zip" if zipfile.is_zipfile(path) else None


def _starts_like_tar(path: Path) -> bool:
    with _decompressed(path) as stream:
        block = _read_up_to(stream, TAR_BLOCK, path.name, "")
    if len(block) != TAR_BLOCK:
        return False
    if block.count(0) == TAR_BLOCK:  # an empty archive is nothing but zero blocks
        return True
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks the header checksum
    except tarfile.HeaderError:
        return False
    return True


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


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry_path(name: str, archive: str) -> PurePosixPath | None:
    """The entry's path inside the destination, or None for junk; raises for names that could escape."""
    if not _is_text(name):
        # tar names arrive as bytes decoded with surrogateescape: such a name could not be shown, stored as a
        # class name or sent back as JSON
        raise DatasetError(f"{archive} holds an entry whose name is not valid UTF-8 ({_show(name)}); "
                           "rename it, or re-create the archive with UTF-8 names", code="unreadable_archive")
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


def _unreadable(archive: str, why: str, where: str = "") -> DatasetError:
    """`why` is our own sentence, never a library's message; `where` is e.g. " at entry 'a/b.png'"."""
    return DatasetError(f"{archive} is corrupt or truncated{where} ({why}); pack it again and re-upload",
                        code="unreadable_archive")


def _at(entry: str | None) -> str:
    return f" at entry {_show(entry)}" if entry else ""


def _why_zip(err: BaseException) -> str:
    """A readable reason for an error that zipfile or zlib raised."""
    if isinstance(err, NotImplementedError):
        return "an entry uses a compression method that cannot be read; pack it with plain zip (deflate)"
    if isinstance(err, zipfile.BadZipFile) and "CRC" in str(err):
        return "an entry's checksum does not match its data"
    if isinstance(err, EOFError):
        return "the data ends early"
    if isinstance(err, zlib.error):
        return "the compressed data is damaged"
    return "its zip structure is damaged"


def _why_stream(err: BaseException) -> str:
    """A readable reason for an error that a gzip, bzip2 or xz decompressor raised."""
    if isinstance(err, EOFError):
        return "the compressed data ends early"
    if isinstance(err, lzma.LZMAError) and "memory" in str(err).lower():
        return (f"its xz compression needs more than {human_bytes(XZ_MEMLIMIT)} of memory to unpack; "
                "compress it with gzip or the default xz level")
    return "the compressed data is damaged"


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


def _write(src: IO[bytes] | _TarData, target: Path, budget: _Budget, entry: str) -> None:
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
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise _unreadable(name, _why_zip(e)) from None
    except OSError as e:
        if e.errno is not None:  # a disk error, not the archive's fault
            raise
        raise _unreadable(name, _why_zip(e)) from None
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
                raise _unreadable(name, _why_zip(e), _at(info.filename)) from None


# ---------------------------------------------------------------------------------------------------- tar


class _XzReader(io.RawIOBase):
    """xz decoding under `XZ_MEMLIMIT` (`lzma.LZMAFile` takes no limit). Concatenated streams are read on; bytes
    after the last one that do not start a stream (padding, junk) end the data, as `lzma.LZMAFile` does."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._dec = self._decoder()
        self._next_stream = False  # the decoder was just started on bytes after a finished stream
        self._done = False

    @staticmethod
    def _decoder() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._done:
            if self._dec.eof:
                data = self._dec.unused_data or self._raw.read(CHUNK)
                if not data:
                    self._done = True
                    break
                self._dec, self._next_stream = self._decoder(), True
            elif self._dec.needs_input:
                data = self._raw.read(CHUNK)
                if not data:
                    raise EOFError("xz stream ended early")
            else:
                data = b""
            try:
                out = self._dec.decompress(data, len(buf))
            except lzma.LZMAError:
                if not self._next_stream:
                    raise
                self._done = True
                break
            self._next_stream = False
            if out:
                buf[:len(out)] = out
                return len(out)
        return 0


@contextmanager
def _decompressed(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, through gzip, bzip2 or xz when its first bytes say so."""
    with path.open("rb") as raw:
        magic = raw.read(len(_XZ_MAGIC))
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic.startswith(_BZ2_MAGIC):
            stream = bz2.BZ2File(raw)
        elif magic == _XZ_MAGIC:
            stream = io.BufferedReader(_XzReader(raw), CHUNK)
        else:
            yield raw
            return
        with stream:
            yield stream


def _read_up_to(stream: IO[bytes], n: int, archive: str, where: str) -> bytes:
    """Up to `n` bytes (fewer only at the end); decompression errors become `unreadable_archive`."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            part = stream.read(min(n - got, CHUNK))
            if not part:
                break
            parts.append(part)
            got += len(part)
    except (EOFError, zlib.error, lzma.LZMAError) as e:
        raise _unreadable(archive, _why_stream(e), where) from None
    except OSError as e:
        if e.errno is not None:  # a disk error, not the archive's fault; gzip.BadGzipFile and friends have none
            raise
        raise _unreadable(archive, _why_stream(e), where) from None
    return b"".join(parts)


def _nts(raw: bytes) -> str:
    """A NUL-terminated name, decoded as tarfile decodes names."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


@dataclass
class _TarEntry:
    """One entry as the archive describes it, after its long-name, long-link and pax records."""

    name: str
    linkname: str
    type: bytes
    size: int  # bytes of data that follow the header; 0 for everything but regular files

    @property
    def kind(self) -> str:
        """file | dir | symlink | hardlink | sparse | special"""
        if self.type in _FILE_TYPES:
            return "file"
        return {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
                tarfile.GNUTYPE_SPARSE: "sparse"}.get(self.type, "special")


class _TarData:
    """The data of the entry the reader stands at: at most `size` bytes, an error if the archive ends first."""

    def __init__(self, reader: _TarReader, entry: str, size: int) -> None:
        self._reader = reader
        self._entry = entry
        self.size = size
        self.left = size

    def read(self, n: int = CHUNK) -> bytes:
        n = min(n, self.left)
        if n <= 0:
            return b""
        data = _read_up_to(self._reader.stream, n, self._reader.archive, _at(self._entry))
        if not data:
            raise _unreadable(self._reader.archive, "the archive ends in the middle of an entry", _at(self._entry))
        self.left -= len(data)
        return data


class _TarReader:
    """Walk a (decompressed) tar stream entry by entry, holding at most one bounded header in memory.

    Follows tarfile's reading: ustar, GNU and pax headers; a zero block ends the archive; an entry's data follows
    its header only for regular files. Global pax headers are read (bounded) and ignored, as tarfile ignores them.
    """

    def __init__(self, stream: IO[bytes], archive: str, budget: _Budget) -> None:
        self.stream = stream
        self.archive = archive
        self._budget = budget  # extended records are unpacked bytes too, though no file holds them
        self._last: str | None = None  # the last entry's name, to say where trouble was found
        self._data: _TarData | None = None

    def _where(self) -> str:
        return f" after entry {_show(self._last)}" if self._last else ""

    def _exact(self, n: int) -> bytes:
        data = _read_up_to(self.stream, n, self.archive, self._where())
        if len(data) != n:
            raise _unreadable(self.archive, "the archive ends in the middle of a header", self._where())
        return data

    def _skip(self, n: int, where: str) -> None:
        while n > 0:
            part = _read_up_to(self.stream, min(n, CHUNK), self.archive, where)
            if not part:
                raise _unreadable(self.archive, "the archive ends in the middle of an entry", where)
            n -= len(part)

    def _finish_entry(self) -> None:
        """Move past the data (and its padding to a whole block) of the entry handed out last."""
        if self._data is not None:
            data, self._data = self._data, None
            self._skip(data.left + -data.size % TAR_BLOCK, _at(self._last))

    def data(self) -> _TarData:
        """The data of the entry handed out last; read it before asking for the next entry."""
        if self._data is None:
            raise RuntimeError("no tar entry to read")
        return self._data

    def _extended(self, info: tarfile.TarInfo) -> bytes:
        """The body of a long-name, long-link or pax record, refused from its header when it is too large."""
        kind = {tarfile.GNUTYPE_LONGNAME: "long-name", tarfile.GNUTYPE_LONGLINK: "long-link"}.get(
            info.type, "pax")
        if info.size > MAX_TAR_EXTENDED_HEADER:
            raise DatasetError(
                f"{self.archive} holds a {kind} header of {human_bytes(info.size)}{self._where()}, over the "
                f"{human_bytes(MAX_TAR_EXTENDED_HEADER)} allowed; real ones hold one path or a few attributes, "
                "so pack the dataset again with a standard tar or zip tool", code="archive_header_too_large")
        self._budget.take(info.size, self._last or f"({kind} header)")
        body = self._exact(info.size)
        self._skip(-info.size % TAR_BLOCK, self._where())
        return body

    def _pax(self, body: bytes) -> dict[str, str]:
        """Records "<length> <key>=<value>\\n"; keys and values are UTF-8 (raw bytes kept as tarfile keeps them)."""
        out: dict[str, str] = {}
        pos = 0
        while pos < len(body) and body[pos] != 0:  # tarfile, too, stops at padding
            space = body.find(b" ", pos, pos + 20)
            digits = body[pos:space] if space > pos else b""
            length = int(digits) if digits.isdigit() else 0
            record = body[pos:pos + length]
            eq = record.find(b"=", len(digits) + 1)
            if length == 0 or len(record) != length or eq < 0 or not record.endswith(b"\n"):
                raise _unreadable(self.archive, "a pax header is malformed", self._where())
            key = record[len(digits) + 1:eq].decode("utf-8", "surrogateescape")
            out[key] = record[eq + 1:-1].decode("utf-8", "surrogateescape")
            pos += length
        return out

    def __iter__(self) -> Iterator[_TarEntry]:
        while True:
            self._finish_entry()
            entry = self._next_entry()
            if entry is None:
                return
            self._last = entry.name
            if entry.kind == "file":
                self._data = _TarData(self, entry.name, entry.size)
            yield entry

    def _next_entry(self) -> _TarEntry | None:
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] | None = None
        for _ in range(MAX_TAR_HEADER_CHAIN + 1):
            block = _read_up_to(self.stream, TAR_BLOCK, self.archive, self._where())
            if not block or block.count(0) == TAR_BLOCK:
                return None  # the end: a zero block, or (as tarfile allows) the end of the data
            if len(block) != TAR_BLOCK:
                raise _unreadable(self.archive, "the archive ends in the middle of a header", self._where())
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                raise _unreadable(self.archive, "a tar header is damaged (its checksum or a number in it is "
                                  "wrong)", self._where()) from None
            if info.size < 0:
                raise _unreadable(self.archive, "a tar header gives a negative size", self._where())
            # When several records give the same field the first one wins; a GNU record wins over a pax one.
            if info.type in _LONG_TYPES:
                value = _nts(self._extended(info))
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = value if long_name is None else long_name
                else:
                    long_link = value if long_link is None else long_link
                continue
            if info.type in _PAX_TYPES:
                records = self._pax(self._extended(info))
                if info.type != tarfile.XGLTYPE:
                    pax = {**records, **(pax or {})}
                continue
            return self._entry(info, long_name, long_link, pax or {})
        raise _unreadable(self.archive, f"more than {MAX_TAR_HEADER_CHAIN} extended headers precede one entry",
                          self._where())

    def _entry(self, info: tarfile.TarInfo, long_name: str | None, long_link: str | None,
               pax: dict[str, str]) -> _TarEntry:
        name, linkname, size = info.name, info.linkname, info.size
        if "path" in pax:
            name = pax["path"].rstrip("/")
        if "linkpath" in pax:
            linkname = pax["linkpath"]
        if "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit()):
                raise _unreadable(self.archive, "a pax header gives a size that is not a number", self._where())
            size = int(pax["size"])
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        kind = info.type
        if any(k.startswith("GNU.sparse.") for k in pax):
            kind = tarfile.GNUTYPE_SPARSE
        entry = _TarEntry(name=name, linkname=linkname, type=kind, size=size)
        if entry.kind != "file":
            entry.size = 0  # as in tarfile, no data follows a folder's header (nor a link's, refused anyway)
        if entry.kind == "dir":
            entry.name = entry.name.rstrip("/")
        return entry


_REFUSED = {"symlink": "symbolic link", "hardlink": "hard link", "sparse": "sparse file",
            "special": "device, fifo or other special file"}


def _extract_tar(archive: Path, dest: Path, *, max_files: int, budget: _Budget) -> None:
    # Entries are checked and streamed by hand: no link, device or permission bit from the archive reaches the disk.
    name = archive.name
    with _decompressed(archive) as stream:
        reader = _TarReader(stream, name, budget)
        for count, member in enumerate(reader, start=1):
            if count > max_files:
                raise _too_many(name, max_files)
            rel = _entry_path(member.name, name)
            if member.kind in _REFUSED:
                raise _refuse_entry(name, member.name, _REFUSED[member.kind])
            if rel is None:
                if member.kind == "file":  # skipped data is still decompressed to get past it
                    budget.take(member.size, member.name)
                continue
            target = _target(dest, rel, name)
            if member.kind == "dir":
                _make_dir(target, name, member.name)
                continue
            budget.ensure_room(member.size, member.name)  # fail early; the real count is below
            _write(reader.data(), target, budget, member.name)
