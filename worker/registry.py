"""Workers announce themselves in the database (name, queues, device) and keep a heartbeat there, so the
API can route a job to the gpu queue only when some GPU worker is alive."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import WorkerRecord, utcnow
from app.settings import Settings, get_settings
from worker.sandbox import log_protections_once, make_undumpable

log = logging.getLogger("kdistill.worker")
HEARTBEAT_SECONDS = 20.0
ALIVE_SECONDS = 90.0
_stop = threading.Event()


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "cpu"


def register(settings: Settings, name: str, queues: list[str], device: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(WorkerRecord, name)
        if row is None:
            s.add(WorkerRecord(name=name, queues=queues, device=device))
        else:
            row.queues, row.device, row.started_at, row.heartbeat_at = queues, device, utcnow(), utcnow()


def beat(settings: Settings, name: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(WorkerRecord, name)
        if row is not None:
            row.heartbeat_at = utcnow()


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
    try:
        register(settings, name, queues, describe_device())
    except Exception:  # the worker is still useful without the registry; say so and go on
        log.exception("could not register worker %s", name)
        return
    log.info("worker %s serves queues %s", name, ", ".join(queues))

    def loop() -> None:
        while not _stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                beat(settings, name)

    threading.Thread(target=loop, name="kdistill-registry", daemon=True).start()


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    _stop.set()
    with contextlib.suppress(Exception):
        unregister(get_settings(), sender.hostname if sender is not None else "")
