"""Uploading a file the tenant already has: the existing teacher or dataset comes back (200 with Location) before
any inspection, unless `?dedupe=false`; teachers only when the same form fields came with it."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
from api_support import TEACHER_FORM, Env
from fastapi.testclient import TestClient

from app.db import session_scope
from app.keys import create_key


def key_of_new_tenant(env: Env) -> dict[str, str]:
    with session_scope(env.db_url) as s:
        key = create_key(s, f"dedupe-tests-{secrets.token_hex(4)}", "dedupe tests")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def me(env: Env) -> dict[str, str]:
    """A tenant of this module only: its uploads meet no other test's."""
    return key_of_new_tenant(env)


def teacher(client: TestClient, auth: dict[str, str], content: bytes, dedupe: bool | None = None,
            **form: str) -> httpx.Response:
    params = {} if dedupe is None else {"dedupe": str(dedupe).lower()}
    return client.post("/v1/teachers", headers=auth, params=params, files={"file": ("t.safetensors", content)},
                       data={**TEACHER_FORM, **form})


def dataset(client: TestClient, auth: dict[str, str], content: bytes, dedupe: bool | None = None) -> httpx.Response:
    params = {} if dedupe is None else {"dedupe": str(dedupe).lower()}
    return client.post("/v1/datasets", headers=auth, params=params, files={"file": ("d.npz", content)})


def answer(resp: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert resp.headers["location"] == f"/v1/{kind}/{body['id']}"
    return body


def test_the_same_teacher_upload_returns_the_existing_teacher(env: Env, me: dict[str, str],
                                                              teacher_file: bytes) -> None:
    first = answer(teacher(env.client, me, teacher_file), 201, "teachers")
    # an inspection that would time out proves that the repeated upload is answered before any inspection
    uninspected = env.client_with(inspect_timeout=0.001)
    again = answer(teacher(uninspected, me, teacher_file), 200, "teachers")
    assert again == first
    refused = teacher(uninspected, me, teacher_file, dedupe=False)
    assert refused.status_code == 422 and refused.json()["code"] == "teacher_inspection_timeout", refused.text

    copy = answer(teacher(env.client, me, teacher_file, dedupe=False), 201, "teachers")
    assert copy["id"] != first["id"] and copy["sha256"] == first["sha256"]
    # the newest of the equal ones answers from now on
    assert answer(teacher(uninspected, me, teacher_file), 200, "teachers")["id"] == copy["id"]

    # other given fields: another teacher, which itself answers the same upload again
    named = answer(teacher(env.client, me, teacher_file, classes=",".join("abcdefghij")), 201, "teachers")
    assert named["id"] not in (first["id"], copy["id"]) and named["classes"] == list("abcdefghij")
    assert answer(teacher(uninspected, me, teacher_file, classes='["a","b","c","d","e","f","g","h","i","j"]'),
                  200, "teachers")["id"] == named["id"], "the same names as a JSON list are the same fields"
    assert teacher(uninspected, me, teacher_file, mean="0.31").status_code == 422, "another mean: inspected"

    # another tenant's teacher is never returned
    assert answer(teacher(env.client, key_of_new_tenant(env), teacher_file), 201, "teachers")["id"] not in (
        first["id"], copy["id"], named["id"])

    # a deleted teacher is never returned
    for ident in (copy["id"], first["id"]):
        assert env.client.delete(f"/v1/teachers/{ident}", headers=me).status_code == 204
    assert teacher(uninspected, me, teacher_file).status_code == 422, "no live equal teacher: inspected"


def test_the_same_dataset_file_returns_the_existing_dataset(env: Env, me: dict[str, str], npz4_file: bytes) -> None:
    first = answer(dataset(env.client, me, npz4_file), 201, "datasets")
    uninspected = env.client_with(inspect_timeout=0.001)
    assert answer(dataset(uninspected, me, npz4_file), 200, "datasets") == first
    copy = answer(dataset(env.client, me, npz4_file, dedupe=False), 201, "datasets")
    assert copy["id"] != first["id"]
    assert answer(dataset(env.client, key_of_new_tenant(env), npz4_file), 201, "datasets")["id"] not in (
        first["id"], copy["id"])
    for ident in (copy["id"], first["id"]):
        assert env.client.delete(f"/v1/datasets/{ident}", headers=me).status_code == 204
    assert dataset(uninspected, me, npz4_file).status_code == 422, "no live equal dataset: inspected"


def test_dedupe_is_documented(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/teachers", "/v1/datasets"):
        post = paths[path]["post"]
        param = next(p for p in post["parameters"] if p["name"] == "dedupe")
        assert param["in"] == "query" and param["schema"]["default"] is True and "sha256" in param["description"]
        assert {"200", "201"} <= set(post["responses"])
    for path, methods in (("/v1/teachers/{teacher_id}", {"get", "delete"}),
                          ("/v1/datasets/{dataset_id}", {"get", "delete"}),
                          ("/v1/jobs/{job_id}", {"get", "delete"}),
                          ("/v1/jobs/{job_id}/artifacts/{name}", {"get", "head"})):
        assert methods <= set(paths[path]), path
