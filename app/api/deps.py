"""FastAPI dependencies: settings, a database session per request, and the caller's tenant."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.db import session_scope
from app.keys import LOCAL_TENANT, get_or_create_tenant, hash_key, tenant_for_key
from app.models import Tenant
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


AUTH_CACHE_SECONDS = 10.0  # a revoked key stops working within this long
_auth_cache: dict[tuple[str, str], tuple[TenantRef, float]] = {}


def current_tenant(
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
) -> TenantRef:
    if settings.auth == "disabled":
        return _cached(settings, "", lambda: get_or_create_tenant(session, LOCAL_TENANT))
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'; "
                       "create one with `kdistill keys create`")
    ref = _cached(settings, hash_key(authorization[7:].strip()),
                  lambda: tenant_for_key(session, authorization[7:].strip()))
    if ref is None:
        raise ApiError(401, "invalid_api_key", "this API key is unknown or revoked")
    return ref


def _cached(settings: Settings, key_hash: str, lookup: Callable[[], Tenant | None]) -> TenantRef | None:
    # Polling clients send the same key many times a second; a database lookup each time is wasted work.
    slot = (settings.resolved_database_url, key_hash)
    hit = _auth_cache.get(slot)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    tenant = lookup()
    if tenant is None:
        _auth_cache.pop(slot, None)
        return None
    ref = TenantRef(tenant.id, tenant.name)
    if len(_auth_cache) > 10_000:
        _auth_cache.clear()
    _auth_cache[slot] = (ref, now + AUTH_CACHE_SECONDS)
    return ref


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[TenantRef, Depends(current_tenant)]
