"""Alembic: upgrade head, downgrade to base, upgrade again, on SQLite and on a fresh PostgreSQL database; the
migrated schema equals the models; a later migration keeps the rows of an earlier schema."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from services import fresh_postgres
from sqlalchemy import create_engine, inspect, text

from app.db import engine_for, session_scope
from app.jobs import job_view
from app.keys import create_key, tenant_for_key
from app.migrate import downgrade, upgrade
from app.models import Base, Dataset, Job, Teacher, utcnow

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


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrated_schema_matches_the_models(kind: str, tmp_path: Path) -> None:
    """What the migrations create is what the ORM models declare: no column the models lack or miss."""
    with _empty_database(kind, tmp_path) as url:
        upgrade(url)
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                diff = compare_metadata(context, Base.metadata)
        finally:
            engine.dispose()
        assert diff == [], diff


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_0003_keeps_existing_rows_and_gives_them_the_defaults(kind: str, tmp_path: Path) -> None:
    """Teachers, datasets and jobs made before 0003 read back with no names, no test split, no warnings."""
    with _empty_database(kind, tmp_path) as url:
        upgrade(url, "0002")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('tn_1', 'old', :now)"),
                             {"now": utcnow()})
                conn.execute(text(
                    "INSERT INTO teachers (id, tenant_id, filename, format, arch, num_classes, input_channels, "
                    "input_size, mean, std, sha256, size_bytes, storage_key, details, created_at) VALUES ('tch_1', "
                    "'tn_1', 't.onnx', 'onnx', NULL, 10, 1, '[8, 8]', '[0.5]', '[0.5]', :h, 1, 'k', '{}', :now)"),
                    {"h": "0" * 64, "now": utcnow()})
                conn.execute(text(
                    "INSERT INTO datasets (id, tenant_id, filename, format, classes, num_classes, num_train, num_val, "
                    "num_unlabeled, channels, image_size, val_source, sha256, size_bytes, storage_key, created_at) "
                    "VALUES ('ds_1', 'tn_1', 'd.npz', 'npz', '[\"a\", \"b\"]', 2, 8, 2, 0, 1, '[8, 8]', 'given', "
                    ":h, 1, 'k', :now)"), {"h": "0" * 64, "now": utcnow()})
                conn.execute(text(
                    "INSERT INTO jobs (id, tenant_id, teacher_id, dataset_id, status, queue, request, request_hash, "
                    "progress, metrics, cancel_requested, attempts, created_at) VALUES ('job_1', 'tn_1', 'tch_1', "
                    "'ds_1', 'queued', 'cpu', '{}', 'x', '{}', '{}', false, 0, :now)"), {"now": utcnow()})
        finally:
            engine.dispose()
        upgrade(url)
        with session_scope(url) as s:
            assert s.get(Teacher, "tch_1").classes is None
            ds = s.get(Dataset, "ds_1")
            assert ds.num_test == 0 and ds.test_source is None
            job = s.get(Job, "job_1")
            assert job.warnings == []
            assert job_view(job)["warnings"] == [] and job_view(job)["progress"]["epochs"] == 10
        downgrade(url, "0002")  # and back: the old schema, the rows still there
        engine = create_engine(url)
        try:
            columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
            assert "warnings" not in columns
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
        finally:
            engine.dispose()
        engine_for(url).dispose()  # let the database be dropped
