"""/v1/jobs: create (checked now, not later), list, read, events, a live stream, cancel, delete, artifact
downloads (HEAD, single byte ranges)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import lifecycle, retention
from app.db import database_unreachable, session_scope
from app.job_stream import JobWatch
from app.jobs import job_view, request_hash
from app.models import Dataset, Job, JobEvent, Teacher
from app.settings import Settings
from app.storage import get_store
from app.submission import new_job

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import ApiError, get_owned, not_found
from ..pagination import page
from ..schemas import ERROR_RESPONSES, ErrorOut, EventOut, JobCreate, JobOut, JobStatus, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_EVENT_ID = 2**63 - 1  # the largest BIGINT: past it the database itself would refuse the query
MEDIA_TYPES = {"onnx": "application/onnx", "metadata": "application/json", "tensorboard": "application/gzip"}
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
        # The inserted job holds off a DELETE of its teacher or dataset (a key-share lock on PostgreSQL, the
        # write lock on SQLite) until it commits; one deleted just before is caught by the check after it.
        session.flush()
        _inputs_not_deleted(session, body)
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


def _inputs_not_deleted(session: Session, body: JobCreate) -> None:
    for model, ident, field in ((Teacher, body.teacher_id, "teacher_id"), (Dataset, body.dataset_id, "dataset_id")):
        if session.scalar(select(model.deleted_at).where(model.id == ident)) is not None:
            raise not_found(model.__tablename__.removesuffix("s"), ident, field)


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


@router.delete("/{job_id}", status_code=204, response_class=Response, summary="Delete a finished job",
               description="Removes its artifacts and checkpoints from the store, then the job with its events. "
               "409 `job_not_finished` (with `status`) while it is queued or running: cancel it first.",
               responses={409: {"model": ErrorOut, "description": "The job is not finished (`job_not_finished`)"}})
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    job = _own_job(session, tenant.id, job_id)
    if not retention.delete_job(session, get_store(settings), job):
        raise ApiError(409, "job_not_finished", f"job {job_id} is {job.status}; only a finished job can be deleted: "
                       f"cancel it first (POST /v1/jobs/{job_id}/cancel) and delete it once it has stopped",
                       status=job.status)
    return Response(status_code=204)


ARTIFACT_PATH = "/{job_id}/artifacts/{name}"
ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The whole file"},
    206: {"content": {"application/octet-stream": {}}, "description": "The one byte range asked for (`Range`)"},
    404: {"model": ErrorOut, "description": "No such job, or no such artifact (`available` lists the names)"},
    409: {"model": ErrorOut, "description": "The job is not finished (`job_not_finished`, with `status`)"},
    410: {"model": ErrorOut, "description": "Removed by the retention sweep (`artifacts_expired`)"},
    416: {"model": ErrorOut, "description": "The range is outside the file (`range_not_satisfiable`)"},
}


@router.get(ARTIFACT_PATH, summary="Download one artifact", response_class=StreamingResponse,
            responses=ARTIFACT_RESPONSES,
            description="Answers `ETag` (its sha256), `Accept-Ranges: bytes`; `If-None-Match` gives 304; one "
            "`Range: bytes=a-b`, `a-` or `-n` gives 206 with `Content-Range` (honoured only while `If-Range`, "
            "when sent, is the ETag); several ranges give the whole file.")
def download_artifact(job_id: str, name: str, request: Request, session: SessionDep, settings: SettingsDep,
                      tenant: TenantDep) -> Response:
    return _artifact(job_id, name, request, session, settings, tenant.id, body=True)


@router.head(ARTIFACT_PATH, summary="An artifact's headers, without its bytes", response_class=Response,
             responses={k: v for k, v in ARTIFACT_RESPONSES.items() if k != 206},
             description="The headers a GET would answer (Content-Length, ETag, Accept-Ranges, Content-Type).")
def artifact_headers(job_id: str, name: str, request: Request, session: SessionDep, settings: SettingsDep,
                     tenant: TenantDep) -> Response:
    return _artifact(job_id, name, request, session, settings, tenant.id, body=False)


def _artifact(job_id: str, name: str, request: Request, session: SessionDep, settings: Settings, tenant_id: str,
              body: bool) -> Response:
    job = _own_job(session, tenant_id, job_id)
    if job.status not in lifecycle.FINAL:
        raise ApiError(409, "job_not_finished", f"job {job_id} is {job.status}; artifacts are published when it "
                       "succeeds", status=job.status)
    if job.artifacts_expired_at is not None:
        raise _expired(job, settings)
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        names = [a.name for a in job.artifacts]
        raise ApiError(404, "artifact_not_found", f"job {job_id} ({job.status}) has no artifact {name!r}; "
                       f"it has {', '.join(names) if names else 'none'}", available=names)
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Content-Disposition": f'attachment; filename="{artifact.name}"',
               "X-Checksum-Sha256": artifact.sha256, "Accept-Ranges": "bytes"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    store = get_store(settings)
    size = store.size(artifact.storage_key)
    media_type = MEDIA_TYPES.get(artifact.format, "application/octet-stream")
    wanted = None
    if body and request.headers.get("if-range", etag) == etag:  # Range is for GET only (RFC 9110 14.2)
        wanted = byte_range(request.headers.get("range"), size)
    start, end = wanted or (0, size)
    headers["Content-Length"] = str(end - start)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    status = 206 if wanted is not None else 200
    if not body:
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(store.open_chunks(artifact.storage_key, start, end), status_code=status,
                             headers=headers, media_type=media_type)


def _expired(job: Job, settings: Settings) -> ApiError:
    when = job.artifacts_expired_at.isoformat(timespec="seconds") + "Z" if job.artifacts_expired_at else "?"
    rule = (f"jobs finished more than {settings.retention_days:g} day(s) ago lose their artifacts"
            if settings.retention_days > 0 else "artifacts of old finished jobs are removed")
    return ApiError(410, "artifacts_expired", f"the artifacts of job {job.id} were removed at {when} by the "
                    f"retention sweep: {rule} (KDISTILL_RETENTION_DAYS); run the job again to get them back",
                    expired_at=when)


def byte_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range of a `Range` header as (start, end exclusive), or None to send the whole file: no
    header, one that does not parse, another unit or several ranges (RFC 9110 14.2 lets a server ignore
    them). Raises 416 `range_not_satisfiable` when the range lies outside the file."""
    if not value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not all(p == "" or (p.isascii() and p.isdigit()) for p in (first, last)) or first == last == "":
        return None
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(value, size)
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored, as the RFC says
    if start >= size:
        raise _unsatisfiable(value, size)
    return start, min(int(last) + 1, size) if last else size


def _unsatisfiable(value: str, size: int) -> ApiError:
    e = ApiError(416, "range_not_satisfiable", f"the range {value[:100]!r} lies outside the file, which has "
                 f"{size} bytes", "Range")
    e.headers["Content-Range"] = f"bytes */{size}"
    return e
