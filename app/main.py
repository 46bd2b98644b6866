"""The FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from worker.sandbox import log_protections_once, make_undumpable

from . import lifecycle
from .api.errors import install_error_handlers
from .api.guard import RequestGuard
from .api.metrics import install_metrics
from .api.routes import catalog, datasets, health, jobs, sweeps, teachers, ui
from .api.schemas import ERROR_RESPONSES
from .api.uploads import UploadGuard, remove_orphaned_uploads
from .db import database_unreachable, session_scope
from .logs import setup_logging
from .settings import Settings, get_settings
from .storage import S3Store, get_store

log = logging.getLogger("kdistill.api")

DESCRIPTION = """Distill small, fast student models from large teachers.

Upload a teacher (`POST /v1/teachers`) and a dataset (`POST /v1/datasets`), create a job
(`POST /v1/jobs`), poll it (`GET /v1/jobs/{id}`), and download the student
(`GET /v1/jobs/{id}/artifacts/{name}`). Search temperature, alpha and the method with a sweep
(`POST /v1/sweeps`): its trials are ordinary jobs. Every error is JSON: `{"code", "message", "field"?}`.
Authenticate with `Authorization: Bearer <api key>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    make_undumpable()
    for d in (settings.data_dir, settings.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    # Swagger UI and ReDoc from files inside the wheel (fastapi-offline), not a CDN: internal networks are
    # often offline, and the docs must work there
    # (ReDoc's page is app.api.routes.ui's, on the same files.)
    app = FastAPIOffline(title="kdistill", version="1", description=DESCRIPTION, lifespan=_lifespan,
                         static_url=ui.DOCS_ASSETS, redoc_url=None)
    app.state.settings = settings
    install_error_handlers(app)
    # The last added runs first: metrics see every request, the guard (Host, Origin, API key) refuses before
    # the upload guard or any form parser reads a byte of the body.
    app.add_middleware(UploadGuard, settings=settings)
    app.add_middleware(RequestGuard, settings=settings)
    install_metrics(app, settings)
    app.include_router(health.router)
    ui.install(app)
    for module in (teachers, datasets, jobs, sweeps, catalog):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    if settings.auth == "disabled":
        log.warning("API keys are switched off: every caller is tenant 'local'")
    log_protections_once(settings)  # the upload inspector's sandbox, said once at start-up
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    removed = await run_in_threadpool(remove_orphaned_uploads, settings.tmp_dir)
    if removed:
        log.info("removed %d upload folder(s) left by a server that stopped mid-upload", removed)
    store = get_store(settings)
    if isinstance(store, S3Store):
        await run_in_threadpool(store.ensure_bucket)
    sweeper = asyncio.create_task(_sweep(settings))
    searcher = asyncio.create_task(_advance_searches(settings))
    try:
        yield
    finally:
        sweeper.cancel()
        searcher.cancel()


async def _sweep(settings: Settings) -> None:
    """The database is the truth: app.lifecycle's recovery rules, then the artifacts' retention (app.retention),
    every sweep_interval."""
    while True:
        await asyncio.sleep(settings.sweep_interval)
        try:
            def sweep() -> lifecycle.Swept:
                with session_scope(settings.resolved_database_url) as s:
                    return lifecycle.sweep(s, settings)
            if swept := await run_in_threadpool(sweep):
                log.info("sweep: sent %d job(s) again, ended %d", len(swept.sent), len(swept.ended))
        except Exception as e:  # the sweep retries next time; the API keeps serving
            _log_loop_failure("the sweep", settings.sweep_interval, e)
        if settings.retention_days > 0:
            try:  # apart from the sweep above: one failing never stops the other
                await run_in_threadpool(_expire_artifacts, settings)
            except Exception as e:
                _log_loop_failure("expiring old artifacts", settings.sweep_interval, e)


def _expire_artifacts(settings: Settings) -> None:
    """Artifacts of jobs finished longer ago than KDISTILL_RETENTION_DAYS (app.retention)."""
    from . import retention

    with session_scope(settings.resolved_database_url) as s:
        retention.expire_artifacts(s, settings, get_store(settings))


async def _advance_searches(settings: Settings) -> None:
    """Hyperparameter sweeps (/v1/sweeps, app.searches), every search_interval: tell Optuna the trials that
    ended, prune, start the next trials. Every API process runs it; a sweep's row lock keeps passes apart."""
    from . import searches

    while True:
        await asyncio.sleep(settings.search_interval)
        try:
            await run_in_threadpool(searches.advance_running, settings)
        except Exception as e:  # e.g. the database is down: the next pass retries
            _log_loop_failure("advancing the sweeps", settings.search_interval, e)


def _log_loop_failure(what: str, interval: float, e: Exception) -> None:
    """One line while the database is unreachable (every few seconds, an outage would flood the log with the
    same traceback; and Python 3.11 builds a traceback's carets with `ast`, whose recursion counter is shared
    by threads, so a traceback formatted here can break `ast` use in the main thread), a traceback otherwise."""
    if database_unreachable(e):
        log.warning("%s failed: the database is unreachable (%s); again in %.0f s", what, type(e).__name__,
                    interval)
    else:
        log.warning("%s failed; again in %.0f s", what, interval, exc_info=True)


def app_factory() -> FastAPI:
    """For `uvicorn --factory app.main:app_factory` in production: JSON logs, settings from the environment."""
    settings = get_settings()
    setup_logging(settings.log_format, settings.log_level)
    return create_app(settings)
