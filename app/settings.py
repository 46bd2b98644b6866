"""Settings from the environment (prefix `KDISTILL_`) or a `.env` file, with one-machine defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the API and the workers; see README's "Settings" table."""

    model_config = SettingsConfigDict(env_prefix="KDISTILL_", env_file=".env", extra="ignore")

    data_dir: Path = Path("kdistill-data")
    database_url: str | None = None  # default: SQLite in data_dir
    broker_url: str | None = None  # default: Celery's filesystem transport in data_dir
    auth: Literal["required", "disabled"] = "required"
    # Which Host headers may reach the API: comma-separated `name` (any port) or `name:port`, `*` for any.
    # Empty: with keys switched off, 127.0.0.1, localhost, [::1] and the address the request came in on, at
    # the server's port; with keys required, no check. See README "Security".
    allowed_hosts: str = ""
    # With keys switched off: origins (scheme://host[:port], comma-separated) besides the server's own that
    # may send POST/PUT/PATCH/DELETE with an Origin header.
    allowed_origins: str = ""
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # Where teachers, datasets and artifacts live: the data folder, or S3-compatible object storage that
    # the API and workers on other machines share.
    artifact_store: Literal["local", "s3"] = "local"
    s3_bucket: str = "kdistill"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None  # e.g. http://minio:9000; None: AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    max_teacher_bytes: int = Field(2 << 30, ge=1)
    max_dataset_bytes: int = Field(8 << 30, ge=1)
    max_dataset_files: int = Field(500_000, ge=1)
    max_unpacked_bytes: int = Field(32 << 30, ge=1)
    max_decoded_bytes: int = Field(16 << 30, ge=1)
    allow_torchscript: bool = True
    inspect_timeout: float = Field(300.0, gt=0)

    # The sandbox of the children that open uploads (README "Sandbox"). A root worker runs them as this
    # uid/gid (0: keep root, without capabilities); sizes in bytes, 0 means no limit.
    sandbox_uid: int = Field(65534, ge=0)
    sandbox_gid: int = Field(65534, ge=0)
    sandbox_inspect_max_memory: int = Field(8 << 30, ge=0)  # RLIMIT_AS; importing torch alone maps ~3.5 GB
    sandbox_inspect_cpu_seconds: int = Field(0, ge=0)  # RLIMIT_CPU; 0: inspect_timeout × CPU count
    sandbox_job_max_memory: int = Field(64 << 30, ge=0)  # RLIMIT_AS of a job on the CPU
    sandbox_job_max_memory_gpu: int = Field(0, ge=0)  # of a job that may use CUDA, which maps terabytes
    sandbox_max_processes: int = Field(512, ge=1)  # RLIMIT_NPROC: tasks (threads too) a child may add
    sandbox_max_file_bytes: int = Field(64 << 30, ge=0)  # RLIMIT_FSIZE: the largest file a child may write
    # Run TorchScript teachers where Landlock is missing (they could then read and write this worker's files).
    allow_unconfined_torchscript: bool = False

    default_queue: str = "gpu"
    job_max_seconds: float = Field(48 * 3600.0, gt=0)
    job_max_attempts: int = Field(3, ge=1)
    progress_interval: float = Field(1.0, ge=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    # A running job whose heartbeat is this old has lost its lease, and a queued job sent this long ago while
    # a worker of its queue sat idle has lost its message: the sweep, every sweep_interval, sends either
    # again (app.lifecycle). Together they bound recovery: 2 minutes by default.
    stale_after: float = Field(60.0, gt=0)
    sweep_interval: float = Field(60.0, gt=0)
    # How often each API process advances the running hyperparameter sweeps (/v1/sweeps, app.searches): tells
    # Optuna the trials that ended, prunes, starts the next trials. Not the recovery sweep above.
    search_interval: float = Field(2.0, gt=0)
    # How often a live stream (GET /v1/jobs/{id}/stream) looks at its job in the database.
    stream_interval: float = Field(1.0, gt=0)
    cancel_grace: float = Field(15.0, ge=0)
    # Redis hands an unacknowledged message out again after this; recovery does not wait for it (the sweep
    # does it sooner), so it only has to outlast the longest job, or a running job would get a duplicate.
    visibility_timeout: int = Field(3 * 24 * 3600, gt=0)

    # Webhooks (app.webhooks, README "Calling kdistill from your tools"): a job's callback_url may name a
    # loopback, private or link-local address only when this is on (never in a shared deployment).
    webhook_allow_private: bool = False
    webhook_timeout: float = Field(10.0, gt=0)  # seconds for one attempt
    webhook_retry_first: float = Field(5.0, gt=0)  # the first retry waits this long, each next one twice as long
    webhook_retry_max_delay: float = Field(600.0, gt=0)  # ... up to this
    webhook_retry_for: float = Field(24 * 3600.0, gt=0)  # a delivery is given up this long after its event
    webhook_poll_interval: float = Field(1.0, gt=0)  # how often each worker looks for deliveries that are due

    # Artifacts of jobs finished more than this many days ago are removed by the sweep (app.retention);
    # 0 keeps them forever.
    retention_days: float = Field(0.0, ge=0)
    # With a tracking URI (http://mlflow:5000, sqlite:///...), each succeeded job is logged to MLflow
    # (worker.tracking_mlflow; the `mlflow` extra) as a run named after the job.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "kdistill"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'kdistill.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
