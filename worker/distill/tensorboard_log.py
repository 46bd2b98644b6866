"""TensorBoard event files of a finished run, packed as `tensorboard.tar.gz` (written in the sandboxed child).

The archive holds one TensorBoard run per folder, at its root (relative paths only):
- `student/`: the distilled student, `baseline/`: the same student on labels alone (when asked for), and
  `teacher/`: the teacher's validation accuracy repeated at every epoch, so that the three overlay.

Scalars per epoch (step = the epoch, 1-based; wall time = the job's start plus the epochs' training seconds),
with the same tags in every run:
- `accuracy/val`: validation accuracy (the teacher's own in `teacher/`), `accuracy/top5`: top-5 accuracy;
- `agreement`: share of validation images where the student picks the teacher's class (not in `teacher/`);
- `loss/train` (the total), `loss/distill`, `loss/label`, and `loss/feature` when feature distillation is on
  (the baseline's distillation term is 0: it has no teacher);
- `learning_rate` (at the epoch's end) and `samples_per_s` (training throughput).

Hparams (TensorBoard's HParams dashboard) are in `student/`: the job's hyperparameters (flat scalars and strings;
lists and empty values are left out) with `student_arch`, `teacher_arch`, `teacher_format` and `baseline`, and
as its metrics the final figures, also scalars at the last epoch: `final/student_accuracy`,
`final/teacher_accuracy`, `final/baseline_accuracy` and `final/gain` (on the test split when the job has one,
else validation, as the job's metrics).

Only tensorboardX writes here (its synchronous EventsWriter and summary protos): TensorBoard itself is an
optional extra, for reading.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .export import ExportedFile, sha256_file
from .progress import EpochMetrics

ARCHIVE_NAME = "tensorboard.tar.gz"
FORMAT = "tensorboard"
RUNS = ("student", "baseline")
FINAL_METRICS = ("student_accuracy", "teacher_accuracy", "baseline_accuracy", "gain")


def epoch_scalars(m: EpochMetrics) -> dict[str, float]:
    """The scalars of one epoch of the student or the baseline run, by tag (absent values left out)."""
    values = {"accuracy/val": m.student_accuracy, "accuracy/top5": m.student_top5, "agreement": m.agreement,
              "loss/train": m.train_loss, "loss/distill": m.train_loss_distill, "loss/label": m.train_loss_label,
              "loss/feature": m.train_loss_feature, "learning_rate": m.learning_rate,
              "samples_per_s": m.samples_per_s}
    return {tag: float(v) for tag, v in values.items() if v is not None}


def teacher_scalars(m: EpochMetrics) -> dict[str, float]:
    """The teacher's scalars at an epoch of the student run (its accuracy does not change while it trains)."""
    values = {"accuracy/val": m.teacher_accuracy, "accuracy/top5": m.teacher_top5}
    return {tag: float(v) for tag, v in values.items() if v is not None}


def flat_hparams(hyperparameters: dict[str, Any], **extra: Any) -> dict[str, bool | int | float | str]:
    """The hyperparameters TensorBoard's HParams dashboard can show: scalars and strings, nothing empty."""
    return {k: v for k, v in {**hyperparameters, **extra}.items() if isinstance(v, bool | int | float | str)}


def write_event_files(logdir: Path, history: Iterable[EpochMetrics], hparams: dict[str, Any],
                      final: dict[str, Any], started: float | None = None) -> list[str]:
    """Write one TensorBoard run per folder of `logdir` from the epoch history; returns the runs written."""
    by_run: dict[str, list[EpochMetrics]] = {run: [] for run in RUNS}
    for m in history:
        if m.run in by_run:
            by_run[m.run].append(m)
    clock = _wall_clock(by_run, started)
    runs: list[str] = []
    student = sorted(by_run["student"], key=lambda m: m.epoch)
    for run, epochs, scalars in (("student", student, epoch_scalars),
                                 ("baseline", sorted(by_run["baseline"], key=lambda m: m.epoch), epoch_scalars),
                                 ("teacher", student, teacher_scalars)):
        if not epochs:
            continue
        with _RunWriter(logdir / run) as writer:
            for m in epochs:
                wall = clock.get((m.run, m.epoch))
                for tag, value in scalars(m).items():
                    writer.scalar(tag, value, m.epoch, wall)
            if run == "student":
                writer.hparams(hparams, final, step=epochs[-1].epoch, wall=clock.get(("student", epochs[-1].epoch)))
        runs.append(run)
    return runs


class _RunWriter:
    """One run's event file, written synchronously. tensorboardX's SummaryWriter queues events through a
    multiprocessing.Queue, whose POSIX semaphore the sandbox refuses (EACCES); its EventsWriter needs none."""

    def __init__(self, folder: Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event

        folder.mkdir(parents=True, exist_ok=True)
        self._event = Event
        self._writer = EventsWriter(str(folder / "events"))

    def __enter__(self) -> _RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()

    def summary(self, summary: Any, step: int, wall: float | None) -> None:
        self._writer.write_event(self._event(summary=summary, step=step,
                                             wall_time=wall if wall is not None else time.time()))

    def scalar(self, tag: str, value: float, step: int, wall: float | None) -> None:
        from tensorboardX.summary import scalar

        self.summary(scalar(tag, value), step, wall)

    def hparams(self, hparams: dict[str, Any], final: dict[str, Any], step: int, wall: float | None) -> None:
        """What SummaryWriter.add_hparams writes, but into this run rather than a new timestamped sub-run: the
        HParams session is then the student run itself, next to its curves."""
        from tensorboardX.summary import hparams as hparams_summaries

        metrics = {f"final/{k}": float(final[k]) for k in FINAL_METRICS if final.get(k) is not None}
        for summary in hparams_summaries(flat_hparams(hparams), metrics):
            self.summary(summary, step, wall)
        for tag, value in metrics.items():
            self.scalar(tag, value, step, wall)


def _wall_clock(by_run: dict[str, list[EpochMetrics]], started: float | None) -> dict[tuple[str, int], float]:
    """When each epoch ended, roughly: the job's start plus the training seconds so far (the baseline trains
    after the student). Empty without a start time: TensorBoard then gets the time of writing."""
    if started is None:
        return {}
    clock, now = {}, started
    for run in RUNS:
        for m in sorted(by_run[run], key=lambda m: m.epoch):
            now += max(float(m.seconds), 0.0)
            clock[(run, m.epoch)] = now
    return clock


def pack(logdir: Path, archive: Path) -> None:
    """Pack `logdir`'s contents as a gzipped tar with paths relative to it, and no owner names or ids."""
    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tmp = archive.with_name(archive.name + ".tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(logdir.rglob("*")):
                tar.add(path, arcname=path.relative_to(logdir).as_posix(), recursive=False, filter=anonymous)
        tmp.replace(archive)
    finally:
        tmp.unlink(missing_ok=True)


def write_tensorboard(out_dir: Path, history: Iterable[EpochMetrics], hparams: dict[str, Any],
                      final: dict[str, Any], started: float | None = None) -> ExportedFile:
    """Write the run's event files and pack them as `out_dir/tensorboard.tar.gz`, described as an artifact."""
    archive = out_dir / ARCHIVE_NAME
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tensorboard-") as work:
        write_event_files(Path(work), history, hparams, final, started)
        pack(Path(work), archive)
    return ExportedFile(name=archive.name, format=FORMAT, path=archive, size_bytes=archive.stat().st_size,
                        sha256=sha256_file(archive))
