"""Job records: request hashing, events, warnings and the API's view of a job (how a job moves is app.lifecycle)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy.orm import Session

from worker.distill.spec import Hyperparameters

from .models import Job, JobEvent

log = logging.getLogger("kdistill.jobs")


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def requested_epochs(request: dict[str, Any] | None) -> int:
    """The epochs a job request asks for (the Hyperparameters default when it names none)."""
    epochs = ((request or {}).get("hyperparameters") or {}).get("epochs")
    return epochs if isinstance(epochs, int) and epochs > 0 else Hyperparameters.model_fields["epochs"].default


def add_warning(job: Job, code: str, message: str) -> bool:
    """Add {code, message} to the job's warnings unless the same one is there; True when it was new."""
    warnings = list(job.warnings or [])
    entry = {"code": str(code), "message": str(message)}
    if entry in warnings:
        return False
    job.warnings = [*warnings, entry]  # a new list: the JSON column sees the change
    return True


def add_event(session: Session, job_id: str, kind: str, message: str, **data: Any) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data))


def job_view(job: Job) -> dict[str, Any]:
    """The job as the API shows it."""
    progress = dict(job.progress or {})
    if not progress.get("epochs"):  # nothing written yet (queued): the epochs it was asked for, not 0
        progress["epochs"] = requested_epochs(job.request)
    return {
        "id": job.id, "status": job.status, "phase": job.phase if job.status == "running" else None,
        "cancel_requested": job.cancel_requested, "queue": job.queue, "teacher_id": job.teacher_id,
        "dataset_id": job.dataset_id, "request": job.request, "progress": progress, "metrics": job.metrics or {},
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        "warnings": list(job.warnings or []),
        "artifacts": [{"name": a.name, "format": a.format, "size_bytes": a.size_bytes, "sha256": a.sha256,
                       "url": f"/v1/jobs/{job.id}/artifacts/{a.name}"} for a in job.artifacts],
        "attempts": job.attempts, "worker": job.worker, "device": job.device, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at,
        "sweep_id": job.sweep_id, "sweep_trial": job.sweep_trial, "artifacts_expired_at": job.artifacts_expired_at,
    }
