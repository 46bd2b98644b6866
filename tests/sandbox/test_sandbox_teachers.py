"""Hostile TorchScript teachers against the real service: uploads through the API (inspection child) and a
job through the supervisor (training child), on SQLite. They are stopped with a clear code and nothing
outside their folder changes; ordinary uploads and jobs still pass."""

from __future__ import annotations

import io
import os
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sandbox_support import ReadsFile, WritesFile, scripted, sha256

from app.db import session_scope
from app.keys import create_key, get_or_create_tenant
from app.main import create_app
from app.migrate import upgrade
from app.models import Dataset, Job, Teacher
from app.settings import Settings
from app.storage import get_store
from worker import landlock
from worker.distill.students import create_model
from worker.supervisor import Supervisor

pytestmark = pytest.mark.skipif(landlock.abi_version() < 1, reason="needs Landlock")
FORM = {"input_channels": "1", "input_size": "8", "mean": "0.5", "std": "0.25"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sandbox-service")
    settings = Settings(data_dir=root / "data", auth="required", inspect_timeout=120, allowed_hosts="*",
                        default_queue="sandboxtest")
    settings.data_dir.mkdir()
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        key = create_key(s, "sandbox", "tests")
    canary = root / "canary.bin"
    canary.write_bytes(os.urandom(4096))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield {"settings": settings, "client": client, "auth": {"Authorization": f"Bearer {key}"},
               "canary": canary, "db": settings.data_dir / "kdistill.db"}


NEW = {"dedupe": "false"}  # every upload is inspected again, even a file this tenant sent before


def upload(service: dict, content: bytes, name: str, **form: str):
    return service["client"].post("/v1/teachers", headers=service["auth"], data={**FORM, **form}, params=NEW,
                                  files={"file": (name, content, "application/octet-stream")})


def test_the_hostile_teachers_work_when_nothing_confines_them(tmp_path):
    decoy = tmp_path / "decoy.bin"
    decoy.write_bytes(b"x" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = torch.jit.load(io.BytesIO(scripted(WritesFile(str(decoy)))))
        reader = torch.jit.load(io.BytesIO(scripted(ReadsFile(str(decoy)))))
    writer(torch.zeros(2, 1, 8, 8))
    assert decoy.read_bytes() == b"A" * 64  # the attack is real
    assert reader(torch.zeros(2, 1, 8, 8))[0, 0].item() == ord("A")


@pytest.mark.parametrize("attack", ["write_canary", "write_db", "read_db"])
def test_a_hostile_torchscript_upload_is_refused_and_changes_nothing(service, attack):
    target = service["canary"] if attack == "write_canary" else service["db"]
    module = WritesFile(str(target)) if attack.startswith("write") else ReadsFile(str(target))
    service["client"].get("/v1/teachers", headers=service["auth"])  # anything the API itself writes, first
    before = sha256(service["canary"]), sha256(service["db"])
    resp = upload(service, scripted(module), "teacher.pt")
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "sandbox_violation" and "Permission denied" in body["message"], body
    assert (sha256(service["canary"]), sha256(service["db"])) == before
    assert service["client"].get("/v1/teachers", headers=service["auth"]).json()["items"] == []


def test_ordinary_uploads_are_inspected_in_the_sandbox(service):
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :10]

    resp = upload(service, scripted(Tiny()), "tiny.pt")
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "torchscript" and resp.json()["num_classes"] == 10
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8), y=np.arange(200) % 4)
    resp = service["client"].post("/v1/datasets", headers=service["auth"], params=NEW,
                                  files={"file": ("d.npz", buf.getvalue(), "application/octet-stream")})
    assert resp.status_code == 201, resp.text
    assert resp.json()["num_classes"] == 4


# -- jobs -------------------------------------------------------------------------------------------------------
def add_job(settings: Settings, job_id: str, teacher_file: Path, fmt: str, arch: str | None) -> None:
    store = get_store(settings)
    rng = np.random.default_rng(0)
    data = teacher_file.parent / "d.npz"
    np.savez(data, x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8), y=np.arange(200) % 4)
    store.put_file(f"teachers/{job_id}/{teacher_file.name}", teacher_file)
    store.put_file(f"datasets/{job_id}/d.npz", data)
    with session_scope(settings.resolved_database_url) as s:
        tenant = get_or_create_tenant(s, "jobs")
        s.add(Teacher(id=f"tch_{job_id}", tenant_id=tenant.id, filename=teacher_file.name, format=fmt, arch=arch,
                      num_classes=4, input_channels=1, input_size=[8, 8], mean=[0.5], std=[0.5],
                      sha256=sha256(teacher_file), size_bytes=teacher_file.stat().st_size,
                      storage_key=f"teachers/{job_id}/{teacher_file.name}"))
        s.add(Dataset(id=f"ds_{job_id}", tenant_id=tenant.id, filename="d.npz", format="npz", classes=list("abcd"),
                      num_classes=4, num_train=160, num_val=40, num_unlabeled=0, channels=1, image_size=[8, 8],
                      val_source="split", sha256=sha256(data), size_bytes=data.stat().st_size,
                      storage_key=f"datasets/{job_id}/d.npz"))
        s.flush()
        s.add(Job(id=job_id, tenant_id=tenant.id, teacher_id=f"tch_{job_id}", dataset_id=f"ds_{job_id}",
                  queue="cpu", request_hash=job_id,
                  request={"student": {"arch": "resnet8"}, "export_formats": ["onnx"],
                           "hyperparameters": {"epochs": 1, "batch_size": 32, "device": "cpu"},
                           "checks": {"teacher": "warn"}}))


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def test_a_hostile_torchscript_job_fails_and_changes_nothing(service, tmp_path):
    settings, db = service["settings"], service["db"]
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(scripted(WritesFile(str(db), size=100)))  # overwrite the database's header
    add_job(settings, "job_hostile", teacher, "torchscript", None)
    canary = sha256(service["canary"])
    Supervisor(settings, "job_hostile", "sandbox-test").run()
    job = job_row(settings, "job_hostile")
    assert job.status == "failed" and job.error_code == "sandbox_violation", (job.error_code, job.error_message)
    assert sha256(service["canary"]) == canary
    assert db.read_bytes()[:16] == b"SQLite format 3\0"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    log = (settings.jobs_dir / "job_hostile" / "child.log").read_text()
    assert "sandbox: landlock ABI" in log


@pytest.mark.slow
def test_an_ordinary_job_trains_and_exports_in_the_sandbox(service, tmp_path):
    settings = service["settings"]
    teacher = tmp_path / "teacher.safetensors"
    save_file(create_model("resnet8", num_classes=4, in_channels=1).state_dict(), str(teacher))
    add_job(settings, "job_plain", teacher, "safetensors", "resnet8")
    Supervisor(settings, "job_plain", "sandbox-test").run()
    job = job_row(settings, "job_plain")
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert "sandbox: landlock ABI" in (settings.jobs_dir / "job_plain" / "child.log").read_text()
