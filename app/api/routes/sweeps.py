"""/v1/sweeps: hyperparameter sweeps whose trials are ordinary jobs (app.searches drives them)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import searches
from app.jobs import request_hash
from app.models import SweepRecord

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import ApiError, get_owned
from ..pagination import page
from ..schemas import Page, SweepCreate, SweepOut, SweepStatus

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
log = logging.getLogger("kdistill.api")


def _own(session: SessionDep, tenant_id: str, sweep_id: str) -> SweepRecord:
    return get_owned(session, SweepRecord, sweep_id, tenant_id)


def _by_key(session: SessionDep, tenant_id: str, key: str) -> SweepRecord | None:
    return session.scalar(select(SweepRecord).where(SweepRecord.tenant_id == tenant_id,
                                                    SweepRecord.idempotency_key == key))


def _replay(session: SessionDep, sweep: SweepRecord, digest: str, response: Response) -> dict[str, Any]:
    if sweep.request_hash != digest:
        raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was already used with a different "
                       f"request body (sweep {sweep.id}); use a new key for a new sweep", "Idempotency-Key")
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return searches.sweep_view(session, sweep)


@router.post("", status_code=202, response_model=SweepOut, summary="Start a hyperparameter sweep",
             description="A job request plus a search space: Optuna (TPE, median pruning on the per-epoch "
             "validation accuracy) picks each trial's values, and each trial is an ordinary job. The first "
             "`max_parallel` trials are queued before this answers.",
             responses={409: {"description": "Idempotency-Key reused with another body"}})
def create_sweep(
    body: SweepCreate, response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    digest = request_hash(body.model_dump(mode="json"))
    if idempotency_key and (existing := _by_key(session, tenant.id, idempotency_key)) is not None:
        return _replay(session, existing, digest, response)
    sweep = searches.create(session, settings, tenant.id, body, idempotency_key=idempotency_key, digest=digest)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        existing = _by_key(session, tenant.id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(session, existing, digest, response)
    try:
        searches.advance(settings, sweep.id)
    except Exception:  # the sweep is on record: the periodic pass starts its trials
        log.warning("sweep %s: its first trials could not start now; the next pass retries", sweep.id,
                    exc_info=True)
    session.refresh(sweep)
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return searches.sweep_view(session, sweep)


@router.get("", response_model=Page[SweepOut], summary="List sweeps, newest first (without their trials)")
def list_sweeps(session: SessionDep, tenant: TenantDep, status: SweepStatus | None = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50, after: str | None = None) -> dict[str, Any]:
    query = select(SweepRecord)
    if status is not None:
        query = query.where(SweepRecord.status == status)
    items, cursor = page(session, query, SweepRecord, tenant_id=tenant.id, limit=limit, after=after)
    return {"items": [searches.sweep_view(session, s, with_trials=False) for s in items], "next_cursor": cursor}


@router.get("/{sweep_id}", response_model=SweepOut, summary="One sweep: its trials, counts and best trial")
def get_sweep(sweep_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return searches.sweep_view(session, _own(session, tenant.id, sweep_id))


@router.post("/{sweep_id}/cancel", response_model=SweepOut, summary="Cancel a sweep and its unfinished trials",
             description="Queued trials are cancelled at once, running ones stop at their next step; the "
             "trials that completed keep their results and the sweep its best so far.")
def cancel_sweep(sweep_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    sweep = _own(session, tenant.id, sweep_id)
    if searches.cancel(session, sweep) == "final" and sweep.status != searches.CANCELLED:
        raise ApiError(409, "sweep_finished", f"sweep {sweep_id} already {sweep.status}; there is nothing to cancel")
    session.commit()
    try:
        searches.settle(settings, sweep_id)
    except Exception:  # Optuna's record of a finished sweep is a nicety; the cancellation itself is done
        log.warning("sweep %s: cancelled, but its study could not be brought up to date", sweep_id, exc_info=True)
    session.refresh(sweep)
    return searches.sweep_view(session, sweep)
