"""The Celery app: settings for long GPU jobs (one at a time, acknowledged when it ends)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import setup_logging as celery_setup_logging

from app.logs import setup_logging
from app.settings import Settings, get_settings


@celery_setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    # Connecting here replaces Celery's own logging setup with kdistill's (JSON lines by default).
    settings = get_settings()
    level = loglevel if isinstance(loglevel, str) else settings.log_level
    setup_logging(settings.log_format, level)


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`: Redis in production, the filesystem transport on one machine."""
    app = Celery("kdistill", broker=settings.resolved_broker_url, include=["worker.tasks", "worker.registry"])
    options: dict = {"visibility_timeout": settings.visibility_timeout}
    if settings.resolved_broker_url.startswith("filesystem"):
        folder = settings.broker_dir.resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                   "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control"),
                   "store_processed": False,
                   "polling_interval": 0.2}  # an idle worker looks for new files 5 times a second (1 s default)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.default_queue,
        # The message stays with the broker until the job has ended, and a task that fails is acknowledged:
        # recovery does not rest on redelivery, which the solo pool and the Redis transport do not give
        # reliably (a lost worker's message waits for the visibility timeout, a failed one is dropped). The
        # database does it: app.lifecycle's sweep sends a lost job again within STALE_AFTER + SWEEP_INTERVAL.
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,  # one job per worker process (per GPU), none held in reserve
        worker_max_tasks_per_child=1000,
        task_ignore_result=True,  # the database holds every result
        task_track_started=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        broker_heartbeat=30,
        broker_connection_timeout=5,
    )
    app.conf.kdistill_settings = settings
    return app


@lru_cache
def _cached(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def get_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    return _cached(settings.model_dump_json())


def __getattr__(name: str) -> Celery:
    # `celery -A worker.celery_app worker` looks up `app`; built on first use so importing this module
    # from the API creates no folders and opens no connections.
    if name == "app":
        return get_celery()
    raise AttributeError(name)
