"""FastAPI dependencies: settings, a database session per request, and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.db import session_scope
from app.keys import LOCAL_TENANT, get_or_create_tenant, tenant_for_key
from app.models import Tenant
from app.settings import Settings

from .errors import ApiError


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_scope(settings.resolved_database_url) as session:
        yield session


def current_tenant(
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
) -> Tenant:
    if settings.auth == "disabled":
        return get_or_create_tenant(session, LOCAL_TENANT)
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'; "
                       "create one with `kdistill keys create`")
    tenant = tenant_for_key(session, authorization[7:].strip())
    if tenant is None:
        raise ApiError(401, "invalid_api_key", "this API key is unknown or revoked")
    return tenant


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]
