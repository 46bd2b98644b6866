"""POST/GET /v1/teachers: good uploads of every format, pagination, and every kind of bad upload."""

from __future__ import annotations

import hashlib
import re

import pytest
from api_support import GREY8, TEACHER_ARCH, TEACHER_FORM, Env, Uploaded, all_pages, assert_error

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def test_upload_state_dict_teacher(env: Env, teacher_a: Uploaded) -> None:
    t = teacher_a.body
    assert t["id"].startswith("tch_")
    assert t["format"] == "safetensors"
    assert t["arch"] == TEACHER_ARCH
    assert t["num_classes"] == 10
    assert t["input_channels"] == 1
    assert t["input_size"] == [8, 8]
    assert t["mean"] == pytest.approx([0.3])
    assert t["std"] == pytest.approx([0.37])
    assert t["sha256"] == hashlib.sha256(teacher_a.content).hexdigest()
    assert t["size_bytes"] == len(teacher_a.content)
    assert t["filename"] == "teacher.safetensors"
    assert ISO_UTC.match(t["created_at"]), t["created_at"]


def test_get_one_teacher_equals_the_upload_answer(env: Env, teacher_a: Uploaded) -> None:
    resp = env.client.get(f"/v1/teachers/{teacher_a.id}", headers=env.auth("a"))
    assert resp.status_code == 200, resp.text
    assert resp.json() == teacher_a.body


def test_list_teachers_shows_the_upload(env: Env, teacher_a: Uploaded) -> None:
    resp = env.client.get("/v1/teachers", headers=env.auth("a"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"items", "next_cursor"}
    assert teacher_a.body in body["items"]


def test_teacher_pagination_newest_first_without_duplicates(env: Env, teachers_b: list[Uploaded]) -> None:
    b = env.auth("b")
    first = env.client.get("/v1/teachers", headers=b, params={"limit": 2}).json()
    assert len(first["items"]) == 2
    assert first["next_cursor"]
    second = env.client.get("/v1/teachers", headers=b, params={"limit": 2, "after": first["next_cursor"]}).json()
    assert len(second["items"]) == 1
    assert second["next_cursor"] is None
    ids = [t["id"] for t in first["items"] + second["items"]]
    assert len(set(ids)) == 3
    assert ids == [t.id for t in reversed(teachers_b)], "newest first"
    assert [[t["id"] for t in p] for p in all_pages(env.client, "/v1/teachers", b, limit=1)] == [[i] for i in ids]
    everything = env.client.get("/v1/teachers", headers=b, params={"limit": 3}).json()
    assert [t["id"] for t in everything["items"]] == ids and everything["next_cursor"] is None


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": "many"}])
def test_teacher_list_bad_limit_is_422(env: Env, params: dict) -> None:
    assert_error(env.client.get("/v1/teachers", headers=env.auth("a"), params=params), 422, "validation_error",
                 "limit")


def test_teacher_list_unknown_cursor_is_422_invalid_cursor(env: Env) -> None:
    resp = env.client.get("/v1/teachers", headers=env.auth("a"), params={"after": "tch_nope"})
    assert_error(resp, 422, "invalid_cursor", "after")


def test_unknown_teacher_is_404(env: Env) -> None:
    resp = env.client.get("/v1/teachers/tch_000000000000000000000000", headers=env.auth("a"))
    assert_error(resp, 404, "teacher_not_found")


def no_leftovers(env: Env) -> bool:
    """A refused upload leaves nothing in the temporary folder."""
    return not any(env.settings.tmp_dir.iterdir())


def test_pickled_module_is_422_unsafe_checkpoint(env: Env, pickled_module_file: bytes) -> None:
    resp = env.upload_teacher(pickled_module_file, "model.pt", **TEACHER_FORM)
    assert_error(resp, 422, "unsafe_checkpoint")
    assert no_leftovers(env)


def test_empty_teacher_is_422_empty_file(env: Env) -> None:
    assert_error(env.upload_teacher(b"", "empty.safetensors", **TEACHER_FORM), 422, "empty_file", "file")
    assert no_leftovers(env)


def test_state_dict_without_arch_is_422_missing_arch(env: Env, state_dict_pt_file: bytes) -> None:
    form = {k: v for k, v in TEACHER_FORM.items() if k != "arch"}
    resp = env.upload_teacher(state_dict_pt_file, "weights.pt", **form)
    # the offending field of this multipart request is `arch`
    assert_error(resp, 422, "missing_arch", "arch")


@pytest.mark.parametrize(("wrong", "field"), [({"num_classes": "7"}, "num_classes"),
                                             ({"input_channels": "3", "mean": "0.3", "std": "0.37"}, "input_channels"),
                                             ({"arch": "resnet20"}, "arch")])
def test_weights_that_do_not_fit_name_the_setting_at_fault(env: Env, state_dict_pt_file: bytes, wrong: dict,
                                                           field: str) -> None:
    resp = env.upload_teacher(state_dict_pt_file, "weights.pt", **{**TEACHER_FORM, **wrong})
    assert_error(resp, 422, "teacher_weights_mismatch", field)


def test_garbage_bytes_are_a_4xx_with_a_code(env: Env) -> None:
    resp = env.upload_teacher(b"\x00\x13garbage, not a model at all" * 50, "model.bin", **TEACHER_FORM)
    assert 400 <= resp.status_code < 500
    body = assert_error(resp, resp.status_code)
    assert body["code"] in ("unreadable_teacher", "unreadable_weights", "unreadable_upload", "invalid_teacher")


@pytest.mark.parametrize("kind", ["json", "urlencoded", "raw"])
def test_non_multipart_teacher_upload_is_415(env: Env, kind: str, teacher_file: bytes) -> None:
    if kind == "json":
        resp = env.client.post("/v1/teachers", headers=env.auth("a"), json={"file": "teacher.safetensors"})
    elif kind == "urlencoded":
        resp = env.client.post("/v1/teachers", headers=env.auth("a"), data={"arch": TEACHER_ARCH})
    else:
        resp = env.client.post("/v1/teachers", content=teacher_file,
                               headers={**env.auth("a"), "Content-Type": "application/octet-stream"})
    assert_error(resp, 415, "unsupported_media_type")


def test_multipart_without_file_is_422(env: Env) -> None:
    resp = env.client.post("/v1/teachers", headers=env.auth("a"),
                           files={"other": ("x.txt", b"x", "text/plain")}, data=TEACHER_FORM)
    assert_error(resp, 422, field="file")


@pytest.mark.parametrize(("limit", "copies"), [
    (1000, 4),  # ~1.3 MB: over the limit + 1 MiB, refused by its Content-Length
    (100_000, 1),  # ~0.3 MB: refused while it is streamed to disk
])
def test_oversized_teacher_is_413_file_too_large(env: Env, teacher_file: bytes, limit: int, copies: int) -> None:
    client = env.client_with(max_teacher_bytes=limit)
    content = teacher_file * copies
    resp = env.upload_teacher(content, client=client, **TEACHER_FORM)
    assert_error(resp, 413, "file_too_large")
    assert no_leftovers(env), "the partial upload must be removed"


@pytest.mark.parametrize(("name", "value", "channels"), [
    ("mean", "a,b", "1"),
    ("std", "0.5,x", "1"),
    ("mean", "0.1,0.2", "1"),  # two values for one channel
    ("std", "0.2,0.2", "3"),  # two values for three channels
    ("std", "0", "1"),  # std must be positive
    ("std", "-0.5", "1"),
])
def test_bad_mean_or_std_is_422_with_the_field(env: Env, teacher_file: bytes, name: str, value: str,
                                               channels: str) -> None:
    form = {**TEACHER_FORM, "input_channels": channels, name: value}
    if channels != "1":
        form.pop("mean" if name == "std" else "std")
    resp = env.upload_teacher(teacher_file, **form)
    assert_error(resp, 422, "invalid_input_spec", name)


@pytest.mark.parametrize(("name", "value"), [("num_classes", "1"), ("input_channels", "5"),
                                             ("input_size", "0"), ("num_classes", "ten"),
                                             ("format", "pickle")])
def test_bad_form_field_is_422_naming_it(env: Env, teacher_file: bytes, name: str, value: str) -> None:
    resp = env.upload_teacher(teacher_file, **{**TEACHER_FORM, name: value})
    assert_error(resp, 422, "validation_error", name)


def test_onnx_teacher_is_201_format_onnx(env: Env, onnx_file: bytes) -> None:
    resp = env.upload_teacher(onnx_file, "../../tiny model.onnx", **GREY8)
    assert resp.status_code == 201, resp.text
    t = resp.json()
    assert t["format"] == "onnx"
    assert t["arch"] is None
    assert t["num_classes"] == 10
    assert t["input_channels"] == 1 and t["input_size"] == [8, 8]
    assert t["mean"] == pytest.approx([0.5]) and t["std"] == pytest.approx([0.25])
    assert t["sha256"] == hashlib.sha256(onnx_file).hexdigest() and t["size_bytes"] == len(onnx_file)
    assert "/" not in t["filename"] and ".." not in t["filename"] and t["filename"].endswith(".onnx")
    assert not list(env.settings.data_dir.parent.glob("tiny*")), "the client's file name must not pick the path"
    got = env.client.get(f"/v1/teachers/{t['id']}", headers=env.auth("a"))
    assert got.status_code == 200 and got.json() == t


def test_torchscript_teacher_is_201_when_allowed(env: Env, torchscript_file: bytes) -> None:
    resp = env.upload_teacher(torchscript_file, "tiny.pt", **GREY8)
    assert resp.status_code == 201, resp.text
    t = resp.json()
    assert t["format"] == "torchscript" and t["arch"] is None and t["num_classes"] == 10
    assert t["sha256"] == hashlib.sha256(torchscript_file).hexdigest()


def test_torchscript_teacher_is_refused_when_switched_off(env: Env, torchscript_file: bytes) -> None:
    client = env.client_with(allow_torchscript=False)
    before = env.client.get("/v1/teachers", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    resp = env.upload_teacher(torchscript_file, "tiny.pt", client=client, **GREY8)
    assert_error(resp, 422, "torchscript_disabled")
    after = env.client.get("/v1/teachers", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    assert after == before, "a refused upload must leave no teacher behind"
