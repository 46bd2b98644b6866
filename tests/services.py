"""Real PostgreSQL and Redis for the tests: a fresh database per test run, a private Redis database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

PG_ADMIN = os.environ.get("KDISTILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KDISTILL_TEST_REDIS", "redis://127.0.0.1:6379")


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """Create an empty database, yield its SQLAlchemy URL, drop it afterwards."""
    name = f"kdistill_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_redis(db: int = 13) -> Iterator[str]:
    """A Redis database emptied before and after use: `db` (8-13, one per suite) on pytest-xdist's first
    worker or without xdist, `db - 6` (2-7) on the second, so that two workers never flush each other's."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if worker > 1:
        raise RuntimeError("the suite's Redis databases are laid out for at most two xdist workers (-n 2)")
    url = f"{REDIS_URL}/{db - 6 * worker}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
