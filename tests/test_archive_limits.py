"""Tar headers that claim huge sizes: refused from the header, before a byte is read, in a child's memory too."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.distill.data import load_dataset, safe_extract
from worker.distill.data.archive import MAX_TAR_EXTENDED_HEADER, MAX_TAR_HEADER_CHAIN, detect_archive
from worker.distill.errors import DatasetError
from worker.distill.spec import DataSpec

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
HUGE = 300 * MiB  # what the hostile headers claim; never held in memory, by the test or the code
SPEC = DataSpec(path="unused", val_fraction=0.25)

# Runs the command given as its arguments and prints the command's peak RSS: RUSAGE_CHILDREN of this wrapper
# covers that one command only, not every child the test process ever waited for.
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "rc": run.returncode, "out": run.stdout, "err": run.stderr[-3000:]}))
""")


# ---------------------------------------------------------------------------------------- building blocks


def header(name: bytes, typeflag: bytes, size: int | bytes, linkname: bytes = b"") -> bytes:
    """One 512-byte GNU tar header, written field by field (tarfile would refuse to write some of these);
    `size` may be the raw 12-byte field."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"  # mode
    block[108:116] = block[116:124] = b"0000000\0"  # uid, gid
    block[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    block[136:148] = b"%011o\0" % 0  # mtime
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = b"ustar  \0"  # GNU magic and version
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def regular(name: str, data: bytes) -> bytes:
    return header(name.encode(), b"0", len(data)) + padded(data)


def end() -> bytes:
    return bytes(1024)


@pytest.fixture(scope="module")
def huge_body(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """HUGE bytes of 'a' as one gzip member, compressed a MiB at a time: about 300 KiB."""
    path = tmp_path_factory.mktemp("body") / "body.gz"
    chunk = b"a" * MiB
    with gzip.open(path, "wb", compresslevel=9) as gz:
        for _ in range(HUGE // MiB):
            gz.write(chunk)
    return path.read_bytes()


def hostile(path: Path, typeflag: bytes, body: bytes) -> Path:
    """A .tar.gz whose first header is a `typeflag` record claiming HUGE bytes, then a normal entry.

    gzip members concatenate, so the HUGE body is compressed once and shared by every variant."""
    name = b"pax_header" if typeflag in (b"x", b"g") else b"././@LongLink"
    with path.open("wb") as f:
        f.write(gzip.compress(header(name, typeflag, HUGE)))
        f.write(body)
        f.write(gzip.compress(regular("a/0.png", png_bytes()) + end()))
    return path


def error_of(fn, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as exc:
        fn(*args, **kwargs)
    return exc.value


def inspect_in_child(path: Path, workdir: Path, **limits: int) -> tuple[dict, int]:
    """`python -m worker.inspect dataset` on `path`: its JSON answer and its peak RSS in bytes."""
    args = {"path": str(path), "limits": limits, "workdir": str(workdir)}
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "worker.inspect", "dataset", json.dumps(args)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout)
    assert report["out"].strip(), report["err"]
    return json.loads(report["out"].strip().splitlines()[-1]), report["peak"]


def small_dataset(path: Path, *, fmt: int = tarfile.GNU_FORMAT, mode: str = "w:gz", prefix: str = "") -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:
        for c in ("cat", "dog"):
            for i in range(4):
                data = png_bytes(i + 10 * len(c))
                info = tarfile.TarInfo(f"{prefix}{c}/{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------- tests


def test_long_name_header_is_refused_before_it_is_read_in_a_child(tmp_path: Path, huge_body: bytes) -> None:
    bomb = hostile(tmp_path / "up.tar.gz", b"L", huge_body)
    assert bomb.stat().st_size < 2 * MiB
    work = tmp_path / "work"
    work.mkdir()
    base, base_peak = inspect_in_child(small_dataset(tmp_path / "ok.tar.gz"), work, max_unpacked_bytes=MiB)
    assert base["ok"] and base["num_classes"] == 2, base
    result, peak = inspect_in_child(bomb, work, max_unpacked_bytes=MiB)
    assert result["ok"] is False and result["code"] == "archive_header_too_large", result
    assert "up.tar.gz" in result["message"] and "long-name" in result["message"], result
    growth = peak - base_peak
    print(f"\npeak RSS: baseline {base_peak / MiB:.0f} MiB, long-name bomb {peak / MiB:.0f} MiB, "
          f"growth {growth / MiB:+.1f} MiB")
    assert growth < 64 * MiB, f"inspecting the bomb took {growth / MiB:.0f} MiB more than a small archive"


@pytest.mark.parametrize(("typeflag", "kind"), [(b"K", "long-link"), (b"x", "pax"), (b"g", "pax")])
def test_long_link_and_pax_headers_are_refused_without_reading_them(tmp_path: Path, huge_body: bytes,
                                                                    typeflag: bytes, kind: str) -> None:
    bomb = hostile(tmp_path / "up.tgz", typeflag, huge_body)
    tracemalloc.start()
    try:
        assert detect_archive(bomb) == "tar"
        err = error_of(safe_extract, bomb, tmp_path / "out", max_files=10, max_unpacked_bytes=MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.code == "archive_header_too_large" and kind in err.message and "up.tgz" in err.message
    assert peak < 4 * MiB, f"{peak / MiB:.0f} MiB allocated"
    assert error_of(load_dataset, bomb, SPEC, seed=0).code == "archive_header_too_large"


def test_the_limit_is_exact(tmp_path: Path) -> None:
    at_limit = padded(b"a/0.png".ljust(MAX_TAR_EXTENDED_HEADER, b"\0"))  # a NUL ends the name
    ok = tmp_path / "ok.tar"
    ok.write_bytes(header(b"././@LongLink", b"L", MAX_TAR_EXTENDED_HEADER) + at_limit
                   + regular("ignored-name", png_bytes()) + end())
    safe_extract(ok, tmp_path / "out", max_files=10, max_unpacked_bytes=MiB)
    assert (tmp_path / "out" / "a" / "0.png").read_bytes() == png_bytes()
    over = tmp_path / "over.tar"
    over.write_bytes(header(b"././@LongLink", b"L", MAX_TAR_EXTENDED_HEADER + 1) + padded(bytes(1 << 17))
                     + regular("a/0.png", png_bytes()) + end())
    err = error_of(safe_extract, over, tmp_path / "out2", max_files=10, max_unpacked_bytes=MiB)
    assert err.code == "archive_header_too_large"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_below_the_limit_still_work(tmp_path: Path, fmt: int) -> None:
    prefix = "d" * 250 + "/"  # a wrapper folder; names of 260 characters need a long-name or pax path record
    d = load_dataset(small_dataset(tmp_path / "long.tar.gz", fmt=fmt, prefix=prefix), SPEC, seed=0)
    assert d.classes == ["cat", "dog"] and d.num_train_labelled + d.num_val == 8
    # pax records other than path are read (under the limit) and ignored
    with tarfile.open(tmp_path / "comment.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/0.png")
        data = png_bytes()
        info.size = len(data)
        info.pax_headers = {"comment": "c" * (MAX_TAR_EXTENDED_HEADER - 100)}
        tf.addfile(info, io.BytesIO(data))
    safe_extract(tmp_path / "comment.tar", tmp_path / "out", max_files=10, max_unpacked_bytes=MiB)
    assert (tmp_path / "out" / "a" / "0.png").read_bytes() == data
    info.pax_headers = {"comment": "c" * (MAX_TAR_EXTENDED_HEADER + 100)}
    with tarfile.open(tmp_path / "big_comment.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    err = error_of(safe_extract, tmp_path / "big_comment.tar", tmp_path / "out2", max_files=10,
                   max_unpacked_bytes=MiB)
    assert err.code == "archive_header_too_large"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_every_compression_is_read_without_tarfile(tmp_path: Path, mode: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_dataset(tmp_path / "data.tar", mode=mode)

    def refuse(*args, **kwargs):
        raise AssertionError("tarfile must not open an untrusted archive")

    monkeypatch.setattr(tarfile, "open", refuse)
    monkeypatch.setattr(tarfile, "is_tarfile", refuse)
    d = load_dataset(path, SPEC, seed=0)
    assert d.classes == ["cat", "dog"] and d.num_train_labelled + d.num_val == 8


def test_xz_needing_a_huge_dictionary_is_refused(tmp_path: Path) -> None:
    data = bytearray(lzma.compress(regular("a/0.png", png_bytes()) + end()))
    size = (data[12] + 1) * 4  # the block header follows the 12-byte stream header
    assert data[14:16] == b"\x21\x01"  # LZMA2 filter, one property byte: the dictionary size
    data[16] = 40  # 4 GiB
    data[12 + size - 4:12 + size] = zlib.crc32(bytes(data[12:12 + size - 4])).to_bytes(4, "little")
    (tmp_path / "big_dict.tar.xz").write_bytes(bytes(data))
    err = error_of(load_dataset, tmp_path / "big_dict.tar.xz", SPEC, seed=0)
    assert err.code == "unreadable_archive" and "memory" in err.message and "big_dict.tar.xz" in err.message


def test_damaged_headers_are_unreadable(tmp_path: Path) -> None:
    entry = regular("a/0.png", png_bytes())
    cases = {
        "chain.tar": (header(b"././@LongLink", b"L", 8) + padded(b"a/0.png\0")) * (MAX_TAR_HEADER_CHAIN + 1)
        + entry + end(),
        "checksum.tar": entry + bytes([entry[0] ^ 1]) + entry[1:] + end(),
        "cut_header.tar": entry + entry[:300],
        "cut_data.tar.gz": gzip.compress(entry[:600]),
        "bad_pax.tar": header(b"pax", b"x", 12) + padded(b"99 path=a/b\n") + entry + end(),
        "negative.tar": entry + header(b"a/1.png", b"0", b"\xff" * 12) + end(),  # base-256 -1
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        err = error_of(safe_extract, tmp_path / name, tmp_path / name.replace(".", "_"), max_files=10,
                       max_unpacked_bytes=MiB)
        assert err.code == "unreadable_archive" and name in err.message, (name, err.message)


def test_compressed_garbage_and_truncation_have_readable_messages(tmp_path: Path) -> None:
    full = gzip.compress(regular("a/0.png", png_bytes(0)) + regular("a/1.png", png_bytes(1)) + end())
    (tmp_path / "cut.tar.gz").write_bytes(full[:len(full) // 2])
    err = error_of(load_dataset, tmp_path / "cut.tar.gz", SPEC, seed=0)
    assert err.code == "unreadable_archive" and "ends early" in err.message
    (tmp_path / "bad.tar.bz2").write_bytes(b"BZh9" + bytes(range(256)) * 4)
    err = error_of(load_dataset, tmp_path / "bad.tar.bz2", SPEC, seed=0)
    assert err.code == "unreadable_archive" and "damaged" in err.message
