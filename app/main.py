"""The FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from worker.sandbox import log_protections_once, make_undumpable

from .api.errors import install_error_handlers
from .api.guard import RequestGuard
from .api.metrics import install_metrics
from .api.routes import datasets, health, jobs, teachers
from .api.schemas import ERROR_RESPONSES
from .api.uploads import UploadGuard
from .db import session_scope
from .logs import setup_logging
from .queue import requeue_pending
from .settings import Settings, get_settings
from .storage import S3Store, get_store

log = logging.getLogger("kdistill.api")
SWEEP_SECONDS = 60.0

DESCRIPTION = """Distill small, fast student models from large teachers.

Upload a teacher (`POST /v1/teachers`) and a dataset (`POST /v1/datasets`), create a job
(`POST /v1/jobs`), poll it (`GET /v1/jobs/{id}`), and download the student
(`GET /v1/jobs/{id}/artifacts/{name}`). Every error is JSON: `{"code", "message", "field"?}`.
Authenticate with `Authorization: Bearer <api key>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    make_undumpable()
    for d in (settings.data_dir, settings.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="kdistill", version="1", description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    # The last added runs first: metrics see every request, the guard (Host, Origin, API key) refuses before
    # the upload guard or any form parser reads a byte of the body.
    app.add_middleware(UploadGuard, settings=settings)
    app.add_middleware(RequestGuard, settings=settings)
    install_metrics(app, settings)
    app.include_router(health.router)
    for module in (teachers, datasets, jobs):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    if settings.auth == "disabled":
        log.warning("API keys are switched off: every caller is tenant 'local'")
    log_protections_once(settings)  # the upload inspector's sandbox, said once at start-up
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    store = get_store(settings)
    if isinstance(store, S3Store):
        await run_in_threadpool(store.ensure_bucket)
    sweeper = asyncio.create_task(_sweep(settings))
    try:
        yield
    finally:
        sweeper.cancel()


async def _sweep(settings: Settings) -> None:
    """The database is the truth: jobs whose message never reached the broker are sent again."""
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            def sweep() -> int:
                with session_scope(settings.resolved_database_url) as s:
                    return requeue_pending(s, settings)
            if n := await run_in_threadpool(sweep):
                log.info("re-sent %d queued job(s) to the broker", n)
        except Exception:  # the sweep retries next minute; the API keeps serving
            log.exception("requeue sweep failed")


def app_factory() -> FastAPI:
    """For `uvicorn --factory app.main:app_factory` in production: JSON logs, settings from the environment."""
    settings = get_settings()
    setup_logging(settings.log_format, settings.log_level)
    return create_app(settings)
