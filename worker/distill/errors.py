"""Typed errors of the engine: each has a stable machine-readable `code` and a message a person can act on."""

from __future__ import annotations


class DistillError(Exception):
    """Base of every error the engine raises on purpose; `code` is stable, `message` is for people."""

    code = "distill_error"
    status = 422  # the HTTP status an API maps this error to

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class ConfigError(DistillError):
    """A hyperparameter or setting is missing or out of range."""

    code = "invalid_config"


class TeacherError(DistillError):
    """The teacher file cannot be loaded or does not behave like a classifier."""

    code = "invalid_teacher"


class UnsafeCheckpointError(TeacherError):
    """The file needs unpickling of arbitrary objects, which is refused."""

    code = "unsafe_checkpoint"


class StudentError(DistillError):
    """The student architecture is unknown or cannot be built for this data."""

    code = "invalid_student"


class DatasetError(DistillError):
    """The dataset archive is malformed, hostile or empty."""

    code = "invalid_dataset"


class ExportError(DistillError):
    """An exported file failed to reload or disagreed with the eager student."""

    code = "export_mismatch"
    status = 500


class Cancelled(DistillError):
    """The run was cancelled by its cancel check."""

    code = "cancelled"
    status = 409
