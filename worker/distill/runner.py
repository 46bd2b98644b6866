"""One whole distillation job: load, distill, optionally train the baseline, export. No HTTP, no database."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .data import load_dataset
from .data.transforms import to_model_input
from .export import ExportedFile, export_student, sha256_file
from .progress import Callbacks, EpochMetrics
from .spec import JobSpec
from .students import check_input_size, create_model
from .teachers import load_teacher
from .trainer import TrainSetup, resolve_device, train

EXAMPLE_BATCH = 16

# torch.jit.load warns that TorchScript is deprecated; TorchScript teachers and exports are still supported.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*", category=FutureWarning)


@dataclass
class RunResult:
    metrics: dict[str, Any]
    files: list[ExportedFile]
    history: list[EpochMetrics]
    device: str
    output_dir: Path
    seconds: float
    teacher: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "artifacts": [f.to_dict() for f in self.files],
                "history": [m.to_dict() for m in self.history], "device": self.device,
                "output_dir": str(self.output_dir), "seconds": self.seconds, "teacher": self.teacher,
                "dataset": self.dataset}


def fingerprint(spec: JobSpec) -> str:
    """What makes two runs the same run: a checkpoint is only resumed by its own job. File paths and
    limits are left out: a job taken over by a worker with another data folder is still the same job."""
    keep = spec.model_dump(mode="json", include={
        "teacher": {"format", "arch", "num_classes", "input"}, "student": {"arch", "input"},
        "data": {"val_fraction", "augment"}, "hyperparameters": True, "baseline": True})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_job(spec: JobSpec, callbacks: Callbacks | None = None) -> RunResult:
    """Run the job `spec` end to end and return its metrics and verified export files."""
    cb = callbacks or Callbacks()
    started = time.monotonic()
    hp = spec.hyperparameters
    out_dir = Path(spec.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir else out_dir / "checkpoints"
    device = resolve_device(hp.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cb.phase("loading")

    teacher_input = spec.teacher.input
    student_input = spec.student.input or teacher_input
    check_input_size(spec.student.arch, student_input.size)
    biggest = max(teacher_input.size, student_input.size, key=lambda s: s[0] * s[1])
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".unpack-") as work:
        data = load_dataset(spec.data.path, spec.data, seed=hp.seed, target_size=biggest, workdir=Path(work))
    cb.event("dataset", f"{data.format} dataset: {data.num_classes} classes, {data.num_train_labelled} labelled "
             f"and {data.num_unlabeled} unlabeled training samples, {data.num_val} validation samples "
             f"({data.val_source})", classes=data.classes)
    teacher = load_teacher(spec.teacher, device=device, num_classes=data.num_classes,
                           allow_torchscript=spec.allow_torchscript_teacher)
    torch.manual_seed(hp.seed)
    student = create_model(spec.student.arch, num_classes=data.num_classes,
                           in_channels=student_input.channels, weights=spec.student.weights)
    baseline_student = copy.deepcopy(student) if spec.baseline else None  # the same initial weights
    cb.event("device", f"training on {describe_device(device)}", device=str(device))

    fp = fingerprint(spec)
    share = 0.5 if spec.baseline else 1.0
    cb.phase("training")
    result = train(TrainSetup(
        student=student, student_input=student_input, train=data.train, val=data.val, classes=data.classes,
        teacher=teacher, device=device, augment=spec.data.augment, run="student",
        checkpoint_path=ckpt_dir / "student.ckpt", fingerprint=fp, progress_interval=spec.progress_interval,
        fraction_share=share), hp, cb)
    metrics: dict[str, Any] = dict(result.metrics)
    history = list(result.history)
    if baseline_student is not None:
        base = train(TrainSetup(
            student=baseline_student, student_input=student_input, train=data.train, val=data.val,
            classes=data.classes, teacher=None, device=device, augment=spec.data.augment, run="baseline",
            checkpoint_path=ckpt_dir / "baseline.ckpt", fingerprint=fp,
            epoch_samples=len(data.train.labels), progress_interval=spec.progress_interval,
            fraction_offset=share, fraction_share=1 - share, teacher_val_logits=result.teacher_val_logits),
            hp, cb)
        metrics["baseline_accuracy"] = base.metrics["student_accuracy"]
        metrics["baseline_agreement"] = base.metrics.get("agreement")
        metrics["gain"] = metrics["student_accuracy"] - metrics["baseline_accuracy"]
        history += base.history
    metrics["train_loss"] = result.history[-1].train_loss if result.history else None
    metrics["epochs"] = hp.epochs
    metrics["resumed_from_epoch"] = result.resumed_from_epoch

    cb.phase("exporting")
    example = to_model_input(data.val.images[:EXAMPLE_BATCH], student_input)
    seconds = time.monotonic() - started
    metadata = {
        "kdistill_version": _version(),
        "created_at": datetime.now(UTC).isoformat(),
        "architecture": spec.student.arch,
        "classes": data.classes,
        "num_classes": data.num_classes,
        "input": student_input.describe() | {"layout": "NCHW", "dtype": "float32",
                                              "preprocessing": "x / 255, then (x - mean) / std per channel"},
        "teacher": teacher.describe(),
        "metrics": metrics,
        "hyperparameters": hp.model_dump(mode="json"),
        "dataset": {"format": data.format, "num_train": data.num_train_labelled,
                    "num_unlabeled": data.num_unlabeled, "num_val": data.num_val, "val_source": data.val_source},
        "device": describe_device(device),
        "torch_version": torch.__version__,
        "train_seconds": round(seconds, 2),
    }
    files = export_student(student, example, out_dir, list(spec.export_formats), atol=spec.export_atol,
                           metadata=metadata)
    files.append(ExportedFile(name="metadata.json", format="metadata", path=out_dir / "metadata.json",
                              size_bytes=(out_dir / "metadata.json").stat().st_size,
                              sha256=sha256_file(out_dir / "metadata.json")))
    return RunResult(metrics=metrics, files=files, history=history, device=describe_device(device),
                     output_dir=out_dir, seconds=time.monotonic() - started, teacher=teacher.describe(),
                     dataset=metadata["dataset"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdistill")
    except PackageNotFoundError:
        return "0+unknown"
