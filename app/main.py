"""The FastAPI application."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from .api.errors import install_error_handlers
from .api.routes import datasets, health, jobs, teachers
from .settings import Settings, get_settings

DESCRIPTION = """Distill small, fast student models from large teachers.

Upload a teacher (`POST /v1/teachers`) and a dataset (`POST /v1/datasets`), create a job
(`POST /v1/jobs`), poll it (`GET /v1/jobs/{id}`), and download the student
(`GET /v1/jobs/{id}/artifacts/{name}`). Every error is JSON: `{"code", "message", "field"?}`.
Authenticate with `Authorization: Bearer <api key>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    for d in (settings.data_dir, settings.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="kdistill", version="1", description=DESCRIPTION)
    app.state.settings = settings
    install_error_handlers(app)
    for module in (health, teachers, datasets, jobs):
        app.include_router(module.router)
    if settings.auth == "disabled":
        logging.getLogger("kdistill.api").warning("API keys are switched off: every caller is tenant 'local'")
    return app


def app_factory() -> FastAPI:
    """For `uvicorn --factory app.main:app_factory`."""
    return create_app()
