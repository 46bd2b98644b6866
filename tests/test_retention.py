"""KDISTILL_RETENTION_DAYS: a real `kdistill serve` trains a job, serves its artifacts (HEAD through `curl -I`,
a byte range), and its periodic sweep removes them once the job is old enough (410 afterwards, an event says
why); and `expire_artifacts` passes run at once on PostgreSQL remove each job's artifacts exactly once."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import Server, _env
from services import fresh_postgres
from sqlalchemy import func, select

from app.db import session_scope
from app.migrate import upgrade
from app.models import Artifact, Dataset, Job, JobEvent, Teacher, Tenant, utcnow
from app.retention import expire_artifacts
from app.settings import Settings
from app.storage import get_store

RETENTION_DAYS = "0.0001"  # 8.6 s: room to read the artifacts first, on a busy machine too
FORM = {"arch": "resnet20", "num_classes": "10", "input_channels": "1", "input_size": "8", "mean": "0.3",
        "std": "0.37"}


def wait_for(what: str, check: Any, timeout: float, server: Server) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what}: not after {timeout} s\n{server.output()[-3000:]}")


@pytest.mark.slow
def test_a_real_server_expires_the_artifacts_of_old_jobs(tmp_path: Path, example_dir: Path) -> None:
    server = Server.start(tmp_path, env=_env(KDISTILL_RETENTION_DAYS=RETENTION_DAYS, KDISTILL_SWEEP_INTERVAL="1",
                                             OMP_NUM_THREADS="1"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with (example_dir / "teacher.safetensors").open("rb") as f:
                teacher = c.post("/v1/teachers", files={"file": ("teacher.safetensors", f)}, data=FORM)
            with (example_dir / "digits.npz").open("rb") as f:
                dataset = c.post("/v1/datasets", files={"file": ("digits.npz", f)})
            assert teacher.status_code == 201 and dataset.status_code == 201, (teacher.text, dataset.text)
            job = c.post("/v1/jobs", json={
                "teacher_id": teacher.json()["id"], "dataset_id": dataset.json()["id"],
                "student": {"arch": "resnet8"}, "export_formats": ["onnx"],
                "hyperparameters": {"epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"}}).json()
            url = f"/v1/jobs/{job['id']}/artifacts/student.onnx"
            job = wait_for("the job to finish", lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] in (
                "succeeded", "failed", "cancelled") and j, 240, server)
            assert job["status"] == "succeeded", job["error"]
            store = server.data_dir / "store" / "jobs" / job["id"]

            head = subprocess.run(["curl", "-sS", "-I", server.url + url], capture_output=True, text=True,
                                  timeout=30)
            lines = head.stdout.splitlines()
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            assert lines[0].split()[1] == "200", head.stdout + head.stderr
            whole = c.get(url)
            assert whole.status_code == 200 and headers["content-length"] == str(len(whole.content))
            assert headers["accept-ranges"] == "bytes" and headers["etag"] == whole.headers["etag"]
            assert headers["content-type"] == "application/onnx"
            part = c.get(url, headers={"Range": "bytes=100-"})
            assert part.status_code == 206 and part.content == whole.content[100:]
            assert any(p.is_file() for p in store.rglob("*"))

            job = wait_for("the artifacts to expire",
                           lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["artifacts_expired_at"] and j,
                           60, server)
            assert job["artifacts"] == []
            assert not store.exists() or not any(p.is_file() for p in store.rglob("*")), "its files are removed"
            gone = c.get(url)
            assert gone.status_code == 410 and gone.json()["code"] == "artifacts_expired", gone.text
            assert "KDISTILL_RETENTION_DAYS" in gone.json()["message"]
            assert c.head(url).status_code == 410
            events = c.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["items"]
            expired = [e for e in events if e["kind"] == "artifacts_expired"]
            assert len(expired) == 1, events
            assert f"KDISTILL_RETENTION_DAYS={RETENTION_DAYS}" in expired[0]["message"]
            assert "student.onnx" in expired[0]["message"]
    finally:
        server.stop()


def test_concurrent_passes_expire_each_job_once(tmp_path: Path) -> None:
    with fresh_postgres() as url:
        upgrade(url)
        settings = Settings(data_dir=tmp_path / "data", database_url=url, retention_days=1)
        store = get_store(settings)
        source = tmp_path / "student.onnx"
        source.write_bytes(b"onnx")
        old, recent = utcnow() - timedelta(days=2), utcnow() - timedelta(hours=1)
        with session_scope(url) as s:
            tenant = Tenant(name="retention")
            s.add(tenant)
            s.flush()
            common = dict(tenant_id=tenant.id, filename="f", format="x", sha256="0" * 64, size_bytes=1,
                          storage_key="k")
            s.add(Teacher(id="tch_r", arch="a", num_classes=2, input_channels=1, input_size=[8, 8], mean=[0.5],
                          std=[0.5], **common))
            s.add(Dataset(id="ds_r", classes=["a", "b"], num_classes=2, num_train=1, num_val=1, num_unlabeled=0,
                          channels=1, image_size=[8, 8], val_source="given", **common))
            s.flush()
            for i in range(30):
                job_id = f"job_r{i:02d}"
                s.add(Job(id=job_id, tenant_id=tenant.id, teacher_id="tch_r", dataset_id="ds_r", queue="q",
                          request={}, request_hash="h", status="succeeded" if i < 28 else "running",
                          finished_at=old if i < 25 else recent if i < 28 else None))
                s.flush()
                key = f"jobs/{job_id}/1/student.onnx"
                store.put_file(key, source)
                s.add(Artifact(job_id=job_id, name="student.onnx", format="onnx", size_bytes=4, sha256="0" * 64,
                               storage_key=key))

        results: list[list[str]] = []

        def one_pass() -> None:
            with session_scope(url) as s:
                results.append(expire_artifacts(s, settings, store))

        threads = [threading.Thread(target=one_pass) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        expired = [j for r in results for j in r]
        assert len(results) == 3 and sorted(expired) == [f"job_r{i:02d}" for i in range(25)], results
        with session_scope(url) as s:
            events = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.kind == "artifacts_expired"))
            left = set(s.scalars(select(Artifact.job_id)))
            marked = set(s.scalars(select(Job.id).where(Job.artifacts_expired_at.is_not(None))))
        assert events == 25 and marked == set(expired)
        assert left == {f"job_r{i:02d}" for i in range(25, 30)}, "recent and running jobs keep theirs"
        on_disk = {p.parts[-3] for p in settings.store_dir.rglob("student.onnx")}
        assert on_disk == left
        with session_scope(url) as s:
            assert expire_artifacts(s, settings, store) == []
            assert expire_artifacts(s, settings.model_copy(update={"retention_days": 0}), store) == []
