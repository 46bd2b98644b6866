"""Datasets: layouts, decoding, splits, hostile uploads and the batch transforms."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.distill.data import (
    augment_batch,
    inspect_dataset,
    load_dataset,
    safe_extract,
    to_model_input,
)
from worker.distill.data.split import carve_splits, split_indices
from worker.distill.errors import DatasetError
from worker.distill.spec import DataSpec as Spec
from worker.distill.spec import InputSpec

SPEC = Spec(path="unused", val_fraction=0.25)


# ---------------------------------------------------------------- fixtures built on the fly


def write_image(path: Path, *, size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0,
                fmt: str | None = None) -> np.ndarray:
    """Random pixels of (h, w) `size`; returns what was written."""
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)  # the mode follows from the array's shape
    return arr


def class_folders(root: Path, counts: dict[str, int], *, mode: str = "RGB", size: tuple[int, int] = (8, 8),
                  suffix: str = ".png") -> None:
    for c, n in counts.items():
        for i in range(n):
            write_image(root / c / f"{c}_{i}{suffix}", mode=mode, size=size, seed=i + 100 * sum(map(ord, c)))


def zip_folder(folder: Path, out: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, prefix + p.relative_to(folder).as_posix())
    return out


def tar_folder(folder: Path, out: Path, *, mode: str = "w:gz") -> Path:
    with tarfile.open(out, mode) as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, p.relative_to(folder).as_posix(), recursive=False)
    return out


def tar_with(out: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def error_of(fn, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as exc:
        fn(*args, **kwargs)
    return exc.value


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- layouts and decoding


def test_flat_class_folders(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds", {"dog": 4, "cat": 4, "ant": 4})
    d = load_dataset(tmp_path / "ds", SPEC, seed=0)
    assert d.classes == ["ant", "cat", "dog"]
    assert (d.format, d.val_source, d.channels, d.image_size) == ("imagefolder", "split", 3, (8, 8))
    assert d.num_train_labelled + d.num_val == 12 and d.num_unlabeled == 0
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert sorted(d.val.labels.tolist()) == [0, 1, 2]  # 25% of 4 per class
    assert d.class_counts().tolist() == [3, 3, 3]


def test_pixels_survive_decoding(tmp_path: Path) -> None:
    want = write_image(tmp_path / "ds" / "a" / "x.png", seed=7)
    write_image(tmp_path / "ds" / "b" / "y.png", seed=8)
    d = load_dataset(tmp_path / "ds", SPEC, seed=0)
    images = torch.cat([d.train.images, d.val.images])
    labels = torch.cat([d.train.labels, d.val.labels])
    got = images[labels.tolist().index(0)]
    assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1))


def test_split_layout_zip_with_wrapper_val_unlabeled_and_junk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    class_folders(src / "train", {"b": 3, "a": 2})
    class_folders(src / "val", {"a": 2})
    write_image(src / "unlabeled" / "u0.png")
    write_image(src / "unlabeled" / "deep" / "u1.jpg", fmt="JPEG")
    (src / "unlabeled" / "notes.txt").write_text("ignored")
    (src / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    archive = zip_folder(src, tmp_path / "upload.zip", prefix="mydata/")
    with zipfile.ZipFile(archive, "a") as zf:  # macOS clutter that would not decode
        zf.writestr("__MACOSX/mydata/train/a/._a_0.png", b"not an image")
    d = load_dataset(archive, SPEC, seed=0)
    assert d.classes == ["a", "b"] and d.val_source == "given"
    assert (d.num_train_labelled, d.num_val, d.num_unlabeled) == (5, 2, 2)
    assert d.train.labels.tolist() == [0, 0, 1, 1, 1, -1, -1]  # labelled first, unlabeled last
    assert d.val.labels.tolist() == [0, 0]
    assert d.class_counts().tolist() == [2, 3]


def test_flat_layout_tar_gz_with_unlabeled_and_workdir_cleanup(tmp_path: Path) -> None:
    src = tmp_path / "src"
    class_folders(src, {"x": 3, "y": 3}, suffix=".JPG")
    write_image(src / "unlabeled" / "u.bmp", fmt="BMP")
    archive = tar_folder(src, tmp_path / "upload.tgz")
    work = tmp_path / "work"
    d = load_dataset(archive, SPEC, seed=1, workdir=work)
    assert d.classes == ["x", "y"] and d.num_unlabeled == 1
    assert d.num_train_labelled + d.num_val == 6
    assert list(work.iterdir()) == []  # the extraction is removed after loading


def test_archive_detected_by_content_not_suffix(tmp_path: Path) -> None:
    class_folders(tmp_path / "src", {"a": 2, "b": 2})
    zipped = zip_folder(tmp_path / "src", tmp_path / "upload.bin")
    tarred = tar_folder(tmp_path / "src", tmp_path / "upload.data", mode="w")
    assert load_dataset(zipped, SPEC, seed=0).num_classes == 2
    assert load_dataset(tarred, SPEC, seed=0).num_classes == 2


def test_grayscale_detection(tmp_path: Path) -> None:
    class_folders(tmp_path / "grey", {"a": 2, "b": 2}, mode="L")
    assert load_dataset(tmp_path / "grey", SPEC, seed=0).channels == 1
    class_folders(tmp_path / "mixed", {"a": 2, "b": 2}, mode="L")
    write_image(tmp_path / "mixed" / "b" / "colour.png", mode="RGB")
    mixed = load_dataset(tmp_path / "mixed", SPEC, seed=0)
    assert mixed.channels == 3 and mixed.train.images.shape[1] == 3


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    for c, value in (("a", 257 * 100), ("b", 65535)):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(tmp_path / "ds" / c / f"{i}.png")
    d = load_dataset(tmp_path / "ds", SPEC, seed=0)
    assert d.channels == 1
    images = torch.cat([d.train.images, d.val.images])
    labels = torch.cat([d.train.labels, d.val.labels])
    assert set(images[labels == 0].unique().tolist()) == {100}
    assert set(images[labels == 1].unique().tolist()) == {255}


def test_mixed_sizes_resize_to_most_common_or_target(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds", {"a": 3, "b": 2}, size=(6, 10))
    write_image(tmp_path / "ds" / "b" / "big.png", size=(20, 12))
    d = load_dataset(tmp_path / "ds", SPEC, seed=0)
    assert d.image_size == (6, 10)
    assert d.num_train_labelled + d.num_val == 6
    t = load_dataset(tmp_path / "ds", SPEC, seed=0, target_size=(5, 7))
    assert t.image_size == (5, 7) and t.val.images.shape[2:] == (5, 7)


def test_inspect_folder_matches_load(tmp_path: Path) -> None:
    class_folders(tmp_path / "src" / "train", {"a": 4, "b": 5}, mode="L", size=(6, 6))
    write_image(tmp_path / "src" / "unlabeled" / "u.png", mode="L", size=(6, 6))
    archive = zip_folder(tmp_path / "src", tmp_path / "up.zip")
    info = inspect_dataset(archive, SPEC)
    d = load_dataset(archive, SPEC, seed=3)
    assert info == d.info()
    assert info.to_dict() == {"format": "imagefolder", "classes": ["a", "b"], "num_classes": 2,
                              "num_train": 7, "num_val": 2, "num_unlabeled": 1, "channels": 1,
                              "image_size": [6, 6], "val_source": "split", "num_test": 0, "test_source": None}


# ---------------------------------------------------------------- npz


def test_npz_nhw_grey(tmp_path: Path, digits) -> None:
    np.savez(tmp_path / "d.npz", x=digits.x_train, y=digits.y_train)
    d = load_dataset(tmp_path / "d.npz", SPEC, seed=0)
    assert d.format == "npz" and d.classes == [str(i) for i in range(10)]
    assert (d.channels, d.image_size) == (1, (8, 8))
    assert d.num_train_labelled + d.num_val == len(digits.y_train)
    assert d.val.labels.unique().tolist() == list(range(10))
    assert abs(d.num_val / len(digits.y_train) - 0.25) < 0.02


def test_npz_nhwc_alpha_val_unlabeled_and_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
             x_val=x[:2], y_val=np.array([2, 0]), x_unlabeled=x[:3], classes=np.array(["cat", "dog", "emu"]))
    d = load_dataset(tmp_path / "d.npz", SPEC, seed=0)
    assert d.classes == ["cat", "dog", "emu"] and d.val_source == "given"
    assert (d.channels, d.image_size) == (3, (5, 4))
    assert (d.num_train_labelled, d.num_unlabeled, d.num_val) == (6, 3, 2)
    assert torch.equal(d.train.images[0], torch.from_numpy(x[0, ..., :3]).permute(2, 0, 1))
    assert d.train.labels.tolist() == [0, 1, 2, 0, 1, 2, -1, -1, -1]
    assert inspect_dataset(tmp_path / "d.npz", SPEC) == d.info()
    resized = load_dataset(tmp_path / "d.npz", SPEC, seed=0, target_size=(10, 8))
    assert resized.train.images.shape == (9, 3, 10, 8) and resized.val.images.shape == (2, 3, 10, 8)


# ---------------------------------------------------------------- the split


def test_split_is_seeded_stratified_and_leaves_unlabeled_in_train(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [10, 7, 3, 2])
    x = rng.integers(0, 256, (len(y), 4, 4), dtype=np.uint8)
    x[:, 0, 0] = np.arange(len(y))  # tags each sample so the split can be traced
    np.savez(tmp_path / "d.npz", x=x, y=y, x_unlabeled=np.full((5, 4, 4), 255, dtype=np.uint8))

    def tags(s) -> list[int]:
        return s.val.images[:, 0, 0, 0].tolist()

    a, b = load_dataset(tmp_path / "d.npz", SPEC, seed=5), load_dataset(tmp_path / "d.npz", SPEC, seed=5)
    assert tags(a) == tags(b) and torch.equal(a.train.images, b.train.images)
    others = [tags(load_dataset(tmp_path / "d.npz", SPEC, seed=s)) for s in range(6, 10)]
    assert any(t != tags(a) for t in others)
    assert a.val.labels.unique().tolist() == [0, 1, 2, 3]  # every class in val
    assert (a.val.labels >= 0).all() and a.num_unlabeled == 5 and a.num_val == 7  # 3 + 2 + 1 + 1 (>= 1 each)
    train_tags = a.train.images[a.train.labels >= 0][:, 0, 0, 0].tolist()
    assert sorted(train_tags + tags(a)) == list(range(len(y)))  # a partition of the labelled samples


def test_split_keeps_single_sample_classes_in_train(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds", {"a": 4, "b": 1})
    d = load_dataset(tmp_path / "ds", SPEC, seed=0)
    assert d.class_counts().tolist() == [3, 1] and d.val.labels.tolist() == [0]
    class_folders(tmp_path / "singles", {"a": 1, "b": 1, "c": 1})
    s = load_dataset(tmp_path / "singles", SPEC, seed=0)
    assert (s.num_train_labelled, s.num_val) == (2, 1)  # falls back to a plain random split


# ---------------------------------------------------------------- the held-out test split


def tagged_npz(path: Path, counts: list[int], **extra: np.ndarray) -> np.ndarray:
    """An npz whose sample i has pixel (0, 0) == i, so splits can be traced; returns its labels."""
    y = np.repeat(np.arange(len(counts)), counts)
    x = np.random.default_rng(0).integers(0, 256, (len(y), 4, 4), dtype=np.uint8)
    x[:, 0, 0] = np.arange(len(y))
    np.savez(path, x=x, y=y, **extra)
    return y


def tags(s) -> list[int]:
    return s.images[:, 0, 0, 0].tolist()


def test_imagefolder_test_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    class_folders(src / "train", {"a": 4, "b": 3, "c": 2})
    class_folders(src / "val", {"a": 1, "c": 1})
    want = [write_image(src / "test" / c / f"t{i}.png", seed=1000 + i) for i, c in enumerate("bbc")]
    write_image(src / "unlabeled" / "u.png")
    archive = zip_folder(src, tmp_path / "up.zip", prefix="wrap/")
    spec = Spec(path="unused", val_fraction=0.25, test_fraction=0.5)  # ignored: the dataset gives test/
    d = load_dataset(archive, spec, seed=0)
    assert d.classes == ["a", "b", "c"]  # test/ is a split, not a class
    assert (d.val_source, d.test_source) == ("given", "given")
    assert (d.num_train_labelled, d.num_val, d.num_test, d.num_unlabeled) == (9, 2, 3, 1)
    assert d.test is not None and d.test.labels.tolist() == [1, 1, 2]
    assert d.val.labels.tolist() == [0, 2]
    # one tensor, in the order train + unlabeled + val + test: views, nothing copied
    base = d.train.images.untyped_storage().data_ptr()
    assert d.val.images.untyped_storage().data_ptr() == base == d.test.images.untyped_storage().data_ptr()
    assert d.test.images.shape == (3, 3, 8, 8)
    # the test images are test/'s files, in order, and none of them is in train or val
    assert torch.equal(d.test.images, torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2))
    train_and_val = torch.cat([d.train.images, d.val.images])
    for img in d.test.images:
        assert not (train_and_val == img).flatten(1).all(1).any()
    info = inspect_dataset(archive, spec)
    assert info == d.info() and info.to_dict()["num_test"] == 3 and info.to_dict()["test_source"] == "given"


def test_imagefolder_test_split_layout_errors(tmp_path: Path) -> None:
    class_folders(tmp_path / "mm" / "train", {"a": 2, "b": 2})
    class_folders(tmp_path / "mm" / "test", {"a": 1, "z": 1})
    err = error_of(load_dataset, tmp_path / "mm", SPEC, seed=0)
    assert err.code == "class_mismatch" and "test/z" in err.message and "test classes" in err.message
    class_folders(tmp_path / "lone" / "test", {"a": 1, "b": 1})
    err = error_of(load_dataset, tmp_path / "lone", SPEC, seed=0)
    assert err.code == "invalid_layout" and "test/ needs a train/ folder" in err.message
    class_folders(tmp_path / "flat", {"a": 2, "b": 2, "test": 2})  # never a class called test: a split
    err = error_of(load_dataset, tmp_path / "flat", SPEC, seed=0)
    assert err.code == "invalid_layout" and "test/" in err.message
    class_folders(tmp_path / "wrapped" / "test", {"a": 1, "b": 1})  # nor a wrapper folder to step into
    err = error_of(load_dataset, zip_folder(tmp_path / "wrapped", tmp_path / "w.zip"), SPEC, seed=0)
    assert err.code == "invalid_layout" and "test/ needs a train/ folder" in err.message


def test_npz_given_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x_test = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    y = tagged_npz(tmp_path / "d.npz", [4, 4], x_test=x_test, y_test=np.array([1, 0, 1]),
                   x_unlabeled=np.zeros((2, 4, 4), np.uint8))
    spec = Spec(path="unused", val_fraction=0.25, test_fraction=0.5)  # ignored: the dataset gives x_test
    d = load_dataset(tmp_path / "d.npz", spec, seed=0, target_size=(6, 6))
    assert (d.val_source, d.test_source, d.num_test, d.num_unlabeled) == ("split", "given", 3, 2)
    assert d.num_train_labelled + d.num_val == len(y)  # nothing carved for test
    assert d.test is not None and d.test.labels.tolist() == [1, 0, 1] and d.test.images.shape == (3, 1, 6, 6)
    plain = load_dataset(tmp_path / "d.npz", spec, seed=0)
    assert plain.test is not None and torch.equal(plain.test.images[:, 0], torch.from_numpy(x_test))
    assert inspect_dataset(tmp_path / "d.npz", spec) == plain.info()


@pytest.mark.parametrize(("extra", "code"), [
    ({"x_test": np.zeros((2, 8, 8), np.uint8)}, "missing_array"),
    ({"y_test": np.array([0, 1])}, "missing_array"),
    ({"x_test": np.zeros((2, 8, 7), np.uint8), "y_test": np.array([0, 1])}, "shape_mismatch"),
    ({"x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.array([0, 2])}, "invalid_labels"),
    ({"x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.array([0, 1, 1])}, "shape_mismatch"),
])
def test_npz_test_split_validation(tmp_path: Path, extra: dict, code: str) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 0, 1]), **extra)
    err = error_of(load_dataset, tmp_path / "d.npz", SPEC, seed=0)
    assert err.code == code and "d.npz" in err.message
    if code == "missing_array":
        assert "x_test" in err.message and "y_test" in err.message


def test_npz_test_split_counts_in_the_byte_budget(tmp_path: Path) -> None:
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1]), x_test=x, y_test=np.array([0, 1, 0, 1]))
    need = 2 * x.nbytes + 2 * 4 * np.dtype(np.int64).itemsize  # 512 image bytes + the labels
    assert load_dataset(tmp_path / "d.npz", Spec(path="unused", max_decoded_bytes=need), seed=0).num_test == 4
    err = error_of(load_dataset, tmp_path / "d.npz", Spec(path="unused", max_decoded_bytes=need - 1), seed=0)
    assert err.code == "dataset_too_large"
    # a larger target size is checked against the limit, test images included (8 images x 16 x 16 = 2048 B)
    err = error_of(load_dataset, tmp_path / "d.npz", Spec(path="unused", max_decoded_bytes=2047), seed=0,
                   target_size=(16, 16))
    assert err.code == "dataset_too_large" and "the 8 images" in err.message
    assert load_dataset(tmp_path / "d.npz", Spec(path="unused", max_decoded_bytes=2048), seed=0,
                        target_size=(16, 16)).test.images.shape == (4, 1, 16, 16)


def test_carved_test_split_is_fixed_stratified_and_disjoint(tmp_path: Path) -> None:
    counts = [60, 45, 30, 12, 3, 2, 1]
    y = tagged_npz(tmp_path / "d.npz", counts, x_unlabeled=np.full((5, 4, 4), 255, dtype=np.uint8))
    spec = Spec(path="unused", val_fraction=0.2, test_fraction=0.2)
    runs = [load_dataset(tmp_path / "d.npz", spec, seed=s) for s in (0, 1, 2, 3)]
    first = runs[0]
    assert first.test is not None and (first.test_source, first.val_source) == ("split", "split")
    for d in runs:
        assert d.test is not None and tags(d.test) == tags(first.test)  # the job seed never moves test samples
        assert torch.equal(d.test.labels, first.test.labels)
        train_tags = tags(d.train)[:d.num_train_labelled]
        assert sorted(train_tags + tags(d.val) + tags(d.test)) == list(range(len(y)))  # a partition
        assert d.num_unlabeled == 5 and (d.train.labels[-5:] == -1).all()
        assert (y[tags(d.test)] == d.test.labels.numpy()).all() and (y[tags(d.val)] == d.val.labels.numpy()).all()
    assert any(tags(d.val) != tags(first.val) for d in runs[1:])  # ... while val still follows it
    # stratified: every class with >= 2 samples is in test, about test_fraction of each; a single sample stays
    assert np.bincount(first.test.labels.numpy(), minlength=len(counts)).tolist() == [12, 9, 6, 2, 1, 1, 0]
    assert first.class_counts()[6] == 1
    # val is still about val_fraction of the labelled data, not of what test left
    assert abs(first.num_val / len(y) - 0.2) < 0.02 and abs(first.num_test / len(y) - 0.2) < 0.02
    # the test samples depend on test_fraction alone, not on val_fraction
    other = load_dataset(tmp_path / "d.npz", spec.model_copy(update={"val_fraction": 0.5}), seed=9)
    assert other.test is not None and tags(other.test) == tags(first.test)
    assert inspect_dataset(tmp_path / "d.npz", spec) == first.info()
    assert first.info().to_dict()["num_test"] == 31 and first.info().to_dict()["test_source"] == "split"


def test_carved_test_split_from_folders_with_given_val(tmp_path: Path) -> None:
    src = tmp_path / "src"
    class_folders(src / "train", {"a": 10, "b": 5, "c": 1})
    class_folders(src / "val", {"a": 1, "b": 1})
    archive = tar_folder(src, tmp_path / "up.tgz")
    spec = Spec(path="unused", val_fraction=0.3, test_fraction=0.2)
    d = load_dataset(archive, spec, seed=0)
    again = load_dataset(archive, spec, seed=7)
    assert (d.val_source, d.test_source) == ("given", "split")
    assert d.test is not None and again.test is not None and torch.equal(d.test.images, again.test.images)
    assert d.test.labels.tolist() == [0, 0, 1] and d.val.labels.tolist() == [0, 1]  # c's only sample: train
    assert (d.num_train_labelled, d.num_val, d.num_test) == (13, 2, 3)
    assert d.class_counts().tolist() == [8, 4, 1]
    base = d.train.images.untyped_storage().data_ptr()  # train + val + test: views of one decoded tensor
    assert d.val.images.untyped_storage().data_ptr() == base == d.test.images.untyped_storage().data_ptr()
    for img in d.test.images:  # every file of train/ has its own pixels: none of test's is in train
        assert not (d.train.images == img).flatten(1).all(1).any()
    assert inspect_dataset(archive, spec) == d.info()


def test_no_test_split_without_test_fraction(tmp_path: Path) -> None:
    y = tagged_npz(tmp_path / "d.npz", [4, 3])
    d = load_dataset(tmp_path / "d.npz", SPEC, seed=0)
    assert d.test is None and d.test_source is None and d.num_test == 0
    assert d.num_train_labelled + d.num_val == len(y)  # few labels: every one is kept for train and val
    assert inspect_dataset(tmp_path / "d.npz", SPEC).to_dict()["num_test"] == 0
    class_folders(tmp_path / "singles", {"a": 1, "b": 1, "c": 1})  # nothing can be held out per class
    s = load_dataset(tmp_path / "singles", Spec(path="unused", val_fraction=0.25, test_fraction=0.3), seed=0)
    assert s.test is None and s.test_source is None and (s.num_train_labelled, s.num_val) == (2, 1)


def test_carve_splits_by_hand() -> None:
    labels = np.repeat(np.arange(3), [10, 4, 1])
    a = carve_splits(labels, val_fraction=0.2, test_fraction=0.3, seed=1)
    b = carve_splits(labels, val_fraction=0.2, test_fraction=0.3, seed=2)
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[2], np.sort(a[2]))
    assert sorted(np.concatenate(a).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[a[2]], minlength=3).tolist() == [3, 1, 0]
    assert np.bincount(labels[a[1]], minlength=3).tolist() == [2, 1, 0]  # 0.2 / 0.7 of the 7 and 3 left
    train, val, test = carve_splits(labels, val_fraction=0.2, test_fraction=0.0, seed=1)
    assert len(test) == 0 and [train.tolist(), val.tolist()] == [x.tolist() for x in split_indices(labels, 0.2, 1)]
    train, val, test = carve_splits(labels, val_fraction=0.2, test_fraction=0.3, seed=1, carve_val=False)
    assert len(val) == 0 and np.array_equal(test, a[2]) and len(train) + len(test) == len(labels)


# ---------------------------------------------------------------- hostile archives


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "..\\evil.png"])
def test_zip_path_escape(tmp_path: Path, name: str) -> None:
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        zf.writestr("a/ok.png", png_bytes())
        zf.writestr(name, png_bytes())
    err = error_of(safe_extract, tmp_path / "up.zip", tmp_path / "out", max_files=10,
                   max_unpacked_bytes=1 << 20)
    assert err.code == "unsafe_archive_path" and "evil.png" in err.message
    assert not (tmp_path / "evil.png").exists() and tree_bytes(tmp_path / "out") == 0


def test_tar_path_escape_and_absolute_paths(tmp_path: Path) -> None:
    tar_with(tmp_path / "up.tgz", (reg("../evil.png"), png_bytes()))
    assert error_of(load_dataset, tmp_path / "up.tgz", SPEC, seed=0).code == "unsafe_archive_path"
    tar_with(tmp_path / "abs.tgz", (reg("/tmp/evil.png"), png_bytes()))
    assert error_of(load_dataset, tmp_path / "abs.tgz", SPEC, seed=0).code == "unsafe_archive_path"
    with zipfile.ZipFile(tmp_path / "abs.zip", "w") as zf:
        zf.writestr("/tmp/evil.png", png_bytes())
    err = error_of(load_dataset, tmp_path / "abs.zip", SPEC, seed=0)
    assert err.code == "unsafe_archive_path" and "/tmp/evil.png" in err.message


@pytest.mark.parametrize("member", [
    special("a/link.png", tarfile.SYMTYPE, "/etc/passwd"),
    special("a/hard.png", tarfile.LNKTYPE, "a/ok.png"),
    special("a/fifo", tarfile.FIFOTYPE),
    special("a/dev", tarfile.CHRTYPE),
])
def test_tar_links_and_devices(tmp_path: Path, member: tarfile.TarInfo) -> None:
    tar_with(tmp_path / "up.tar.gz", (reg("a/ok.png"), png_bytes()), (member, None))
    err = error_of(safe_extract, tmp_path / "up.tar.gz", tmp_path / "out", max_files=10,
                   max_unpacked_bytes=1 << 20)
    assert err.code == "unsafe_archive_entry" and member.name in err.message
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_zip_symlink(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("a/link.png")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        zf.writestr("a/ok.png", png_bytes())
        zf.writestr(link, "/etc/passwd")
    err = error_of(load_dataset, tmp_path / "up.zip", SPEC, seed=0)
    assert err.code == "unsafe_archive_entry" and "a/link.png" in err.message


def test_too_many_files(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        for i in range(5):
            zf.writestr(f"a/{i}.png", png_bytes(i))
    tar_with(tmp_path / "up.tgz", *((reg(f"a/{i}.png"), png_bytes(i)) for i in range(5)))
    for archive in ("up.zip", "up.tgz"):
        err = error_of(safe_extract, tmp_path / archive, tmp_path / archive.replace(".", "_"), max_files=4,
                       max_unpacked_bytes=1 << 20)
        assert err.code == "archive_too_many_files"
    safe_extract(tmp_path / "up.zip", tmp_path / "ok", max_files=5, max_unpacked_bytes=1 << 20)
    assert len(list((tmp_path / "ok" / "a").iterdir())) == 5


def test_zip_bomb_stops_at_the_byte_limit(tmp_path: Path) -> None:
    limit = 1 << 20
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("a/small.png", png_bytes())
        zf.writestr("a/huge.png", bytes(32 << 20))
    assert (tmp_path / "bomb.zip").stat().st_size < 64 << 10
    err = error_of(safe_extract, tmp_path / "bomb.zip", tmp_path / "out", max_files=10,
                   max_unpacked_bytes=limit)
    assert err.code == "archive_too_large" and "a/huge.png" in err.message
    assert 0 < tree_bytes(tmp_path / "out") <= limit
    spec = Spec(path="unused", max_unpacked_bytes=limit)
    assert error_of(load_dataset, tmp_path / "bomb.zip", spec, seed=0).code == "archive_too_large"


def test_tar_bomb_stops_at_the_byte_limit(tmp_path: Path) -> None:
    tar_with(tmp_path / "bomb.tgz", (reg("a/huge.png"), bytes(16 << 20)))
    assert (tmp_path / "bomb.tgz").stat().st_size < 64 << 10
    err = error_of(safe_extract, tmp_path / "bomb.tgz", tmp_path / "out", max_files=10,
                   max_unpacked_bytes=1 << 20)
    assert err.code == "archive_too_large" and tree_bytes(tmp_path / "out") <= 1 << 20


def test_corrupt_and_unsupported_archives(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"a/{i}.png", rng.bytes(50_000))
    data = (tmp_path / "good.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    assert error_of(load_dataset, tmp_path / "cut.zip", SPEC, seed=0).code == "unreadable_archive"
    tar_with(tmp_path / "good.tgz", *((reg(f"a/{i}.png"), rng.bytes(50_000)) for i in range(3)))
    data = (tmp_path / "good.tgz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])
    err = error_of(load_dataset, tmp_path / "cut.tgz", SPEC, seed=0)
    assert err.code == "unreadable_archive" and "cut.tgz" in err.message
    (tmp_path / "data.rar").write_bytes(b"Rar!\x1a\x07\x00 not really")
    assert error_of(load_dataset, tmp_path / "data.rar", SPEC, seed=0).code == "unsupported_dataset_format"
    assert error_of(load_dataset, tmp_path / "missing.zip", SPEC, seed=0).code == "dataset_not_found"


def test_empty_archives(tmp_path: Path) -> None:
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    assert error_of(load_dataset, tmp_path / "empty.zip", SPEC, seed=0).code == "empty_dataset"
    with zipfile.ZipFile(tmp_path / "junk.zip", "w") as zf:
        zf.writestr("__MACOSX/._x.png", b"junk")
        zf.writestr("a/readme.txt", b"no images here")
    assert error_of(load_dataset, tmp_path / "junk.zip", SPEC, seed=0).code == "empty_dataset"


# ---------------------------------------------------------------- hostile or broken contents


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds" / "train", {"a": 2, "b": 2})
    (tmp_path / "ds" / "train" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    err = error_of(load_dataset, tmp_path / "ds", SPEC, seed=0)
    assert err.code == "unreadable_image" and "train/b/bad.png" in err.message
    (tmp_path / "ds" / "train" / "b" / "bad.png").unlink()
    good = png_bytes(3)
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        for c in "ab":
            zf.writestr(f"mine/{c}/ok.png", good)
        zf.writestr("mine/a/truncated.png", good[: len(good) // 2])  # the header reads, the pixels do not
    err = error_of(inspect_dataset, tmp_path / "up.zip", SPEC)
    assert err.code == "unreadable_image" and "mine/a/truncated.png" in err.message


def test_pixel_bomb_image_is_refused_before_decoding(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    data = bytearray(png_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width and height: 10 gigapixels claimed
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "ds" / "a" / "bomb.png").write_bytes(bytes(data))
    err = error_of(load_dataset, tmp_path / "ds", SPEC, seed=0)
    assert err.code == "unreadable_image" and "a/bomb.png" in err.message


def test_folder_structure_errors(tmp_path: Path) -> None:
    class_folders(tmp_path / "one", {"a": 3})
    assert error_of(load_dataset, tmp_path / "one", SPEC, seed=0).code == "too_few_classes"
    class_folders(tmp_path / "mm" / "train", {"a": 2, "b": 2})
    class_folders(tmp_path / "mm" / "val", {"c": 1})
    err = error_of(load_dataset, tmp_path / "mm", SPEC, seed=0)
    assert err.code == "class_mismatch" and "val/c" in err.message
    class_folders(tmp_path / "hole", {"a": 2, "b": 2})
    (tmp_path / "hole" / "c").mkdir()
    assert error_of(load_dataset, tmp_path / "hole", SPEC, seed=0).code == "empty_class"
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    assert error_of(load_dataset, tmp_path / "nothing", SPEC, seed=0).code == "empty_dataset"


def test_decoded_byte_limit(tmp_path: Path) -> None:
    class_folders(tmp_path / "ds", {"a": 2, "b": 2}, size=(8, 8))
    err = error_of(load_dataset, tmp_path / "ds", Spec(path="unused", max_decoded_bytes=500), seed=0)
    assert err.code == "dataset_too_large" and "768 bytes" in err.message  # 4 x 3 x 8 x 8
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 0, 1]))
    err = error_of(load_dataset, tmp_path / "d.npz", Spec(path="unused", max_decoded_bytes=200), seed=0)
    assert err.code == "dataset_too_large"


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    err = error_of(load_dataset, tmp_path / "evil.npz", SPEC, seed=0)
    assert err.code == "unreadable_dataset" and "evil.npz" in err.message


@pytest.mark.parametrize(("arrays", "code"), [
    ({"x": np.zeros((4, 8, 8), np.float32), "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 3, 8, 8), np.uint8)[:, :, :, :2], "y": np.array([0, 1, 0, 1])}, "invalid_images"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0.0, 1.0, 0.0, 1.0])}, "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0])}, "shape_mismatch"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, -1])}, "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 2]), "classes": np.array(["a", "b"])},
     "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([1, 1, 1, 1])}, "too_few_classes"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]),
      "x_val": np.zeros((2, 7, 8), np.uint8), "y_val": np.array([0, 1])}, "shape_mismatch"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]),
      "x_unlabeled": np.zeros((2, 8, 8, 3), np.uint8)}, "shape_mismatch"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]),
      "x_val": np.zeros((2, 8, 8), np.uint8), "y_val": np.array([0, 5])}, "invalid_labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 0, 1]),
      "x_val": np.zeros((2, 8, 8), np.uint8)}, "missing_array"),
    ({"x": np.zeros((4, 8, 8), np.uint8)}, "missing_array"),
])
def test_npz_validation(tmp_path: Path, arrays: dict, code: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    err = error_of(load_dataset, tmp_path / "d.npz", SPEC, seed=0)
    assert err.code == code and "d.npz" in err.message


def test_npz_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"not a zip at all")
    assert error_of(load_dataset, tmp_path / "d.npz", SPEC, seed=0).code == "unreadable_dataset"


# ---------------------------------------------------------------- transforms


def test_normalisation_by_hand() -> None:
    images = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    spec = InputSpec(channels=3, size=(1, 2), mean=(0.5, 0.2, 0.0), std=(0.5, 0.2, 1.0))
    got = to_model_input(images, spec)
    want = torch.tensor([[[[-1.0, 1.0]], [[0.0, 1.0]], [[1.0, 0.0]]]])
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    default = to_model_input(images, InputSpec(channels=3, size=(1, 2)))
    assert torch.allclose(default[0, 0, 0, 0], torch.tensor((0 - 0.485) / 0.229))
    assert to_model_input(images, spec, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_channel_adaptation() -> None:
    grey = torch.tensor([[[[0, 128], [255, 64]]]], dtype=torch.uint8)  # [1, 1, 2, 2]
    plain3 = InputSpec(channels=3, size=(2, 2), mean=(0.0,), std=(1.0,))
    out = to_model_input(grey, plain3)
    assert out.shape == (1, 3, 2, 2) and torch.equal(out[:, 0], out[:, 2])
    assert torch.allclose(out[0, 1], grey[0, 0].float() / 255)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    plain1 = InputSpec(channels=1, size=(1, 1), mean=(0.0,), std=(1.0,))
    assert torch.allclose(to_model_input(red, plain1), torch.tensor([[[[0.299]]]]))
    rgba = torch.tensor([10, 20, 30, 200], dtype=torch.uint8).view(1, 4, 1, 1)
    plain3_1 = InputSpec(channels=3, size=(1, 1), mean=(0.0,), std=(1.0,))
    assert torch.allclose(to_model_input(rgba, plain3_1).flatten(), torch.tensor([10, 20, 30]) / 255)


def test_resize_only_when_needed() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=seeded(0))
    assert to_model_input(images, InputSpec(size=(4, 6))).shape == (2, 3, 4, 6)
    same = to_model_input(images, InputSpec(size=8, mean=(0.0,), std=(1.0,)))
    assert torch.allclose(same, images.float() / 255)


def test_augment_is_seeded_and_keeps_shape() -> None:
    images = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8, generator=seeded(1))
    a = augment_batch(images, seeded(42))
    b = augment_batch(images, seeded(42))
    c = augment_batch(images, seeded(43))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_crops_and_flips() -> None:
    h, w = 8, 8
    row = torch.arange(1, w + 1, dtype=torch.uint8)  # 1..8: zero only where padding shows
    images = row.view(1, 1, 1, w).expand(64, 2, h, w).contiguous()
    out = augment_batch(images, seeded(0))
    flipped = shifted = 0
    for sample in out:
        mid = sample[0, h // 2]
        seen = mid[mid > 0].int()
        diffs = seen.diff()
        assert (diffs == 1).all() or (diffs == -1).all()  # a contiguous, possibly mirrored, window
        flipped += bool((diffs == -1).all())
        shifted += bool((mid == 0).any())
        assert torch.equal(sample[0], sample[1])  # the same crop and flip for every channel
    assert 0 < flipped < 64 and shifted > 0
    plain = augment_batch(images, seeded(0), hflip=False)
    for sample in plain:  # without flips, each sample is the input shifted by at most 1 pixel (8 // 8)
        assert any(torch.equal(sample, _shift(images[0], dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    h, w = img.shape[1:]
    return padded[:, 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
