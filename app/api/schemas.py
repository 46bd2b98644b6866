"""Request and response bodies of the v1 API (the names are the contract in shared/design.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from worker.distill.spec import AugmentMode, Checks, ExportFormat, Hyperparameters, room_to_train

T = TypeVar("T")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]  # app.lifecycle moves a job among them


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("created_at", "started_at", "finished_at", "artifacts_expired_at", check_fields=False)
    def _utc(self, v: datetime | None) -> str | None:
        return None if v is None else v.isoformat(timespec="milliseconds") + "Z"


class TeacherOut(_Out):
    id: str
    filename: str
    format: str
    arch: str | None
    num_classes: int
    input_channels: int
    input_size: list[int]
    mean: list[float]
    std: list[float]
    sha256: str
    size_bytes: int
    classes: list[str] | None = Field(None, description="names of outputs 0..num_classes-1, when known")
    created_at: datetime


class DatasetOut(_Out):
    id: str
    filename: str
    format: str
    classes: list[str]
    num_classes: int
    num_train: int
    num_val: int
    num_unlabeled: int
    channels: int
    image_size: list[int]
    val_source: str
    num_test: int = 0
    test_source: str | None = Field(None, description="where the test split comes from; null: none")
    sha256: str
    size_bytes: int
    created_at: datetime


class StudentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Annotated[str, Field(min_length=1, max_length=100, examples=["resnet18"])]
    input_size: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None, description="square input size of the student; default: the teacher's")
    mean: list[float] | None = Field(None, description="normalisation of the student's input; default: teacher's")
    std: list[float] | None = None


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="carved from the labelled data when the dataset has no test split")
    augment: AugmentMode = Field(False, description='true or "standard": random crop and flip; "consistent": '
                                 "function matching, teacher and student see the same crop, flip and mixup/cutmix")

    @field_validator("test_fraction", mode="after")
    @classmethod
    def _room_to_train(cls, v: float, info: ValidationInfo) -> float:
        return room_to_train(v, info)


class JobCreate(BaseModel):
    """POST /v1/jobs body."""

    model_config = ConfigDict(extra="forbid")

    teacher_id: str
    dataset_id: str
    student: StudentRequest
    hyperparameters: Hyperparameters = Hyperparameters()
    export_formats: Annotated[list[ExportFormat], Field(min_length=1)] = ["torchscript", "onnx"]
    baseline: bool = False
    max_export_accuracy_drop: Annotated[float, Field(ge=0, le=1)] = Field(
        0.01, description="onnx_fp16 / onnx_int8 exports losing more accuracy than this are flagged in warnings")
    data: DataOptions = DataOptions()
    checks: Checks = Field(Checks(), description='{"teacher": "warn"} distills even when the teacher check fails')
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,50}$")] | None = Field(
        None, description="worker queue, e.g. gpu or cpu; default: the deployment's default queue")
    max_run_seconds: Annotated[float, Field(gt=0)] | None = None
    callback_url: Annotated[str, Field(max_length=2000)] | None = Field(
        None, description="http(s) URL that receives the job object, signed (Kdistill-Signature), on every final "
        "status; loopback and private addresses are refused unless the deployment allows them")
    callback_epochs: bool = Field(False, description="also call callback_url after each epoch (event job.epoch)")

    @field_validator("export_formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("hyperparameters", mode="wrap")
    @classmethod
    def _weights_error(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A bad list of class_weights fails both arms of `"auto" | list`; report the list's error (e.g.
        hyperparameters.class_weights.3: greater than 0), not that the list is not "auto"."""
        try:
            return handler(v)
        except ValidationError as e:
            weights = v.get("class_weights") if isinstance(v, dict) else None
            if not isinstance(weights, list):
                raise
            errors = [err for err in e.errors() if not _is_arm(err["loc"], "literal[")]
            if not errors or len(errors) == len(e.errors()):
                raise
            raise ValidationError.from_exception_data(e.title, [InitErrorDetails(
                type=err["type"], loc=tuple(p for p in err["loc"] if not _is_arm((p,), "list[")),
                input=err["input"], ctx=err.get("ctx") or {}) for err in errors]) from None


def _is_arm(loc: tuple[Any, ...], prefix: str) -> bool:
    """Whether `loc` goes through the union arm whose name starts with `prefix` (pydantic names arms)."""
    return any(isinstance(p, str) and p.startswith(prefix) for p in loc)


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    eta_seconds: float | None = None
    run: str | None = None
    loss: float | None = None
    samples_per_s: float | None = None


class ErrorOut(BaseModel):
    """Every error: a stable machine-readable `code`, a `message` for people, the offending `field`."""

    code: str
    message: str
    field: str | None = None


# Documented on every /v1 operation (FastAPI's default 422 body is not what this API sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (400, "Malformed request (body not JSON or multipart, bad Host)"),
        (401, "Missing or invalid API key"),
        (403, "Origin not allowed (local mode)"),
        (404, "No such object (for this API key, when keys are required)"),
        (409, "Conflict (idempotency key reused, job finished or not yet finished, object in use)"),
        (413, "Upload or archive too large"),
        (415, "Unsupported media type or file format"),
        (422, "Invalid input: `field` names it"),
        (503, "The database is unreachable for the moment (`database_unavailable`, with Retry-After): retry"))}


class WarningOut(BaseModel):
    code: str
    message: str


class ArtifactOut(_Out):
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str | None = None


class JobOut(_Out):
    id: str
    status: JobStatus
    phase: str | None
    cancel_requested: bool
    queue: str
    teacher_id: str
    dataset_id: str
    request: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any]
    error: ErrorOut | None
    warnings: list[WarningOut] = Field([], description="what did not fail the job but deserves a look")
    artifacts: list[ArtifactOut]
    attempts: int
    worker: str | None
    device: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sweep_id: str | None = Field(None, description="the sweep this job is a trial of, if any")
    sweep_trial: int | None = Field(None, description="its trial number in that sweep")
    artifacts_expired_at: datetime | None = Field(
        None, description="when the retention sweep removed the job's artifacts (KDISTILL_RETENTION_DAYS)")


class EventOut(_Out):
    id: int
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as `after` to get the next page")


# -- sweeps (/v1/sweeps) ----------------------------------------------------------------------------------
SweepStatus = Literal["running", "succeeded", "failed", "cancelled"]
TrialState = Literal["queued", "running", "complete", "pruned", "failed", "cancelled"]
Distillation = Literal["soft", "hard", "dkd"]


class FloatRange(BaseModel):
    """A continuous dimension: Optuna samples a float in [low, high], on a log scale when `log`."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}); for one value give a list")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


FloatDimension = Annotated[list[float], Field(min_length=1, max_length=100)] | FloatRange


def _one_arm(v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Errors of the arm the value meant (a dict is a range, anything else a list), without pydantic's arm
    names in the field, so that a bad `{"low": 0}` says `space.temperature.high: Field required`."""
    try:
        return handler(v)
    except ValidationError as e:
        def arm(p: Any) -> bool:
            return isinstance(p, str) and ("FloatRange" in p if isinstance(v, dict) else p.startswith("list["))

        errors = [err for err in e.errors() if any(arm(p) for p in err["loc"])] or e.errors()
        raise ValidationError.from_exception_data(e.title, [InitErrorDetails(
            type=err["type"], loc=tuple(p for p in err["loc"] if not arm(p)),
            input=err["input"], ctx=err.get("ctx") or {}) for err in errors]) from None


class SearchSpace(BaseModel):
    """What a sweep searches: a list of values (categorical) or a range per hyperparameter; the others
    keep the base request's value."""

    model_config = ConfigDict(extra="forbid")

    temperature: FloatDimension | None = None
    alpha: FloatDimension | None = None
    learning_rate: FloatDimension | None = None
    distillation: Annotated[list[Distillation], Field(min_length=1)] | None = None
    standardize: Annotated[list[bool], Field(min_length=1)] | None = Field(
        None, description="searched only where the trial's distillation is not hard")

    @field_validator("temperature", "alpha", "learning_rate", mode="wrap")
    @classmethod
    def _clean_errors(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _one_arm(v, handler)

    @field_validator("temperature", "alpha", "learning_rate", "distillation", "standardize")
    @classmethod
    def _unique(cls, v: Any) -> Any:
        return list(dict.fromkeys(v)) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if not self.dimensions():
            raise ValueError("the search space is empty; give at least one of temperature, alpha, learning_rate, "
                             "distillation, standardize")
        return self

    def dimensions(self) -> dict[str, list[Any] | FloatRange]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


class PruningOptions(BaseModel):
    """Median pruning on the per-epoch validation accuracy: a trial below the median of the completed trials
    at the same epoch is cancelled."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    startup_trials: Annotated[int, Field(ge=0, le=1000)] = Field(
        3, description="no pruning until this many trials completed")
    warmup_epochs: Annotated[int, Field(ge=0, le=10_000)] = Field(
        1, description="no trial is pruned during its first epochs")


class SweepCreate(JobCreate):
    """POST /v1/sweeps body: a job request (the trials' base) plus what to search and how far."""

    space: SearchSpace
    max_trials: Annotated[int, Field(ge=1, le=1000)] = 10
    max_parallel: Annotated[int, Field(ge=1, le=100)] = Field(
        2, description="trials running at once (above max_trials it is max_trials)")
    metric: str = Field("validation_accuracy", description="what the sweep maximises; validation_accuracy: "
                        "the student's validation accuracy at its chosen epoch (never the test split)")
    sampler_seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(0, description="seed of the TPE sampler")
    pruning: PruningOptions = PruningOptions()

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v != "validation_accuracy":
            raise ValueError(f"unsupported metric {v!r}; sweeps maximise validation_accuracy (the student's "
                             "validation accuracy at its chosen epoch) for now")
        return v

    def job_request(self) -> JobCreate:
        """The base job request that every trial starts from."""
        return JobCreate.model_validate(self.model_dump(include=set(JobCreate.model_fields)))


class TrialOut(BaseModel):
    number: int
    job_id: str
    state: TrialState
    params: dict[str, Any]
    value: float | None = Field(None, description="complete: the validation accuracy at the chosen epoch; "
                                "pruned: the last one reported")
    epochs: int = Field(0, description="per-epoch validation figures reported so far")


class SweepOut(_Out):
    id: str
    status: SweepStatus
    request: dict[str, Any]
    metric: str
    max_trials: int
    max_parallel: int
    trials_started: int
    counts: dict[str, int] = Field(description="trials per state, and total")
    trials: list[TrialOut] = Field([], description="oldest first; empty in listings")
    best_job_id: str | None
    best_params: dict[str, Any] | None
    best_value: float | None
    error: ErrorOut | None
    created_at: datetime
    finished_at: datetime | None
