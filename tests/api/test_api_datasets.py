"""POST/GET /v1/datasets: .npz and ImageFolder zips, and hostile or wrong uploads."""

from __future__ import annotations

import hashlib

import pytest
from api_support import FOLDER_TRAIN, FOLDER_VAL, NPZ4, NPZ10, Env, Uploaded, assert_error, png_bytes, zip_bytes


def test_upload_npz_dataset(env: Env, dataset_a: Uploaded) -> None:
    d = dataset_a.body
    assert d["id"].startswith("ds_")
    assert d["format"] == "npz"
    assert d["classes"] == [str(i) for i in range(10)]
    assert d["num_classes"] == 10
    assert d["num_train"] == NPZ10["num_classes"] * NPZ10["per_class"]
    assert d["num_val"] == NPZ10["num_classes"] * NPZ10["val_per_class"]
    assert d["num_unlabeled"] == NPZ10["unlabeled"]
    assert d["channels"] == 1 and d["image_size"] == [8, 8]
    assert d["val_source"] == "given"
    assert d["sha256"] == hashlib.sha256(dataset_a.content).hexdigest()
    assert d["size_bytes"] == len(dataset_a.content)
    assert d["filename"] == "digits.npz"


def test_upload_four_class_npz(env: Env, dataset_a4: Uploaded) -> None:
    d = dataset_a4.body
    assert d["num_classes"] == 4 and d["classes"] == ["0", "1", "2", "3"]
    assert d["num_train"] == NPZ4["num_classes"] * NPZ4["per_class"]
    assert d["num_val"] == NPZ4["num_classes"] * NPZ4["val_per_class"]
    assert d["num_unlabeled"] == 0


def test_upload_imagefolder_zip(env: Env, folder_zip_file: bytes) -> None:
    resp = env.upload_dataset(folder_zip_file, "pets.zip")
    assert resp.status_code == 201, resp.text
    d = resp.json()
    assert d["format"] == "imagefolder"
    assert d["classes"] == sorted(FOLDER_TRAIN)
    assert d["num_classes"] == 3
    assert d["num_train"] == sum(FOLDER_TRAIN.values())
    assert d["num_val"] == sum(FOLDER_VAL.values())
    assert d["num_unlabeled"] == 0
    assert d["val_source"] == "given"
    assert d["channels"] == 1 and d["image_size"] == [8, 8]
    assert d["sha256"] == hashlib.sha256(folder_zip_file).hexdigest()
    assert d["size_bytes"] == len(folder_zip_file)
    got = env.client.get(f"/v1/datasets/{d['id']}", headers=env.auth("a"))
    assert got.status_code == 200 and got.json() == d


def test_get_and_list_datasets(env: Env, dataset_a: Uploaded, dataset_a4: Uploaded) -> None:
    one = env.client.get(f"/v1/datasets/{dataset_a.id}", headers=env.auth("a"))
    assert one.status_code == 200 and one.json() == dataset_a.body
    listed = env.client.get("/v1/datasets", headers=env.auth("a"), params={"limit": 200}).json()
    ids = [d["id"] for d in listed["items"]]
    assert dataset_a.id in ids and dataset_a4.id in ids
    assert ids.index(dataset_a4.id) < ids.index(dataset_a.id), "newest first"
    assert listed["next_cursor"] is None
    first = env.client.get("/v1/datasets", headers=env.auth("a"), params={"limit": 1}).json()
    assert len(first["items"]) == 1 and first["next_cursor"] == first["items"][0]["id"]
    rest = env.client.get("/v1/datasets", headers=env.auth("a"),
                          params={"limit": 200, "after": first["next_cursor"]}).json()
    assert [d["id"] for d in first["items"] + rest["items"]] == ids


def test_unknown_dataset_is_404(env: Env) -> None:
    resp = env.client.get("/v1/datasets/ds_000000000000000000000000", headers=env.auth("a"))
    assert_error(resp, 404, "dataset_not_found")


def test_dataset_list_unknown_cursor_is_422(env: Env) -> None:
    resp = env.client.get("/v1/datasets", headers=env.auth("a"), params={"after": "ds_nope"})
    assert_error(resp, 422, "invalid_cursor", "after")


def test_zip_climbing_out_is_refused_unsafe_archive_path(env: Env) -> None:
    content = zip_bytes({"train/a/0.png": png_bytes(1), "train/b/0.png": png_bytes(2), "../evil.png": png_bytes(3)})
    resp = env.upload_dataset(content, "evil.zip")
    assert 400 <= resp.status_code < 500
    assert_error(resp, resp.status_code, "unsafe_archive_path")
    assert not (env.settings.tmp_dir.parent / "evil.png").exists()
    assert not list(env.settings.data_dir.rglob("evil.png"))


def test_text_file_is_415_unsupported_dataset_format(env: Env) -> None:
    resp = env.upload_dataset(b"label,path\n0,a.png\n1,b.png\n", "notes.txt")
    assert_error(resp, 415, "unsupported_dataset_format")


def test_empty_file_is_422_empty_file(env: Env) -> None:
    assert_error(env.upload_dataset(b"", "empty.npz"), 422, "empty_file", "file")


def test_non_multipart_dataset_upload_is_415(env: Env, npz4_file: bytes) -> None:
    resp = env.client.post("/v1/datasets", content=npz4_file,
                           headers={**env.auth("a"), "Content-Type": "application/octet-stream"})
    assert_error(resp, 415, "unsupported_media_type")


def test_oversized_dataset_is_413_file_too_large(env: Env, npz10_file: bytes) -> None:
    client = env.client_with(max_dataset_bytes=len(npz10_file) // 2)
    assert_error(env.upload_dataset(npz10_file, "big.npz", client=client), 413, "file_too_large")


@pytest.mark.parametrize("who", ["a", "b"])
def test_refused_uploads_leave_no_dataset(env: Env, who: str) -> None:
    before = env.client.get("/v1/datasets", headers=env.auth(who), params={"limit": 200}).json()["items"]
    assert_error(env.upload_dataset(b"", "empty.npz", who=who), 422, "empty_file")
    after = env.client.get("/v1/datasets", headers=env.auth(who), params={"limit": 200}).json()["items"]
    assert after == before
