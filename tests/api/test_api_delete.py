"""DELETE /v1/teachers/{id}, /v1/datasets/{id} (409 while in use, then gone everywhere, the row kept) and
/v1/jobs/{id} (finished jobs only; its files and rows go), and the race of a DELETE with a job being created."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import TEACHER_FORM, Env, job_body
from sqlalchemy import func, select, update

from app.api.schemas import JobCreate
from app.db import session_scope
from app.keys import create_key
from app.models import Artifact, Dataset, Job, JobEvent, SweepRecord, Teacher, Tenant, WebhookDelivery, utcnow
from app.storage import get_store
from app.submission import new_job


def error_of(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The flat JSON error, extra fields allowed (api_support.assert_error knows only code/message/field)."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    body = resp.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], body
    return body


class Caller:
    """A tenant of this module only, so that what it uploads and deletes touches no other test."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.name = f"delete-tests-{secrets.token_hex(4)}"
        with session_scope(env.db_url) as s:
            self.key = create_key(s, self.name, "delete tests")
        with session_scope(env.db_url) as s:
            self.id = s.scalar(select(Tenant.id).where(Tenant.name == self.name))
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def teacher(self, content: bytes) -> str:
        resp = self.env.client.post("/v1/teachers", headers=self.headers, params={"dedupe": "false"},
                                    files={"file": ("t.safetensors", content)}, data=TEACHER_FORM)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def dataset(self, content: bytes) -> str:
        resp = self.env.client.post("/v1/datasets", headers=self.headers, params={"dedupe": "false"},
                                    files={"file": ("d.npz", content)})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def job(self, teacher_id: str, dataset_id: str) -> str:
        resp = self.env.client.post("/v1/jobs", headers=self.headers, json=job_body(teacher_id, dataset_id))
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.env.client.request(method, path, headers=self.headers, **kwargs)


@pytest.fixture(scope="module")
def me(env: Env) -> Caller:
    return Caller(env)


@pytest.fixture(scope="module")
def kept(me: Caller, teacher_file: bytes, npz10_file: bytes) -> tuple[str, str]:
    """A teacher and a dataset that no test deletes."""
    return me.teacher(teacher_file), me.dataset(npz10_file)


def stored(env: Env, prefix: str) -> list[Path]:
    folder = env.settings.store_dir / prefix
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_a_teacher_or_dataset_in_use_is_409_then_deleted_once_its_job_ended(
        env: Env, me: Caller, kept: tuple[str, str], teacher_file: bytes, npz10_file: bytes) -> None:
    teacher, dataset = me.teacher(teacher_file), me.dataset(npz10_file)
    job = me.job(teacher, dataset)
    for kind, ident in (("teacher", teacher), ("dataset", dataset)):
        body = error_of(me.call("DELETE", f"/v1/{kind}s/{ident}"), 409, f"{kind}_in_use")
        assert body["job_ids"] == [job] and job in body["message"]
        assert me.call("GET", f"/v1/{kind}s/{ident}").status_code == 200  # nothing changed
        assert stored(env, f"{kind}s/{ident}")
    assert me.call("POST", f"/v1/jobs/{job}/cancel").json()["status"] == "cancelled"

    with session_scope(env.db_url) as s:  # a running sweep built on the teacher keeps it too
        sweep = SweepRecord(tenant_id=me.id, request={"teacher_id": teacher, "dataset_id": dataset}, max_trials=2,
                            max_parallel=1, metric="validation_accuracy", request_hash="x")
        s.add(sweep)
        s.flush()
        sweep_id = sweep.id
    body = error_of(me.call("DELETE", f"/v1/teachers/{teacher}"), 409, "teacher_in_use")
    assert body["sweep_ids"] == [sweep_id] and body["job_ids"] == [] and sweep_id in body["message"]
    with session_scope(env.db_url) as s:
        s.execute(update(SweepRecord).where(SweepRecord.id == sweep_id).values(status="cancelled"))

    for kind, ident in (("teacher", teacher), ("dataset", dataset)):
        resp = me.call("DELETE", f"/v1/{kind}s/{ident}")
        assert resp.status_code == 204 and resp.content == b""
        assert stored(env, f"{kind}s/{ident}") == [], "its file is removed from the store"
        error_of(me.call("GET", f"/v1/{kind}s/{ident}"), 404, f"{kind}_not_found")
        listed = me.call("GET", f"/v1/{kind}s", params={"limit": 200}).json()["items"]
        assert ident not in [o["id"] for o in listed]
        error_of(me.call("DELETE", f"/v1/{kind}s/{ident}"), 404, f"{kind}_not_found")
        with session_scope(env.db_url) as s:  # the row stays: the finished job names it
            model = Teacher if kind == "teacher" else Dataset
            assert s.get(model, ident).deleted_at is not None
    gone = error_of(me.call("POST", "/v1/jobs", json=job_body(teacher, kept[1])), 404, "teacher_not_found")
    assert gone["field"] == "teacher_id"
    gone = error_of(me.call("POST", "/v1/jobs", json=job_body(kept[0], dataset)), 404, "dataset_not_found")
    assert gone["field"] == "dataset_id"
    assert me.call("GET", f"/v1/jobs/{job}").json()["status"] == "cancelled", "the ended job is still there"


def test_delete_job_is_409_until_finished_then_removes_files_and_rows(env: Env, me: Caller,
                                                                      kept: tuple[str, str]) -> None:
    job = me.job(*kept)
    body = error_of(me.call("DELETE", f"/v1/jobs/{job}"), 409, "job_not_finished")
    assert body["status"] == "queued" and "cancel" in body["message"]
    me.call("POST", f"/v1/jobs/{job}/cancel")
    store = get_store(env.settings)
    source = env.settings.tmp_dir / f"{job}.bin"
    source.write_bytes(b"student bytes")
    store.put_file(f"jobs/{job}/1/student.onnx", source)
    store.put_file(f"checkpoints/{job}/1/run.ckpt", source)
    with session_scope(env.db_url) as s:
        s.add(Artifact(job_id=job, name="student.onnx", format="onnx", size_bytes=13, sha256="0" * 64,
                       storage_key=f"jobs/{job}/1/student.onnx"))
        s.add(WebhookDelivery(job_id=job, tenant_id=me.id, event="job.cancelled", url="http://example.org/hook",
                              payload={"id": job}))
    source.unlink()
    assert stored(env, f"jobs/{job}") and stored(env, f"checkpoints/{job}")

    resp = me.call("DELETE", f"/v1/jobs/{job}")
    assert resp.status_code == 204 and resp.content == b""
    assert stored(env, f"jobs/{job}") == [] and stored(env, f"checkpoints/{job}") == []
    error_of(me.call("GET", f"/v1/jobs/{job}"), 404, "job_not_found")
    error_of(me.call("DELETE", f"/v1/jobs/{job}"), 404, "job_not_found")
    with session_scope(env.db_url) as s:
        for model in (JobEvent, Artifact, WebhookDelivery):
            assert s.scalar(select(func.count()).select_from(model).where(model.job_id == job)) == 0, model
    assert me.call("GET", f"/v1/teachers/{kept[0]}").status_code == 200, "its inputs stay"


def test_another_tenants_delete_is_404(env: Env, me: Caller, kept: tuple[str, str]) -> None:
    job = me.job(*kept)
    me.call("POST", f"/v1/jobs/{job}/cancel")
    other = {"Authorization": f"Bearer {env.keys['b']}"}
    for path, code in ((f"/v1/teachers/{kept[0]}", "teacher_not_found"), (f"/v1/datasets/{kept[1]}",
                                                                          "dataset_not_found"),
                       (f"/v1/jobs/{job}", "job_not_found")):
        error_of(env.client.delete(path, headers=other), 404, code)
        assert me.call("GET", path).status_code == 200


def test_a_delete_waits_for_a_job_being_created_and_then_sees_it(env: Env, me: Caller,
                                                                  kept: tuple[str, str]) -> None:
    teacher, dataset = kept
    with session_scope(env.db_url) as s:  # POST /v1/jobs, stopped between its insert and its commit
        job = new_job(s, env.settings, me.id, JobCreate.model_validate(job_body(teacher, dataset)))
        s.flush()
        thread, out = in_thread(lambda: me.call("DELETE", f"/v1/teachers/{teacher}"))
        thread.join(1.5)
        assert thread.is_alive(), f"the DELETE did not wait for the job's transaction: {out}"
        job_id = job.id
    thread.join(60)
    body = error_of(out[0], 409, "teacher_in_use")
    assert body["job_ids"] == [job_id]
    me.call("POST", f"/v1/jobs/{job_id}/cancel")
    assert me.call("GET", f"/v1/teachers/{teacher}").status_code == 200


def test_a_job_created_during_a_delete_is_404(env: Env, me: Caller, teacher_file: bytes,
                                              kept: tuple[str, str]) -> None:
    teacher = me.teacher(teacher_file)
    with session_scope(env.db_url) as s:  # DELETE /v1/teachers/{id}, stopped before its commit
        row = s.scalars(select(Teacher).where(Teacher.id == teacher).with_for_update()).one()
        row.deleted_at = utcnow()
        s.flush()
        thread, out = in_thread(lambda: me.call("POST", "/v1/jobs", json=job_body(teacher, kept[1])))
        thread.join(1.5)
        assert thread.is_alive(), f"the job was created past a DELETE in progress: {out}"
    thread.join(60)
    body = error_of(out[0], 404, "teacher_not_found")
    assert body["field"] == "teacher_id"
    with session_scope(env.db_url) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.teacher_id == teacher)) == 0
