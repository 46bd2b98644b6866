"""Handing job ids to the broker. The database stays the truth: an id that fails to reach the broker is
sent again later by `requeue_pending`."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .models import Job, utcnow
from .settings import Settings

log = logging.getLogger("kdistill.queue")
TASK_NAME = "kdistill.run_job"


def enqueue(settings: Settings, job_id: str, queue: str) -> bool:
    """Publish the job id; False (and a log line) when the broker cannot be reached now."""
    from worker.celery_app import get_celery

    try:
        get_celery(settings).send_task(TASK_NAME, args=[job_id], queue=queue, retry=True,
                                       retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                     "interval_step": 0.5, "interval_max": 1})
        return True
    except Exception:  # any broker failure: the job waits in the database for the next sweep
        log.exception("could not enqueue job %s on queue %s", job_id, queue)
        return False


def default_queue(session: Session, settings: Settings) -> str:
    """gpu when a live worker serves it, else cpu when one serves that, else the configured default."""
    from worker.registry import live_queues

    live = live_queues(session)
    for queue in ("gpu", "cpu"):
        if queue in live:
            return queue
    return settings.default_queue


def requeue_pending(session: Session, settings: Settings, older_than: float = 30.0) -> int:
    """Send again the queued jobs whose message never reached the broker, and the running jobs whose
    worker went silent (a broker that does not redeliver, such as the filesystem transport, would
    otherwise strand them); a worker claims such a job only once its heartbeat is stale."""
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than)
    stale = now - timedelta(seconds=settings.stale_after)
    # never sent, or sent so long ago that the broker may have lost it (a Redis restart without its
    # append-only file); a duplicate message is harmless, the claim lets only one through
    resend = now - timedelta(seconds=settings.requeue_after)
    lost = select(Job).where(Job.status == "queued", Job.created_at < cutoff,
                             or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend))
    # enqueued_at < heartbeat_at: not sent again since the worker last showed life, so one message each time
    silent = select(Job).where(Job.status == "running", Job.heartbeat_at < stale,
                               or_(Job.enqueued_at.is_(None), Job.enqueued_at < Job.heartbeat_at))
    jobs = [*session.scalars(lost).all(), *session.scalars(silent).all()]
    sent = 0
    for job in jobs:
        if enqueue(settings, job.id, job.queue):
            job.enqueued_at = utcnow()
            sent += 1
    return sent
