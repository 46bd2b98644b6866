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
)
from pydantic_core import InitErrorDetails

from worker.distill.spec import Checks, ExportFormat, Hyperparameters, room_to_train

T = TypeVar("T")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]  # app.lifecycle moves a job among them


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("created_at", "started_at", "finished_at", check_fields=False)
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
    augment: bool = False

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
    data: DataOptions = DataOptions()
    checks: Checks = Field(Checks(), description='{"teacher": "warn"} distills even when the teacher check fails')
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,50}$")] | None = Field(
        None, description="worker queue, e.g. gpu or cpu; default: the deployment's default queue")
    max_run_seconds: Annotated[float, Field(gt=0)] | None = None

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
        (404, "No such object for this API key"),
        (409, "Conflict (idempotency key reused, job finished)"),
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


class EventOut(_Out):
    id: int
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as `after` to get the next page")
