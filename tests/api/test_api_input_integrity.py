"""A worker hands the training child only teacher and dataset files whose sha256 is the one recorded at upload:
a bad cached copy is fetched again, a bad stored object fails the job with `input_corrupted`. With the local
store (the files themselves) and with S3 (moto's server over HTTP, and the per-machine cache)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from api_support import TEACHER_FORM, Env, created, job_body
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.db import session_scope
from app.models import Dataset, Job, Teacher
from app.settings import Settings
from app.storage import InputCorrupted, get_store, sha256_of, verified_local_path
from worker.supervisor import Supervisor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Inputs:
    settings: Settings
    client: TestClient
    teacher: dict
    dataset: dict
    teacher_bytes: bytes
    dataset_bytes: bytes
    auth: dict[str, str]

    def new_job(self) -> str:
        resp = self.client.post("/v1/jobs", headers=self.auth, json=job_body(self.teacher["id"], self.dataset["id"]))
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def run(self, job_id: str) -> dict:
        Supervisor(self.settings, job_id, "integrity-test").run()
        return self.client.get(f"/v1/jobs/{job_id}", headers=self.auth).json()

    def spec_paths(self, job_id: str) -> tuple[Path, Path]:
        with session_scope(self.settings.resolved_database_url) as s:
            job = s.get(Job, job_id)
            spec = Supervisor(self.settings, job_id, "integrity-test")._spec(
                job, s.get(Teacher, job.teacher_id), s.get(Dataset, job.dataset_id))
        return Path(spec.teacher.path), Path(spec.data.path)


def _inputs(env: Env, client: TestClient, settings: Settings, teacher_file: bytes, npz10_file: bytes) -> Inputs:
    teacher = created(env.upload_teacher(teacher_file, "integrity.safetensors", client=client, **TEACHER_FORM),
                      teacher_file).body
    dataset = created(env.upload_dataset(npz10_file, "integrity.npz", client=client), npz10_file).body
    return Inputs(settings, client, teacher, dataset, teacher_file, npz10_file, env.auth("a"))


@pytest.fixture(scope="module")
def local_inputs(env: Env, teacher_file: bytes, npz10_file: bytes) -> Inputs:
    return _inputs(env, env.client, env.settings, teacher_file, npz10_file)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
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


@pytest.fixture(scope="module")
def s3_inputs(env: Env, moto_url: str, teacher_file: bytes, npz10_file: bytes,
              tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    overrides = {"artifact_store": "s3", "s3_endpoint_url": moto_url, "s3_bucket": f"kd-{secrets.token_hex(4)}",
                 "s3_access_key_id": "testing", "s3_secret_access_key": SecretStr("testing"),
                 "data_dir": tmp_path_factory.mktemp("s3-worker")}  # the cache lives in data_dir/cache
    client = env.client_with(**overrides)  # its start-up creates the bucket
    return _inputs(env, client, env.settings.model_copy(update=overrides), teacher_file, npz10_file)


def _key(env: Env, model: type, ident: str) -> str:
    with session_scope(env.db_url) as s:
        return s.get(model, ident).storage_key


# ---------------------------------------------------------------------------------------------- local store

@pytest.mark.parametrize("what", ["teacher", "dataset"])
def test_a_changed_file_in_the_local_store_fails_the_job_as_input_corrupted(env: Env, local_inputs: Inputs,
                                                                           what: str) -> None:
    model, obj = (Teacher, local_inputs.teacher) if what == "teacher" else (Dataset, local_inputs.dataset)
    path = env.settings.store_dir / _key(env, model, obj["id"])
    original = path.read_bytes()
    job_id = local_inputs.new_job()
    with path.open("r+b") as f:  # one byte flipped in place, as a bad disk would
        f.seek(len(original) // 2)
        f.write(bytes([original[len(original) // 2] ^ 0xFF]))
    try:
        done = local_inputs.run(job_id)
    finally:
        path.write_bytes(original)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "input_corrupted"
    assert f"{what} {obj['id']}" in done["error"]["message"] and "upload it again" in done["error"]["message"]
    # the store holds the uploaded bytes again: the same inputs pass the check
    teacher_path, dataset_path = local_inputs.spec_paths(local_inputs.new_job())
    assert sha256_of(teacher_path) == local_inputs.teacher["sha256"]
    assert sha256_of(dataset_path) == local_inputs.dataset["sha256"]


# ---------------------------------------------------------------------------------------------- S3 and its cache

def test_a_bad_cached_copy_from_s3_is_fetched_again(env: Env, s3_inputs: Inputs) -> None:
    job_id = s3_inputs.new_job()
    teacher_path, dataset_path = s3_inputs.spec_paths(job_id)
    cache = s3_inputs.settings.cache_dir.resolve()
    assert teacher_path.is_relative_to(cache) and dataset_path.is_relative_to(cache)
    assert teacher_path.read_bytes() == s3_inputs.teacher_bytes
    teacher_path.write_bytes(b"not the teacher")  # a bad copy in the cache
    with dataset_path.open("r+b") as f:  # a download cut short
        f.truncate(100)
    again = s3_inputs.spec_paths(job_id)
    assert again == (teacher_path, dataset_path)
    assert teacher_path.read_bytes() == s3_inputs.teacher_bytes
    assert dataset_path.read_bytes() == s3_inputs.dataset_bytes


def test_a_bad_object_in_s3_fails_the_job_as_input_corrupted(env: Env, s3_inputs: Inputs) -> None:
    settings = s3_inputs.settings
    key = _key(env, Dataset, s3_inputs.dataset["id"])
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"someone else's bytes")
    cached = settings.cache_dir.resolve() / key
    if cached.exists():  # a good copy in the cache is used as it is; make this machine fetch it
        cached.write_bytes(b"a bad copy")
    try:
        job_id = s3_inputs.new_job()
        done = s3_inputs.run(job_id)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "input_corrupted"
        assert f"dataset {s3_inputs.dataset['id']}" in done["error"]["message"]
        assert not cached.exists()  # no bad copy is left in the cache
        with pytest.raises(InputCorrupted):
            verified_local_path(get_store(settings), key, s3_inputs.dataset["sha256"], "dataset")
    finally:
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=s3_inputs.dataset_bytes)
