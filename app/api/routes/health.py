"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.db import engine_for

from ..deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the database and the broker are reachable")
async def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    for name, probe in (("database", _database), ("broker", _broker)):
        try:
            await run_in_threadpool(probe, settings)
            checks[name] = "ok"
        except Exception as e:  # any failure means not ready; say which and why
            checks[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def _database(settings: Any) -> None:
    with engine_for(settings.resolved_database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker(settings: Any) -> None:
    from worker.celery_app import get_celery

    with get_celery(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
