"""Celery tasks: thin wrappers; the work is in `worker.supervisor`, the rules in `app.lifecycle`."""

from __future__ import annotations

import socket

from celery import shared_task
from celery.exceptions import Reject

from app.queue import TASK_NAME
from app.settings import get_settings

from .supervisor import ClaimDeferred, Supervisor


@shared_task(name=TASK_NAME, bind=True, acks_late=True)
def run_job(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """Claim job `job_id` and supervise its training process to the end."""
    settings = getattr(self.app.conf, "kdistill_settings", None) or get_settings()
    worker = f"{self.request.hostname or socket.gethostname()}"
    try:
        Supervisor(settings, job_id, worker).run()
    except ClaimDeferred:
        # The database stayed down through every retry of the claim: give the message back to the broker
        # (rule R4 of app.lifecycle) rather than drop it.
        raise Reject("the database is unreachable; the job waits in the queue", requeue=True) from None
