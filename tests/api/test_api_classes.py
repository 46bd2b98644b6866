"""Contract v1.1 on the API: teacher class names (given at upload or read from the file), classes matched by
name at job creation, test splits of datasets, `checks`, `data.test_fraction`, `warnings`, and the progress
a queued job shows. Real uploads inspected in child processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import uvicorn
from api_support import (
    GREY8,
    TEACHER_FORM,
    Env,
    Uploaded,
    assert_error,
    created,
    job_body,
    png_bytes,
    resnet8,
    zip_bytes,
)
from safetensors.torch import save_file

from app.client import Client, KdistillError
from app.db import session_scope
from app.main import create_app
from app.models import Job, utcnow

TEN = ["cat", "dog", "fox", "owl", "bee", "eel", "yak", "emu", "gnu", "ant"]
PETS = {"cat": 3, "dog": 3, "fox": 3}  # a dataset whose classes are a subset of TEN


def _with_names_onnx(onnx_file: bytes, names: list[str]) -> bytes:
    model = onnx.load_from_string(onnx_file)
    onnx.helper.set_model_props(model, {"classes": json.dumps(names)})
    return model.SerializeToString()


def _with_names_safetensors(tmp_path: Path, names: list[str]) -> bytes:
    path = tmp_path / "named.safetensors"
    save_file({k: v.contiguous() for k, v in resnet8().state_dict().items()}, str(path),
              metadata={"classes": json.dumps(names)})
    return path.read_bytes()


def _folder_zip(counts: dict[str, int], seed: int = 100) -> bytes:
    entries: dict[str, bytes] = {}
    for cls, n in counts.items():
        for i in range(n):
            seed += 1
            entries[f"train/{cls}/{i}.png"] = png_bytes(seed)
    return zip_bytes(entries)


@pytest.fixture(scope="module")
def named_teacher(env: Env, teacher_file: bytes) -> Uploaded:
    """The resnet8 teacher (10 outputs) with TEN as the names of its outputs, given as comma-separated text."""
    return created(env.upload_teacher(teacher_file, **TEACHER_FORM, classes=" , ".join(TEN)), teacher_file)


@pytest.fixture(scope="module")
def pets(env: Env) -> Uploaded:
    content = _folder_zip(PETS)
    return created(env.upload_dataset(content, "pets.zip"), content)


def _post_job(env: Env, body: dict[str, Any]) -> Any:
    return env.client.post("/v1/jobs", headers=env.auth("a"), json=body)


# ---------------------------------------------------------------------------------------------- teachers

def test_teacher_classes_as_comma_separated_text_are_stored_and_returned(env: Env, named_teacher: Uploaded) -> None:
    assert named_teacher.body["classes"] == TEN, "trimmed names in output order"
    got = env.client.get(f"/v1/teachers/{named_teacher.id}", headers=env.auth("a"))
    assert got.status_code == 200 and got.json() == named_teacher.body
    listed = env.client.get("/v1/teachers", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    assert named_teacher.body in listed


def test_teacher_classes_as_a_json_list_keep_commas_inside_names(env: Env, teacher_file: bytes) -> None:
    names = ["sea lion, grey", *TEN[1:]]
    resp = env.upload_teacher(teacher_file, **TEACHER_FORM, classes=json.dumps(names))
    assert resp.status_code == 201, resp.text
    assert resp.json()["classes"] == names


def test_a_teacher_without_names_has_classes_null(env: Env, teacher_a: Uploaded) -> None:
    assert "classes" in teacher_a.body and teacher_a.body["classes"] is None


@pytest.mark.parametrize("value", [
    "cat,dog,Cat,owl,bee,eel,yak,emu,gnu,ant",  # duplicates, ignoring case
    "cat,dog,,owl,bee,eel,yak,emu,gnu,ant",  # an empty name
    "cat",  # one name is no classifier
    '["cat", 1, "fox"]',  # not all strings
    '["cat", "dog"',  # looks like JSON, does not parse
])
def test_bad_classes_are_422_invalid_classes(env: Env, teacher_file: bytes, value: str) -> None:
    body = assert_error(env.upload_teacher(teacher_file, **TEACHER_FORM, classes=value), 422, "invalid_classes",
                        "classes")
    assert "class" in body["message"]


def test_classes_that_disagree_with_num_classes_are_422_before_inspection(env: Env, teacher_file: bytes) -> None:
    body = assert_error(env.upload_teacher(teacher_file, **TEACHER_FORM, classes="cat,dog,fox"), 422,
                        "class_count_mismatch", "classes")
    assert "3" in body["message"] and "10" in body["message"]


def test_classes_that_disagree_with_the_teachers_outputs_are_422(env: Env, onnx_file: bytes) -> None:
    """No num_classes here: only the inspection learns that the ONNX model has 10 outputs."""
    resp = env.upload_teacher(onnx_file, "tiny.onnx", **GREY8, classes="cat,dog,fox")
    body = assert_error(resp, 422, "class_count_mismatch", "classes")
    assert "3" in body["message"] and "10" in body["message"]


def test_names_are_read_from_onnx_metadata_props(env: Env, onnx_file: bytes) -> None:
    resp = env.upload_teacher(_with_names_onnx(onnx_file, TEN), "named.onnx", **GREY8)
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "onnx" and resp.json()["classes"] == TEN


def test_names_are_read_from_safetensors_metadata(env: Env, tmp_path: Path) -> None:
    content = _with_names_safetensors(tmp_path, TEN)
    resp = env.upload_teacher(content, "named.safetensors", **TEACHER_FORM)
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "safetensors" and resp.json()["classes"] == TEN


def test_names_in_the_file_that_do_not_fit_its_outputs_are_422(env: Env, onnx_file: bytes) -> None:
    resp = env.upload_teacher(_with_names_onnx(onnx_file, TEN[:4]), "named.onnx", **GREY8)
    assert_error(resp, 422, "class_count_mismatch", "file")


# ---------------------------------------------------------------------------------------------- datasets

def test_datasets_show_their_test_split(env: Env, dataset_a: Uploaded) -> None:
    assert dataset_a.body["num_test"] == 0 and dataset_a.body["test_source"] is None
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 4,
             x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 4)
    resp = env.upload_dataset(buf.getvalue(), "with_test.npz")
    assert resp.status_code == 201, resp.text
    d = resp.json()
    assert d["num_test"] == 12 and d["test_source"] == "given"
    assert env.client.get(f"/v1/datasets/{d['id']}", headers=env.auth("a")).json() == d


# ---------------------------------------------------------------------------------------------- jobs

def test_a_named_teacher_distils_a_dataset_of_a_subset_of_its_classes(env: Env, named_teacher: Uploaded,
                                                                      pets: Uploaded) -> None:
    assert pets.body["classes"] == sorted(PETS)
    resp = _post_job(env, job_body(named_teacher.id, pets.id))
    assert resp.status_code == 202, resp.text


def test_a_dataset_class_the_teacher_does_not_name_is_422_class_mismatch(env: Env, teacher_file: bytes,
                                                                        pets: Uploaded) -> None:
    names = [n if n != "fox" else "foxes" for n in TEN]
    teacher = created(env.upload_teacher(teacher_file, **TEACHER_FORM, classes=",".join(names)), teacher_file)
    before = env.queue_depth()
    body = assert_error(_post_job(env, job_body(teacher.id, pets.id)), 422, "class_mismatch", "dataset_id")
    assert "'fox'" in body["message"] and "foxes" in body["message"], "names the class and the closest name"
    assert env.queue_depth() == before


def test_an_unnamed_teacher_still_needs_as_many_classes_as_the_dataset(env: Env, teacher_a: Uploaded,
                                                                       pets: Uploaded) -> None:
    assert_error(_post_job(env, job_body(teacher_a.id, pets.id)), 422, "class_count_mismatch", "dataset_id")


def test_checks_and_test_fraction_are_accepted_and_echoed(env: Env, teacher_a: Uploaded,
                                                          dataset_a: Uploaded) -> None:
    body = job_body(teacher_a.id, dataset_a.id, checks={"teacher": "warn"},
                    data={"val_fraction": 0.2, "test_fraction": 0.3})
    resp = _post_job(env, body)
    assert resp.status_code == 202, resp.text
    echoed = resp.json()["request"]
    assert echoed["checks"] == {"teacher": "warn"}
    assert echoed["data"]["test_fraction"] == 0.3
    plain = _post_job(env, job_body(teacher_a.id, dataset_a.id)).json()["request"]
    assert plain["checks"] == {"teacher": "fail"} and plain["data"]["test_fraction"] == 0


@pytest.mark.parametrize(("over", "field"), [
    ({"checks": {"teacher": "ignore"}}, "checks.teacher"),
    ({"checks": {"student": "warn"}}, "checks.student"),
    ({"data": {"test_fraction": -0.1}}, "data.test_fraction"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "data.test_fraction"),  # nothing left to train on
    ({"data": {"val_fraction": 0.3, "test_fraction": 0.75}}, "data.test_fraction"),
])
def test_bad_checks_or_test_fraction_are_422_naming_the_field(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                             over: dict, field: str) -> None:
    body = assert_error(_post_job(env, job_body(teacher_a.id, dataset_a.id, **over)), 422, "validation_error", field)
    assert "errors.pydantic.dev" not in body["message"]


@pytest.mark.parametrize(("name", "value", "field"), [
    ("seed", -1, "hyperparameters.seed"),
    ("seed", 2**31, "hyperparameters.seed"),
    ("seed", 2**64 + 1, "hyperparameters.seed"),  # past any database integer
    ("seed", 10**40, "hyperparameters.seed"),
    ("class_weights", [0.0] * 10, "hyperparameters.class_weights"),
    ("class_weights", [1.0, 1.0, 0.0, *[1.0] * 7], "hyperparameters.class_weights"),
    ("class_weights", [1.0, -2.0, *[1.0] * 8], "hyperparameters.class_weights"),
    ("class_weights", [1.0, "heavy", *[1.0] * 8], "hyperparameters.class_weights"),
])
def test_bad_seed_or_class_weights_are_422_with_a_field_never_500(env: Env, teacher_a: Uploaded,
                                                                 dataset_a: Uploaded, name: str, value: Any,
                                                                 field: str) -> None:
    body = job_body(teacher_a.id, dataset_a.id)
    body["hyperparameters"] = {**body["hyperparameters"], name: value}
    err = assert_error(_post_job(env, body), 422, "invalid_hyperparameter")
    # the field, or the entry of the list at fault (hyperparameters.class_weights.2)
    assert err.get("field") == field or err.get("field", "").startswith(f"{field}."), err
    assert "'auto'" not in err["message"], "the list's own error, not the other arm of the union"
    assert "errors.pydantic.dev" not in err["message"]


def test_a_new_job_has_no_warnings_and_shows_those_recorded(env: Env, job_a: dict) -> None:
    assert job_a["warnings"] == []
    seen = {"code": "teacher_not_predictive", "message": "the teacher is near chance on this data"}
    with session_scope(env.db_url) as s:
        s.get(Job, job_a["id"]).warnings = [seen]
    got = env.client.get(f"/v1/jobs/{job_a['id']}", headers=env.auth("a")).json()
    assert got["warnings"] == [seen]
    listed = env.client.get("/v1/jobs", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    assert next(j for j in listed if j["id"] == job_a["id"])["warnings"] == [seen]


def test_a_queued_job_shows_the_epochs_it_asked_for(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    body = job_body(teacher_a.id, dataset_a.id)
    body["hyperparameters"]["epochs"] = 7
    job = _post_job(env, body).json()
    assert job["progress"]["epochs"] == 7 and job["progress"]["epoch"] == 0
    assert env.client.get(f"/v1/jobs/{job['id']}", headers=env.auth("a")).json()["progress"]["epochs"] == 7
    default = job_body(teacher_a.id, dataset_a.id)
    del default["hyperparameters"]
    assert _post_job(env, default).json()["progress"]["epochs"] == 10  # the Hyperparameters default
    with session_scope(env.db_url) as s:  # once the worker writes progress, that is what shows
        s.get(Job, job["id"]).progress = {"run": "baseline", "epoch": 2, "epochs": 3, "step": 5, "fraction": 0.8}
    p = env.client.get(f"/v1/jobs/{job['id']}", headers=env.auth("a")).json()["progress"]
    assert p["epochs"] == 3 and p["epoch"] == 2


# ---------------------------------------------------------------------------------------------- client.wait

@pytest.fixture
def server(env: Env) -> Iterator[str]:
    """The app on a real socket (uvicorn in a thread) for the Python client; its job stream looks every 50 ms."""
    settings = env.settings.model_copy(update={"stream_interval": 0.05})
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (srv.started and srv.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_wait_reports_changes_not_polls(env: Env, server: str, job_a: dict) -> None:
    def update(**fields: Any) -> None:
        with session_scope(env.db_url) as s:
            job = s.get(Job, job_a["id"])
            for k, v in fields.items():
                setattr(job, k, v)

    steps = [
        {"status": "running", "phase": "loading", "started_at": utcnow()},
        {"phase": "training"},
        {"progress": {"run": "student", "epoch": 1, "epochs": 2, "step": 3, "total_steps": 6, "fraction": 0.5}},
        {"progress": {"run": "student", "epoch": 2, "epochs": 2, "step": 6, "total_steps": 6, "fraction": 1.0}},
        {"status": "succeeded", "phase": None, "finished_at": utcnow()},
    ]

    def driver() -> None:
        for fields in steps:
            time.sleep(0.6)  # a dozen looks of the stream between changes
            update(**fields)

    seen: list[dict[str, Any]] = []
    polls = 0
    with Client(server, api_key=env.keys["a"]) as kd:
        get_job = kd.get_job

        def counting_get_job(job_id: str) -> dict[str, Any]:
            nonlocal polls
            polls += 1
            return get_job(job_id)

        kd.get_job = counting_get_job  # type: ignore[method-assign]
        thread = threading.Thread(target=driver)
        thread.start()
        try:
            final = kd.wait(job_a["id"], timeout=60, poll=0.05, on_progress=seen.append)
        finally:
            thread.join()
    assert final["status"] == "succeeded"
    assert polls <= 1, f"{polls} GETs: wait() polled instead of following the stream (one GET: the final job)"
    assert [(j["status"], j["phase"], j["progress"].get("step")) for j in seen] == [
        ("queued", None, 0), ("running", "loading", 0), ("running", "training", 0), ("running", "training", 3),
        ("running", "training", 6), ("succeeded", None, 6)]
    assert seen[0]["progress"]["epochs"] == 2, "a queued job shows its requested epochs"


def test_the_client_uploads_classes_as_a_list_or_text(env: Env, server: str, teacher_file: bytes,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(teacher_file)
    form = {"arch": TEACHER_FORM["arch"], "num_classes": 10, "input_channels": 1, "input_size": 8,
            "mean": [0.3], "std": [0.37]}
    names = ["sea lion, grey", *TEN[1:]]
    with Client(server, api_key=env.keys["a"]) as kd:
        assert kd.upload_teacher(path, **form, classes=names)["classes"] == names
        assert kd.upload_teacher(path, **form, classes=",".join(TEN))["classes"] == TEN
        with pytest.raises(KdistillError) as e:
            kd.upload_teacher(path, **form, classes=["cat", "CAT", *TEN[2:]])
    assert (e.value.status, e.value.code, e.value.field) == (422, "invalid_classes", "classes")
