"""The broker restarts with jobs queued: Redis's append-only file must keep every message, and each job must
run exactly once when workers come."""

from __future__ import annotations

import contextlib
from datetime import datetime

import pytest
from harness import Figures, Stack, audit_job, duplicate_runs, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]
JOBS = 20


def _stamp(value: str) -> float:
    """time.time() of an API timestamp."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_redis_restart_with_20_jobs_queued_loses_and_repeats_none(stack: Stack, figures: Figures) -> None:
    stack.start_api(workers=1)  # the fault is the broker's; one API process leaves the 2 cores to the jobs
    with stack.client() as c:
        teacher_id, dataset_id = stack.upload_inputs(c)
        job_ids = [stack.submit(c, teacher_id, dataset_id)["id"] for _ in range(JOBS)]
    # published by the API before it answered; the short wait only spares a publisher that lags a little
    with contextlib.suppress(AssertionError):  # the count is asserted below, after the figures
        wait_for(lambda: stack.redis.queue_depth() >= JOBS, 10, f"{JOBS} messages on the queue")
    before = stack.redis.queue_depth()

    back = stack.redis.restart()  # SIGTERM: Redis fsyncs its AOF and exits; then the same port and folder
    after = stack.redis.queue_depth()
    stack.start_worker("w1")
    stack.start_worker("w2")
    stack.wait_workers_ready(["w1", "w2"])
    done = stack.wait_jobs(job_ids, timeout=600)
    with stack.client() as c:
        audits = [audit_job(c, job_id) for job_id in job_ids]
    last_done = max(_stamp(j["finished_at"]) for j in done.values())
    first_claim = min(_stamp(j["started_at"]) for j in done.values() if j["started_at"])
    succeeded = [j for j in done.values() if j["status"] == "succeeded"]
    lost = JOBS - len(succeeded)
    dups = duplicate_runs(audits)
    per_worker = sorted({j["worker"] for j in succeeded})
    figures.record(f"Redis restart (SIGTERM, AOF) with {JOBS} jobs queued", recovery_s=last_done - back, jobs=JOBS,
                   lost=lost, duplicate_runs=dups,
                   note=f"queue {before} -> {after} messages across the restart; recovery = Redis back to last "
                        f"job done, incl. starting 2 workers (first claim after {first_claim - back:.1f} s); "
                        f"ran on {len(per_worker)} worker(s)")

    assert before == after == JOBS, f"queued messages: {before} before the restart, {after} after"
    assert lost == 0, {j["id"]: (j["status"], j["error"]) for j in done.values() if j["status"] != "succeeded"}
    bad = [a for a in audits if a.claims != 1 or a.attempts != (1,) or a.epochs_twice]
    assert not bad, f"jobs that ran other than once: {bad}\n{stack.logs()}"
    assert all(j["attempts"] == 1 for j in done.values())
