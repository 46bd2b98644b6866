"""Alembic: upgrade head, downgrade to base, upgrade again, on SQLite and on a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from services import fresh_postgres
from sqlalchemy import create_engine, inspect

from app.db import engine_for, session_scope
from app.keys import create_key, tenant_for_key
from app.migrate import downgrade, upgrade

TABLES = {"tenants", "api_keys", "teachers", "datasets", "jobs", "job_events", "artifacts"}


@contextmanager
def _empty_database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        with fresh_postgres() as url:
            yield url


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_upgrade_downgrade_upgrade(kind: str, tmp_path: Path) -> None:
    with _empty_database(kind, tmp_path) as url:
        upgrade(url)
        assert _tables(url) >= TABLES
        downgrade(url, "base")
        assert not _tables(url) & TABLES
        upgrade(url)
        assert _tables(url) >= TABLES
        upgrade(url)  # already at head: nothing to do
        with session_scope(url) as s:
            key = create_key(s, "after-migrations")
        with session_scope(url) as s:
            tenant = tenant_for_key(s, key)
            assert tenant is not None and tenant.name == "after-migrations"
        engine_for(url).dispose()  # let the database be dropped
