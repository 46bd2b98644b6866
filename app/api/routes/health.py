"""Liveness and readiness."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.db import engine_for

from ..deps import SettingsDep

router = APIRouter(tags=["health"])
log = logging.getLogger("kdistill.api")


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the database and the broker are reachable")
async def readyz(settings: SettingsDep) -> JSONResponse:
    """Anyone may ask, so a failure is named by a code only (`database_unreachable`, `broker_unreachable`);
    the error itself, which can carry host names, user names or paths, goes to the server's log."""
    checks: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for name, probe in (("database", _database), ("broker", _broker)):
        try:
            await run_in_threadpool(probe, settings)
            checks[name] = "ok"
        except Exception:  # any failure means not ready; say which, and why only in the log
            log.warning("readiness: the %s is unreachable", name, exc_info=True)
            checks[name] = f"error: {name} unreachable"
            errors.append({"code": f"{name}_unreachable", "message": f"the {name} is unreachable; the error "
                           "is in the server's log"})
    ready = not errors
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=200 if ready else 503)


def _database(settings: Any) -> None:
    with engine_for(settings.resolved_database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker(settings: Any) -> None:
    from worker.celery_app import get_celery

    with get_celery(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
