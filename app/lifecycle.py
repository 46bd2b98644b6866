"""How a job moves: its states, every edge and who may take it, the lease, and how a lost job is found.

This module is the one place that writes a job's status, lease or final result; the API, the supervisor
(worker/supervisor.py), the sweep and `kdistill serve`/`kdistill worker` call it.

States: `queued`, `running`, and the final `succeeded`, `failed`, `cancelled`; `cancel_requested` is a flag
on a queued or running job. The edges (EDGES below is the table the code checks):

    queued  -> running     supervisor  claim: a new lease (worker, attempt + 1, heartbeat now)
    queued  -> cancelled   API         cancel before any worker claimed the job
    running -> running     supervisor  claim over a lost lease (heartbeat older than STALE_AFTER): attempt + 1
    running -> succeeded   supervisor  with the lease: artifacts and metrics in the same transaction
    running -> failed      supervisor  with the lease; or claim/sweep when a lost lease used the last attempt
    running -> cancelled   supervisor  with the lease, after cancel_requested; or sweep when the lease is lost
    running: cancel_requested          API         the supervisor sees it at its next heartbeat

The lease is (worker, attempt, heartbeat_at) on the job's row. The supervisor beats every
HEARTBEAT_INTERVAL; a heartbeat older than STALE_AFTER (or none) means the lease is lost. Every write to a
running job is fenced by its lease: it applies only where status = running, worker = us and
attempts = our attempt, so a stale supervisor, or a copy that lost its lease during a database outage,
can never overwrite the job or publish artifacts (its store uploads go to keys of its own attempt).

Recovery: the broker only carries job ids and may lose them; the database decides. The sweep (every
SWEEP_INTERVAL, in every API process) applies these rules, so each lost job moves again within
STALE_AFTER + SWEEP_INTERVAL (2 minutes by default):

    R1 never sent        queued, no enqueued_at (the broker was down at submit)  -> send
    R2 message lost      queued, sent more than STALE_AFTER ago while a live worker of its queue has been
                         idle all that time (it would have taken the message)    -> send again
    R3 lease lost        running, heartbeat stale (worker killed, supervisor crashed, a final write that
                         never happened), not sent within STALE_AFTER            -> send again; the claim
                         takes the lease over and resumes from the last checkpoint. A job that asked to be
                         cancelled is cancelled, and one out of attempts failed, by the sweep itself.
    R4 claim failed      the database was down when a worker took the message: the task retries the claim
                         (DB_RETRY_SECONDS), then hands the message back to the broker; R2 covers the rest.

A sent message is never acknowledged before its task ends, yet nothing relies on redelivery: a duplicate
message is harmless (the claim lets one through), and a job whose message is gone is found by R1 to R3.
`kdistill serve` and `kdistill worker` know when their own Celery process died; `abandon` expires its
leases at once instead of after STALE_AFTER.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from . import webhooks
from .jobs import add_event
from .models import Artifact, Job, WorkerRecord, utcnow
from .queue import enqueue
from .settings import Settings

log = logging.getLogger("kdistill.lifecycle")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
API, SUPERVISOR, SWEEP = "api", "supervisor", "sweep"
NEVER_SENT_GRACE = 30.0  # the API sends right after its commit; the sweep gives it this long first
DB_RETRY_SECONDS = 900.0  # how long a supervisor keeps retrying a write while the database is down


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    actors: frozenset[str]


EDGES: tuple[Edge, ...] = (
    Edge(QUEUED, RUNNING, frozenset({SUPERVISOR})),
    Edge(QUEUED, CANCELLED, frozenset({API})),
    Edge(RUNNING, RUNNING, frozenset({SUPERVISOR})),
    Edge(RUNNING, SUCCEEDED, frozenset({SUPERVISOR})),
    Edge(RUNNING, FAILED, frozenset({SUPERVISOR, SWEEP})),
    Edge(RUNNING, CANCELLED, frozenset({SUPERVISOR, SWEEP})),
)


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug, never a user's error."""


def check_edge(source: str, target: str, actor: str) -> None:
    if not any(e.source == source and e.target == target and actor in e.actors for e in EDGES):
        raise IllegalTransition(f"{actor} may not move a job from {source} to {target}")


@dataclass(frozen=True)
class Lease:
    """The right to run one attempt of a job; every write of the supervisor names it."""

    job_id: str
    worker: str
    attempt: int


def _fence(lease: Lease) -> Any:
    return (Job.id == lease.job_id) & (Job.status == RUNNING) & (Job.worker == lease.worker) & (
        Job.attempts == lease.attempt)


def _lost(stale: datetime) -> Any:
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)


# -- the API ------------------------------------------------------------------------------------------
def submitted(session: Session, job: Job) -> None:
    """Record a new job's first event (the job is added queued by the caller)."""
    job.status = QUEUED
    add_event(session, job.id, "status", "queued", status=QUEUED)


def send(session: Session, settings: Settings, job: Job) -> bool:
    """Hand the job's id to the broker and stamp when; False when the broker is unreachable (R1 then)."""
    if not enqueue(settings, job.id, job.queue):
        return False
    job.enqueued_at = utcnow()
    return True


def request_cancel(session: Session, job: Job) -> str:
    """`cancelled` for a queued job (at once), `requested` for a running one, `final` when it had ended."""
    if job.status in FINAL:
        return "final"
    now = utcnow()
    done = session.execute(update(Job).where(Job.id == job.id, Job.status == QUEUED).values(
        status=CANCELLED, cancel_requested=True, finished_at=now, phase=None)).rowcount
    if done:
        check_edge(QUEUED, CANCELLED, API)
        add_event(session, job.id, "status", "cancelled before it started", status=CANCELLED)
        session.refresh(job)
        webhooks.announce(session, job, webhooks.final_event(CANCELLED))
        return "cancelled"
    session.refresh(job)
    if job.status in FINAL:
        return "final"
    if not job.cancel_requested:
        job.cancel_requested = True
        add_event(session, job.id, "cancel_requested", "cancellation requested; the worker stops at the next step")
    return "requested"


# -- the supervisor -----------------------------------------------------------------------------------
def claim(session: Session, settings: Settings, job_id: str, worker: str) -> Lease | None:
    """Take the job (queued, or running under a lost lease) for `worker`; None when it is not ours to run.
    A lost job that must not run again (cancel requested, attempts used up) is ended here instead."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after)
    taken = session.execute(
        update(Job).where(
            Job.id == job_id, Job.attempts < settings.job_max_attempts, Job.cancel_requested.is_(False),
            or_(Job.status == QUEUED, (Job.status == RUNNING) & _lost(stale)),
        ).values(status=RUNNING, attempts=Job.attempts + 1, worker=worker, heartbeat_at=now, phase="loading",
                 started_at=now).execution_options(synchronize_session=False)
    ).rowcount
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s does not exist; message dropped", job_id)
        return None
    session.refresh(job)
    if taken:
        resumed = job.attempts > 1
        add_event(session, job.id, "status", f"running on {worker} (attempt {job.attempts})"
                  + ("; the previous worker was lost, resuming from its last checkpoint" if resumed else ""),
                  status=RUNNING, worker=worker, attempt=job.attempts)
        return Lease(job.id, worker, job.attempts)
    if job.status == RUNNING and (job.heartbeat_at is None or job.heartbeat_at < stale):
        _end_lost(session, settings, job)
    else:
        log.info("job %s is %s (worker %s, attempt %d); redelivered message ignored", job.id, job.status,
                 job.worker, job.attempts)
    return None


def beat(session: Session, lease: Lease) -> tuple[bool, bool]:
    """Renew the lease; (still held, cancel requested)."""
    held = session.execute(update(Job).where(_fence(lease)).values(heartbeat_at=utcnow())).rowcount > 0
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id))
    return held, bool(cancel)


def held(session: Session, lease: Lease) -> Job | None:
    """The job, locked for this transaction, while `lease` holds it; None once the lease is lost."""
    return session.scalars(select(Job).where(_fence(lease)).with_for_update()).first()


def update_held(session: Session, lease: Lease, **values: Any) -> bool:
    """Set columns of a job this lease holds; False (nothing written) once the lease is lost."""
    return session.execute(update(Job).where(_fence(lease)).values(**values)).rowcount > 0


def conclude(session: Session, lease: Lease, status: str, code: str | None = None, message: str | None = None,
             artifacts: list[Artifact] | None = None, **values: Any) -> bool:
    """End the attempt that `lease` holds with a final status, its artifacts and results, in one
    transaction; False (nothing written) when the lease was lost."""
    check_edge(RUNNING, status, SUPERVISOR)
    job = held(session, lease)
    if job is None:
        return False
    for k, v in values.items():
        setattr(job, k, v)
    for artifact in artifacts or []:
        session.add(artifact)
    _finish(session, job, status, code, message)
    return True


def _finish(session: Session, job: Job, status: str, code: str | None, message: str | None) -> None:
    job.status, job.phase, job.finished_at = status, None, utcnow()
    job.error_code, job.error_message = code, message
    add_event(session, job.id, "status", status if not message else f"{status}: {message}", status=status, code=code)
    webhooks.announce(session, job, webhooks.final_event(status))
    log.info("job %s %s%s", job.id, status, f" ({code})" if code else "")


def _end_lost(session: Session, settings: Settings, job: Job) -> bool:
    """End a job whose lease is lost and that must not run again; False when it may run again."""
    if job.status == RUNNING and job.cancel_requested:
        check_edge(RUNNING, CANCELLED, SWEEP)
        _finish(session, job, CANCELLED, None, None)
        return True
    if job.status == RUNNING and job.attempts >= settings.job_max_attempts:
        check_edge(RUNNING, FAILED, SWEEP)
        _finish(session, job, FAILED, "too_many_attempts",
                f"the job was started {job.attempts} times and its worker was lost each time; check the "
                "workers' logs (out of memory?) before submitting it again")
        return True
    return False


# -- recovery -----------------------------------------------------------------------------------------
@dataclass
class Swept:
    sent: list[str]
    ended: list[str]

    def __bool__(self) -> bool:
        return bool(self.sent or self.ended)


def sweep(session: Session, settings: Settings, never_sent_grace: float = NEVER_SENT_GRACE) -> Swept:
    """Apply the recovery rules R1 to R3 once; commits as it goes, so that concurrent sweeps (one per API
    process) send each job at most once per STALE_AFTER."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after)
    out = Swept([], [])
    # R3: running under a lost lease
    for job in session.scalars(select(Job).where(Job.status == RUNNING, _lost(stale))).all():
        if _end_lost(session, settings, job):
            out.ended.append(job.id)
            session.commit()
        elif _resend(session, settings, job, stale):
            out.sent.append(job.id)
    # R1: never sent
    grace = now - timedelta(seconds=never_sent_grace)
    for job in session.scalars(select(Job).where(Job.status == QUEUED, Job.enqueued_at.is_(None),
                                                 Job.created_at <= grace)).all():
        if _resend(session, settings, job, stale):
            out.sent.append(job.id)
    # R2: sent, but an idle worker of its queue never took it
    idle = idle_queues(session, now - timedelta(seconds=settings.stale_after))
    if idle:
        for job in session.scalars(select(Job).where(Job.status == QUEUED, Job.enqueued_at < stale,
                                                     Job.queue.in_(idle))).all():
            if _resend(session, settings, job, stale):
                out.sent.append(job.id)
    return out


def _resend(session: Session, settings: Settings, job: Job, stale: datetime) -> bool:
    """Send the job again unless someone did within STALE_AFTER (another sweep, the API)."""
    before = job.enqueued_at
    mine = session.execute(update(Job).where(
        Job.id == job.id, Job.status == job.status, or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
    ).values(enqueued_at=utcnow())).rowcount
    session.commit()
    if not mine:
        return False
    if enqueue(settings, job.id, job.queue):
        return True
    # The broker is down: give the stamp back so the next sweep tries at once.
    session.execute(update(Job).where(Job.id == job.id).values(enqueued_at=before))
    session.commit()
    return False


def idle_queues(session: Session, idle_before: datetime) -> set[str]:
    """Queues served by a live worker that has run nothing since `idle_before`."""
    from worker.registry import ALIVE_SECONDS

    alive = utcnow() - timedelta(seconds=ALIVE_SECONDS)
    rows = session.scalars(select(WorkerRecord).where(
        WorkerRecord.heartbeat_at >= alive, WorkerRecord.current_job_id.is_(None),
        WorkerRecord.idle_since.is_not(None), WorkerRecord.idle_since <= idle_before)).all()
    return {q for w in rows for q in w.queues}


def abandon(session: Session, settings: Settings, worker: str) -> list[str]:
    """Expire the leases of `worker`, which the caller knows is dead (its process exited), and send those
    jobs again so that they resume now rather than after STALE_AFTER."""
    ids = list(session.scalars(select(Job.id).where(Job.status == RUNNING, Job.worker == worker)))
    if not ids:
        return []
    session.execute(update(Job).where(Job.id.in_(ids), Job.status == RUNNING, Job.worker == worker).values(
        heartbeat_at=None, enqueued_at=None))
    session.commit()
    sent = []
    for job in session.scalars(select(Job).where(Job.id.in_(ids))).all():
        if job.status == RUNNING and _end_lost(session, settings, job):
            session.commit()
        elif job.status == RUNNING and _resend(session, settings, job, utcnow()):
            sent.append(job.id)
    return sent
