"""GET /v1/jobs/{id}/artifacts/{name}: streamed bytes, Content-Length, ETag and conditional requests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from api_support import Env, assert_error, finish_job, store_artifact


@pytest.fixture
def artifact(env: Env, job_a: dict, tmp_path: Path) -> tuple[dict, str, bytes]:
    """A 2.5 MB ONNX artifact (several store chunks) of a job of tenant A, put in the store by hand."""
    content = os.urandom((5 << 20) // 2)
    name = store_artifact(env.settings, env.db_url, job_a["id"], content, tmp_path)
    finish_job(env.db_url, job_a["id"])
    return job_a, name, content


def test_download_artifact(env: Env, artifact: tuple[dict, str, bytes]) -> None:
    job, name, content = artifact
    resp = env.client.get(f"/v1/jobs/{job['id']}/artifacts/{name}", headers=env.auth("a"))
    assert resp.status_code == 200, resp.text[:300]
    assert resp.content == content
    assert resp.headers["content-length"] == str(len(content))
    assert resp.headers["etag"] == f'"{hashlib.sha256(content).hexdigest()}"'


def test_if_none_match_is_304(env: Env, artifact: tuple[dict, str, bytes]) -> None:
    job, name, content = artifact
    url = f"/v1/jobs/{job['id']}/artifacts/{name}"
    etag = f'"{hashlib.sha256(content).hexdigest()}"'
    resp = env.client.get(url, headers={**env.auth("a"), "If-None-Match": etag})
    assert resp.status_code == 304
    assert resp.content == b""
    assert resp.headers["etag"] == etag
    stale = env.client.get(url, headers={**env.auth("a"), "If-None-Match": '"0123"'})
    assert stale.status_code == 200 and stale.content == content


def test_job_lists_its_artifacts(env: Env, artifact: tuple[dict, str, bytes]) -> None:
    job, name, content = artifact
    got = env.client.get(f"/v1/jobs/{job['id']}", headers=env.auth("a")).json()
    assert len(got["artifacts"]) == 1
    listed = got["artifacts"][0]
    assert listed["name"] == name and listed["format"] == "onnx"
    assert listed["size_bytes"] == len(content)
    assert listed["sha256"] == hashlib.sha256(content).hexdigest()


def test_unknown_artifact_is_404(env: Env, artifact: tuple[dict, str, bytes]) -> None:
    job, _, _ = artifact
    resp = env.client.get(f"/v1/jobs/{job['id']}/artifacts/student.pt2", headers=env.auth("a"))
    assert_error(resp, 404, "artifact_not_found")


def test_artifact_of_unknown_job_is_404(env: Env) -> None:
    resp = env.client.get("/v1/jobs/job_nope/artifacts/student.onnx", headers=env.auth("a"))
    assert_error(resp, 404, "job_not_found")
