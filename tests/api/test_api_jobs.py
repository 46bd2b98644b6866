"""/v1/jobs: create (checked at once, published to the broker), idempotency, list, events and cancel.

No worker runs here, so every job stays `queued` unless a test moves it on in the database.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest
from api_support import Env, Uploaded, all_pages, assert_error, job_body

from app.db import session_scope
from app.models import Job, utcnow

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _jobs(env: Env, who: str = "a", **params: Any) -> list[dict[str, Any]]:
    resp = env.client.get("/v1/jobs", headers=env.auth(who), params={"limit": 200, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


def _set_status(env: Env, job_id: str, status: str) -> None:
    with session_scope(env.db_url) as s:
        job = s.get(Job, job_id)
        job.status = status
        if status == "running":
            job.started_at, job.phase = utcnow(), "training"
        else:
            job.finished_at = utcnow()


# ---------------------------------------------------------------------------------------------- create

def test_create_job_is_202_queued_and_published(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    body = job_body(teacher_a.id, dataset_a.id)
    before = env.queue_depth()
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["id"].startswith("job_")
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["phase"] is None and job["cancel_requested"] is False
    assert job["teacher_id"] == teacher_a.id and job["dataset_id"] == dataset_a.id
    assert job["queue"] == env.settings.default_queue
    assert job["artifacts"] == []
    assert job["error"] is None
    assert job["metrics"] == {}
    assert job["started_at"] is None and job["finished_at"] is None
    assert ISO_UTC.match(job["created_at"]), job["created_at"]
    # the request is echoed: every field sent comes back as sent
    echoed = job["request"]
    assert echoed["teacher_id"] == teacher_a.id and echoed["dataset_id"] == dataset_a.id
    assert echoed["student"]["arch"] == "resnet8"
    for name, value in body["hyperparameters"].items():
        assert echoed["hyperparameters"][name] == value
    assert echoed["export_formats"] == ["onnx"]
    assert echoed["baseline"] is False
    # a message reached the real broker
    assert env.queue_depth() == before + 1
    # and the job reads back the same
    got = env.client.get(f"/v1/jobs/{job['id']}", headers=env.auth("a"))
    assert got.status_code == 200 and got.json() == job


def test_create_job_with_every_contract_field(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    hp = {"epochs": 10, "batch_size": 128, "optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 0.0005,
          "scheduler": "cosine", "temperature": 4.0, "alpha": 0.9, "distillation": "soft", "label_smoothing": 0.0,
          "seed": 0}
    body = {"teacher_id": teacher_a.id, "dataset_id": dataset_a.id, "student": {"arch": "resnet8"},
            "hyperparameters": hp, "export_formats": ["torchscript", "onnx"], "baseline": False}
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert resp.status_code == 202, resp.text
    echoed = resp.json()["request"]
    assert {k: echoed["hyperparameters"][k] for k in hp} == hp
    assert echoed["export_formats"] == ["torchscript", "onnx"]


def test_unknown_teacher_is_404_with_field(env: Env, dataset_a: Uploaded) -> None:
    before = env.queue_depth()
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body("tch_nope", dataset_a.id))
    assert_error(resp, 404, "teacher_not_found", "teacher_id")
    assert env.queue_depth() == before


def test_unknown_dataset_is_404_with_field(env: Env, teacher_a: Uploaded) -> None:
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, "ds_nope"))
    assert_error(resp, 404, "dataset_not_found", "dataset_id")


def test_class_count_mismatch_is_422(env: Env, teacher_a: Uploaded, dataset_a4: Uploaded) -> None:
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a4.id))
    body = assert_error(resp, 422, "class_count_mismatch")
    assert "10" in body["message"] and "4" in body["message"]


def test_unknown_student_arch_is_422_with_a_close_match(env: Env, teacher_a: Uploaded,
                                                        dataset_a: Uploaded) -> None:
    resp = env.client.post("/v1/jobs", headers=env.auth("a"),
                           json=job_body(teacher_a.id, dataset_a.id, student={"arch": "resnt18"}))
    body = assert_error(resp, 422, "unknown_architecture", "student.arch")
    assert "resnet18" in body["message"], "the message suggests the close match"


@pytest.mark.parametrize(("name", "value"), [
    ("temperature", 0),
    ("alpha", 1.5),
    ("epochs", 0),
    ("optimizer", "lbfgs"),
    ("learning_rate", -0.1),
    ("batch_size", 0),
    ("scheduler", "exponential"),
    ("distillation", "medium"),
    ("label_smoothing", 1.0),
    ("device", "tpu"),
    ("class_weights", [1.0, 2.0]),  # 2 weights for 10 classes
    ("warmup_epochs", 5),  # must be below epochs (2)
    ("bogus_knob", 1),
])
def test_out_of_range_hyperparameter_is_422_invalid_hyperparameter(env: Env, teacher_a: Uploaded,
                                                                   dataset_a: Uploaded, name: str,
                                                                   value: Any) -> None:
    before = len(_jobs(env))
    body = job_body(teacher_a.id, dataset_a.id)
    body["hyperparameters"] = {**body["hyperparameters"], name: value}
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert_error(resp, 422, "invalid_hyperparameter", f"hyperparameters.{name}")
    assert len(_jobs(env)) == before


@pytest.mark.parametrize(("student", "field"), [
    ({"arch": "vit_b_16"}, "student.input_size"),  # a ViT takes exactly 224x224, the teacher gives 8x8
    ({"arch": "resnet8", "input_size": 4}, "student.input_size"),  # below the small family's minimum of 8
])
def test_student_input_size_below_the_minimum_is_422(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                     student: dict, field: str) -> None:
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id,
                                                                            student=student))
    assert_error(resp, 422, "input_too_small", field)


def test_student_normalisation_for_the_wrong_channel_count_is_422(env: Env, teacher_a: Uploaded,
                                                                 dataset_a: Uploaded) -> None:
    student = {"arch": "resnet8", "mean": [0.1, 0.2], "std": [0.3, 0.3]}  # the teacher takes 1 channel
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id,
                                                                            student=student))
    body = assert_error(resp, 422, "invalid_input_spec")
    assert "errors.pydantic.dev" not in body["message"] and "mean" in body["message"], body["message"]
    assert body.get("field") == "student.mean", body


def test_job_is_created_while_the_broker_is_down(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    """The database is the source of truth: a job whose message cannot be sent now is kept, queued."""
    client = env.client_with(broker_url="redis://127.0.0.1:1/0")
    resp = client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    got = env.client.get(f"/v1/jobs/{job['id']}", headers=env.auth("a"))
    assert got.status_code == 200 and got.json()["status"] == "queued"
    with session_scope(env.db_url) as s:
        assert s.get(Job, job["id"]).enqueued_at is None, "the sweep must find it to send it again"


@pytest.mark.parametrize(("over", "field"), [
    ({"export_formats": ["pickle"]}, "export_formats.0"),
    ({"export_formats": []}, "export_formats"),
    ({"student": {}}, "student.arch"),
    ({"student": {"arch": "resnet8", "extra": 1}}, "student.extra"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_job_body_is_422_validation_error(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                              over: dict, field: str) -> None:
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id, **over))
    assert_error(resp, 422, "validation_error", field)


def test_job_body_must_be_json(env: Env) -> None:
    resp = env.client.post("/v1/jobs", headers={**env.auth("a"), "Content-Type": "application/json"},
                           content=b"{not json")
    assert_error(resp, 422)


# ---------------------------------------------------------------------------------------------- idempotency

def test_idempotency_key_replays_the_same_job(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    key = f"idem-{secrets.token_hex(4)}"
    body = job_body(teacher_a.id, dataset_a.id)
    headers = {**env.auth("a"), "Idempotency-Key": key}
    first = env.client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == 202, first.text
    count, depth = len(_jobs(env)), env.queue_depth()
    again = env.client.post("/v1/jobs", headers=headers, json=body)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["request"] == first.json()["request"]
    assert len(_jobs(env)) == count, "a replay must not create a second job"
    assert env.queue_depth() == depth, "a replay must not publish a second message"
    assert [j["id"] for j in _jobs(env)].count(first.json()["id"]) == 1
    # the replay is the same 202 answer as the first, Location header included
    assert again.headers.get("location") == first.headers["location"]


def test_idempotency_key_with_another_body_is_409(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    key = f"idem-{secrets.token_hex(4)}"
    headers = {**env.auth("a"), "Idempotency-Key": key}
    first = env.client.post("/v1/jobs", headers=headers, json=job_body(teacher_a.id, dataset_a.id))
    assert first.status_code == 202, first.text
    count = len(_jobs(env))
    other = job_body(teacher_a.id, dataset_a.id, hyperparameters={"epochs": 3})
    assert_error(env.client.post("/v1/jobs", headers=headers, json=other), 409, "idempotency_conflict")
    assert len(_jobs(env)) == count


def test_tenants_use_the_same_idempotency_key_independently(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                            teachers_b: list[Uploaded], dataset_b: Uploaded) -> None:
    key = f"shared-{secrets.token_hex(4)}"
    a = env.client.post("/v1/jobs", headers={**env.auth("a"), "Idempotency-Key": key},
                        json=job_body(teacher_a.id, dataset_a.id))
    assert a.status_code == 202, a.text
    b = env.client.post("/v1/jobs", headers={**env.auth("b"), "Idempotency-Key": key},
                        json=job_body(teachers_b[0].id, dataset_b.id))
    assert b.status_code == 202, b.text
    assert b.json()["id"] != a.json()["id"]
    assert b.json()["teacher_id"] == teachers_b[0].id
    assert b.json()["id"] in [j["id"] for j in _jobs(env, "b")]
    # and each tenant's key still replays its own job
    a2 = env.client.post("/v1/jobs", headers={**env.auth("a"), "Idempotency-Key": key},
                         json=job_body(teacher_a.id, dataset_a.id))
    assert a2.status_code == 202 and a2.json()["id"] == a.json()["id"]


# ---------------------------------------------------------------------------------------------- list and read

def test_list_jobs_newest_first_with_cursor_pagination(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    new = []
    for _ in range(3):
        resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id))
        assert resp.status_code == 202, resp.text
        new.append(resp.json()["id"])
    everything = _jobs(env)
    ids = [j["id"] for j in everything]
    assert ids[:3] == new[::-1], "newest first"
    created = [j["created_at"] for j in everything]
    assert created == sorted(created, reverse=True)
    pages = all_pages(env.client, "/v1/jobs", env.auth("a"), limit=2)
    assert all(len(p) == 2 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 2
    paged = [j["id"] for p in pages for j in p]
    assert len(paged) == len(set(paged)), "no duplicates across pages"
    assert paged == ids


def test_list_jobs_status_filter(env: Env, teacher_a: Uploaded, dataset_a: Uploaded, job_a: dict) -> None:
    cancelled = env.client.post(f"/v1/jobs/{job_a['id']}/cancel", headers=env.auth("a"))
    assert cancelled.status_code == 200, cancelled.text
    queued = _jobs(env, status="queued")
    assert queued and all(j["status"] == "queued" for j in queued)
    assert job_a["id"] not in [j["id"] for j in queued]
    only_cancelled = _jobs(env, status="cancelled")
    assert job_a["id"] in [j["id"] for j in only_cancelled]
    assert all(j["status"] == "cancelled" for j in only_cancelled)
    pages = all_pages(env.client, "/v1/jobs", env.auth("a"), limit=1, status="queued")
    assert [j["id"] for p in pages for j in p] == [j["id"] for j in queued]


def test_list_jobs_unknown_status_is_422(env: Env) -> None:
    resp = env.client.get("/v1/jobs", headers=env.auth("a"), params={"status": "sleeping"})
    assert_error(resp, 422, "validation_error", "status")


@pytest.mark.parametrize("after", ["job_nope", "", "tch_000000000000000000000000"])
def test_list_jobs_invalid_cursor_is_422(env: Env, after: str) -> None:
    resp = env.client.get("/v1/jobs", headers=env.auth("a"), params={"after": after})
    assert_error(resp, 422, "invalid_cursor", "after")


def test_unknown_job_is_404(env: Env) -> None:
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/events"):
        assert_error(env.client.get(path, headers=env.auth("a")), 404, "job_not_found")
    assert_error(env.client.post("/v1/jobs/job_nope/cancel", headers=env.auth("a")), 404, "job_not_found")


def test_events_list_the_queued_status(env: Env, job_a: dict) -> None:
    resp = env.client.get(f"/v1/jobs/{job_a['id']}/events", headers=env.auth("a"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["next_cursor"] is None
    assert len(body["items"]) == 1
    event = body["items"][0]
    assert event["kind"] == "status"
    assert event["data"]["status"] == "queued"
    assert "queued" in event["message"]
    assert ISO_UTC.match(event["created_at"])


def test_events_pagination(env: Env, job_a: dict) -> None:
    _set_status(env, job_a["id"], "running")
    assert env.client.post(f"/v1/jobs/{job_a['id']}/cancel", headers=env.auth("a")).status_code == 200
    url = f"/v1/jobs/{job_a['id']}/events"
    first = env.client.get(url, headers=env.auth("a"), params={"limit": 1}).json()
    assert [e["kind"] for e in first["items"]] == ["status"] and first["next_cursor"]
    rest = env.client.get(url, headers=env.auth("a"), params={"after": first["next_cursor"]}).json()
    assert [e["kind"] for e in rest["items"]] == ["cancel_requested"] and rest["next_cursor"] is None
    assert rest["items"][0]["id"] > first["items"][0]["id"]


# ---------------------------------------------------------------------------------------------- cancel

def test_cancel_a_queued_job_at_once_and_idempotently(env: Env, job_a: dict) -> None:
    url = f"/v1/jobs/{job_a['id']}/cancel"
    first = env.client.post(url, headers=env.auth("a"))
    assert first.status_code == 200, first.text
    job = first.json()
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None
    second = env.client.post(url, headers=env.auth("a"))
    assert second.status_code == 200, second.text
    assert second.json()["status"] == "cancelled"
    assert second.json()["finished_at"] == job["finished_at"]
    got = env.client.get(f"/v1/jobs/{job_a['id']}", headers=env.auth("a")).json()
    assert got["status"] == "cancelled"
    events = env.client.get(f"/v1/jobs/{job_a['id']}/events", headers=env.auth("a")).json()["items"]
    statuses = [e["data"].get("status") for e in events if e["kind"] == "status"]
    assert statuses == ["queued", "cancelled"], "one cancelled event, however many cancels"


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_a_finished_job_is_409_job_finished(env: Env, job_a: dict, status: str) -> None:
    _set_status(env, job_a["id"], status)
    resp = env.client.post(f"/v1/jobs/{job_a['id']}/cancel", headers=env.auth("a"))
    assert_error(resp, 409, "job_finished")
    got = env.client.get(f"/v1/jobs/{job_a['id']}", headers=env.auth("a")).json()
    assert got["status"] == status and got["cancel_requested"] is False


def test_cancel_a_running_job_requests_cancellation(env: Env, job_a: dict) -> None:
    _set_status(env, job_a["id"], "running")
    url = f"/v1/jobs/{job_a['id']}/cancel"
    resp = env.client.post(url, headers=env.auth("a"))
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "running"
    assert job["cancel_requested"] is True
    assert job["phase"] == "training"
    assert job["finished_at"] is None
    again = env.client.post(url, headers=env.auth("a"))
    assert again.status_code == 200 and again.json()["status"] == "running" and again.json()["cancel_requested"]
    events = env.client.get(f"/v1/jobs/{job_a['id']}/events", headers=env.auth("a")).json()["items"]
    assert [e["kind"] for e in events].count("cancel_requested") == 1
    listed = {j["id"]: j for j in _jobs(env, status="running")}
    assert listed[job_a["id"]]["cancel_requested"] is True
