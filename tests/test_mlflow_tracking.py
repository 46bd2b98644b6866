"""MLflow tracking (KDISTILL_MLFLOW_TRACKING_URI) against a real `mlflow server` (SQLite backend, proxied artifacts)
started here, with real jobs through a real `kdistill serve`: the run named after the job holds its params, its
per-epoch metrics as the job's epoch events have them, the ONNX student as the model `student` and metadata.json.
An unreachable server leaves the job succeeded, with the warning `mlflow_failed`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_support import Server, _env, free_port, upload_example

from app.client import Client
from app.settings import Settings
from worker.tracking_mlflow import redact, track

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
HYPER = {"batch_size": 64, "seed": 0, "device": "cpu", "learning_rate": 0.05}


def start_mlflow(tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A real MLflow tracking server on a free port (in its own process group: it starts workers)."""
    port = free_port()
    log = tmp / "mlflow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                 "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=_env())
    return proc, f"http://127.0.0.1:{port}", log


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"mlflow server exited {proc.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"mlflow server not up after {timeout} s:\n{log.read_text()}"
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group; SIGKILL soon after (its data is thrown away)."""
    os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):  # the workers it started, should they linger
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def serve(tmp: Path, tracking_uri: str) -> Server:
    return Server.start(tmp, env=_env(KDISTILL_MLFLOW_TRACKING_URI=tracking_uri, KDISTILL_MLFLOW_EXPERIMENT="kd-test",
                                      KDISTILL_PROGRESS_INTERVAL="0.2", OMP_NUM_THREADS="1"))


def run_job(server: Server, example_dir: Path, **job: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Upload the example's teacher and digits, run one job to its end; the job and its events."""
    teacher_id, dataset_id = upload_example(server.url, example_dir)
    with Client(server.url) as kd:
        job_id = kd.create_job(teacher_id, dataset_id, "resnet8", export_formats=["onnx"], **job)["id"]
        done = kd.wait(job_id, timeout=240)
        return done, kd.events(job_id)


@dataclass
class Jobs:
    mlflow_url: str
    tracked: tuple[dict[str, Any], list[dict[str, Any]], Server]  # logged to the MLflow server
    unreachable: tuple[dict[str, Any], str, float, Server]  # job, the URI where nothing listens, seconds


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Jobs]:
    """The MLflow server and two `kdistill serve` (one tracking to it, one to a closed port) start together
    while the example is written, then each runs a job: the waits overlap, so the module stays short."""
    proc, url, log = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pool = ThreadPoolExecutor(2)
    starting = [pool.submit(serve, tmp_path_factory.mktemp(name), uri)
                for name, uri in (("serve-mlflow", url), ("serve-unreachable", closed))]
    try:
        example_dir = request.getfixturevalue("example_dir")
        servers = [f.result() for f in starting]
        wait_healthy(proc, url, log)

        def timed(srv: Server, **job: Any) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
            started = time.monotonic()
            done, events = run_job(srv, example_dir, **job)
            return done, events, time.monotonic() - started

        tracked = pool.submit(timed, servers[0], hyperparameters={**HYPER, "epochs": 2}, baseline=True)
        failing = pool.submit(timed, servers[1], hyperparameters={**HYPER, "epochs": 1})
        job, events, _ = tracked.result()
        other, _, took = failing.result()
        yield Jobs(url, (job, events, servers[0]), (other, closed, took, servers[1]))
    finally:
        pool.shutdown(wait=True)
        started = [f.result() for f in starting if f.exception() is None]
        with ThreadPoolExecutor(2) as stopping:
            list(stopping.map(lambda srv: srv.proc.poll() is None and srv.stop(), started))
        stop_group(proc)


def test_a_job_is_logged_as_an_mlflow_run_named_after_it(jobs: Jobs, tmp_path: Path):
    import mlflow
    import onnxruntime as ort
    from mlflow import MlflowClient

    job, events, server = jobs.tracked
    mlflow_url = jobs.mlflow_url
    assert job["status"] == "succeeded", (job, server.output()[-3000:])
    assert not [w for w in job["warnings"] if w["code"].startswith("mlflow")], job["warnings"]
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("kd-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{job['id']}'")
    assert len(runs) == 1
    run = runs[0]
    assert job["metrics"]["tracking"] == {"mlflow_run_id": run.info.run_id,
                                          "mlflow_experiment_id": experiment.experiment_id}
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["kdistill.job_id"] == job["id"] and tags["kdistill.student_arch"] == "resnet8"
    assert tags["kdistill.teacher_id"] == job["teacher_id"] and tags["kdistill.dataset_id"] == job["dataset_id"]
    params = run.data.params
    assert params["epochs"] == "2" and params["batch_size"] == "64" and params["learning_rate"] == "0.05"
    assert params["student_arch"] == "resnet8" and params["distillation"] == "soft" and params["baseline"] == "true"
    assert params["export_formats"] == '["onnx"]'

    # per-epoch metrics: exactly what the job's epoch events say, step = epoch
    epochs = [e["data"] for e in events if e["kind"] == "epoch"]
    for run_name, prefix in (("student", ""), ("baseline", "baseline_")):
        mine = sorted((e for e in epochs if e["run"] == run_name), key=lambda e: e["epoch"])
        assert [e["epoch"] for e in mine] == [1, 2]
        for field, key in (("student_accuracy", "val_accuracy"), ("train_loss", "train_loss"),
                           ("learning_rate", "learning_rate")):
            history = sorted(client.get_metric_history(run.info.run_id, prefix + key), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e[field])) for e in mine]
    teacher = client.get_metric_history(run.info.run_id, "teacher_val_accuracy")
    assert len(teacher) == 2 and teacher[0].value == pytest.approx(epochs[0]["teacher_accuracy"])
    final = run.data.metrics
    assert final["final_accuracy"] == pytest.approx(job["metrics"]["student_accuracy"])
    assert final["final_gain"] == pytest.approx(job["metrics"]["gain"])
    assert final["compression"] == pytest.approx(job["metrics"]["efficiency"]["compression"])
    assert final["validation_accuracy"] == pytest.approx(job["metrics"]["validation"]["student_accuracy"])

    # metadata.json, byte for byte the job's artifact
    assert "metadata.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    local = Path(client.download_artifacts(run.info.run_id, "metadata.json", str(tmp_path)))
    published = {a["name"]: a for a in job["artifacts"]}
    assert hashlib.sha256(local.read_bytes()).hexdigest() == published["metadata.json"]["sha256"]
    assert published["tensorboard.tar.gz"]["format"] == "tensorboard"

    # the ONNX student as the MLflow model "student" of this run, loadable and runnable
    mlflow.set_tracking_uri(mlflow_url)  # models:/ URIs are read from the process-wide tracking URI
    models = client.search_logged_models([experiment.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["student"]
    (tmp_path / "model").mkdir()
    onnx_model = mlflow.onnx.load_model(f"models:/{models[0].model_id}", dst_path=str(tmp_path / "model"))
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert logits.shape == (3, 10)


def test_an_unreachable_tracking_server_leaves_the_job_succeeded_with_a_warning(jobs: Jobs):
    job, closed, took, srv = jobs.unreachable
    assert job["status"] == "succeeded", (job, srv.output()[-3000:])
    warnings = [w for w in job["warnings"] if w["code"] == "mlflow_failed"]
    assert len(warnings) == 1 and closed in warnings[0]["message"], job["warnings"]
    assert "tracking" not in job["metrics"] and job["metrics"]["student_accuracy"] > 0
    assert {a["name"] for a in job["artifacts"]} >= {"student.onnx", "metadata.json", "tensorboard.tar.gz"}
    assert took < 120  # bounded retries, not MLflow's minutes of back-off


def test_without_the_extra_the_job_gets_mlflow_not_installed(tmp_path, monkeypatch):
    # mlflow is installed here (the dev extra); a None entry in sys.modules makes its import fail as if it were not
    monkeypatch.setitem(sys.modules, "mlflow", None)
    settings = Settings(mlflow_tracking_uri="http://user:pw@127.0.0.1:1", data_dir=tmp_path)
    tracking, warning = track(settings, "job_x", {}, {"metrics": {}, "history": []}, tmp_path)
    assert tracking is None and warning is not None
    assert warning[0] == "mlflow_not_installed" and "kdistill[mlflow]" in warning[1]
    assert "http://user:***@127.0.0.1:1" in warning[1] and "pw" not in warning[1]


def test_redact_hides_only_the_password():
    assert redact("https://bob:s3cret@mlflow.example:5000/x") == "https://bob:***@mlflow.example:5000/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"

