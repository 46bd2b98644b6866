"""End to end over HTTP: uvicorn + Celery workers + PostgreSQL + Redis, with teachers trained here."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from digits_data import DIGITS_MEAN, DIGITS_STD, few_label_npz
from torch import nn

from worker.distill.students import create_model

pytestmark = pytest.mark.slow
TERMINAL = ("succeeded", "failed", "cancelled")


def upload_teacher(c, path, **form):
    with open(path, "rb") as f:
        r = c.post("/v1/teachers", files={"file": (path.name, f)}, params={"dedupe": "false"},
                   data={"input_channels": 1, "input_size": 8, "mean": str(DIGITS_MEAN), "std": str(DIGITS_STD),
                         **form})
    assert r.status_code == 201, r.text
    return r.json()


def upload_dataset(c, path):
    with open(path, "rb") as f:
        r = c.post("/v1/datasets", files={"file": (path.name, f)}, params={"dedupe": "false"})
    assert r.status_code == 201, r.text
    return r.json()


def submit(c, teacher_id, dataset_id, **hyper):
    body = {"teacher_id": teacher_id, "dataset_id": dataset_id, "student": {"arch": "resnet8"},
            "hyperparameters": {"epochs": 6, "batch_size": 64, "learning_rate": 0.05, "device": "cpu", **hyper},
            "export_formats": ["onnx", "torchscript"]}
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def uploaded(stack, tmp_path_factory, digits, digits_teacher):
    stack.start_worker("w1")
    tmp = tmp_path_factory.mktemp("uploads")
    with stack.client() as c:
        teacher = upload_teacher(c, digits_teacher.path, arch=digits_teacher.arch)
        dataset = upload_dataset(c, few_label_npz(tmp / "digits.npz", digits, labels_per_class=10, val_per_class=10))
    assert teacher["num_classes"] == 10 and dataset["num_unlabeled"] > 1000
    return teacher, dataset


def events_of(c, job_id):
    return c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]


def test_round_trip_teacher_dataset_job_download_and_run(stack, uploaded, digits):
    teacher, dataset = uploaded
    with stack.client() as c:
        job = submit(c, teacher["id"], dataset["id"])
        assert job["status"] == "queued"
        done = stack.wait_job(job["id"], lambda j: j["status"] in TERMINAL)
        assert done["status"] == "succeeded", done
        assert done["progress"]["fraction"] == pytest.approx(1.0)
        assert done["device"].startswith("cpu") and done["attempts"] == 1
        m = done["metrics"]
        assert m["teacher_accuracy"] > 0.9 and m["student_accuracy"] > 0.85 and 0 < m["agreement"] <= 1
        names = {a["name"] for a in done["artifacts"]}
        assert {"student.onnx", "student.torchscript.pt", "metadata.json"} <= names

        files = {}
        for a in done["artifacts"]:
            r = c.get(f"/v1/jobs/{job['id']}/artifacts/{a['name']}")
            assert r.status_code == 200
            assert r.headers["etag"] == f'"{a["sha256"]}"'
            assert int(r.headers["content-length"]) == a["size_bytes"] == len(r.content)
            assert hashlib.sha256(r.content).hexdigest() == a["sha256"]
            files[a["name"]] = r.content
        kinds = [e["kind"] for e in events_of(c, job["id"])]
    assert kinds[0] == "status" and "epoch" in kinds and kinds[-1] == "status"

    (stack.data_dir / "student.onnx").write_bytes(files["student.onnx"])
    (stack.data_dir / "student.pt").write_bytes(files["student.torchscript.pt"])
    x = (digits.x_test[:, None].astype(np.float32) / 255 - DIGITS_MEAN) / DIGITS_STD
    session = ort.InferenceSession(str(stack.data_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_acc = float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == digits.y_test).mean())
    scripted = torch.jit.load(str(stack.data_dir / "student.pt"))
    with torch.inference_mode():
        ts_acc = float((scripted(torch.from_numpy(x)).argmax(1).numpy() == digits.y_test).mean())
    assert ts_acc == pytest.approx(onnx_acc, abs=0.005)
    # the job measured its validation split (100 images); the 540 held-out images agree within sampling noise
    assert onnx_acc == pytest.approx(m["student_accuracy"], abs=0.06)


def test_cancelling_a_running_job(stack, uploaded):
    teacher, dataset = uploaded
    with stack.client() as c:
        job = submit(c, teacher["id"], dataset["id"], epochs=300, batch_size=16)
        stack.wait_job(job["id"], lambda j: j["status"] == "running" and j["progress"].get("step", 0) > 0)
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        t0 = time.monotonic()
        done = stack.wait_job(job["id"], lambda j: j["status"] in TERMINAL, timeout=60)
        assert done["status"] == "cancelled" and done["artifacts"] == []
        assert time.monotonic() - t0 < 30
        assert done["progress"]["epoch"] < 300
        assert "cancel_requested" in [e["kind"] for e in events_of(c, job["id"])]


class NanOnDigits(nn.Module):
    """Fine on random inputs (so it passes upload checks), NaN on real digits, whose background is flat."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("resnet8", num_classes=10, in_channels=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        flat = x.flatten(1)
        if bool(((flat == flat.min()).float().mean() > 0.3).item()):
            return out * float("nan")
        return out


def test_a_teacher_that_emits_nan_fails_the_job_with_a_clear_error(stack, uploaded, tmp_path):
    _, dataset = uploaded
    path = tmp_path / "nan_teacher.pt"
    torch.jit.save(torch.jit.script(NanOnDigits().eval()), str(path))
    with stack.client() as c:
        teacher = upload_teacher(c, path)
        assert teacher["format"] == "torchscript"
        job = submit(c, teacher["id"], dataset["id"])
        done = stack.wait_job(job["id"], lambda j: j["status"] in TERMINAL)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "teacher_nonfinite_output"
        assert "NaN" in done["error"]["message"] and "Traceback" not in done["error"]["message"]
        errors = [e for e in events_of(c, job["id"]) if e["kind"] == "error"]
        assert errors and "Traceback" in errors[0]["data"]["traceback"]


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(stack, uploaded):
    teacher, dataset = uploaded
    with stack.client() as c:
        job = submit(c, teacher["id"], dataset["id"], epochs=10, batch_size=16)
        stack.wait_job(job["id"], lambda j: j["status"] == "running" and j["metrics"].get("epoch", 0) >= 2)
        worker = stack.workers["w1"]
        worker.send_signal(signal.SIGKILL)  # the worker process itself, as the OOM killer would
        worker.wait(timeout=10)
        stack.workers.pop("w1")
        time.sleep(2)
        # the training child dies with its supervisor: nothing keeps training the job
        orphans = subprocess.run(["pgrep", "-f", f"jobs/{job['id']}/spec.json"], capture_output=True, text=True)
        assert orphans.stdout.strip() == "", "the training process outlived its killed worker"
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"

        stack.start_worker("w2")
        done = stack.wait_job(job["id"], lambda j: j["status"] in TERMINAL, timeout=400)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = events_of(c, job["id"])
        resumed = [e for e in events if e["kind"] == "resumed"]
        assert resumed and resumed[0]["data"]["epoch"] >= 2
        story = " | ".join(e["message"] for e in events if e["kind"] in ("status", "resumed"))
        assert "attempt 2" in story and "previous worker was lost" in story, story
        assert done["metrics"]["resumed_from_epoch"] >= 2
        epochs = [e["data"]["epoch"] for e in events if e["kind"] == "epoch"]
        assert sorted(set(epochs)) == list(range(1, 11))


def test_a_job_past_its_maximum_run_time_is_stopped_and_failed(stack, uploaded):
    teacher, dataset = uploaded
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"teacher_id": teacher["id"], "dataset_id": dataset["id"],
                                     "student": {"arch": "resnet8"}, "max_run_seconds": 6,
                                     "hyperparameters": {"epochs": 500, "batch_size": 16, "device": "cpu"}})
        assert r.status_code == 202, r.text
        done = stack.wait_job(r.json()["id"], lambda j: j["status"] in TERMINAL, timeout=120)
        assert done["status"] == "failed" and done["error"]["code"] == "job_timeout", done
        assert "6 s" in done["error"]["message"]
