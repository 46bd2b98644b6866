"""API keys: random tokens shown once, stored only as their sha256; and each tenant's webhook signing secret."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant, utcnow

KEY_PREFIX = "kd_"
WEBHOOK_SECRET_PREFIX = "whsec_"
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


def webhook_secret(session: Session, tenant_name: str, rotate: bool = False) -> str:
    """The secret that signs `tenant_name`'s webhook calls (tenant and secret made if new); `rotate` replaces
    it, and calls from then on are signed with the new one."""
    return secret_for_tenant(session, get_or_create_tenant(session, tenant_name), rotate=rotate)


def secret_for_tenant(session: Session, tenant: Tenant, rotate: bool = False) -> str:
    """The tenant's webhook secret, made on first use (or anew with `rotate`)."""
    if tenant.webhook_secret and not rotate:
        return tenant.webhook_secret
    new = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
    query = update(Tenant).where(Tenant.id == tenant.id)
    if not rotate:
        # Only where none exists: two workers (or a worker and `kdistill keys`) making the first one at once
        # must end up with the same secret, not each sign with its own.
        query = query.where(Tenant.webhook_secret.is_(None))
    session.execute(query.values(webhook_secret=new).execution_options(synchronize_session=False))
    session.refresh(tenant, ["webhook_secret"])
    if not tenant.webhook_secret:  # the tenant was deleted meanwhile
        raise LookupError(f"tenant {tenant.id} no longer exists")
    return tenant.webhook_secret
