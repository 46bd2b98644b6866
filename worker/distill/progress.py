"""What a run tells the outside world: progress at a bounded rate, per-epoch metrics, events, cancellation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Progress:
    """Where a job stands. Steps count optimiser steps over the whole job (the distillation run, then the
    baseline run when asked for), so `fraction == step / total_steps`; `epoch` is within the current `run`."""

    run: str  # "student" or "baseline"
    epoch: int  # 1-based epoch in progress, within `run`
    epochs: int  # epochs of each run
    step: int  # optimiser steps done in the whole job
    total_steps: int  # optimiser steps of the whole job
    fraction: float  # step / total_steps
    loss: float
    loss_distill: float
    loss_label: float
    learning_rate: float
    samples_per_s: float
    eta_seconds: float | None
    phase: str = "training"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochMetrics:
    run: str
    epoch: int
    epochs: int
    train_loss: float
    train_loss_distill: float
    train_loss_label: float
    student_accuracy: float
    student_top5: float | None
    teacher_accuracy: float | None
    teacher_top5: float | None
    agreement: float | None
    learning_rate: float
    seconds: float
    samples_per_s: float
    best: bool = False
    train_loss_feature: float | None = None  # the weighted feature-distillation term, when one is used
    # sent again from a checkpoint on resume: a caller that missed it (its process died before recording it)
    # can fill the gap; one that has it already ignores it
    replayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Callbacks:
    """Hooks a caller passes in; each is optional. `cancelled` is polled between steps."""

    on_progress: Callable[[Progress], None] | None = None
    on_epoch: Callable[[EpochMetrics], None] | None = None
    on_event: Callable[[str, str, dict[str, Any]], None] | None = None  # (kind, message, data)
    on_phase: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def progress(self, p: Progress) -> None:
        if self.on_progress:
            self.on_progress(p)

    def epoch(self, m: EpochMetrics) -> None:
        if self.on_epoch:
            self.on_epoch(m)

    def event(self, kind: str, message: str, **data: Any) -> None:
        if self.on_event:
            self.on_event(kind, message, data)

    def phase(self, name: str) -> None:
        if self.on_phase:
            self.on_phase(name)

    def is_cancelled(self) -> bool:
        return bool(self.cancelled and self.cancelled())


@dataclass
class RateLimiter:
    """True at most once per `interval` seconds; `force` lets epoch ends through regardless."""

    interval: float
    _last: float = field(default=-float("inf"))

    def ready(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False
