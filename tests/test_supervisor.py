"""The supervisor on its own (no broker): a real training child, a real SQLite database."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from safetensors.torch import save_file

from app.db import session_scope
from app.jobs import job_view
from app.keys import get_or_create_tenant
from app.migrate import upgrade
from app.models import Dataset, Job, JobEvent, Teacher
from app.settings import Settings
from app.storage import get_store, sha256_of
from worker.distill.students import create_model
from worker.supervisor import Supervisor, _ChildState


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
                      sha256=sha256_of(tmp_path / "t.safetensors"), size_bytes=1,
                      storage_key="teachers/tch_1/t.safetensors"))
        s.add(Dataset(id="ds_1", tenant_id=tenant.id, filename="d.npz", format="npz", classes=list("abcd"),
                      num_classes=4, num_train=320, num_val=80, num_unlabeled=0, channels=1, image_size=[8, 8],
                      val_source="split", sha256=sha256_of(tmp_path / "d.npz"), size_bytes=1,
                      storage_key="datasets/ds_1/d.npz"))
        s.flush()
        s.add(Job(id="job_1", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="cpu",
                  request_hash="x", request={"student": {"arch": "resnet8"}, "export_formats": ["onnx"],
                                             "hyperparameters": {"epochs": 400, "batch_size": 8, "device": "cpu"},
                                             # the teacher is untrained: near chance, which fails a job by default
                                             "checks": {"teacher": "warn"}}))
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

    def training() -> bool:
        now = job(settings)
        assert now["status"] in ("queued", "running"), f"the job ended before training: {now['error']}"
        return now["progress"].get("step", 0) > 0

    wait_for(training)
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
    sup._succeed(forged)
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


def _warning_line(code: str, message: str) -> str:
    return json.dumps({"type": "event", "kind": "warning", "message": message, "data": {"code": code}})


def test_the_spec_carries_teacher_names_test_fraction_and_checks(deployment):
    with session_scope(deployment.resolved_database_url) as s:
        s.get(Teacher, "tch_1").classes = ["d", "c", "b", "a"]
        j = s.get(Job, "job_1")
        j.request = {**j.request, "data": {"val_fraction": 0.25, "test_fraction": 0.2, "augment": False},
                     "checks": {"teacher": "warn"}}
    sup = Supervisor(deployment, "job_1", "worker-a")
    with session_scope(deployment.resolved_database_url) as s:
        j = s.get(Job, "job_1")
        spec = sup._spec(j, s.get(Teacher, "tch_1"), s.get(Dataset, "ds_1"))
    assert spec.teacher.classes == ["d", "c", "b", "a"]
    assert spec.data.val_fraction == 0.25 and spec.data.test_fraction == 0.2
    assert spec.checks.teacher == "warn"
    # a request from before these fields: no names, no test split, the teacher check fails the job
    with session_scope(deployment.resolved_database_url) as s:
        s.get(Teacher, "tch_1").classes = None
        j = s.get(Job, "job_1")
        j.request = {k: v for k, v in j.request.items() if k not in ("data", "checks")}
        spec = sup._spec(j, s.get(Teacher, "tch_1"), s.get(Dataset, "ds_1"))
    assert spec.teacher.classes is None and spec.data.test_fraction == 0 and spec.checks.teacher == "fail"


def test_warnings_are_recorded_as_they_come_once_each_and_a_failed_job_keeps_them(deployment):
    sup = Supervisor(deployment, "job_1", "worker-a")
    assert sup.claim()
    state = _ChildState(started=time.monotonic())
    sup._handle_line(_warning_line("teacher_not_predictive", "near chance"), state)
    assert job(deployment)["warnings"] == [{"code": "teacher_not_predictive", "message": "near chance"}]
    sup._handle_line(_warning_line("teacher_not_predictive", "near chance"), state)  # the same again
    sup._handle_line(_warning_line("few_labels", "only 8 labelled samples"), state)
    sup._handle_line(json.dumps({"type": "event", "kind": "info", "message": "not a warning", "data": {}}), state)
    expected = [{"code": "teacher_not_predictive", "message": "near chance"},
                {"code": "few_labels", "message": "only 8 labelled samples"}]
    assert job(deployment)["warnings"] == expected
    sup._handle_line(json.dumps({"type": "error", "code": "export_mismatch", "message": "the ONNX file disagrees"}),
                     state)
    sup._conclude(2, state, 100.0)
    done = job(deployment)
    assert done["status"] == "failed" and done["error"]["code"] == "export_mismatch"
    assert done["warnings"] == expected
    with session_scope(deployment.resolved_database_url) as s:
        kinds = [e.kind for e in s.query(JobEvent).filter(JobEvent.job_id == "job_1").order_by(JobEvent.id)]
    assert kinds.count("warning") == 3, "every warning line stays in the timeline"


def test_a_succeeded_job_takes_the_warnings_of_the_result(deployment):
    sup = Supervisor(deployment, "job_1", "worker-a")
    assert sup.claim()
    state = _ChildState(started=time.monotonic())
    sup._handle_line(_warning_line("teacher_not_predictive", "near chance"), state)
    (sup.job_dir / "out").mkdir(parents=True)
    result = {"artifacts": [], "metrics": {"student_accuracy": 0.5}, "warnings": [
        {"code": "teacher_not_predictive", "message": "near chance"},
        {"code": "small_test_split", "message": "12 test samples: wide intervals"}]}
    sup._succeed(result)
    done = job(deployment)
    assert done["status"] == "succeeded"
    assert done["warnings"] == result["warnings"]


def test_a_teacher_near_chance_only_warns_with_checks_warn(deployment):
    """A real run: an untrained teacher fails the teacher check; `checks.teacher: warn` turns that into a
    warning on the job, recorded while it runs, and the job still succeeds."""
    with session_scope(deployment.resolved_database_url) as s:
        j = s.get(Job, "job_1")
        j.request = {**j.request, "hyperparameters": {"epochs": 1, "batch_size": 64, "device": "cpu"},
                     "checks": {"teacher": "warn"}}
    Supervisor(deployment, "job_1", "worker-a").run()
    done = job(deployment)
    assert done["status"] == "succeeded", done["error"]
    assert "teacher_not_predictive" in [w["code"] for w in done["warnings"]], done["warnings"]
    with session_scope(deployment.resolved_database_url) as s:
        events = s.query(JobEvent).filter(JobEvent.job_id == "job_1", JobEvent.kind == "warning").all()
        assert any(e.data.get("code") == "teacher_not_predictive" for e in events)


def test_a_copy_whose_lease_was_taken_over_publishes_no_artifact_even_under_the_same_worker_name(deployment):
    stale = Supervisor(deployment, "job_1", "worker-a")
    assert stale.claim()
    with session_scope(deployment.resolved_database_url) as s:  # silent past STALE_AFTER (a long outage, say)
        s.get(Job, "job_1").heartbeat_at = None
    fresh = Supervisor(deployment, "job_1", "worker-a")  # the same worker, restarted
    assert fresh.claim() and fresh.lease.attempt == 2
    (stale.job_dir / "out").mkdir(parents=True)
    (stale.job_dir / "out" / "metadata.json").write_text("{}")
    result = {"artifacts": [{"name": "metadata.json", "format": "json",
                             "sha256": sha256_of(stale.job_dir / "out" / "metadata.json")}], "metrics": {"x": 1}}
    stale._succeed(result)
    after = job(deployment)
    assert (after["status"], after["attempts"], after["artifacts"], after["metrics"]) == ("running", 2, [], {})
    assert not (deployment.store_dir / "jobs" / "job_1" / "1").exists(), "the stale copy's uploads are removed"
    fresh._succeed(result)
    done = job(deployment)
    assert done["status"] == "succeeded" and [a["name"] for a in done["artifacts"]] == ["metadata.json"]
    with session_scope(deployment.resolved_database_url) as s:
        events = [e.message for e in s.query(JobEvent).filter(JobEvent.job_id == "job_1", JobEvent.kind == "status")]
    assert events.count("succeeded") == 1


def test_a_bug_that_raises_not_implemented_fails_the_job_instead_of_passing_for_a_stopping_worker(deployment,
                                                                                                 monkeypatch):
    def broken(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError("a code path nobody wrote")

    monkeypatch.setattr(Supervisor, "_supervise", broken)
    Supervisor(deployment, "job_1", "worker-a").run()
    done = job(deployment)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_error", done
    assert "NotImplementedError" in done["error"]["message"]
