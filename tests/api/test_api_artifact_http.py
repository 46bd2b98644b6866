"""GET/HEAD /v1/jobs/{id}/artifacts/{name}: HEAD, single byte ranges (206, 416, If-Range), and the errors of a
job that is not finished (409), an unknown name (404 listing the names), expired artifacts (410), and the
not-found wording with API keys on and off."""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import Env, store_artifact
from pydantic import SecretStr
from service_support import free_port
from sqlalchemy import update

from app.db import session_scope
from app.models import Artifact, Job, utcnow
from app.settings import Settings
from app.storage import CHUNK, ArtifactStore, LocalStore, S3Store, get_store

SIZE = (5 << 20) // 2  # 2.5 MB: three store chunks of 1 MiB


def error_of(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The flat JSON error, extra fields allowed (api_support.assert_error knows only code/message/field)."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers["content-type"]
    body = resp.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], body
    return body


def finish(env: Env, job_id: str, **values: Any) -> None:
    """Mark a job succeeded (or as `values` say), as its worker would once its artifacts are published."""
    with session_scope(env.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values({"status": "succeeded", "finished_at": utcnow(),
                                                               **values}))


@pytest.fixture
def done(env: Env, job_a: dict, tmp_path: Path) -> tuple[str, bytes]:
    """A succeeded job of tenant A with a 2.5 MB student.onnx and a small metadata.json."""
    content = os.urandom(SIZE)
    store_artifact(env.settings, env.db_url, job_a["id"], content, tmp_path)
    store_artifact(env.settings, env.db_url, job_a["id"], b'{"a": 1}', tmp_path, name="metadata.json")
    finish(env, job_a["id"])
    return f"/v1/jobs/{job_a['id']}/artifacts/student.onnx", content


def test_head_answers_the_headers_of_a_get_without_the_body(env: Env, done: tuple[str, bytes]) -> None:
    url, content = done
    head = env.client.head(url, headers=env.auth("a"))
    get = env.client.get(url, headers=env.auth("a"))
    assert head.status_code == 200 and head.content == b""
    assert get.status_code == 200 and get.content == content
    for name in ("content-length", "etag", "accept-ranges", "content-type", "content-disposition"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["content-length"] == str(SIZE)
    assert head.headers["etag"] == f'"{hashlib.sha256(content).hexdigest()}"'
    assert head.headers["accept-ranges"] == "bytes" and head.headers["content-type"] == "application/onnx"
    missing = env.client.head(url.replace("student.onnx", "nothing.bin"), headers=env.auth("a"))
    assert missing.status_code == 404 and missing.content == b""
    # Range is for GET only: HEAD answers the whole file's headers
    ranged = env.client.head(url, headers={**env.auth("a"), "Range": "bytes=0-9"})
    assert ranged.status_code == 200 and ranged.headers["content-length"] == str(SIZE)


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-99", 0, 100),
    ("bytes=1048000-2100000", 1048000, 2100001),  # across two store chunks
    ("bytes=2000000-", 2000000, SIZE),
    ("bytes=-1000", SIZE - 1000, SIZE),
    ("bytes=-99999999", 0, SIZE),  # more than the file: all of it
    ("bytes=2621000-99999999", 2621000, SIZE),  # an end past the file is clipped
    ("BYTES = 5-5", 5, 6),
])
def test_a_single_range_is_206_with_those_bytes(env: Env, done: tuple[str, bytes], header: str, start: int,
                                                end: int) -> None:
    url, content = done
    resp = env.client.get(url, headers={**env.auth("a"), "Range": header})
    assert resp.status_code == 206, resp.text[:300]
    assert resp.content == content[start:end]
    assert resp.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert resp.headers["content-length"] == str(end - start)
    assert resp.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("header", ["bytes=0-9,20-29", "items=0-9", "bytes=9-3", "bytes=x-", "bytes=-",
                                    b"bytes=\xb2-"])  # a superscript two (latin-1) is no digit here
def test_several_or_unreadable_ranges_get_the_whole_file(env: Env, done: tuple[str, bytes],
                                                         header: str | bytes) -> None:
    url, content = done
    resp = env.client.get(url, headers={**env.auth("a"), "Range": header})
    assert resp.status_code == 200 and resp.content == content
    assert "content-range" not in resp.headers


def test_if_range_with_another_etag_gets_the_whole_file(env: Env, done: tuple[str, bytes]) -> None:
    url, content = done
    etag = f'"{hashlib.sha256(content).hexdigest()}"'
    stale = env.client.get(url, headers={**env.auth("a"), "Range": "bytes=10-19", "If-Range": '"0abc"'})
    assert stale.status_code == 200 and stale.content == content
    same = env.client.get(url, headers={**env.auth("a"), "Range": "bytes=10-19", "If-Range": etag})
    assert same.status_code == 206 and same.content == content[10:20]


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
def test_a_range_outside_the_file_is_416(env: Env, done: tuple[str, bytes], header: str) -> None:
    url, _ = done
    resp = env.client.get(url, headers={**env.auth("a"), "Range": header})
    error_of(resp, 416, "range_not_satisfiable")
    assert resp.headers["content-range"] == f"bytes */{SIZE}"


def test_artifacts_of_a_job_not_finished_are_409_with_the_status(env: Env, job_a: dict, tmp_path: Path) -> None:
    name = store_artifact(env.settings, env.db_url, job_a["id"], b"early", tmp_path)
    for status in ("queued", "running"):
        with session_scope(env.db_url) as s:
            s.execute(update(Job).where(Job.id == job_a["id"]).values(status=status))
        body = error_of(env.client.get(f"/v1/jobs/{job_a['id']}/artifacts/{name}", headers=env.auth("a")), 409,
                        "job_not_finished")
        assert body["status"] == status
        assert body["message"] == f"job {job_a['id']} is {status}; artifacts are published when it succeeds"


def test_an_unknown_name_is_404_listing_the_names(env: Env, done: tuple[str, bytes]) -> None:
    url, _ = done
    body = error_of(env.client.get(url.replace("student.onnx", "student.pt2"), headers=env.auth("a")), 404,
                    "artifact_not_found")
    assert body["available"] == ["metadata.json", "student.onnx"]
    assert "metadata.json, student.onnx" in body["message"] and "student.pt2" in body["message"]


def test_a_finished_job_without_artifacts_says_it_has_none(env: Env, job_a: dict) -> None:
    finish(env, job_a["id"], status="failed")
    body = error_of(env.client.get(f"/v1/jobs/{job_a['id']}/artifacts/student.onnx", headers=env.auth("a")), 404,
                    "artifact_not_found")
    assert body["available"] == [] and "none" in body["message"]


def test_expired_artifacts_are_410(env: Env, done: tuple[str, bytes]) -> None:
    url, _ = done
    job_id = url.split("/")[3]
    with session_scope(env.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(artifacts_expired_at=utcnow()))
    client = env.client_with(retention_days=30)
    body = error_of(client.get(url, headers=env.auth("a")), 410, "artifacts_expired")
    assert "30 day(s)" in body["message"] and "KDISTILL_RETENTION_DAYS" in body["message"]
    assert body["expired_at"].endswith("Z")
    assert client.head(url, headers=env.auth("a")).status_code == 410


def test_tensorboard_archives_are_served_as_gzip(env: Env, job_a: dict, tmp_path: Path) -> None:
    content = gzip.compress(b"events")
    (tmp_path / "tensorboard.tar.gz").write_bytes(content)
    key = f"jobs/{job_a['id']}/1/tensorboard.tar.gz"
    get_store(env.settings).put_file(key, tmp_path / "tensorboard.tar.gz")
    with session_scope(env.db_url) as s:
        s.add(Artifact(job_id=job_a["id"], name="tensorboard.tar.gz", format="tensorboard", size_bytes=len(content),
                       sha256=hashlib.sha256(content).hexdigest(), storage_key=key))
    finish(env, job_a["id"])
    resp = env.client.get(f"/v1/jobs/{job_a['id']}/artifacts/tensorboard.tar.gz", headers=env.auth("a"))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/gzip"
    assert resp.content == content


def test_not_found_says_for_this_api_key_only_when_keys_are_on(env: Env) -> None:
    with_keys = error_of(env.client.get("/v1/jobs/job_nope", headers=env.auth("a")), 404, "job_not_found")
    assert with_keys["message"] == "no job with id 'job_nope' (for this API key)"
    local = env.client_with(auth="disabled", allowed_hosts="*")
    for path, code in (("/v1/jobs/job_nope", "job_not_found"), ("/v1/teachers/tch_nope", "teacher_not_found"),
                       ("/v1/datasets/ds_nope", "dataset_not_found"),
                       ("/v1/jobs/job_nope/artifacts/x", "job_not_found")):
        body = error_of(local.get(path), 404, code)
        assert "API key" not in body["message"], body
    job = error_of(local.post("/v1/jobs", json={"teacher_id": "tch_nope", "dataset_id": "ds_nope",
                                                 "student": {"arch": "resnet8"}}), 404, "teacher_not_found")
    assert job["message"] == "no teacher with id 'tch_nope'" and job["field"] == "teacher_id"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's S3-compatible server, in its own process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "moto's server exited"
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_each_store_reads_a_byte_range(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    content = os.urandom(2 * CHUNK + 123)
    store: ArtifactStore
    if kind == "local":
        store = LocalStore(tmp_path / "store")
    else:
        settings = Settings(data_dir=tmp_path / "data", artifact_store="s3", s3_bucket=f"kd-{secrets.token_hex(4)}",
                            s3_endpoint_url=request.getfixturevalue("moto_url"), s3_access_key_id="testing",
                            s3_secret_access_key=SecretStr("testing"))
        store = S3Store(settings)
        store.ensure_bucket()
    (tmp_path / "a.bin").write_bytes(content)
    store.put_file("jobs/job_x/1/a.bin", tmp_path / "a.bin")
    for start, end in ((0, None), (0, 10), (CHUNK - 5, CHUNK + 5), (CHUNK + 1, None), (len(content) - 1, None),
                       (7, 7), (5, len(content) + 100)):
        got = b"".join(store.open_chunks("jobs/job_x/1/a.bin", start, end))
        assert got == content[start:end], (start, end)
    store.delete_prefix("jobs/job_x")
    assert not store.exists("jobs/job_x/1/a.bin")
