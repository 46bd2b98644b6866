"""API keys and tenant isolation: another tenant's object answers 404 and never shows in a list."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_support import Env, Uploaded, assert_error, finish_job, job_body, store_artifact

PROTECTED = [
    ("GET", "/v1/teachers"),
    ("GET", "/v1/teachers/tch_000000000000000000000000"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/ds_000000000000000000000000"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/job_000000000000000000000000"),
    ("GET", "/v1/jobs/job_000000000000000000000000/events"),
    ("POST", "/v1/jobs/job_000000000000000000000000/cancel"),
    ("GET", "/v1/jobs/job_000000000000000000000000/artifacts/student.onnx"),
    ("GET", "/v1/jobs/job_000000000000000000000000/stream"),
    ("GET", "/v1/me"),
    ("GET", "/v1/students"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_api_key_is_401_missing_api_key(env: Env, method: str, path: str) -> None:
    kwargs = {"json": job_body("tch_x", "ds_x")} if method == "POST" and path == "/v1/jobs" else {}
    resp = env.client.request(method, path, **kwargs)
    assert_error(resp, 401, "missing_api_key")
    assert resp.headers.get("www-authenticate", "").lower().startswith("bearer")


@pytest.mark.parametrize("path", ["/v1/teachers", "/v1/datasets"])
def test_upload_without_api_key_is_401_before_anything_is_read(env: Env, path: str) -> None:
    resp = env.client.post(path, files={"file": ("x.bin", b"0123456789", "application/octet-stream")})
    assert_error(resp, 401, "missing_api_key")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "kd_not_a_bearer_header", "Bearer", ""])
def test_header_without_a_bearer_key_is_401_missing_api_key(env: Env, header: str) -> None:
    assert_error(env.client.get("/v1/jobs", headers={"Authorization": header}), 401, "missing_api_key")


@pytest.mark.parametrize("key", ["kd_wrong", "kd_" + "x" * 43, "not even our prefix"])
def test_wrong_key_is_401_invalid_api_key(env: Env, key: str) -> None:
    resp = env.client.get("/v1/teachers", headers={"Authorization": f"Bearer {key}"})
    assert_error(resp, 401, "invalid_api_key")
    assert resp.headers.get("www-authenticate", "").lower().startswith("bearer")


def test_revoked_key_is_401_invalid_api_key(env: Env) -> None:
    assert_error(env.client.get("/v1/teachers", headers=env.auth("revoked")), 401, "invalid_api_key")


def test_valid_keys_of_both_tenants_work(env: Env) -> None:
    for who in ("a", "b"):
        resp = env.client.get("/v1/jobs", headers=env.auth(who))
        assert resp.status_code == 200, resp.text
    # the scheme name is case-insensitive (RFC 7235)
    resp = env.client.get("/v1/jobs", headers={"Authorization": f"bearer {env.keys['a']}"})
    assert resp.status_code == 200, resp.text


def test_auth_disabled_needs_no_header_and_is_its_own_tenant(env: Env, teacher_a: Uploaded,
                                                             dataset_a: Uploaded) -> None:
    client = env.client_with(auth="disabled")
    for path in ("/v1/teachers", "/v1/datasets", "/v1/jobs"):
        resp = client.get(path)
        assert resp.status_code == 200, resp.text
        ids = [item["id"] for item in resp.json()["items"]]
        assert teacher_a.id not in ids and dataset_a.id not in ids
    assert_error(client.get(f"/v1/teachers/{teacher_a.id}"), 404, "teacher_not_found")
    # a wrong key is simply ignored when keys are switched off
    resp = client.get("/v1/jobs", headers={"Authorization": "Bearer kd_wrong"})
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------------------------- isolation

@pytest.fixture
def a_job_with_artifact(env: Env, job_a: dict, tmp_path: Path) -> tuple[dict, str]:
    name = store_artifact(env.settings, env.db_url, job_a["id"], b"student weights of tenant A", tmp_path)
    finish_job(env.db_url, job_a["id"])
    return job_a, name


def test_tenant_b_gets_404_for_every_object_of_tenant_a(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                        a_job_with_artifact: tuple[dict, str]) -> None:
    job, artifact = a_job_with_artifact
    b, c = env.auth("b"), env.client
    # tenant A sees its own objects
    for path in (f"/v1/teachers/{teacher_a.id}", f"/v1/datasets/{dataset_a.id}", f"/v1/jobs/{job['id']}",
                 f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/artifacts/{artifact}"):
        assert c.get(path, headers=env.auth("a")).status_code == 200, path
    assert_error(c.get(f"/v1/teachers/{teacher_a.id}", headers=b), 404, "teacher_not_found")
    assert_error(c.get(f"/v1/datasets/{dataset_a.id}", headers=b), 404, "dataset_not_found")
    assert_error(c.get(f"/v1/jobs/{job['id']}", headers=b), 404, "job_not_found")
    assert_error(c.get(f"/v1/jobs/{job['id']}/events", headers=b), 404, "job_not_found")
    assert_error(c.post(f"/v1/jobs/{job['id']}/cancel", headers=b), 404, "job_not_found")
    assert_error(c.get(f"/v1/jobs/{job['id']}/artifacts/{artifact}", headers=b), 404, "job_not_found")
    assert c.head(f"/v1/jobs/{job['id']}/artifacts/{artifact}", headers=b).status_code == 404
    assert_error(c.delete(f"/v1/jobs/{job['id']}", headers=b), 404, "job_not_found")
    assert_error(c.delete(f"/v1/teachers/{teacher_a.id}", headers=b), 404, "teacher_not_found")
    assert_error(c.delete(f"/v1/datasets/{dataset_a.id}", headers=b), 404, "dataset_not_found")
    # B's cancel and deletes changed nothing
    after = c.get(f"/v1/jobs/{job['id']}", headers=env.auth("a")).json()
    assert after["status"] == "succeeded" and after["cancel_requested"] is False
    for path in (f"/v1/teachers/{teacher_a.id}", f"/v1/datasets/{dataset_a.id}"):
        assert c.get(path, headers=env.auth("a")).status_code == 200, path


def test_tenant_b_cannot_use_tenant_a_uploads_in_a_job(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                       teachers_b: list[Uploaded], dataset_b: Uploaded) -> None:
    b = env.auth("b")
    before = env.queue_depth()
    resp = env.client.post("/v1/jobs", headers=b, json=job_body(teacher_a.id, dataset_b.id))
    assert_error(resp, 404, "teacher_not_found", "teacher_id")
    resp = env.client.post("/v1/jobs", headers=b, json=job_body(teachers_b[0].id, dataset_a.id))
    assert_error(resp, 404, "dataset_not_found", "dataset_id")
    assert env.queue_depth() == before


def test_lists_of_tenant_b_do_not_show_tenant_a_items(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                      job_a: dict, teachers_b: list[Uploaded],
                                                      dataset_b: Uploaded) -> None:
    b = env.auth("b")
    teachers = env.client.get("/v1/teachers", headers=b, params={"limit": 200}).json()["items"]
    datasets = env.client.get("/v1/datasets", headers=b, params={"limit": 200}).json()["items"]
    jobs = env.client.get("/v1/jobs", headers=b, params={"limit": 200}).json()["items"]
    assert {t["id"] for t in teachers} == {t.id for t in teachers_b}
    assert dataset_b.id in {d["id"] for d in datasets}
    assert dataset_a.id not in {d["id"] for d in datasets}
    assert job_a["id"] not in {j["id"] for j in jobs}
    # and A's lists do not show B's
    a_teachers = env.client.get("/v1/teachers", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    assert not {t["id"] for t in a_teachers} & {t.id for t in teachers_b}
    a_datasets = env.client.get("/v1/datasets", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    assert dataset_b.id not in {d["id"] for d in a_datasets}


@pytest.mark.parametrize("kind", ["teachers", "datasets", "jobs"])
def test_another_tenants_id_is_not_a_valid_cursor(env: Env, kind: str, teacher_a: Uploaded, dataset_a: Uploaded,
                                                  job_a: dict) -> None:
    """An id of tenant A is unknown to tenant B everywhere, `after` included (no existence oracle)."""
    a_id = {"teachers": teacher_a.id, "datasets": dataset_a.id, "jobs": job_a["id"]}[kind]
    resp = env.client.get(f"/v1/{kind}", headers=env.auth("b"), params={"after": a_id})
    assert_error(resp, 422, "invalid_cursor", "after")
