"""The one-machine service for real: `kdistill example`, `kdistill serve` (API + a Celery worker on SQLite and
the filesystem broker) driven by the Python client and the CLI, API keys, and a clean stop on SIGINT/SIGTERM.

Every process here is real: `kdistill` is run as a subprocess (the script beside this interpreter), the
server trains real students, and the downloaded ONNX/TorchScript files are run on held-out digits.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import (  # noqa: F401
    ARCH_ARGS,
    KDISTILL,
    Server,
    _env,
    alive,
    free_port,
    kdistill,
    pids_matching,
)

from app.client import Client, KdistillError
from app.serve import is_loopback, resolve_auth


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `kdistill serve` with the one-machine defaults (loopback, no flags), shared by the module. Short
    heartbeats let the restart test see an interrupted job taken over in seconds rather than a minute."""
    tmp = tmp_path_factory.mktemp("serve")
    server = Server.start(tmp, env=_env(KDISTILL_HEARTBEAT_INTERVAL="1", KDISTILL_STALE_AFTER="4"))
    yield server
    if server.proc.poll() is None:
        server.stop()


def digits_test_accuracy(example: Path, run) -> float:  # type: ignore[no-untyped-def]
    test = np.load(example / "digits_test.npz")
    x = (test["x"][:, None].astype(np.float32) / 255 - 0.3) / 0.37
    return float((np.asarray(run(x)).argmax(1) == test["y"]).mean())


# -- fast ------------------------------------------------------------------------------------------------
def test_auth_defaults_follow_the_host():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")
    assert resolve_auth("127.0.0.1", None, {}) == "disabled"
    assert resolve_auth("0.0.0.0", None, {}) == "required"
    assert resolve_auth("0.0.0.0", False, {}) == "disabled"  # only by asking for it
    assert resolve_auth("127.0.0.1", True, {}) == "required"
    assert resolve_auth("127.0.0.1", None, {"KDISTILL_AUTH": "required"}) == "required"


def test_client_reports_an_unreachable_server():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as client, pytest.raises(KdistillError) as e:
        client.get_job("job_x")
    assert e.value.status == 0 and e.value.code == "unreachable"


# -- slow: real training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_writes_a_good_teacher_and_datasets(example_dir: Path):
    from worker.distill.data.npz import read_npz
    from worker.distill.spec import InputSpec, TeacherSpec, load_spec
    from worker.distill.teachers import load_teacher

    for name in ("teacher.safetensors", "digits.npz", "digits_test.npz", "README.txt", "job.yaml"):
        assert (example_dir / name).is_file(), name
    teacher = load_teacher(TeacherSpec(path=str(example_dir / "teacher.safetensors"), arch="resnet20", num_classes=10,
                                       input=InputSpec(channels=1, size=8, mean=[0.3], std=[0.37])), num_classes=10)
    accuracy = digits_test_accuracy(example_dir, lambda x: teacher.logits(torch.from_numpy(x)).numpy())
    assert accuracy > 0.9, accuracy

    data = read_npz(example_dir / "digits.npz", max_files=10, max_decoded_bytes=1 << 30)
    assert (len(data.x), len(data.x_val), data.channels, data.image_size) == (200, 300, 1, (8, 8))
    assert len(data.x_unlabeled) > 700
    assert len(np.load(example_dir / "digits_test.npz")["y"]) == 540

    spec = load_spec(example_dir / "job.yaml")  # valid for `kdistill run`, paths taken from its folder
    assert Path(spec.teacher.path) == (example_dir / "teacher.safetensors").resolve()
    assert spec.teacher.input.size == (8, 8) and spec.teacher.input.mean == (0.3,)
    printed = (example_dir.parent / "stdout.txt").read_text()
    assert "kdistill submit --teacher" in printed and "--input-size 8" in printed and "curl -F file=@" in printed


@pytest.mark.slow
def test_serve_distils_the_example_end_to_end(service: Server, example_dir: Path, tmp_path: Path):
    import onnxruntime as ort

    banner = service.output()
    assert f"{service.url}/docs" in banner and str(service.data_dir) in banner and "auth:       OFF" in banner
    assert "queue 'cpu'" in banner or "queue 'gpu'" in banner

    with Client(service.url) as client:
        teacher = client.upload_teacher(example_dir / "teacher.safetensors", arch="resnet20", num_classes=10,
                                        input_channels=1, input_size=8, mean=[0.3], std=[0.37])
        dataset = client.upload_dataset(example_dir / "digits.npz")
        assert (dataset["num_train"], dataset["num_val"], dataset["num_classes"]) == (200, 300, 10)
        assert (dataset["num_test"], dataset["test_source"]) == (540, "given")
        assert teacher["classes"] == [str(i) for i in range(10)]  # read from the file's metadata
        assert teacher["id"] in [t["id"] for t in client.list_teachers()]
        assert dataset["id"] in [d["id"] for d in client.list_datasets(limit=1)]

        with pytest.raises(KdistillError) as e:  # errors come back typed, with the field
            client.create_job(teacher["id"], dataset["id"], "no_such_net")
        assert (e.value.status, e.value.code, e.value.field) == (422, "unknown_architecture", "student.arch")

        job = client.create_job(teacher["id"], dataset["id"], "resnet8", export_formats=["onnx", "torchscript"],
                                hyperparameters={"epochs": 3, "batch_size": 64, "seed": 0},
                                idempotency_key="e2e-1")
        assert job["status"] == "queued" and job["queue"] in ("cpu", "gpu")
        seen: list[str] = []
        job = client.wait(job["id"], timeout=240, poll=0.5, on_progress=lambda j: seen.append(j["status"]))
        assert job["status"] == "succeeded", (job["error"], service.output()[-3000:])
        assert seen[-1] == "succeeded" and job["progress"]["fraction"] == 1.0
        assert client.create_job(teacher["id"], dataset["id"], "resnet8", export_formats=["onnx", "torchscript"],
                                 hyperparameters={"epochs": 3, "batch_size": 64, "seed": 0},
                                 idempotency_key="e2e-1")["id"] == job["id"]
        assert job["id"] in [j["id"] for j in client.list_jobs(status="succeeded", limit=1)]

        events = client.events(job["id"])
        statuses = [ev["data"].get("status") for ev in events if ev["kind"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        epochs = [ev for ev in events if ev["kind"] == "epoch"]
        assert [ev["data"]["epoch"] for ev in epochs] == [1, 2, 3]
        assert any(ev["kind"] == "device" for ev in events)

        names = {a["name"] for a in job["artifacts"]}
        assert {"student.onnx", "student.torchscript.pt", "metadata.json"} <= names
        paths = {name: client.download(job["id"], name, tmp_path) for name in names}  # sha256-checked
        with pytest.raises(KdistillError) as e:
            client.download(job["id"], "nothing.bin", tmp_path)
        assert e.value.code == "artifact_not_found" and not (tmp_path / "nothing.bin").exists()

    meta = json.loads(paths["metadata.json"].read_text())
    assert meta["input"]["mean"] == [0.3] and meta["input"]["std"] == [0.37]
    reported = job["metrics"]["student_accuracy"]
    session = ort.InferenceSession(str(paths["student.onnx"]), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    onnx_acc = digits_test_accuracy(example_dir, lambda x: session.run(None, {input_name: x})[0])
    scripted = torch.jit.load(str(paths["student.torchscript.pt"]), map_location="cpu").eval()
    with torch.inference_mode():
        ts_acc = digits_test_accuracy(example_dir, lambda x: scripted(torch.from_numpy(x)).numpy())
    print(f"reported (test) {reported:.4f}, held-out ONNX {onnx_acc:.4f}, TorchScript {ts_acc:.4f}")
    assert reported > 0.8 and job["metrics"]["accuracy_split"] == "test"
    lo, hi = job["metrics"]["student_accuracy_ci"]
    assert lo < reported < hi and job["metrics"]["test"]["n"] == 540
    # the job's test split is these very images: the downloaded files score what the job reported
    assert abs(onnx_acc - reported) <= 2 / 540 and abs(ts_acc - reported) <= 2 / 540
    assert abs(onnx_acc - ts_acc) < 0.005


@pytest.mark.slow
def test_cli_submit_wait_status_download(service: Server, example_dir: Path, tmp_path: Path):
    env = _env(KDISTILL_URL=service.url)
    names = json.dumps([str(i) for i in range(10)])  # the teacher's outputs by name, as a JSON list
    submitted = kdistill("submit", "--teacher", str(example_dir / "teacher.safetensors"), *ARCH_ARGS,
                         "--classes", names, "--dataset", str(example_dir / "digits.npz"), "--student", "resnet8",
                         "--epochs", "2", "--batch-size", "64", "--temperature", "3", "--alpha", "0.8", "--hp",
                         "seed=1", "--export", "onnx", "--wait", "--json", cwd=tmp_path, env=env)
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded", submitted.stderr
    with Client(service.url) as client:
        assert client.get_teacher(job["teacher_id"])["classes"] == json.loads(names)
    assert job["request"]["hyperparameters"]["temperature"] == 3.0 and job["request"]["export_formats"] == ["onnx"]
    assert job["request"]["hyperparameters"]["seed"] == 1
    assert "student epoch 2/2" in submitted.stderr  # the watch printed the epochs as they came

    shown = kdistill("status", job["id"], cwd=tmp_path, env=env)
    assert "succeeded" in shown.stdout and "accuracy on the test split, 540 samples" in shown.stdout
    assert "95% interval" in shown.stdout and "latency, batch 32" in shown.stdout
    watched = kdistill("status", job["id"], "--watch", "--json", cwd=tmp_path, env=env)
    assert json.loads(watched.stdout)["metrics"] == job["metrics"]

    downloaded = kdistill("download", job["id"], "--dest", str(tmp_path / "out"), cwd=tmp_path, env=env)
    files = [Path(p) for p in downloaded.stdout.split()]
    assert sorted(p.name for p in files) == sorted(a["name"] for a in job["artifacts"])
    for a in job["artifacts"]:
        assert hashlib.sha256((tmp_path / "out" / a["name"]).read_bytes()).hexdigest() == a["sha256"]
    one = kdistill("download", job["id"], "--name", "student.onnx", cwd=tmp_path, env=env)
    assert Path(one.stdout.strip()) == Path(job["id"]) / "student.onnx"  # default: ./<job id>/
    assert (tmp_path / job["id"] / "student.onnx").is_file()

    # errors exit 1 with the API's code
    listed = kdistill("jobs", cwd=tmp_path, env=env)
    assert job["id"] in listed.stdout
    missing = kdistill("status", "job_does_not_exist", cwd=tmp_path, env=env, check=False)
    assert missing.returncode == 1 and "job_not_found" in missing.stderr
    bad = kdistill("submit", "--teacher-id", job["teacher_id"], "--dataset-id", job["dataset_id"], "--student",
                   "resnet8", "--epochs", "0", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 1 and "invalid_hyperparameter" in bad.stderr
    clashing = kdistill("submit", "--teacher", str(example_dir / "teacher.safetensors"), *ARCH_ARGS,
                        "--classes", "a,b,A", "--dataset-id", job["dataset_id"], "--student", "resnet8",
                        cwd=tmp_path, env=env, check=False)
    assert clashing.returncode == 1 and "invalid_classes" in clashing.stderr and "classes" in clashing.stderr


@pytest.mark.slow
def test_sigint_stops_serve_worker_and_training_and_a_restart_resumes_the_job(service: Server, tmp_path: Path):
    with Client(service.url) as client:
        teacher = next(iter(client.list_teachers()))
        dataset = next(iter(client.list_datasets()))
        job = client.create_job(teacher["id"], dataset["id"], "resnet8", export_formats=["onnx"],
                                hyperparameters={"epochs": 2000, "batch_size": 64})
        deadline = time.monotonic() + 90
        while client.get_job(job["id"])["progress"].get("epoch", 0) < 1:
            assert time.monotonic() < deadline, service.output()[-3000:]
            time.sleep(0.3)
    worker_pid = int((service.data_dir / "worker.pid").read_text())
    training = pids_matching(f"worker.run {service.data_dir}")
    assert alive(worker_pid) and len(training) == 1

    took = service.stop(signal.SIGINT, timeout=25)
    assert service.proc.returncode == 0, service.output()[-3000:]
    left = pids_matching(str(service.data_dir))
    assert not left, f"left running after SIGINT: {left}"
    assert not alive(worker_pid) and not any(alive(p) for p in training)
    assert took < 20, took
    assert "kdistill: stopped" in service.output()

    # The job was left running (its worker was killed mid-training); the next serve takes it over.
    restarted = Server.start(tmp_path, data_dir=service.data_dir,
                             env=_env(KDISTILL_HEARTBEAT_INTERVAL="1", KDISTILL_STALE_AFTER="4"))
    try:
        assert "1 job(s) were running" in restarted.output()
        with Client(restarted.url) as client:
            deadline = time.monotonic() + 60
            while client.get_job(job["id"])["attempts"] < 2:
                assert time.monotonic() < deadline, restarted.output()[-3000:]
                time.sleep(0.5)
            assert any("resuming from its last checkpoint" in ev["message"] for ev in client.events(job["id"]))
            client.cancel(job["id"])
            assert client.wait(job["id"], timeout=60, poll=0.5)["status"] == "cancelled"
    finally:
        restarted.stop(signal.SIGTERM)
    assert restarted.proc.returncode == 0 and not pids_matching(str(service.data_dir))


@pytest.mark.slow
def test_keys_create_authenticates_against_serve_with_auth(tmp_path: Path):
    data_dir = tmp_path / "data"
    created = kdistill("keys", "create", "--tenant", "acme", "--name", "ci", "--data-dir", str(data_dir), cwd=tmp_path)
    key = created.stdout.strip()
    assert key.startswith("kd_") and "\n" not in key  # only the key on stdout
    other = kdistill("keys", "create", "--tenant", "globex", "--data-dir", str(data_dir), cwd=tmp_path).stdout.strip()

    server = Server.start(tmp_path, "--host", "127.0.0.1", "--auth")
    try:
        assert "API keys required" in server.output()
        with Client(server.url) as anonymous, pytest.raises(KdistillError) as e:
            list(anonymous.list_jobs())
        assert (e.value.status, e.value.code) == (401, "missing_api_key")
        with Client(server.url, api_key="kd_wrong") as wrong, pytest.raises(KdistillError) as e:
            wrong.get_job("job_x")
        assert (e.value.status, e.value.code) == (401, "invalid_api_key")
        with Client(server.url, api_key=key) as acme:
            assert list(acme.list_jobs()) == []
            with pytest.raises(KdistillError) as e:
                acme.get_job("job_x")
            assert e.value.code == "job_not_found"  # authenticated: past the 401
        listed = kdistill("jobs", cwd=tmp_path, env=_env(KDISTILL_URL=server.url, KDISTILL_API_KEY=other))
        assert listed.returncode == 0
        refused = kdistill("jobs", "--url", server.url, cwd=tmp_path, check=False)
        assert refused.returncode == 1 and "missing_api_key" in refused.stderr
    finally:
        server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0 and not pids_matching(str(data_dir))


@pytest.mark.slow
def test_kdistill_run_says_when_it_resumes_and_fresh_starts_over(tmp_path: Path):
    """`kdistill run` resumes from the checkpoints a run left, says so in plain sight, and `--fresh` deletes
    them first. The teacher is untrained, so the teacher check warns (checks.teacher: warn) and that shows."""
    from safetensors.torch import save_file

    from worker.distill.students import create_model

    torch.manual_seed(0)
    save_file(create_model("resnet8", num_classes=4, in_channels=1).state_dict(), str(tmp_path / "t.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (96, 8, 8), dtype=np.uint8), y=np.arange(96) % 4)
    spec = {"teacher": {"path": "t.safetensors", "arch": "resnet8", "input": {"channels": 1, "size": 8}},
            "student": {"arch": "resnet8"}, "data": {"path": "d.npz"}, "checks": {"teacher": "warn"},
            "hyperparameters": {"epochs": 2, "batch_size": 32, "device": "cpu"}, "export_formats": ["onnx"],
            "output_dir": "out"}
    (tmp_path / "job.json").write_text(json.dumps(spec))

    first = kdistill("run", "job.json", cwd=tmp_path, timeout=300)
    assert "resuming" not in first.stderr
    assert "warning" in first.stderr and "teacher_not_predictive" in first.stderr, first.stderr
    assert (tmp_path / "out" / "checkpoints").is_dir() and (tmp_path / "out" / "student.onnx").is_file()

    again = kdistill("run", "job.json", cwd=tmp_path, timeout=300)
    assert "resuming from the checkpoint of epoch 2" in again.stderr, again.stderr
    assert "pass --fresh to start over" in again.stderr

    fresh = kdistill("run", "job.json", "--fresh", cwd=tmp_path, timeout=300)
    assert "removed the checkpoints" in fresh.stderr, fresh.stderr
    assert "resuming" not in fresh.stderr
    assert json.loads(fresh.stdout.strip().splitlines()[-1])["resumed_from_epoch"] == 0
