"""Hostile uploads against the real API: one table of (case, route, generated file, expected status and code).

Every file is built by code in hostile_files.py when its case runs, and posted to POST /v1/teachers or
/v1/datasets through the API suite's TestClient (the real app, its upload guard and its sandboxed inspector
child) with a fresh API key of its own tenant. Whatever the case, the answer is never a 5xx, an error carries
its stable code in the JSON error shape, and afterwards: the pickle payloads never ran (their marker file is
absent), no archive entry landed outside its folder, no upload folder is left in the data folder's tmp/, and
the tenant's lists still answer 200, holding the upload only when it was accepted.

The engine's own tests (tests/test_data.py, test_teachers.py, test_archive_limits.py, test_npz_headers.py)
cover the readers case by case; this table checks what a client of the API gets for each.

Refusals happen before anything is stored, so those run on SQLite only; the cases that reach the database
(`stored=True`: uploads that are, or that might wrongly be, accepted) run on PostgreSQL too.

A row with `bug` is a defect of the app found by this table: it is a strict xfail that names what happens
now, so that the fix turns it into a failure asking for the mark to go.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostile_files as hf
import pytest
import torch
from api_support import GREY8, TEACHER_FORM, Env, TinyNet, assert_error
from fastapi.testclient import TestClient

from app.db import session_scope
from app.keys import create_key

ESCAPED = "kdistill-hostile-escape.png"  # the name every path-escape entry tries to write
LIMITS = {"max_unpacked_bytes": 1 << 20, "max_dataset_files": 64}  # the `tight` app: 1 MiB unpacked, 64 files


@dataclass(frozen=True)
class Upload:
    """One row: `build(marker)` makes the file (or the whole body when `content_type` is given)."""

    name: str
    route: str
    build: Callable[[Path], bytes]
    status: int
    code: str | None  # None for an accepted upload (201)
    filename: str = "upload.bin"
    form: dict[str, str] = field(default_factory=dict)
    part_type: str = "application/octet-stream"
    content_type: str | None = None  # set: `build` makes the raw request body, sent with this Content-Type
    tight: bool = False  # sent to the app with LIMITS
    stored: bool = False  # reaches the database: run on PostgreSQL too
    then: Callable[[dict[str, Any]], None] | None = None  # more checks of a 201 body
    bug: str | None = None  # a known defect of the app: strict xfail with this reason


TEACHERS, DATASETS = "/v1/teachers", "/v1/datasets"
MULTIPART_RAW = f"multipart/form-data; boundary={hf.BOUNDARY.decode()}"


def _classes(*names: str) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        assert body["format"] == "imagefolder" and body["classes"] == list(names), body
    return check


def _filename(expected: str | None = None) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        name = body["filename"]
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}", name), name  # safe_filename's alphabet
        assert expected is None or name == expected, name
    return check


def _with_escape(*names: str) -> Callable[[Path], bytes]:
    return lambda _: hf.zip_of({**hf.good_folder_entries(), **{n: hf.png(7) for n in names}})


CASES: list[Upload] = [
    # --- pickles: nothing in a .pt is ever unpickled beyond tensors
    Upload("pt_reduce_os_system_zip", TEACHERS, hf.pickle_reduce_zip_pt, 422, "unsafe_checkpoint", "trap.pt",
           TEACHER_FORM),
    Upload("pt_reduce_os_system_legacy_pickle", TEACHERS, hf.pickle_reduce_legacy_pt, 422, "unsafe_checkpoint",
           "trap.pt", TEACHER_FORM),
    Upload("pt_reduce_builtins_exec", TEACHERS, lambda m: hf.pickle_reduce_zip_pt(m, "exec"), 422,
           "unsafe_checkpoint", "trap.pt", TEACHER_FORM),
    Upload("pt_pickled_whole_module", TEACHERS, lambda _: hf.torch_save(TinyNet()), 422, "unsafe_checkpoint",
           "model.pt", GREY8),
    # --- truncated and lying weight files
    # a zip cut in half has lost its central directory, so it is no longer told apart from ONNX by content
    Upload("pt_state_dict_truncated", TEACHERS, lambda _: hf.truncated(hf.torch_save({"w": torch.zeros(64, 64)})),
           422, "unreadable_teacher", "weights.pt", TEACHER_FORM),
    Upload("safetensors_truncated", TEACHERS, lambda _: hf.truncated(hf.safetensors_raw(
        {"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 64 * 64 * 4]}}, bytes(64 * 64 * 4))),
        422, "unreadable_weights", "weights.safetensors", TEACHER_FORM),
    Upload("safetensors_shape_2e40", TEACHERS, lambda _: hf.safetensors_huge_shape(), 422, "unreadable_weights",
           "weights.safetensors", TEACHER_FORM),
    Upload("safetensors_header_length_99mib", TEACHERS, lambda _: hf.safetensors_huge_header_length(), 422,
           "unreadable_weights", "weights.safetensors", TEACHER_FORM),
    # --- ONNX
    Upload("onnx_truncated", TEACHERS, lambda _: hf.truncated(hf.onnx_tiny()), 422, "unreadable_teacher",
           "model.onnx", GREY8),
    Upload("onnx_external_data_etc_passwd", TEACHERS, lambda _: hf.onnx_external_data("/etc/passwd"), 422,
           "onnx_external_data", "model.onnx", GREY8),
    Upload("onnx_external_data_relative", TEACHERS, lambda _: hf.onnx_external_data("../../kdistill.db"), 422,
           "onnx_external_data", "model.onnx", GREY8),
    Upload("onnx_input_declared_2e40", TEACHERS, lambda _: hf.onnx_huge_input(), 422, "unreadable_teacher",
           "model.onnx", GREY8),
    Upload("onnx_initializer_declared_2e40", TEACHERS, lambda _: hf.onnx_huge_initializer(), 422,
           "unreadable_teacher", "model.onnx", GREY8),
    Upload("onnx_runtime_tensor_2e40", TEACHERS, lambda _: hf.onnx_huge_runtime_tensor(), 422,
           "teacher_forward_failed", "model.onnx", GREY8),
    # --- the wrong kind of file on each route
    Upload("npz_dataset_as_teacher", TEACHERS, lambda _: hf.good_npz(), 422, "unreadable_weights", "digits.npz",
           TEACHER_FORM),
    Upload("onnx_model_as_dataset", DATASETS, lambda _: hf.onnx_tiny(), 415, "unsupported_dataset_format",
           "model.onnx"),
    Upload("onnx_model_named_npz_as_dataset", DATASETS, lambda _: hf.onnx_tiny(), 422, "unreadable_dataset",
           "model.npz"),
    # --- mislabelled content types: the multipart envelope is required, a part's own type is not trusted
    Upload("json_body_to_teachers", TEACHERS, lambda _: json.dumps({"file": "AAAA", "arch": "resnet8"}).encode(),
           415, "unsupported_media_type", content_type="application/json"),
    Upload("json_body_to_datasets", DATASETS, lambda _: json.dumps({"file": "AAAA"}).encode(), 415,
           "unsupported_media_type", content_type="application/json"),
    Upload("multipart_without_boundary", TEACHERS, lambda _: json.dumps({"file": "AAAA"}).encode(), 400,
           "bad_request", content_type="multipart/form-data"),
    Upload("multipart_body_not_multipart", DATASETS, lambda _: json.dumps({"file": "AAAA"}).encode(), 400,
           "bad_request", content_type=MULTIPART_RAW),
    Upload("zip_in_a_text_plain_part", DATASETS, lambda _: hf.good_folder_zip(), 201, None, "folders.zip",
           part_type="text/plain", stored=True, then=_classes("cat", "dog")),
    # --- archive paths and links
    Upload("zip_slip_parent", DATASETS, _with_escape(f"train/cat/../../../{ESCAPED}"), 422, "unsafe_archive_path",
           "slip.zip"),
    Upload("zip_slip_backslash", DATASETS, _with_escape(f"..\\..\\{ESCAPED}"), 422, "unsafe_archive_path",
           "slip.zip"),
    Upload("zip_absolute_path", DATASETS, _with_escape(f"/tmp/{ESCAPED}"), 422, "unsafe_archive_path", "slip.zip"),
    Upload("zip_drive_letter", DATASETS, _with_escape(f"C:/{ESCAPED}"), 422, "unsafe_archive_path", "slip.zip"),
    Upload("zip_drive_letter_backslash", DATASETS, _with_escape(f"C:\\{ESCAPED}"), 422, "unsafe_archive_path",
           "slip.zip"),
    Upload("zip_symlink", DATASETS, lambda _: hf.zip_symlink(), 422, "unsafe_archive_entry", "links.zip"),
    Upload("tar_slip_parent", DATASETS, lambda _: hf.tar_with_extra(f"../{ESCAPED}"), 422, "unsafe_archive_path",
           "slip.tar.gz"),
    Upload("tar_absolute_path", DATASETS, lambda _: hf.tar_with_extra(f"/tmp/{ESCAPED}"), 422,
           "unsafe_archive_path", "slip.tar.gz"),
    Upload("tar_symlink", DATASETS, lambda _: hf.tar_link(tarfile.SYMTYPE, "/etc/passwd"), 422,
           "unsafe_archive_entry", "links.tar.gz"),
    Upload("tar_hard_link", DATASETS, lambda _: hf.tar_link(tarfile.LNKTYPE, "train/cat/0.png"), 422,
           "unsafe_archive_entry", "links.tar.gz"),
    # --- bombs and limits
    Upload("zip_bomb_2x16mib_zeros", DATASETS, lambda _: hf.zip_bomb(2, 16 << 20), 413, "archive_too_large",
           "bomb.zip", tight=True),
    Upload("tar_gz_bomb_2x16mib_zeros", DATASETS, lambda _: hf.tar_gz_bomb(2, 16 << 20), 413, "archive_too_large",
           "bomb.tar.gz", tight=True),
    Upload("zip_200_empty_entries", DATASETS, lambda _: hf.zip_many_files(200), 413, "archive_too_many_files",
           "many.zip", tight=True),
    Upload("tar_gnu_long_name_1gib", DATASETS, lambda _: hf.tar_gnu_long_name(), 422, "archive_header_too_large",
           "longname.tar.gz"),
    Upload("png_100000x100000", DATASETS, lambda _: hf.zip_with_extra("train/cat/bomb.png", hf.png_pixel_bomb()),
           422, "unreadable_image", "pixels.zip"),
    Upload("bmp_100000x100000", DATASETS, lambda _: hf.zip_with_extra("train/dog/bomb.bmp", hf.bmp_pixel_bomb()),
           422, "unreadable_image", "pixels.zip"),
    Upload("npz_x_declared_2e40", DATASETS, lambda _: hf.npz_huge_declared_shape(), 422, "unreadable_dataset",
           "huge.npz"),
    # --- truncated datasets
    Upload("zip_truncated", DATASETS, lambda _: hf.truncated(hf.good_folder_zip()), 422, "unreadable_archive",
           "cut.zip"),
    Upload("tar_gz_truncated", DATASETS, lambda _: hf.truncated(hf.tar_of(hf.good_folder_members())), 422,
           "unreadable_archive", "cut.tar.gz"),
    Upload("npz_truncated", DATASETS, lambda _: hf.truncated(hf.good_npz()), 422, "unreadable_dataset", "cut.npz"),
    Upload("npz_pickled_object_array", DATASETS, hf.npz_pickled_objects, 422, "unreadable_dataset", "trap.npz"),
    # --- names that are not UTF-8
    Upload("zip_name_invalid_utf8_with_utf8_flag", DATASETS, lambda _: hf.zip_non_utf8_name_flagged(), 422,
           "unreadable_archive", "names.zip", stored=True),
    Upload("zip_name_cp437", DATASETS, lambda _: hf.zip_cp437_name(), 201, None, "names.zip", stored=True,
           then=_classes("caf\u00e9", "dog")),
    Upload("tar_class_folder_invalid_utf8", DATASETS, lambda _: hf.tar_non_utf8_name(), 422, "unreadable_archive",
           "names.tar.gz", stored=True),
    Upload("tar_file_name_invalid_utf8_in_an_error", DATASETS, lambda _: hf.tar_non_utf8_bad_image(), 422,
           "unreadable_archive", "names.tar.gz", stored=True),
    Upload("npz_class_name_lone_surrogate", DATASETS, lambda _: hf.npz_lone_surrogate_class(), 422, "invalid_classes",
           "names.npz", stored=True),
    Upload("multipart_filename_odd_bytes", DATASETS, lambda _: hf.multipart_body(
        b"..\\..\\\xff\xfe\x00 \xe9vil\x07.npz", hf.good_npz()), 201, None, content_type=MULTIPART_RAW, stored=True,
        then=_filename()),
    Upload("multipart_filename_path", DATASETS, lambda _: hf.multipart_body(b"../../etc/passwd.npz", hf.good_npz()),
           201, None, content_type=MULTIPART_RAW, stored=True, then=_filename("passwd.npz")),
]

PARAMS = [pytest.param(backend, case, id=f"{case.name}-{backend}",
                       marks=[pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else [])
          for case in CASES for backend in (["sqlite", "postgres"] if case.stored else ["sqlite"])]


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="session")
def tight(env: Env) -> TestClient:
    return env.client_with(**LIMITS)


@pytest.mark.parametrize(("env", "case"), PARAMS, indirect=["env"])
def test_hostile_upload(env: Env, case: Upload, tight: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled-marker"
    content = case.build(marker)
    with session_scope(env.db_url) as s:  # a tenant of its own: a bad row stored by one case spoils no other
        headers = {"Authorization": f"Bearer {create_key(s, f'hostile-{case.name}', 'hostile uploads')}"}
    client = tight if case.tight else env.client
    if case.content_type is None:
        resp = client.post(case.route, headers=headers, data=case.form,
                           files={"file": (case.filename, content, case.part_type)})
    else:
        resp = client.post(case.route, headers={**headers, "Content-Type": case.content_type}, content=content)

    assert resp.status_code < 500, f"{case.name}: {resp.status_code} {resp.text[:500]}"
    if case.code is None:
        assert resp.status_code == case.status, f"{case.name}: {resp.status_code} {resp.text[:500]}"
        body = resp.json()
        if case.then is not None:
            case.then(body)
    else:
        assert_error(resp, case.status, case.code)

    assert not marker.exists(), "a pickled payload ran"
    escaped = [p for p in (env.settings.data_dir.parent / ESCAPED, Path("/tmp") / ESCAPED, Path("/etc") / ESCAPED)
               if p.exists()] + list(env.settings.data_dir.rglob(ESCAPED))
    assert not escaped, f"an archive entry was written outside its folder: {escaped}"
    assert not list(env.settings.tmp_dir.glob("upload-*")), "an upload folder was left behind"
    for listing in (TEACHERS, DATASETS):
        page = env.client.get(listing, headers=headers)
        assert page.status_code == 200, f"GET {listing} after {case.name}: {page.status_code} {page.text[:300]}"
        stored = [item["id"] for item in page.json()["items"]]
        assert stored == ([resp.json()["id"]] if listing == case.route and case.code is None else []), stored


def test_the_table_covers_both_routes_and_every_kind_of_answer() -> None:
    assert {c.route for c in CASES} == {TEACHERS, DATASETS}
    assert {c.status for c in CASES} == {201, 400, 413, 415, 422}

