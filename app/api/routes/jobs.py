"""/v1/jobs: create (checked now, not later), list, read, events, a live stream, cancel, artifact downloads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app import lifecycle
from app.db import database_unreachable, session_scope
from app.job_stream import JobWatch
from app.jobs import job_view, request_hash
from app.models import Artifact, Job, JobEvent
from app.storage import get_store
from app.submission import new_job

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import ApiError, get_owned, not_found
from ..pagination import page
from ..schemas import ERROR_RESPONSES, EventOut, JobCreate, JobOut, JobStatus, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_EVENT_ID = 2**63 - 1  # the largest BIGINT: past it the database itself would refuse the query
MEDIA_TYPES = {"onnx": "application/onnx", "metadata": "application/json"}
# Errors of the stream are JSON, sent before it starts; FastAPI would document them as text/event-stream.
STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": spec["description"],
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for status, spec in ERROR_RESPONSES.items()}


def _own_job(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    return get_owned(session, Job, job_id, tenant_id)


@router.post("", status_code=202, response_model=JobOut, summary="Create a distillation job",
             responses={409: {"description": "Idempotency-Key reused with another body"}})
def create_job(
    body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    request = body.model_dump(mode="json")
    digest = request_hash(request)
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id,
                                                    Job.idempotency_key == idempotency_key))
        if existing is not None:
            response.headers["Location"] = f"/v1/jobs/{existing.id}"
            return _replay(existing, digest)
    job = new_job(session, settings, tenant.id, body, idempotency_key=idempotency_key)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id,
                                                    Job.idempotency_key == idempotency_key))
        if existing is None:
            raise
        response.headers["Location"] = f"/v1/jobs/{existing.id}"
        return _replay(existing, digest)
    if lifecycle.send(session, settings, job):
        session.commit()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job)


def _replay(job: Job, digest: str) -> dict[str, Any]:
    if job.request_hash != digest:
        raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was already used with a different "
                       f"request body (job {job.id}); use a new key for a new job", "Idempotency-Key")
    return job_view(job)


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(session: SessionDep, tenant: TenantDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50, after: str | None = None,
              sweep_id: Annotated[str | None, Query(max_length=40, description="only this sweep's trials")] = None,
              ) -> dict[str, Any]:
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == status)
    if sweep_id is not None:
        query = query.where(Job.sweep_id == sweep_id)
    items, cursor = page(session, query, Job, tenant_id=tenant.id, limit=limit, after=after)
    return {"items": [job_view(j) for j in items], "next_cursor": cursor}


@router.get("/{job_id}", response_model=JobOut, summary="One job: status, progress, metrics, artifacts")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return job_view(_own_job(session, tenant.id, job_id))


@router.get("/{job_id}/events", response_model=Page[EventOut], summary="The job's timeline, oldest first")
def job_events(job_id: str, session: SessionDep, tenant: TenantDep,
               limit: Annotated[int, Query(ge=1, le=1000)] = 200,
               after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID,
                                                  description="the last event id seen")] = None) -> dict[str, Any]:
    _own_job(session, tenant.id, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    items = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next_cursor": str(items[-1].id) if more else None}


def _check_owner(job_id: str, settings: SettingsDep, tenant: TenantDep) -> None:
    # its own short session: the stream that follows must not hold a database connection for its lifetime
    with session_scope(settings.resolved_database_url) as session:
        _own_job(session, tenant.id, job_id)


@router.get("/{job_id}/stream", response_class=EventSourceResponse, dependencies=[Depends(_check_owner)],
            responses=STREAM_ERRORS,
            summary="Follow a job live (server-sent events)",
            description="`job`: the whole job, first and whenever anything but its progress changes; `progress`: on "
            "each change; `epoch` (per-epoch metrics) and `event` (the rest of the timeline), each with the event "
            "id as SSE `id`: every past one first, then as they come; `end` once the job is final, then the "
            "stream closes. Resume with `after` (or the `Last-Event-ID` header) to skip the events already seen.")
async def stream_job(
    job_id: str, request: Request, settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="the last event id seen")] = None,
    last_event_id: Annotated[str | None, Header(max_length=30)] = None,
) -> AsyncIterator[ServerSentEvent]:
    resumed = int(last_event_id) if last_event_id and last_event_id.isascii() and last_event_id.isdigit() else None
    seen = [v for v in (after, resumed) if v is not None and v <= MAX_EVENT_ID]
    watch = JobWatch(job_id, after=max(seen) if seen else None)

    def poll() -> list[ServerSentEvent]:
        with session_scope(settings.resolved_database_url) as session:
            return watch.poll(session)

    while True:
        try:
            messages = await run_in_threadpool(poll)
        except Exception as e:  # a database outage pauses the stream; the client keeps its connection
            if not database_unreachable(e):
                raise
            messages = []
        for message in messages:
            yield message
        if watch.ended or await request.is_disconnected():
            return
        await asyncio.sleep(settings.stream_interval)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a job",
             description="queued: cancelled at once; running: stops at the next training step")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _own_job(session, tenant.id, job_id)
    if lifecycle.request_cancel(session, job) == "final" and job.status != "cancelled":
        raise ApiError(409, "job_finished", f"job {job_id} already {job.status}; there is nothing to cancel")
    session.commit()
    session.refresh(job)
    return job_view(job)


@router.get("/{job_id}/artifacts/{name}", summary="Download one artifact",
            response_class=StreamingResponse, responses={200: {"content": {"application/octet-stream": {}}}})
def download_artifact(job_id: str, name: str, request: Request, session: SessionDep, settings: SettingsDep,
                      tenant: TenantDep) -> Response:
    _own_job(session, tenant.id, job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        raise not_found("artifact", name)
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Content-Disposition": f'attachment; filename="{artifact.name}"',
               "X-Checksum-Sha256": artifact.sha256}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    store = get_store(settings)
    headers["Content-Length"] = str(store.size(artifact.storage_key))
    return StreamingResponse(store.open_chunks(artifact.storage_key), headers=headers,
                             media_type=MEDIA_TYPES.get(artifact.format, "application/octet-stream"))

