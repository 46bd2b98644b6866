"""Workers announce themselves in the database (name, queues, device, the job they run or since when they
are idle) and keep a heartbeat there: the API routes a job to the gpu queue only when some GPU worker is
alive, and the sweep (app.lifecycle, rule R2) tells a lost message from a busy queue.

The same thread touches a file per worker (`<data dir>/workers/<name>.alive`), which `kdistill
worker-health` reads: a busy worker (the solo pool cannot answer `inspect ping` while a job runs) is
healthy, and a database outage does not make every worker unhealthy."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import WorkerRecord, utcnow
from app.settings import Settings, get_settings
from worker.sandbox import log_protections_once, make_undumpable
from worker.webhook_pump import WebhookPump

log = logging.getLogger("kdistill.worker")
HEARTBEAT_SECONDS = 10.0
ALIVE_SECONDS = 60.0  # a worker whose last beat is older is not counted (routing, rule R2, health)
PUMP_STOP_SECONDS = 5.0  # how long shutdown waits for a webhook call in flight (its lease covers the rest)
_stop = threading.Event()
_pumps: list[WebhookPump] = []


@dataclass
class _Activity:
    job_id: str | None = None
    idle_since: datetime | None = field(default_factory=utcnow)


_activity = _Activity()


def running(job_id: str) -> None:
    """This worker process now runs `job_id` (the supervisor says so once it holds the job's lease)."""
    _activity.job_id, _activity.idle_since = job_id, None


def finished() -> None:
    """This worker process runs nothing from now on."""
    _activity.job_id, _activity.idle_since = None, utcnow()


def alive_file(settings: Settings, name: str) -> Path:
    return settings.data_dir / "workers" / f"{name}.alive"


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "cpu"


def register(settings: Settings, name: str, queues: list[str], device: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(WorkerRecord, name)
        if row is None:
            s.add(WorkerRecord(name=name, queues=queues, device=device, current_job_id=_activity.job_id,
                               idle_since=_activity.idle_since))
        else:
            row.queues, row.device, row.started_at, row.heartbeat_at = queues, device, utcnow(), utcnow()
            row.current_job_id, row.idle_since = _activity.job_id, _activity.idle_since


def beat(settings: Settings, name: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(WorkerRecord, name)
        if row is not None:
            row.heartbeat_at = utcnow()
            row.current_job_id, row.idle_since = _activity.job_id, _activity.idle_since


def touch_alive(settings: Settings, name: str) -> None:
    path = alive_file(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def unregister(settings: Settings, name: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(delete(WorkerRecord).where(WorkerRecord.name == name))


def live_queues(session: Session) -> set[str]:
    """Queues served by at least one worker that beat recently."""
    since = utcnow() - timedelta(seconds=ALIVE_SECONDS)
    rows = session.scalars(select(WorkerRecord.queues).where(WorkerRecord.heartbeat_at >= since)).all()
    return {q for queues in rows for q in queues}


def _settings_of(sender: Any) -> Settings:
    return getattr(sender.app.conf, "kdistill_settings", None) or get_settings()


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    make_undumpable()  # the training children this worker starts must not read its credentials
    settings, name = _settings_of(sender), sender.hostname
    log_protections_once(settings)  # what the sandbox of this worker's children can enforce on this host
    queues = sorted(sender.app.amqp.queues.consume_from.keys())
    device = describe_device()
    finished()
    with contextlib.suppress(OSError):
        touch_alive(settings, name)

    def loop() -> None:
        registered = False
        while True:
            with contextlib.suppress(OSError):
                touch_alive(settings, name)
            try:
                if not registered:
                    register(settings, name, queues, device)
                    registered = True
                    log.info("worker %s serves queues %s", name, ", ".join(queues))
                else:
                    beat(settings, name)
            except Exception:  # the database may be down: the worker still works; beat again later
                log.warning("worker %s: could not write its heartbeat to the database", name, exc_info=True)
            if _stop.wait(HEARTBEAT_SECONDS):
                return

    threading.Thread(target=loop, name="kdistill-registry", daemon=True).start()
    # Webhooks go out from every worker process (`kdistill serve` runs one too): never inline in a request.
    pump = WebhookPump(settings)
    pump.start()
    _pumps.append(pump)


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    _stop.set()
    while _pumps:
        _pumps.pop().stop(PUMP_STOP_SECONDS)
    if sender is None:
        return
    settings = _settings_of(sender)
    alive_file(settings, sender.hostname).unlink(missing_ok=True)
    with contextlib.suppress(Exception):
        unregister(settings, sender.hostname)
