"""API keys: random tokens shown once, stored only as their sha256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant, utcnow

KEY_PREFIX = "kd_"
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, name: str = "") -> str:
    """Create a key for `tenant_name` (made if new) and return it; only its hash is kept."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, name=name, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    now = utcnow()
    # A write per request would make every poll a database write; a minute's precision is plenty.
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now
    return row.tenant
