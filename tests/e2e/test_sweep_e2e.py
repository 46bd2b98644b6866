"""A sweep end to end: uvicorn + two Celery workers + PostgreSQL + Redis, trials that really train on digits.

The API's own periodic pass (app.searches, every search_interval) drives the sweeps: nothing here calls the
driver directly.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from digits_data import DIGITS_MEAN, DIGITS_STD, few_label_npz
from typer.testing import CliRunner

from app.cli import cli
from app.client import Client

pytestmark = pytest.mark.slow
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def uploaded(stack, tmp_path_factory, digits, digits_teacher) -> tuple[dict, dict]:
    stack.start_worker("w1")
    stack.start_worker("w2")
    tmp = tmp_path_factory.mktemp("uploads")
    dataset_path = few_label_npz(tmp / "digits.npz", digits, labels_per_class=10, val_per_class=10)
    with stack.client() as c:
        with open(digits_teacher.path, "rb") as f:
            teacher = c.post("/v1/teachers", files={"file": (digits_teacher.path.name, f)}, params={"dedupe": "false"},
                             data={"arch": digits_teacher.arch, "input_channels": 1, "input_size": 8,
                                   "mean": str(DIGITS_MEAN), "std": str(DIGITS_STD)})
        with open(dataset_path, "rb") as f:
            dataset = c.post("/v1/datasets", files={"file": (dataset_path.name, f)}, params={"dedupe": "false"})
    assert teacher.status_code == 201, teacher.text
    assert dataset.status_code == 201, dataset.text
    return teacher.json(), dataset.json()


def sweep_body(teacher: dict, dataset: dict, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "teacher_id": teacher["id"], "dataset_id": dataset["id"], "student": {"arch": "resnet8"},
        "hyperparameters": {"epochs": 2, "batch_size": 64, "learning_rate": 0.05, "device": "cpu"},
        "export_formats": ["onnx"],
        "space": {"temperature": {"low": 1.0, "high": 8.0, "log": True}, "alpha": [0.5, 0.9]},
        "max_trials": 3, "max_parallel": 2}
    body.update(over)
    return body


def when(s: str) -> datetime:
    return datetime.fromisoformat(s.removesuffix("Z"))


def test_a_sweep_fans_out_over_two_workers_and_keeps_the_best_on_validation(stack, uploaded) -> None:
    teacher, dataset = uploaded
    body = sweep_body(teacher, dataset)
    with Client(stack.url, api_key=stack.api_key) as kd:
        sweep = kd.create_sweep(teacher["id"], dataset["id"], "resnet8", body["space"], max_trials=3, max_parallel=2,
                                hyperparameters=body["hyperparameters"], export_formats=["onnx"])
        assert sweep["trials_started"] == 2, "the first max_parallel trials start with the sweep"
        done = kd.wait_sweep(sweep["id"], timeout=300, poll=0.5)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    assert [t["state"] for t in done["trials"]] == ["complete"] * 3 and done["trials_started"] == 3
    with stack.client() as c:
        jobs = [c.get(f"/v1/jobs/{t['job_id']}").json() for t in done["trials"]]
    assert all(j["status"] == "succeeded" and j["sweep_id"] == done["id"] for j in jobs)
    assert len({j["worker"] for j in jobs}) == 2, [j["worker"] for j in jobs]
    overlapping = any(a["worker"] != b["worker"] and when(a["started_at"]) < when(b["finished_at"])
                      and when(b["started_at"]) < when(a["finished_at"]) for a in jobs for b in jobs)
    assert overlapping, "two trials ran at the same time on the two workers"
    validation = {j["id"]: j["metrics"]["validation"]["student_accuracy"] for j in jobs}
    assert done["best_value"] == pytest.approx(max(validation.values()))
    assert validation[done["best_job_id"]] == max(validation.values())
    best = next(j for j in jobs if j["id"] == done["best_job_id"])["request"]["hyperparameters"]
    assert done["best_params"] == {"temperature": pytest.approx(best["temperature"]), "alpha": best["alpha"]}
    for trial, job in zip(done["trials"], jobs, strict=True):
        assert trial["value"] == pytest.approx(validation[job["id"]]) and trial["epochs"] == 2


def kdistill(stack, *args: str) -> str:
    """Run the CLI against the stack's server; its stdout."""
    result = CliRunner().invoke(cli, [*args, "--url", stack.url, "--api-key", stack.api_key])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cancelling_a_sweep_midway_cancels_its_running_trials(stack, uploaded) -> None:
    teacher, dataset = uploaded
    sweep_id = kdistill(stack, "sweep", "submit", "--teacher-id", teacher["id"], "--dataset-id", dataset["id"],
                        "--student", "resnet8", "--param", "temperature=1..8:log", "--param", "alpha=0.5,0.9",
                        "--epochs", "200", "--batch-size", "16", "--hp", "device=cpu", "--max-trials", "4",
                        "--max-parallel", "2").strip().splitlines()[-1]
    with stack.client() as c:
        sweep = c.get(f"/v1/sweeps/{sweep_id}").raise_for_status().json()
    assert sweep["request"]["space"] == {"temperature": {"low": 1.0, "high": 8.0, "log": True}, "alpha": [0.5, 0.9],
                                         "learning_rate": None, "distillation": None, "standardize": None}
    ids = [t["job_id"] for t in sweep["trials"]]
    for job_id in ids:
        stack.wait_job(job_id, lambda j: j["status"] == "running" and j["progress"].get("step", 0) > 0, timeout=120)
    kdistill(stack, "sweep", "cancel", sweep_id)
    for job_id in ids:
        done = stack.wait_job(job_id, lambda j: j["status"] in TERMINAL, timeout=60)
        assert done["status"] == "cancelled" and done["progress"]["epoch"] < 200
    time.sleep(3)  # a periodic pass or two: a cancelled sweep starts nothing more
    with stack.client() as c:
        after = c.get(f"/v1/sweeps/{sweep_id}").json()
        assert after["status"] == "cancelled" and after["trials_started"] == 2
        assert [t["state"] for t in after["trials"]] == ["cancelled", "cancelled"]
        assert len(c.get("/v1/jobs", params={"sweep_id": sweep_id}).json()["items"]) == 2
    shown = kdistill(stack, "sweep", "status", sweep_id)
    assert sweep_id in shown and "cancelled" in shown and all(job_id in shown for job_id in ids)
