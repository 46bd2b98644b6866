"""Hostile upload files, built by code at test time (nothing is committed as a blob).

Every builder returns the bytes of one file. They stay small (kilobytes): a bomb is a small file that
*claims* or *decompresses to* a lot, never a big file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

HUGE_DIM = 1 << 40  # a dimension no upload may make the server allocate
OPSET = [helper.make_opsetid("", 17)]


# ---------------------------------------------------------------------------------------------- images


def png(seed: int, size: int = 8) -> bytes:
    """A real grey PNG of `size` x `size` random pixels."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height grey pixels (10 Gpx by default, 10 GB decoded), with a
    few hundred bytes of IDAT: the first rows, all zero, compressed. The file is under 1 KiB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, deflate, no filter, no interlace
    rows = zlib.compress(bytes(4 * (width + 1)), 9)  # four rows of filter byte 0 + zero pixels
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def bmp_pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 54-byte-header BMP declaring width x height 24-bit pixels and holding none of them."""
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


# ---------------------------------------------------------------------------------------------- zip


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression, compresslevel=9 if compression else None) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


def good_folder_entries(prefix: str = "train/", classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3,
                        ) -> dict[str, bytes]:
    """A small valid ImageFolder: `per_class` 8x8 grey PNGs in each class folder."""
    out: dict[str, bytes] = {}
    for c, cls in enumerate(classes):
        for i in range(per_class):
            out[f"{prefix}{cls}/{i}.png"] = png(100 * c + i)
    return out


def good_folder_zip() -> bytes:
    return zip_of(good_folder_entries())


def zip_with_extra(name: str, data: bytes | None = None) -> bytes:
    """A valid ImageFolder zip plus one more entry named `name` (which the archive writer keeps verbatim)."""
    return zip_of({**good_folder_entries(), name: png(7) if data is None else data})


def zip_symlink() -> bytes:
    """A zip whose entry `train/cat/link.png` is a unix symbolic link to /etc/passwd."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good_folder_entries().items():
            zf.writestr(zipfile.ZipInfo(name), data)
        info = zipfile.ZipInfo("train/cat/link.png")
        info.create_system = 3  # unix
        info.external_attr = (0o120777 << 16)  # S_IFLNK | rwxrwxrwx
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def zip_bomb(entries: int, entry_bytes: int) -> bytes:
    """`entries` deflated entries of `entry_bytes` zeros each (about 1000:1), beside a valid folder."""
    files = {f"train/{'cat' if i % 2 else 'dog'}/zero{i}.png": bytes(entry_bytes) for i in range(entries)}
    return zip_of({**good_folder_entries(), **files}, compression=zipfile.ZIP_DEFLATED)


def zip_many_files(count: int) -> bytes:
    """A zip of `count` empty entries: tiny, but past a small file-count limit."""
    return zip_of({f"train/{'cat' if i % 2 else 'dog'}/{i}.png": b"" for i in range(count)})


def _patch_names(data: bytes, placeholder: bytes, raw: bytes, expected: int) -> bytes:
    """Replace an entry name's placeholder bytes by `raw` (same length) in the local and central headers."""
    assert len(placeholder) == len(raw)
    assert data.count(placeholder) == expected, data.count(placeholder)
    return data.replace(placeholder, raw)


def zip_non_utf8_name_flagged() -> bytes:
    """A class folder whose name is invalid UTF-8 (bytes ff fe) in an entry that sets the zip's UTF-8 flag
    (general purpose bit 11), so a reader that trusts the flag cannot decode it."""
    entries = {**good_folder_entries(), "train/\u00e9/0.png": png(50)}  # the 'é' makes zipfile set bit 11
    data = zip_of(entries)
    return _patch_names(data, "\u00e9".encode(), b"\xff\xfe", expected=2)


def zip_cp437_name() -> bytes:
    """A class folder named b'caf\\x82' without the UTF-8 flag: by the zip standard that is CP437, 'café'."""
    entries = {"train/dog/0.png": png(1), "train/dog/1.png": png(2), "train/cafX/0.png": png(3),
               "train/cafX/1.png": png(4)}
    data = zip_of(entries)
    return _patch_names(data, b"cafX", b"caf\x82", expected=4)


# ---------------------------------------------------------------------------------------------- tar


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz",
           fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def good_folder_members(prefix: str = "train/") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_file(name, data) for name, data in good_folder_entries(prefix).items()]


def tar_with_extra(name: str, data: bytes | None = None) -> bytes:
    return tar_of([*good_folder_members(), _file(name, png(8) if data is None else data)])


def tar_link(kind: bytes, target: str) -> bytes:
    """A valid folder plus `train/cat/link.png`, a symbolic (`kind` SYMTYPE) or hard (LNKTYPE) link."""
    info = tarfile.TarInfo("train/cat/link.png")
    info.type = kind
    info.linkname = target
    return tar_of([*good_folder_members(), (info, None)])


def tar_gz_bomb(entries: int, entry_bytes: int) -> bytes:
    members = [_file(f"train/{'cat' if i % 2 else 'dog'}/zero{i}.png", bytes(entry_bytes)) for i in range(entries)]
    return tar_of([*good_folder_members(), *members])


def tar_non_utf8_name() -> bytes:
    """A class folder whose name is the raw bytes ff fe (not UTF-8; tar has no encoding flag)."""
    odd = b"\xff\xfe".decode("utf-8", "surrogateescape")
    return tar_of([*good_folder_members(), _file(f"train/{odd}/0.png", png(9)), _file(f"train/{odd}/1.png", png(10))])


def _tar_header(name: bytes, typeflag: bytes, size: int) -> bytes:
    """One 512-byte GNU header written field by field (tarfile refuses to write absurd sizes)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 0
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[257:265] = b"ustar  \0"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def tar_gnu_long_name(claimed: int = 1 << 30, body: int = 256 << 10) -> bytes:
    """A .tar.gz whose first header is a GNU long-name ('L') record claiming `claimed` bytes (1 GiB), followed
    by `body` bytes of 'a' (past the 64 KiB header limit, but compressed to a few hundred bytes) and no end."""
    return gzip.compress(_tar_header(b"././@LongLink", b"L", claimed) + b"a" * body, 9)


# ---------------------------------------------------------------------------------------------- npz


def npz_of(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_npz() -> bytes:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 6).astype(np.int64)
    return npz_of(x=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y=y)


class MarkerTrap:
    """The classic pickle exploit: unpickling calls `os.system` (pickled as posix.system) or `exec`
    (builtins.exec), either of which would create the marker file."""

    def __init__(self, marker: Path, via: str = "system") -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):  # type: ignore[no-untyped-def]
        if self.via == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch '{self.marker}'",)


def npz_pickled_objects(marker: Path) -> bytes:
    """An .npz whose `y` is an object array holding a MarkerTrap (np.save pickles object arrays)."""
    rng = np.random.default_rng(0)
    y = np.empty(2, dtype=object)
    y[0], y[1] = MarkerTrap(marker), 1
    return npz_of(x=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), y=y)


def npz_huge_declared_shape() -> bytes:
    """An .npz whose x.npy header declares [2**40, 8, 8] uint8 (64 TiB) over 128 bytes of data."""
    data = good_npz()
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as out:
        for name in src.namelist():
            member = src.read(name)
            if name == "x.npy":
                header = {"descr": "|u1", "fortran_order": False, "shape": (HUGE_DIM, 8, 8)}
                npy = io.BytesIO()
                np.lib.format.write_array_header_1_0(npy, header)
                member = npy.getvalue() + bytes(128)
            out.writestr(name, member)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- pickles


def torch_save(obj: object) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pickle_reduce_zip_pt(marker: Path, via: str = "system") -> bytes:
    """A torch.save (zip) checkpoint: a plausible state dict beside an entry that unpickles to a call."""
    import torch

    return torch_save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": MarkerTrap(marker, via)})


def pickle_reduce_legacy_pt(marker: Path) -> bytes:
    """A bare pickle (what torch.save wrote before 1.6, and what pickle.dump writes) of MarkerTrap."""
    return pickle.dumps({"payload": MarkerTrap(marker)}, protocol=2)


# ---------------------------------------------------------------------------------------------- onnx


def _tiny_graph(initializers: list[TensorProto] | None = None, input_shape: list | None = None,
                extra_nodes: list | None = None, extra_inits: list[TensorProto] | None = None,
                logits_from: str = "logits") -> onnx.ModelProto:
    """input [N, 1, 8, 8] → Flatten → Gemm(64 → 10) → logits [N, 10]; optional extra nodes feeding the output."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [10, 64], np.linspace(-1, 1, 640, dtype=np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [10], np.zeros(10, dtype=np.float32))
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1), *(extra_nodes or [])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape or ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(logits_from, TensorProto.FLOAT, ["N", 10])],
        initializer=initializers if initializers is not None else [w, b, *(extra_inits or [])])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def onnx_tiny() -> bytes:
    return _tiny_graph().SerializeToString()


def onnx_external_data(location: str = "/etc/passwd") -> bytes:
    """The tiny model whose Gemm weights live in an external file that the model names."""
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend([10, 64])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(640 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    b = helper.make_tensor("b", TensorProto.FLOAT, [10], np.zeros(10, dtype=np.float32))
    return _tiny_graph(initializers=[w, b]).SerializeToString()


def onnx_huge_input() -> bytes:
    """The tiny model with its input declared [N, 1, 2**40, 2**40]."""
    return _tiny_graph(input_shape=["N", 1, HUGE_DIM, HUGE_DIM]).SerializeToString()


def onnx_huge_initializer() -> bytes:
    """An initializer declared [2**40] floats (4 TiB) that holds no data, added to the logits."""
    big = TensorProto()
    big.name, big.data_type = "big", TensorProto.FLOAT
    big.dims.extend([HUGE_DIM])
    nodes = [helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0),
             helper.make_node("Add", ["logits", "big_sum"], ["out"])]
    return _tiny_graph(extra_nodes=nodes, extra_inits=[big], logits_from="out").SerializeToString()


def onnx_huge_runtime_tensor() -> bytes:
    """A ConstantOfShape node that asks for [2**20, 2**20] floats (4 TiB) while running, added to the logits."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], np.array([1 << 20, 1 << 20], dtype=np.int64))
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0),
             helper.make_node("Add", ["logits", "big_sum"], ["out"])]
    return _tiny_graph(extra_nodes=nodes, extra_inits=[shape], logits_from="out").SerializeToString()


# ---------------------------------------------------------------------------------------------- safetensors


def safetensors_raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def safetensors_huge_shape() -> bytes:
    """A safetensors header declaring one F32 tensor of [2**40] (4 TiB) over 16 bytes of data."""
    return safetensors_raw({"fc.weight": {"dtype": "F32", "shape": [HUGE_DIM], "data_offsets": [0, 4 * HUGE_DIM]}},
                           bytes(16))


def safetensors_huge_header_length() -> bytes:
    """A safetensors file whose 8-byte header length says 99 MiB, then 2 bytes of header: `{}`."""
    return struct.pack("<Q", 99 << 20) + b"{}"


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


# ---------------------------------------------------------------------------------------------- odd names


def npz_lone_surrogate_class() -> bytes:
    """An .npz whose `classes` (a numpy str array, UCS-4) holds a lone surrogate, which no UTF-8 can encode."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 6).astype(np.int64)
    return npz_of(x=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y=y, classes=np.array(["\ud800", "b"]))


def tar_non_utf8_bad_image() -> bytes:
    """An image named with the raw bytes ff fe that is not an image, so that the error names it."""
    odd = b"\xff\xfe".decode("utf-8", "surrogateescape")
    return tar_of([*good_folder_members(), _file(f"train/cat/{odd}.png", b"not a png")])


BOUNDARY = b"kdistillhostileboundary"


def multipart_body(filename: bytes, data: bytes, part_type: bytes = b"application/octet-stream") -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) with one part `file`, its filename written as raw bytes."""
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\nContent-Type: ' + part_type + b"\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n")
