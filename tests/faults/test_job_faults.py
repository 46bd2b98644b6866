"""Jobs through crashes and a database outage, on the shipped timing (STALE_AFTER and SWEEP_INTERVAL 60 s):
each job ends once, with one student, no epoch trained twice and no event missing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
from harness import TERMINAL, Stack, audit_job, descendants, job_events, wait_for

# recovery bound with the defaults (STALE_AFTER + SWEEP_INTERVAL), plus room for a job's start-up here
BOUND_S = 60 + 60 + 20
SLOW = {"epochs": 10, "batch_size": 16, "device": "cpu"}


def training_pids(job_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"jobs/{job_id}/spec.json"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def celery_pid(wrapper: subprocess.Popen[bytes]) -> int:
    for pid in descendants(wrapper.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"celery" in cmd and b"worker.run" not in cmd:
            return pid
    raise AssertionError("no Celery process under the worker")


def one_student(job: dict) -> bool:
    return [a["name"] for a in job["artifacts"]].count("student.onnx") == 1


def test_a_killed_worker_resumes_elsewhere_and_a_killed_celery_process_is_restarted(stack: Stack, figures):
    stack.start_api()
    stack.start_worker("a")
    stack.start_worker("b")
    stack.wait_workers_ready(["a", "b"])
    with stack.client() as c:
        teacher, dataset = stack.upload_inputs(c)

        # 1. SIGKILL of a whole `kdistill worker` (wrapper, Celery, training) mid-epoch: nobody is left to
        # say so, the lease goes stale and the sweep sends the job to the other worker.
        job = stack.submit(c, teacher, dataset, hyperparameters=SLOW)
        running = stack.wait_job(job["id"], lambda j: j["status"] == "running" and j["metrics"].get("epoch", 0) >= 2,
                                 timeout=240)
        victim = next(n for n in ("a", "b") if stack.node(n) == running["worker"])
        survivor = "b" if victim == "a" else "a"
        killed_at = time.monotonic()
        os.killpg(stack.workers[victim].pid, signal.SIGKILL)
        stack.workers[victim].wait(timeout=10)
        time.sleep(2)
        assert training_pids(job["id"]) == [], "the training process outlived its killed worker"
        resumed = stack.wait_job(job["id"], lambda j: j["attempts"] >= 2 or j["status"] in TERMINAL,
                                 timeout=BOUND_S + 60)
        recovery = time.monotonic() - killed_at
        done = stack.wait_job(job["id"], timeout=300)
        audit = audit_job(c, job["id"])
        assert resumed["attempts"] == 2 and done["status"] == "succeeded", done
        assert done["worker"] == stack.node(survivor) and done["attempts"] == 2
        assert one_student(done) and audit.claims == 2 and not audit.epochs_twice, audit
        assert done["metrics"]["resumed_from_epoch"] >= 2
        epochs = sorted({e["data"]["epoch"] for e in job_events(c, job["id"]) if e["kind"] == "epoch"})
        assert epochs == list(range(1, SLOW["epochs"] + 1)), epochs
        assert recovery <= BOUND_S, recovery
        figures.record("worker SIGKILL mid-epoch (2 workers)", recovery_s=recovery, jobs=1, lost=0,
                       duplicate_runs=int(audit.duplicated(expected_claims=2)),
                       note=f"resumed on the other worker from epoch {done['metrics']['resumed_from_epoch']}")

        # 2. Only the Celery process dies: `kdistill worker` restarts it and, knowing it dead, lets the job
        # resume at once instead of after STALE_AFTER.
        stack.start_worker(victim)
        stack.wait_workers_ready([victim])
        job = stack.submit(c, teacher, dataset, hyperparameters=SLOW)
        running = stack.wait_job(job["id"], lambda j: j["status"] == "running" and j["metrics"].get("epoch", 0) >= 2,
                                 timeout=240)
        holder = next(n for n in ("a", "b") if stack.node(n) == running["worker"])
        killed_at = time.monotonic()
        os.kill(celery_pid(stack.workers[holder]), signal.SIGKILL)
        resumed = stack.wait_job(job["id"], lambda j: j["attempts"] >= 2 or j["status"] in TERMINAL, timeout=BOUND_S)
        recovery = time.monotonic() - killed_at
        done = stack.wait_job(job["id"], timeout=300)
        audit = audit_job(c, job["id"])
        assert resumed["attempts"] == 2 and done["status"] == "succeeded", done
        assert one_student(done) and audit.claims == 2 and not audit.epochs_twice, audit
        assert stack.workers[holder].poll() is None, "kdistill worker must outlive its Celery process"
        assert recovery < 60, f"{recovery:.0f} s: the restart should not wait for STALE_AFTER"
        figures.record("Celery process SIGKILL (kdistill worker restarts it)", recovery_s=recovery, jobs=1, lost=0,
                       duplicate_runs=int(audit.duplicated(expected_claims=2)), note="resumed without waiting")


def test_postgres_unreachable_for_30_s_while_a_job_runs_and_another_is_claimed(make_stack, figures):
    stack: Stack = make_stack(proxy_db=True)
    assert stack.proxy is not None
    stack.start_api()
    stack.start_worker("a")
    stack.wait_workers_ready(["a"])
    with stack.client() as c:
        teacher, dataset = stack.upload_inputs(c)
        running = stack.submit(c, teacher, dataset, hyperparameters={**SLOW, "epochs": 12})
        stack.wait_job(running["id"], lambda j: j["status"] == "running" and j["metrics"].get("epoch", 0) >= 1,
                       timeout=240)
        queued = stack.submit(c, teacher, dataset)  # waits in Redis: worker a is busy
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

        answers: list[int | str] = []
        stop = threading.Event()

        def poll() -> None:  # one keep-alive connection, as a dashboard would hold
            with stack.client(timeout=20) as poller:
                while not stop.is_set():
                    try:
                        r = poller.get(f"/v1/jobs/{running['id']}")
                        answers.append(r.status_code if r.status_code != 503 else r.json()["code"])
                    except httpx.TransportError as e:
                        answers.append(f"transport error: {type(e).__name__}")
                    time.sleep(0.25)

        stack.proxy.cut()
        cut_at = time.monotonic()
        poller = threading.Thread(target=poll)
        poller.start()
        stack.start_worker("b")  # takes the queued job's message while the database is down: its claim fails
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        stop.set()
        poller.join()
        stack.proxy.restore()
        restored_at = time.monotonic()

        def claimed() -> bool:
            return stack.sql("SELECT status FROM jobs WHERE id = %s", queued["id"])[0][0] != "queued"

        wait_for(claimed, 120, "the queued job to be claimed after the outage", context=stack.logs)
        recovery = time.monotonic() - restored_at
        final = stack.wait_jobs([running["id"], queued["id"]], timeout=400)
        audits = [audit_job(c, j) for j in final]
        stuck = stack.sql("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")[0][0]

    outage = [a for a in answers if a != 200]
    assert outage and set(outage) == {"database_unavailable"}, answers
    assert all(f["status"] == "succeeded" and f["attempts"] == 1 and one_student(f) for f in final.values()), final
    assert all(a.claims == 1 and not a.epochs_twice for a in audits), audits
    with stack.client() as c:
        events = job_events(c, running["id"])
    epochs = [e["data"]["epoch"] for e in events if e["kind"] == "epoch" and e["data"].get("run") == "student"]
    assert epochs == list(range(1, 13)), f"epoch events written late, never lost or twice: {epochs}"
    assert stuck == 0
    figures.record("PostgreSQL cut for 30 s (a job running, one being claimed)", recovery_s=recovery, jobs=2, lost=0,
                   duplicate_runs=sum(a.duplicated() for a in audits),
                   note=f"{len(outage)} answers during the outage, all 503 database_unavailable; "
                        f"{len(epochs)}/12 epoch events")


def test_a_message_the_broker_lost_is_sent_again_by_the_sweep(stack: Stack, figures):
    """Redis loses a queued job's message (a restart without its append-only file, say): an idle worker of its
    queue never takes it, so the sweep sends it again within STALE_AFTER + SWEEP_INTERVAL."""
    stack.start_api()
    with stack.client() as c:
        teacher, dataset = stack.upload_inputs(c)
        job = stack.submit(c, teacher, dataset)
        assert stack.redis.queue_depth() == 1
        client = stack.redis.client()
        try:
            assert client.delete("faults") == 1  # the message is gone; the job is still queued in the database
        finally:
            client.close()
        stack.start_worker("a")
        stack.wait_workers_ready(["a"])
        lost_at = time.monotonic()  # from when a worker could have run it
        claimed = stack.wait_job(job["id"], lambda j: j["status"] != "queued", timeout=BOUND_S + 30)
        recovery = time.monotonic() - lost_at
        done = stack.wait_job(job["id"], timeout=300)
        audit = audit_job(c, job["id"])
    assert claimed["attempts"] == 1 and done["status"] == "succeeded" and one_student(done), done
    assert audit.claims == 1 and not audit.epochs_twice
    assert recovery <= BOUND_S, recovery
    figures.record("a queued job's message lost by the broker", recovery_s=recovery, jobs=1, lost=0,
                   duplicate_runs=int(audit.duplicated()), note="sent again by the sweep (idle worker, rule R2)")
