"""The CLI as a script or pipeline uses it, against one real `kdistill serve` (uvicorn + a Celery worker training
real students on the example digits): `--output json` alone on stdout, the exit code carrying how a job ended
(0 succeeded, 3 failed, 4 cancelled, 5 timeout), whole ids in piped tables, plain progress lines without a
terminal, `delete`, `teachers`/`datasets`, `tensorboard`, and `keys webhook-secret`. Every `kdistill` here is
a subprocess whose stdout and stderr are pipes, as in a pipeline."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import KDISTILL, Server, _env, free_port, kdistill, upload_example

from app.cli import EXIT_CODES, UnsafeArchive, extract_events
from app.client import Client

HYPER = {"batch_size": 64, "seed": 0, "device": "cpu"}
PROGRESS = re.compile(r"^(job_\w+) (queued|running|succeeded|failed|cancelled)\b(.*)$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-cli")
    srv = Server.start(tmp, env=_env(KDISTILL_STREAM_INTERVAL="0.2", KDISTILL_PROGRESS_INTERVAL="0.2",
                                     OMP_NUM_THREADS="1"))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def env(server: Server) -> dict[str, str]:
    # a narrow "terminal" for anything that would take its width from the environment
    return _env(KDISTILL_URL=server.url, COLUMNS="40")


@pytest.fixture(scope="module")
def uploaded(server: Server, example_dir: Path) -> tuple[str, str]:
    return upload_example(server.url, example_dir)


def ids(uploaded: tuple[str, str]) -> list[str]:
    return ["--teacher-id", uploaded[0], "--dataset-id", uploaded[1], "--student", "resnet8", "--batch-size", "64",
            "--hp", "device=cpu", "--export", "onnx"]


@pytest.fixture(scope="module")
def succeeded(server: Server, env: dict[str, str], uploaded: tuple[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`kdistill submit --wait -o json` of a 1-epoch job, as a pipeline runs it."""
    cwd = tmp_path_factory.mktemp("submit")
    done = kdistill("submit", *ids(uploaded), "--epochs", "1", "--wait", "-o", "json", "--progress-interval", "1000",
                    cwd=cwd, env=env, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr, server.output()[-3000:])
    return json.loads(done.stdout), done


def new_job(server: Server, uploaded: tuple[str, str], **extra: Any) -> str:
    with Client(server.url) as kd:
        return kd.create_job(*uploaded, "resnet8", export_formats=["onnx"], hyperparameters={**HYPER, "epochs": 1},
                             **extra)["id"]


# -- fast ------------------------------------------------------------------------------------------------
def test_help_and_docstring_show_the_exit_codes(tmp_path: Path):
    import app.cli

    shown = kdistill("--help", cwd=tmp_path)
    assert "Exit codes:" in shown.stdout
    for code, meaning in (("0", "success"), ("1", "error"), ("2", "usage error"), ("3", "failed"),
                          ("4", "cancelled"), ("5", "--timeout"), ("130", "interrupted")):
        assert re.search(rf"^\W*{code}\s+.*{re.escape(meaning)}", shown.stdout, re.M), (code, shown.stdout)
    assert EXIT_CODES and EXIT_CODES in (app.cli.__doc__ or "")


def test_models_and_keys_list_print_json(tmp_path: Path):
    models = json.loads(kdistill("models", "--family", "small", "-o", "json", cwd=tmp_path).stdout)
    resnet8 = next(m for m in models if m["name"] == "resnet8")
    assert isinstance(resnet8["parameters"], int) and resnet8["parameters"] > 0

    kdistill("keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path), cwd=tmp_path)
    keys = json.loads(kdistill("keys", "list", "--data-dir", str(tmp_path), "-o", "json", cwd=tmp_path).stdout)
    assert [(k["tenant"], k["revoked"]) for k in keys] == [("acme", None)] and keys[0]["id"].startswith("key_")


def test_keys_webhook_secret_prints_the_tenants_secret_and_rotates_it(tmp_path: Path):
    def secret(*args: str) -> str:
        out = kdistill("keys", "webhook-secret", "--data-dir", str(tmp_path), *args, cwd=tmp_path).stdout
        assert out.count("\n") == 1, out  # the secret alone on stdout
        return out.strip()

    first = secret()
    assert len(first) >= 32 and secret("--tenant", "local") == first  # local: the tenant of a server without keys
    other = secret("--tenant", "acme")
    assert other != first
    rotated = secret("--rotate")
    assert rotated not in (first, other) and secret() == rotated


def test_the_tensorboard_archive_is_extracted_only_when_safe(tmp_path: Path):
    def archive(name: str, *members: tarfile.TarInfo) -> Path:
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            ok = tarfile.TarInfo("student/events.out.tfevents.1")
            ok.size = 3
            tar.addfile(ok, io.BytesIO(b"abc"))
            for m in members:
                tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
        return path

    good = archive("good")
    assert extract_events(good, tmp_path / "good") == 1
    assert (tmp_path / "good" / "student" / "events.out.tfevents.1").read_bytes() == b"abc"

    def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type, m.linkname, m.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
        return m

    for name, bad in {"dotdot": member("../escaped"), "nested": member("a/../../escaped"),
                      "absolute": member(str(tmp_path / "escaped")),
                      "symlink": member("link", tarfile.SYMTYPE, "/etc/passwd"),
                      "hardlink": member("hard", tarfile.LNKTYPE, "student/events.out.tfevents.1"),
                      "fifo": member("fifo", tarfile.FIFOTYPE)}.items():
        with pytest.raises(UnsafeArchive):
            extract_events(archive(name, bad), tmp_path / "out" / name)
        assert not (tmp_path / "out" / name).exists(), f"{name}: nothing is extracted"
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "escaped").exists()
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UnsafeArchive, match="cannot be extracted"):
        extract_events(damaged, tmp_path / "out" / "damaged")


def test_run_exits_3_when_the_local_run_fails(tmp_path: Path):
    """An untrained teacher fails the teacher check (checks.teacher defaults to fail): the run failed, not its
    spec (which exits 2, see tests/test_worker_run.py)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from worker.distill.students import create_model

    torch.manual_seed(0)
    save_file(create_model("resnet8", num_classes=4, in_channels=1).state_dict(), str(tmp_path / "t.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (96, 8, 8), dtype=np.uint8), y=np.arange(96) % 4)
    spec = {"teacher": {"path": "t.safetensors", "arch": "resnet8", "input": {"channels": 1, "size": 8}},
            "student": {"arch": "resnet8"}, "data": {"path": "d.npz"},
            "hyperparameters": {"epochs": 1, "batch_size": 32, "device": "cpu"}, "export_formats": ["onnx"],
            "output_dir": "out"}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    failed = kdistill("run", "job.json", cwd=tmp_path, env=_env(OMP_NUM_THREADS="1"), check=False, timeout=300)
    assert failed.returncode == 3, (failed.returncode, failed.stderr[-3000:])
    assert "teacher" in failed.stderr and not failed.stdout


# -- against the server --------------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_wait_json_is_parseable_and_exits_0(succeeded: tuple[dict[str, Any], Any]):
    job, done = succeeded
    assert job["status"] == "succeeded" and job["metrics"]["student_accuracy"] > 0.3
    assert {a["name"] for a in job["artifacts"]} >= {"student.onnx", "metadata.json"}
    assert done.stderr and f"job {job['id']} queued" in done.stderr  # messages went to stderr


@pytest.mark.slow
def test_progress_without_a_terminal_is_plain_lines(succeeded: tuple[dict[str, Any], Any]):
    job, done = succeeded
    progress = [m for m in map(PROGRESS.match, done.stderr.splitlines()) if m]
    assert progress and all(m.group(1) == job["id"] for m in progress), done.stderr
    statuses = [m.group(2) for m in progress]
    assert statuses[-1] == "succeeded" and "running" in statuses, done.stderr
    running = [m.group(3) for m in progress if m.group(2) == "running"]
    assert any(re.search(r"student epoch [01]/1 \d+%", r) for r in running), done.stderr
    # --progress-interval 1000: a line per change of status, phase or epoch only, never one per progress tick
    keys = [re.sub(r" \d+%.*", "", m.group(0)) for m in progress]
    assert len(keys) == len(set(keys)), done.stderr
    assert not re.search(r"━+\s+\d+\.\d%", done.stderr), "no rich progress bar without a terminal"
    assert "epoch student epoch 1/1" in done.stderr  # the events still come as they happen


@pytest.mark.slow
def test_piped_tables_keep_whole_ids_and_statuses(server: Server, env: dict[str, str], tmp_path: Path,
                                                  succeeded: tuple[dict[str, Any], Any], uploaded: tuple[str, str]):
    job, _ = succeeded
    listed = kdistill("jobs", cwd=tmp_path, env=env)
    row = next(line for line in listed.stdout.splitlines() if job["id"] in line)
    assert re.search(rf"\b{job['id']}\b.*\bsucceeded\b.*\bresnet8\b", row), listed.stdout
    assert "…" not in listed.stdout
    as_json = json.loads(kdistill("jobs", "-o", "json", "--status", "succeeded", cwd=tmp_path, env=env).stdout)
    assert job["id"] in [j["id"] for j in as_json] and {j["status"] for j in as_json} == {"succeeded"}

    for verb, object_id in (("teachers", uploaded[0]), ("datasets", uploaded[1])):
        table = kdistill(verb, cwd=tmp_path, env=env).stdout
        assert re.search(rf"\b{object_id}\b", table) and "…" not in table, table
        listed_json = json.loads(kdistill(verb, "-o", "json", cwd=tmp_path, env=env).stdout)
        assert object_id in [o["id"] for o in listed_json]
    teacher = next(t for t in json.loads(kdistill("teachers", "-o", "json", cwd=tmp_path, env=env).stdout)
                   if t["id"] == uploaded[0])
    assert (teacher["arch"], teacher["num_classes"], teacher["input_size"]) == ("resnet20", 10, [8, 8])

    shown = json.loads(kdistill("status", job["id"], "-o", "json", "--events", cwd=tmp_path, env=env).stdout)
    assert shown["id"] == job["id"] and [e for e in shown["events"] if e["kind"] == "epoch"]
    written = json.loads(kdistill("download", job["id"], "--name", "student.onnx", "--dest", str(tmp_path / "d"),
                                  "-o", "json", cwd=tmp_path, env=env).stdout)
    onnx = next(a for a in job["artifacts"] if a["name"] == "student.onnx")
    assert written == [{"name": "student.onnx", "path": str(tmp_path / "d" / "student.onnx"),
                        "size_bytes": onnx["size_bytes"], "sha256": onnx["sha256"]}]


@pytest.mark.slow
def test_a_failed_job_exits_3(server: Server, env: dict[str, str], uploaded: tuple[str, str], tmp_path: Path):
    done = kdistill("submit", *ids(uploaded), "--epochs", "500", "--max-run-seconds", "0.2", "--wait", "-o", "json",
                    cwd=tmp_path, env=env, check=False)
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    job = json.loads(done.stdout)
    assert job["status"] == "failed" and job["error"]["code"] == "job_timeout"
    watched = kdistill("status", job["id"], "--watch", cwd=tmp_path, env=env, check=False)
    assert watched.returncode == 3 and "failed" in watched.stdout
    assert kdistill("status", job["id"], cwd=tmp_path, env=env).returncode == 0  # a plain look is no verdict


@pytest.mark.slow
def test_a_cancelled_job_exits_4_and_a_timeout_5(server: Server, env: dict[str, str], uploaded: tuple[str, str],
                                                 tmp_path: Path):
    """`submit --wait` on a queue no worker serves: a watcher with --timeout gives up (5, the job as it is on
    stdout), then the job is cancelled from another process and the waiting submit exits 4."""
    queue = "nobody_serves_cancel"
    with Client(server.url) as kd:
        before = {j["id"] for j in kd.list_jobs(status="queued")}
    waiting = subprocess.Popen([KDISTILL, "submit", *ids(uploaded), "--epochs", "1", "--queue", queue, "--wait",
                                "-o", "json"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        job_id = None
        while job_id is None:
            assert time.monotonic() < deadline and waiting.poll() is None, waiting.poll()
            with Client(server.url) as kd:
                job_id = next((j["id"] for j in kd.list_jobs(status="queued")
                               if j["id"] not in before and j["queue"] == queue), None)
            time.sleep(0.2)
        timed = kdistill("status", job_id, "--watch", "--timeout", "1", "-o", "json", cwd=tmp_path, env=env,
                         check=False)
        assert timed.returncode == 5, (timed.returncode, timed.stderr)
        assert json.loads(timed.stdout)["status"] == "queued" and f"job {job_id} is still queued" in timed.stderr
        kdistill("cancel", job_id, cwd=tmp_path, env=env)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 4, (waiting.returncode, err)
    assert json.loads(out)["status"] == "cancelled" and json.loads(out)["id"] == job_id


@pytest.mark.slow
def test_sweep_wait_exits_5_on_timeout_and_4_once_cancelled(server: Server, env: dict[str, str],
                                                           uploaded: tuple[str, str], tmp_path: Path):
    started = kdistill("sweep", "submit", *ids(uploaded), "--epochs", "1", "--param", "alpha=0.5,0.9",
                       "--max-trials", "2", "--queue", "nobody_serves_sweeps", "--wait", "--timeout", "1", "-o",
                       "json", cwd=tmp_path, env=env, check=False)
    assert started.returncode == 5, (started.returncode, started.stderr)
    sweep = json.loads(started.stdout)
    assert sweep["status"] == "running"
    kdistill("sweep", "cancel", sweep["id"], cwd=tmp_path, env=env)
    watched = kdistill("sweep", "status", sweep["id"], "--watch", "-o", "json", cwd=tmp_path, env=env, check=False)
    assert watched.returncode == 4 and json.loads(watched.stdout)["status"] == "cancelled", watched.stderr
    listed = json.loads(kdistill("sweep", "list", "-o", "json", cwd=tmp_path, env=env).stdout)
    assert sweep["id"] in [s["id"] for s in listed]


@pytest.mark.slow
def test_delete_teacher_dataset_and_job(server: Server, env: dict[str, str], example_dir: Path, tmp_path: Path):
    with Client(server.url) as kd:  # objects of this test alone, not the shared upload
        teacher = kd.upload_teacher(example_dir / "teacher.safetensors", arch="resnet20", num_classes=10,
                                    input_channels=1, input_size=8, mean=[0.3], std=[0.37], dedupe=False)
        dataset = kd.upload_dataset(example_dir / "digits.npz", dedupe=False)
    job_id = new_job(server, (teacher["id"], dataset["id"]), queue="nobody_serves_delete")

    def delete(kind: str, *object_ids: str) -> subprocess.CompletedProcess[str]:
        return kdistill("delete", kind, *object_ids, cwd=tmp_path, env=env, check=False)

    for kind, object_id, code in (("teacher", teacher["id"], "teacher_in_use"),
                                  ("dataset", dataset["id"], "dataset_in_use"), ("job", job_id, "job_not_finished")):
        refused = delete(kind, object_id)
        assert refused.returncode == 1 and code in refused.stderr, (kind, refused.stderr)
    kdistill("cancel", job_id, cwd=tmp_path, env=env)
    both = delete("job", "job_does_not_exist", job_id)  # each id is tried; one refusal makes the exit code
    assert both.returncode == 1 and "job_not_found" in both.stderr and f"deleted job {job_id}" in both.stderr
    assert delete("teacher", teacher["id"]).returncode == 0 and delete("dataset", dataset["id"]).returncode == 0

    gone = kdistill("status", job_id, cwd=tmp_path, env=env, check=False)
    assert gone.returncode == 1 and "job_not_found" in gone.stderr
    listed = json.loads(kdistill("teachers", "-o", "json", "--limit", "200", cwd=tmp_path, env=env).stdout)
    assert teacher["id"] not in [t["id"] for t in listed]
    listed = json.loads(kdistill("datasets", "-o", "json", "--limit", "200", cwd=tmp_path, env=env).stdout)
    assert dataset["id"] not in [d["id"] for d in listed]
    again = delete("teacher", teacher["id"])
    assert again.returncode == 1 and "teacher_not_found" in again.stderr


@pytest.mark.slow
def test_tensorboard_downloads_the_event_files_and_runs_tensorboard(server: Server, env: dict[str, str],
                                                                   tmp_path: Path,
                                                                   succeeded: tuple[dict[str, Any], Any]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, _ = succeeded
    logdir = tmp_path / "tb"
    fetched = kdistill("tensorboard", job["id"], "--no-launch", "--dir", str(logdir), cwd=tmp_path, env=env)
    assert fetched.stdout.strip() == str(logdir)
    events = sorted(logdir.rglob("events.out.tfevents*"))
    assert events, sorted(logdir.rglob("*"))
    scalars = set()
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert scalars, "the event files hold the job's scalars"
    assert not (tmp_path / job["id"]).exists(), "--dir is where the files go"

    missing = kdistill("tensorboard", job["id"], "--dir", str(logdir), "--tensorboard", str(tmp_path / "no-such-tb"),
                       cwd=tmp_path, env=env, check=False)
    assert missing.returncode == 1 and "pip install 'kdistill[tensorboard]'" in missing.stderr, missing.stderr
    assert missing.stdout.strip() == str(logdir)

    port = free_port()
    launched = subprocess.Popen([KDISTILL, "tensorboard", job["id"], "--dir", str(logdir), "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert launched.poll() is None, launched.communicate()
            assert time.monotonic() < deadline, "TensorBoard did not answer within 90 s"
            try:
                answer = httpx.get(f"http://localhost:{port}/data/runs", timeout=2)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert answer.json(), "TensorBoard lists the job's runs"
        launched.send_signal(signal.SIGINT)
        launched.wait(timeout=30)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode == 130
    with pytest.raises(httpx.TransportError):  # TensorBoard went with it
        httpx.get(f"http://localhost:{port}/data/runs", timeout=2)
