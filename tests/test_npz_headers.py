""".npz datasets are described from their .npy headers: inspection never loads images, headers are bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from worker.distill.data import inspect_dataset, load_dataset
from worker.distill.data import npz as npz_module
from worker.distill.errors import DatasetError
from worker.distill.spec import DataSpec

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SPEC = DataSpec(path="unused", val_fraction=0.25)

# Runs the command given as its arguments and prints the command's peak RSS (RUSAGE_CHILDREN of this wrapper
# covers that one command only).
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "rc": run.returncode, "out": run.stdout, "err": run.stderr[-3000:]}))
""")


def inspect_in_child(path: Path, workdir: Path) -> tuple[dict, int]:
    """`python -m worker.inspect dataset` on `path`: its JSON answer and its peak RSS in bytes."""
    args = {"path": str(path), "workdir": str(workdir)}
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "worker.inspect", "dataset", json.dumps(args)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout)
    assert report["out"].strip(), report["err"]
    return json.loads(report["out"].strip().splitlines()[-1]), report["peak"]


def npy_header(shape: tuple[int, ...], descr: str = "|u1", *, fortran: bool = False) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def error_of(fn, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as exc:
        fn(*args, **kwargs)
    return exc.value


# ---------------------------------------------------------------------------------------------- big x


N_BIG = (2 << 30) // (32 * 32 * 3) + 1  # 699,051 images of 32x32x3: 2 GiB of pixels


@pytest.fixture(scope="module")
def big_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x declares 2 GiB of zeros, written a MiB at a time and deflated to ~9 MiB; y is small and real."""
    path = tmp_path_factory.mktemp("big") / "big.npz"
    header = npy_header((N_BIG, 32, 32, 3))
    left = N_BIG * 32 * 32 * 3
    zeros = bytes(MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header)
            while left:
                f.write(zeros[:min(left, MiB)])
                left -= min(left, MiB)
        with zf.open("y.npy", "w") as f:
            np.lib.format.write_array(f, (np.arange(N_BIG) % 10).astype(np.uint8))
    return path


def test_inspecting_a_2_gib_npz_never_loads_its_images(tmp_path: Path, big_npz: Path) -> None:
    assert big_npz.stat().st_size < 32 * MiB
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((40, 32, 32, 3), np.uint8), y=np.arange(40) % 10)
    base, base_peak = inspect_in_child(small, tmp_path)
    assert base["ok"], base
    info, peak = inspect_in_child(big_npz, tmp_path)
    assert info["ok"], info
    assert info["num_train"] + info["num_val"] == N_BIG and info["num_classes"] == 10
    assert (info["channels"], info["image_size"], info["num_unlabeled"]) == (3, [32, 32], 0)
    growth = peak - base_peak
    print(f"\npeak RSS: baseline {base_peak / MiB:.0f} MiB, 2 GiB npz {peak / MiB:.0f} MiB, "
          f"growth {growth / MiB:+.1f} MiB")
    assert growth < 128 * MiB, f"inspecting a 2 GiB npz took {growth / MiB:.0f} MiB more than a small one"


def test_inspection_reads_labels_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 4, 4, 3), np.uint8), y=np.arange(8) % 2,
             x_val=np.zeros((2, 4, 4, 3), np.uint8), y_val=np.array([0, 1]),
             x_unlabeled=np.zeros((3, 4, 4, 3), np.uint8), classes=np.array(["a", "b"]))
    read: list[str] = []
    real = npz_module._read_member

    def spy(zf, key, header):
        read.append(key)
        return real(zf, key, header)

    monkeypatch.setattr(npz_module, "_read_member", spy)
    info = inspect_dataset(tmp_path / "d.npz", SPEC)
    assert sorted(read) == ["classes", "y", "y_val"]
    assert (info.num_train, info.num_val, info.num_unlabeled, info.classes) == (8, 2, 3, ["a", "b"])
    read.clear()
    assert load_dataset(tmp_path / "d.npz", SPEC, seed=0).info() == info
    assert {"x", "x_val", "x_unlabeled"} <= set(read)


# ------------------------------------------------------------------------------------------ bad headers


BAD = [
    ({"x": np.zeros((4, 64), np.uint8), "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 8, 8, 2), np.uint8), "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 3, 8, 8), np.uint8)[:, :, :, :2], "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 8, 8), np.float32), "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([[0, 1], [0, 1]])}, "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0.0, 1.0, 0.0, 1.0])}, "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0])}, "shape_mismatch"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 7]), "classes": np.array(["a", "b"])},
     "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]), "classes": np.array([1, 2])},
     "invalid_classes"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]), "classes": np.array(["a", "a"])},
     "invalid_classes"),
    ({"x": np.zeros((0, 8, 8), np.uint8), "y": np.zeros(0, np.int64)}, "empty_dataset"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 8, 9), np.uint8),
      "y_test": np.array([0, 1])}, "shape_mismatch"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]), "y_val": np.array([0, 1])},
     "missing_array"),
    ({"x": np.array([{"a": 1}, None], dtype=object), "y": np.array([0, 1])}, "unreadable_dataset"),
]


@pytest.mark.parametrize(("arrays", "code"), BAD)
def test_header_checks_give_the_same_codes_to_inspection_and_loading(tmp_path: Path, arrays: dict,
                                                                     code: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    for fn, args in ((inspect_dataset, (SPEC,)), (load_dataset, (SPEC,))):
        kwargs = {"seed": 0} if fn is load_dataset else {}
        err = error_of(fn, tmp_path / "d.npz", *args, **kwargs)
        assert err.code == code and "d.npz" in err.message, (fn.__name__, err.message)


def write_member(path: Path, name: str, data: bytes, **arrays: np.ndarray) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
        for key, a in arrays.items():
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, a)


def test_a_header_that_lies_about_the_data_is_unreadable(tmp_path: Path) -> None:
    y = np.array([0, 1] * 500)
    write_member(tmp_path / "short.npz", "x.npy", npy_header((1000, 8, 8)) + bytes(10), y=y)
    write_member(tmp_path / "long.npz", "x.npy", npy_header((2, 8, 8)) + bytes(1000), y=np.array([0, 1]))
    for name in ("short.npz", "long.npz"):
        for err in (error_of(inspect_dataset, tmp_path / name, SPEC),
                    error_of(load_dataset, tmp_path / name, SPEC, seed=0)):
            assert err.code == "unreadable_dataset" and name in err.message and "header" in err.message


def test_a_huge_header_length_is_refused_before_the_header_is_read(tmp_path: Path) -> None:
    # a version-2 header whose length field says 4 GiB: numpy would read (and keep) all of it first
    member = b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b" " * (8 * MiB)
    write_member(tmp_path / "d.npz", "x.npy", member, y=np.array([0, 1]))
    tracemalloc.start()
    try:
        err = error_of(inspect_dataset, tmp_path / "d.npz", SPEC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.code == "unreadable_dataset" and "header" in err.message and "d.npz" in err.message
    assert peak < 4 * MiB, f"{peak / MiB:.0f} MiB allocated"
    write_member(tmp_path / "e.npz", "x.npy", b"not an array at all", y=np.array([0, 1]))
    assert error_of(inspect_dataset, tmp_path / "e.npz", SPEC).code == "unreadable_dataset"


def test_byte_budget_counts_labels_as_int64(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 0, 1], np.uint8))
    need = 4 * 8 * 8 + 4 * 8  # pixels + labels as decoded
    for fn, kwargs in ((inspect_dataset, {}), (load_dataset, {"seed": 0})):
        err = error_of(fn, tmp_path / "d.npz", DataSpec(path="unused", max_decoded_bytes=need - 1), **kwargs)
        assert err.code == "dataset_too_large"
        fn(tmp_path / "d.npz", DataSpec(path="unused", max_decoded_bytes=need), **kwargs)


def test_fortran_order_and_big_endian_arrays_load_as_saved(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8))
    y = np.array([0, 1, 2, 0, 1, 2], dtype=">i4")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_dataset(tmp_path / "d.npz", DataSpec(path="unused", val_fraction=0.5), seed=0)
    images = np.concatenate([d.train.images.numpy(), d.val.images.numpy()]).transpose(0, 2, 3, 1)
    labels = np.concatenate([d.train.labels.numpy(), d.val.labels.numpy()])
    order = [int(np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0]) for img in images]
    assert sorted(order) == list(range(6)) and labels.tolist() == y[order].tolist()
