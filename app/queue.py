"""Handing job ids to the broker, and picking a job's queue. The broker only carries ids: when one fails to
arrive, app.lifecycle's sweep sends it again."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

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
