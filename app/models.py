"""ORM models: tenants and their API keys, teachers, datasets, jobs, job events, artifacts, webhook deliveries
and sweeps."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so both databases store the same naive UTC values."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # signs the tenant's webhook deliveries (app.webhooks); made on first use, shown by `kdistill keys`
    webhook_secret: Mapped[str | None] = mapped_column(String(100), default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key; the key is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so people can tell keys apart
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship()


class Teacher(Base):
    __tablename__ = "teachers"
    __table_args__ = (Index("ix_teachers_tenant_sha256", "tenant_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tch"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(20))
    arch: Mapped[str | None] = mapped_column(String(100))
    num_classes: Mapped[int] = mapped_column(Integer)
    input_channels: Mapped[int] = mapped_column(Integer)
    input_size: Mapped[list[Any]] = mapped_column()
    mean: Mapped[list[Any]] = mapped_column()
    std: Mapped[list[Any]] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # names of outputs 0..num_classes-1 (given at upload or read from the file); None: output i = class i
    classes: Mapped[list[Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # DELETE keeps the row (finished jobs name it) but removes the file; a deleted teacher is 404 everywhere
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_sha256", "tenant_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(20))
    classes: Mapped[list[Any]] = mapped_column()
    num_classes: Mapped[int] = mapped_column(Integer)
    num_train: Mapped[int] = mapped_column(Integer)
    num_val: Mapped[int] = mapped_column(Integer)
    num_unlabeled: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    image_size: Mapped[list[Any]] = mapped_column()
    val_source: Mapped[str] = mapped_column(String(20))
    num_test: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    test_source: Mapped[str | None] = mapped_column(String(20), default=None)  # None: the dataset has no test split
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)  # as Teacher.deleted_at


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        # one job per trial of a sweep: a driver that retries after a crash can never start a trial twice
        Index("uq_jobs_sweep_trial", "sweep_id", "sweep_trial", unique=True),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    teacher_id: Mapped[str] = mapped_column(ForeignKey("teachers.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    phase: Mapped[str | None] = mapped_column(String(20), default=None)
    queue: Mapped[str] = mapped_column(String(50))
    request: Mapped[dict[str, Any]] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    warnings: Mapped[list[Any]] = mapped_column(default=list, server_default=text("'[]'"))  # [{code, message}]
    error_code: Mapped[str | None] = mapped_column(String(100), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    device: Mapped[str | None] = mapped_column(String(200), default=None)
    samples_per_s: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # a trial of a sweep (app.searches): the sweep and the trial's number in its Optuna study
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), default=None)
    sweep_trial: Mapped[int | None] = mapped_column(Integer, default=None)
    # when the retention sweep removed its artifacts (KDISTILL_RETENTION_DAYS, app.retention)
    artifacts_expired_at: Mapped[datetime | None] = mapped_column(default=None)

    artifacts: Mapped[list[Artifact]] = relationship(order_by="Artifact.name", lazy="selectin")


class WorkerRecord(Base):
    """A live Celery worker and the queues it serves: how the API knows whether any GPU worker exists."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[list[Any]] = mapped_column()
    device: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # what it runs now (None: idle since idle_since): how the sweep tells a lost message from a busy queue
    current_job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    idle_since: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(40))  # status, epoch, warning, info, error, resumed, ...
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(40))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One webhook call to make for a job (app.webhooks): added in the transaction that records what it
    announces, then sent, retried and recorded by the worker side (worker.webhook_pump)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))  # job.succeeded, job.failed, job.cancelled, job.epoch
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column()  # the job object as of the event; every attempt sends it
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class SweepRecord(Base):
    """A hyperparameter sweep (/v1/sweeps): an Optuna study whose trials are ordinary jobs (Job.sweep_id).

    Named apart from app.lifecycle's recovery sweep; app.searches drives it."""

    __tablename__ = "sweeps"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_sweeps_tenant_idempotency_key"),
        Index("ix_sweeps_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_sweeps_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("swp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default="running")  # running, succeeded, failed, cancelled
    request: Mapped[dict[str, Any]] = mapped_column()  # the whole POST body: base job request, space, limits
    max_trials: Mapped[int] = mapped_column(Integer)
    max_parallel: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(40))
    # trials whose job was created; only ever grows, in the transaction that adds the job
    trials_started: Mapped[int] = mapped_column(Integer, default=0)
    best_job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    best_params: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    best_value: Mapped[float | None] = mapped_column(Float, default=None)
    error_code: Mapped[str | None] = mapped_column(String(100), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    advanced_at: Mapped[datetime | None] = mapped_column(default=None)  # the driver's last pass (its row lock)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
