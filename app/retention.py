"""Removing what is stored: deleted teachers, datasets and jobs, and the artifacts of jobs finished longer ago
than KDISTILL_RETENTION_DAYS (the periodic sweep of app.main calls `expire_artifacts`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from . import lifecycle
from .models import Artifact, Dataset, Job, JobEvent, SweepRecord, Teacher, utcnow
from .settings import Settings
from .storage import ArtifactStore

log = logging.getLogger("kdistill.retention")
ACTIVE = (lifecycle.QUEUED, lifecycle.RUNNING)
EXPIRE_BATCH = 100  # jobs per pass: a long backlog is worked off over several sweeps, never in one long hold


@dataclass
class InUse:
    """What keeps a teacher or dataset from being deleted: its queued or running jobs and running sweeps."""

    job_ids: list[str] = field(default_factory=list)
    sweep_ids: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.job_ids or self.sweep_ids)


def delete_input(session: Session, store: ArtifactStore, obj: Teacher | Dataset) -> InUse | None:
    """Mark a teacher or dataset deleted and remove its file, unless a queued or running job (or a running
    sweep) uses it: then nothing changes and the users are returned. None: a concurrent request deleted it
    first. Commits.

    A job created at the same moment cannot slip past: the row is locked first (on PostgreSQL a job's
    insert takes a key-share lock on the teacher and dataset it names, which FOR UPDATE waits for and holds
    off; on SQLite the flush below takes the database's write lock), so the check sees every committed job,
    and POST /v1/jobs checks `deleted_at` again after inserting its job."""
    model = type(obj)
    session.execute(select(model).where(model.id == obj.id).with_for_update()
                    .execution_options(populate_existing=True))
    if obj.deleted_at is not None:
        session.rollback()
        return None
    obj.deleted_at = utcnow()
    session.flush()
    column = Job.teacher_id if model is Teacher else Job.dataset_id
    users = InUse(job_ids=list(session.scalars(select(Job.id).where(column == obj.id, Job.status.in_(ACTIVE))
                                               .order_by(Job.created_at, Job.id))))
    key = "teacher_id" if model is Teacher else "dataset_id"
    sweeps = session.scalars(select(SweepRecord).where(SweepRecord.tenant_id == obj.tenant_id,
                                                       SweepRecord.status == "running"))
    users.sweep_ids = [s.id for s in sweeps if (s.request or {}).get(key) == obj.id]
    if users:
        session.rollback()
        return users
    session.commit()
    # after the commit: a failed removal leaves a stray file, never a live object without its file
    prefix = f"{model.__tablename__}/{obj.id}"
    try:
        store.delete_prefix(prefix)
    except Exception:
        log.warning("%s was deleted but its files under %r could not be removed", obj.id, prefix, exc_info=True)
    return users


def delete_job(session: Session, store: ArtifactStore, job: Job) -> bool:
    """Remove a finished job's artifacts and checkpoints from the store, then its row (its events, artifacts
    and webhook deliveries go with it: ON DELETE CASCADE). False when the job is not final. Commits.

    The files go first: a failure half-way leaves the job in place, and deleting it again finishes the work."""
    if job.status not in lifecycle.FINAL:
        return False
    store.delete_prefix(f"jobs/{job.id}")
    store.delete_prefix(f"checkpoints/{job.id}")
    session.execute(delete(Job).where(Job.id == job.id, Job.status.in_(lifecycle.FINAL)),
                    execution_options={"synchronize_session": False})
    session.commit()
    return True


def expire_artifacts(session: Session, settings: Settings, store: ArtifactStore) -> list[str]:
    """With `settings.retention_days` > 0: remove the artifacts of up to EXPIRE_BATCH jobs finished longer
    ago than that, mark them expired and say so in each job's events; return those jobs' ids.

    Several API processes may run it at once: each job is claimed with a conditional UPDATE (on
    artifacts_expired_at still null) in its own transaction before its files go, so only one pass removes it."""
    days = settings.retention_days
    if days <= 0:
        return []
    cutoff = utcnow() - timedelta(days=days)
    has_artifacts = select(Artifact.id).where(Artifact.job_id == Job.id).exists()
    due = list(session.scalars(
        select(Job.id).where(Job.status.in_(lifecycle.FINAL), Job.finished_at.is_not(None),
                             Job.finished_at < cutoff, Job.artifacts_expired_at.is_(None), has_artifacts)
        .order_by(Job.finished_at, Job.id).limit(EXPIRE_BATCH)))
    session.commit()
    expired: list[str] = []
    for job_id in due:
        if _expire_one(session, store, job_id, days):
            expired.append(job_id)
    if expired:
        log.info("retention: removed the artifacts of %d job(s) finished more than %s day(s) ago",
                 len(expired), _days(days))
    return expired


def _expire_one(session: Session, store: ArtifactStore, job_id: str, days: float) -> bool:
    now = utcnow()
    claimed = session.execute(update(Job).where(Job.id == job_id, Job.artifacts_expired_at.is_(None))
                              .values(artifacts_expired_at=now), execution_options={"synchronize_session": False})
    if claimed.rowcount != 1:  # another process's pass got it first
        session.rollback()
        return False
    names = list(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id).order_by(Artifact.name)))
    try:
        store.delete_prefix(f"jobs/{job_id}")
    except Exception:
        session.rollback()  # not marked: the next pass tries again
        raise
    session.execute(delete(Artifact).where(Artifact.job_id == job_id), execution_options={"synchronize_session": False})
    session.add(JobEvent(job_id=job_id, kind="artifacts_expired", data=_event_data(days, names), message=(
        f"artifacts removed ({', '.join(names)}): the job finished more than {_days(days)} day(s) ago "
        f"(KDISTILL_RETENTION_DAYS={_days(days)})")))
    session.commit()
    return True


def _event_data(days: float, names: list[str]) -> dict[str, Any]:
    return {"retention_days": days, "artifacts": names}


def _days(days: float) -> str:
    return f"{days:g}"
