"""Celery tasks: thin wrappers; the work is in `worker.supervisor`."""

from __future__ import annotations

import socket

from celery import shared_task

from app.queue import TASK_NAME
from app.settings import get_settings

from .supervisor import Supervisor


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """Claim job `job_id` and supervise its training process to the end."""
    settings = getattr(self.app.conf, "kdistill_settings", None) or get_settings()
    worker = f"{self.request.hostname or socket.gethostname()}"
    Supervisor(settings, job_id, worker).run()
