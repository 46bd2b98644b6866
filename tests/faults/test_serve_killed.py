"""A whole `kdistill serve` killed (SIGKILL: no clean-up at all) mid-job and started again on the same
folder, with the one-machine defaults (SQLite, the filesystem broker): nothing of it keeps running, and the
job resumes at the restart from its checkpoint and ends once, with one student."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import (
    TEACHER_FORM,
    TERMINAL,
    audit_job,
    digits_npz_bytes,
    free_port,
    teacher_bytes,
    tiny_job_body,
    wait_for,
)

EPOCHS = 10


def start_serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}  # the shipped defaults
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", KDISTILL_DEFAULT_QUEUE="cpu")
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(data_dir)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def processes_of(data_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def test_serve_killed_mid_job_and_started_again_resumes_the_job(tmp_path: Path, figures):
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    serve = start_serve(data_dir, port, log)
    restarted = None
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            def ready() -> bool:
                assert serve.poll() is None, log.read_text()
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, 120, "kdistill serve", interval=0.3)
            teacher = c.post("/v1/teachers", files={"file": ("t.safetensors", teacher_bytes())}, data=TEACHER_FORM)
            dataset = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())})
            assert teacher.status_code == 201 and dataset.status_code == 201, (teacher.text, dataset.text)
            job = c.post("/v1/jobs", json=tiny_job_body(teacher.json()["id"], dataset.json()["id"], hyperparameters={
                "epochs": EPOCHS, "batch_size": 16, "device": "cpu"})).json()
            wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["metrics"].get("epoch", 0) >= 2, 240,
                     "two epochs", interval=0.3, context=lambda: log.read_text()[-3000:])

        os.kill(serve.pid, signal.SIGKILL)  # serve alone: its worker and training must follow by themselves
        serve.wait(timeout=10)
        wait_for(lambda: not processes_of(data_dir), 15, "the worker and training process to die with serve")

        restarted = start_serve(data_dir, port, log)
        started_at = time.monotonic()
        with httpx.Client(base_url=url, timeout=60) as c:
            def resumed() -> bool:
                assert restarted.poll() is None, log.read_text()[-3000:]
                try:
                    return c.get(f"/v1/jobs/{job['id']}").json()["attempts"] >= 2
                except httpx.TransportError:
                    return False

            wait_for(resumed, 120, "the job to resume", interval=0.3, context=lambda: log.read_text()[-3000:])
            recovery = time.monotonic() - started_at
            done = None

            def final() -> bool:
                nonlocal done
                done = c.get(f"/v1/jobs/{job['id']}").json()
                return done["status"] in TERMINAL

            wait_for(final, 300, "the job to end", interval=0.5, context=lambda: log.read_text()[-3000:])
            audit = audit_job(c, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert [a["name"] for a in done["artifacts"]].count("student.onnx") == 1
        assert audit.claims == 2 and not audit.epochs_twice, audit
        assert "1 job(s) were running" in log.read_text()
        assert recovery < 60, f"{recovery:.0f} s: serve knows its old worker is dead and need not wait"
        figures.record("kdistill serve SIGKILL mid-job, started again", recovery_s=recovery, jobs=1, lost=0,
                       duplicate_runs=int(audit.duplicated(expected_claims=2)),
                       note=f"resumed from epoch {done['metrics'].get('resumed_from_epoch')}; seconds from restart")
    finally:
        for proc in (serve, restarted):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_of(data_dir):
            os.kill(pid, signal.SIGKILL)
