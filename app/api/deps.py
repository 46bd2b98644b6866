"""FastAPI dependencies: settings, a database session per request, and the caller's tenant.

Who the caller is gets decided in one place, `authenticate`: the request guard (app/api/guard.py) calls it
for every /v1 request before any body is read and leaves the answer in `scope["state"]`; the `current_tenant`
dependency takes it from there (and calls `authenticate` itself only for an app built without the guard).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.keys import LOCAL_TENANT, get_or_create_tenant, hash_key, tenant_for_key
from app.settings import Settings

from .errors import ApiError


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_scope(settings.resolved_database_url) as session:
        yield session


@dataclass(frozen=True)
class TenantRef:
    """Who is calling: the tenant every object of the request must belong to."""

    id: str
    name: str


TENANT_STATE = "kdistill_tenant"  # the key under scope["state"] where the guard leaves the caller's TenantRef
AUTH_CACHE_SECONDS = 10.0  # a revoked key stops working within this long
_auth_cache: dict[tuple[str, str], tuple[TenantRef, float]] = {}


def _bearer_key(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise ApiError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'; "
                       "create one with `kdistill keys create`")
    return authorization[7:].strip()


def _slot(settings: Settings, authorization: str | None) -> tuple[str, str]:
    """The cache slot of this caller: the database and the key's sha256 ('' for the local tenant)."""
    key_hash = "" if settings.auth == "disabled" else hash_key(_bearer_key(authorization))
    return settings.resolved_database_url, key_hash


def cached_tenant(settings: Settings, authorization: str | None) -> TenantRef | None:
    """The caller from the cache, without touching the database; None on a miss. Raises missing_api_key."""
    hit = _auth_cache.get(_slot(settings, authorization))
    return hit[0] if hit is not None and hit[1] > time.monotonic() else None


def authenticate(settings: Settings, authorization: str | None, session: Session | None = None) -> TenantRef:
    """Who sends `authorization` (the Authorization header): the one decision on the caller, cached for
    AUTH_CACHE_SECONDS. Raises ApiError 401 `missing_api_key` / `invalid_api_key`. With keys switched off,
    everyone is the tenant 'local'. Blocking (it may query the database): call it from a thread."""
    slot = _slot(settings, authorization)
    hit = _auth_cache.get(slot)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    if session is None:
        with session_scope(settings.resolved_database_url) as own:
            ref = _lookup(settings, own, authorization)
    else:
        ref = _lookup(settings, session, authorization)
    if ref is None:
        _auth_cache.pop(slot, None)
        raise ApiError(401, "invalid_api_key", "this API key is unknown or revoked")
    if len(_auth_cache) > 10_000:
        _auth_cache.clear()
    _auth_cache[slot] = (ref, now + AUTH_CACHE_SECONDS)
    return ref


def _lookup(settings: Settings, session: Session, authorization: str | None) -> TenantRef | None:
    if settings.auth == "disabled":
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
    else:
        tenant = tenant_for_key(session, _bearer_key(authorization))
    # Read the fields while the session is open: the ref outlives it.
    return None if tenant is None else TenantRef(tenant.id, tenant.name)


async def current_tenant(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
) -> TenantRef:
    ref = request.scope.get("state", {}).get(TENANT_STATE)
    if isinstance(ref, TenantRef):  # the guard checked the key before the body was read
        return ref
    return await run_in_threadpool(authenticate, settings, authorization)


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[TenantRef, Depends(current_tenant)]
