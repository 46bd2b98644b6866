"""The supervisor on its own (no broker): a real training child, a real SQLite database."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from safetensors.torch import save_file

from app.db import session_scope
from app.jobs import job_view
from app.keys import get_or_create_tenant
from app.migrate import upgrade
from app.models import Dataset, Job, Teacher
from app.settings import Settings
from app.storage import get_store
from worker.distill.students import create_model
from worker.supervisor import Supervisor


@pytest.fixture
def deployment(tmp_path):
    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.2, progress_interval=0.2, cancel_grace=2)
    upgrade(settings.resolved_database_url)
    model = create_model("resnet8", num_classes=4, in_channels=1)
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (400, 8, 8), dtype=np.uint8), y=np.arange(400) % 4)
    store = get_store(settings)
    store.put_file("teachers/tch_1/t.safetensors", tmp_path / "t.safetensors")
    store.put_file("datasets/ds_1/d.npz", tmp_path / "d.npz")
    with session_scope(settings.resolved_database_url) as s:
        tenant = get_or_create_tenant(s, "t")
        s.add(Teacher(id="tch_1", tenant_id=tenant.id, filename="t.safetensors", format="safetensors",
                      arch="resnet8", num_classes=4, input_channels=1, input_size=[8, 8], mean=[0.5], std=[0.5],
                      sha256="0" * 64, size_bytes=1, storage_key="teachers/tch_1/t.safetensors"))
        s.add(Dataset(id="ds_1", tenant_id=tenant.id, filename="d.npz", format="npz", classes=list("abcd"),
                      num_classes=4, num_train=320, num_val=80, num_unlabeled=0, channels=1, image_size=[8, 8],
                      val_source="split", sha256="0" * 64, size_bytes=1, storage_key="datasets/ds_1/d.npz"))
        s.flush()
        s.add(Job(id="job_1", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="cpu",
                  request_hash="x", request={"student": {"arch": "resnet8"}, "export_formats": ["onnx"],
                                             "hyperparameters": {"epochs": 400, "batch_size": 8, "device": "cpu"}}))
    return settings


def job(settings: Settings) -> dict:
    with session_scope(settings.resolved_database_url) as s:
        return job_view(s.get(Job, "job_1"))


def wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def start_training(settings: Settings) -> tuple[Supervisor, threading.Thread]:
    """Supervise job_1 in a thread, as a Celery task would, and return once its child is training."""
    sup = Supervisor(settings, "job_1", "worker-a")
    runner = threading.Thread(target=sup.run)
    runner.start()
    wait_for(lambda: job(settings)["progress"].get("step", 0) > 0)
    return sup, runner


def test_a_copy_that_lost_its_job_to_another_worker_stops_training_and_writes_nothing(deployment):
    sup, runner = start_training(deployment)
    with session_scope(deployment.resolved_database_url) as s:
        s.get(Job, "job_1").worker = "worker-b"  # as a takeover after a stale heartbeat would
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert sup.proc is not None and sup.proc.poll() is not None  # the training process is gone
    after = job(deployment)
    assert after["status"] == "running" and after["worker"] == "worker-b"  # left to its new owner


def test_cancel_reaches_the_child_and_ends_the_job_cancelled(deployment):
    sup, runner = start_training(deployment)
    with session_scope(deployment.resolved_database_url) as s:
        s.get(Job, "job_1").cancel_requested = True
    runner.join(timeout=60)
    assert job(deployment)["status"] == "cancelled"
    assert sup.proc.poll() is not None


def test_artifact_names_from_the_child_cannot_choose_a_store_key(deployment):
    sup = Supervisor(deployment, "job_1", "worker-a")
    assert sup.claim()
    (sup.job_dir / "out").mkdir(parents=True)
    (sup.job_dir / "out" / "evil").write_bytes(b"x")
    forged = {"artifacts": [{"name": "../../teachers/tch_1/t.safetensors", "format": "onnx", "sha256": "0"}],
              "metrics": {}}
    with session_scope(deployment.resolved_database_url) as s:
        sup._store_artifacts(s, s.get(Job, "job_1"), forged)
    done = job(deployment)
    assert done["status"] == "failed" and done["error"]["code"] == "artifact_rejected"
    assert (deployment.store_dir / "teachers/tch_1/t.safetensors").read_bytes() != b"x"


def test_the_deployment_limit_caps_a_longer_requested_run_time(deployment):
    settings = deployment.model_copy(update={"job_max_seconds": 3.0})
    with session_scope(settings.resolved_database_url) as s:
        j = s.get(Job, "job_1")
        j.request = {**j.request, "max_run_seconds": 10**9}
    Supervisor(settings, "job_1", "worker-a").run()
    done = job(settings)
    assert done["status"] == "failed" and done["error"]["code"] == "job_timeout"
