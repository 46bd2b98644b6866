"""One JSON error shape everywhere: `{"code", "message", "field"?}` with a stable code."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import database_unreachable
from worker.distill.errors import DistillError

log = logging.getLogger("kdistill.api")


class ApiError(Exception):
    """Raise from a route to answer `status` with a stable `code`; `extra` adds fields to the body (any name,
    `status` too: the first four are positional-only)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, /, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra
        # True: absent only as far as this caller can tell (another tenant may own it); the handler says
        # so when API keys are on, and only then, since with keys off there is one tenant
        self.per_key = False
        self.headers: dict[str, str] = {}  # sent with the answer, e.g. Content-Range on a 416


PER_KEY_SUFFIX = " (for this API key)"


def not_found(kind: str, ident: str, field: str | None = None) -> ApiError:
    """404 `<kind>_not_found`; the handler adds PER_KEY_SUFFIX to the message when API keys are required."""
    e = ApiError(404, f"{kind}_not_found", f"no {kind} with id {ident!r}", field)
    e.per_key = True
    return e


def in_use(kind: str, ident: str, job_ids: list[str], sweep_ids: list[str]) -> ApiError:
    """409 `<kind>_in_use`: a teacher or dataset that queued or running jobs (or running sweeps) still need."""
    users = [*(f"job {j}" for j in job_ids), *(f"sweep {s}" for s in sweep_ids)]
    shown = ", ".join(users[:20]) + (f" and {len(users) - 20} more" if len(users) > 20 else "")
    return ApiError(409, f"{kind}_in_use", f"{kind} {ident} is used by {shown}; delete it once they have finished "
                    "(or cancel them first)", job_ids=job_ids, sweep_ids=sweep_ids)


def get_owned(session: Any, model: Any, ident: str, tenant_id: str, field: str | None = None) -> Any:
    """The tenant's object by id; another tenant's object, or a deleted one (`deleted_at` set), is as absent
    as a made-up id (404)."""
    obj = session.get(model, ident)
    if obj is None or obj.tenant_id != tenant_id or getattr(obj, "deleted_at", None) is not None:
        raise not_found(model.__tablename__.removesuffix("s"), ident, field)
    return obj


def error_body(code: str, message: str, field: str | None = None, /, **extra: Any) -> dict[str, Any]:
    # Messages quote untrusted names; one that is not valid Unicode must not turn a 4xx into a 500.
    body: dict[str, Any] = {"code": code, "message": _text(message)}
    if field:
        body["field"] = _text(field)
    body.update(extra)
    return body


def _text(s: str) -> str:
    """`s` as valid UTF-8 text: lone surrogates (from undecodable bytes) become backslash escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


RETRY_AFTER_SECONDS = 5


def database_unavailable() -> ApiError:
    """The answer while the database cannot be reached: 503, worth retrying, never a 500."""
    return ApiError(503, "database_unavailable", "the database is unreachable for the moment; nothing was "
                    f"changed. Retry in a few seconds (Retry-After: {RETRY_AFTER_SECONDS})",
                    retry_after=RETRY_AFTER_SECONDS)


def unavailable_response(method: str, path: str) -> JSONResponse:
    log.warning("%s %s: the database is unreachable; answered 503", method, path)
    e = database_unavailable()
    return JSONResponse(error_body(e.code, e.message, **e.extra), status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        message = e.message
        if e.per_key and request.app.state.settings.auth == "required":
            message += PER_KEY_SUFFIX
        headers = dict(e.headers)
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(e.code, message, e.field, **e.extra), status_code=e.status,
                            headers=headers or None)

    @app.exception_handler(DistillError)
    async def _distill_error(_: Request, e: DistillError) -> JSONResponse:
        status = e.status if 400 <= e.status < 500 else 422
        return JSONResponse(error_body(e.code, e.message, e.field), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        details = [{"field": ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path",
                                                                                         "header")),
                    "message": err.get("msg")} for err in errors]
        code = "invalid_hyperparameter" if field and field.startswith("hyperparameters") else "validation_error"
        return JSONResponse(error_body(code, f"{field}: {msg}" if field else msg, field, errors=details),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = getattr(e, "code", None) or HTTP_CODES.get(e.status_code, "http_error")
        return JSONResponse(error_body(code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, e: SQLAlchemyError) -> JSONResponse:
        if database_unreachable(e):
            return unavailable_response(request.method, request.url.path)
        return await _unexpected(request, e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        if database_unreachable(e):
            return unavailable_response(request.method, request.url.path)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "the server failed to answer; the error is logged"),
                            status_code=500)
