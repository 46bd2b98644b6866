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

import numpy as np
import torch
from torch import nn

from .data import DatasetSplits, load_dataset
from .data.transforms import to_model_input
from .efficiency import efficiency_report
from .evaluation import split_report
from .export import REDUCED_FORMATS, ExportedFile, export_student, sha256_file, write_metadata
from .feature_distill import check_feature_teacher
from .metrics import confusion_matrix, per_class_report
from .preflight import preflight
from .progress import Callbacks, EpochMetrics
from .quantize import measure_exports
from .spec import InputSpec, JobSpec, checkpoint_folder
from .students import check_input_size, create_model
from .teachers import LoadedTeacher, load_teacher
from .tensorboard_log import flat_hparams, write_tensorboard
from .trainer import TrainResult, TrainSetup, predict, resolve_device, resolve_precision, steps_in_epoch, train

EXAMPLE_BATCH = 16
CALIBRATION_IMAGES = 512  # ONNX Runtime's static quantization needs a few hundred representative images
MEASURE_SAMPLES = 5000

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
    warnings: list[dict[str, str]] = field(default_factory=list)  # what did not fail the job but should be read

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "artifacts": [f.to_dict() for f in self.files],
                "history": [m.to_dict() for m in self.history], "device": self.device,
                "output_dir": str(self.output_dir), "seconds": self.seconds, "teacher": self.teacher,
                "dataset": self.dataset, "warnings": self.warnings}


def content_digest(path: str | Path | None) -> str | None:
    """sha256 of a file, or of a folder's relative paths and file contents; None for no path."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def fingerprint(spec: JobSpec) -> str:
    """What makes two runs the same run: a checkpoint is only resumed by its own job. The inputs count by
    content, so retraining the teacher (same path, new weights) never resumes the old student. File paths
    and limits are left out: a job taken over by a worker with another data folder is still the same job."""
    keep = spec.model_dump(mode="json", include={
        "teacher": {"format", "arch", "num_classes", "input", "classes"}, "student": {"arch", "input"},
        "data": {"val_fraction", "test_fraction", "augment"}, "hyperparameters": True, "baseline": True})
    keep["contents"] = {"teacher": content_digest(spec.teacher.path), "data": content_digest(spec.data.path),
                        "student_weights": content_digest(spec.student.weights)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_job(spec: JobSpec, callbacks: Callbacks | None = None) -> RunResult:
    """Run the job `spec` end to end and return its metrics and verified export files."""
    cb = callbacks or Callbacks()
    started, started_at = time.monotonic(), time.time()
    hp = spec.hyperparameters
    out_dir = Path(spec.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = checkpoint_folder(spec)
    device = resolve_device(hp.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = resolve_precision(hp.precision, device)
    cb.phase("loading")

    teacher_input = spec.teacher.input
    student_input = spec.student.input or teacher_input
    check_input_size(spec.student.arch, student_input.size)
    biggest = max(teacher_input.size, student_input.size, key=lambda s: s[0] * s[1])
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".unpack-") as work:
        data = load_dataset(spec.data.path, spec.data, seed=hp.seed, target_size=biggest, workdir=Path(work))
    test_note = f", {data.num_test} test samples ({data.test_source})" if data.test is not None else \
        ", no test split (scores come from validation)"
    cb.event("dataset", f"{data.format} dataset: {data.num_classes} classes, {data.num_train_labelled} labelled "
             f"and {data.num_unlabeled} unlabeled training samples, {data.num_val} validation samples "
             f"({data.val_source}){test_note}", classes=data.classes)
    loaded = load_teacher(spec.teacher, device=device, allow_torchscript=spec.allow_torchscript_teacher)
    check_feature_teacher(hp.feature_distillation, loaded.format)
    checked = preflight(loaded, data, mode=spec.checks.teacher, seed=hp.seed, callbacks=cb,
                        predict=lambda t, images: predict(t, images, t.input, device, amp_dtype))
    teacher = checked.teacher
    torch.manual_seed(hp.seed)
    student = create_model(spec.student.arch, num_classes=data.num_classes,
                           in_channels=student_input.channels, weights=spec.student.weights)
    baseline_student = copy.deepcopy(student) if spec.baseline else None  # the same initial weights
    cb.event("device", f"training on {describe_device(device)}", device=str(device))

    fp = fingerprint(spec)
    # Both runs take the same number of steps (the baseline cycles its labels), so the job's step count is known.
    run_steps = hp.epochs * steps_in_epoch(len(data.train), hp.batch_size)
    job_steps = run_steps * (2 if spec.baseline else 1)
    cb.phase("training")
    result = train(TrainSetup(
        student=student, student_input=student_input, train=data.train, val=data.val, classes=data.classes,
        teacher=teacher, device=device, augment=spec.data.augment, run="student",
        checkpoint_path=ckpt_dir / "student.ckpt", fingerprint=fp, progress_interval=spec.progress_interval,
        job_total_steps=job_steps), hp, cb)
    history = list(result.history)
    base = None
    if baseline_student is not None:
        base = train(TrainSetup(
            student=baseline_student, student_input=student_input, train=data.train, val=data.val,
            classes=data.classes, teacher=None, device=device, augment=spec.data.augment, run="baseline",
            checkpoint_path=ckpt_dir / "baseline.ckpt", fingerprint=fp,
            epoch_samples=len(data.train.labels), progress_interval=spec.progress_interval,
            step_offset=run_steps, job_total_steps=job_steps, teacher_val_logits=result.teacher_val_logits),
            hp, cb)
        history += base.history

    cb.phase("evaluating")
    metrics = _score(data, student, baseline_student, teacher, result, base, student_input, device, amp_dtype)
    metrics["train_loss"] = result.history[-1].train_loss if result.history else None
    metrics["epochs"] = hp.epochs
    metrics["resumed_from_epoch"] = result.resumed_from_epoch
    metrics["teacher_check"] = checked.check.to_dict() if checked.check is not None else None
    metrics["notes"] = result.notes
    cb.event("score", _score_sentence(metrics), split=metrics["accuracy_split"])

    cb.phase("exporting")
    example = to_model_input(data.val.images[:EXAMPLE_BATCH], student_input)
    calibration = None
    if "onnx_int8" in spec.export_formats:
        pick = torch.randperm(len(data.train.images), generator=torch.Generator().manual_seed(hp.seed))
        calibration = to_model_input(data.train.images[pick[:CALIBRATION_IMAGES]], student_input)
    files = export_student(student, example, out_dir, list(spec.export_formats), atol=spec.export_atol,
                           calibration=calibration)
    onnx_file = next((f.path for f in files if f.format == "onnx"), None)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".measure-") as work:
        metrics["efficiency"] = efficiency_report(
            teacher_module=teacher.module if teacher.format != "onnx" else None,
            teacher_onnx=teacher.path if teacher.format == "onnx" else None, teacher_file=teacher.path,
            teacher_input=(teacher_input.channels, *teacher_input.size), student=student, student_onnx=onnx_file,
            student_input=(student_input.channels, *student_input.size), workdir=Path(work))
    job_warnings = list(checked.warnings)
    if set(REDUCED_FORMATS) & set(spec.export_formats):
        metrics["exports"], export_warnings = measure_exports(
            files, _measure_splits(data, student_input), max_drop=spec.max_export_accuracy_drop, student=student)
        for w in export_warnings:
            cb.event("warning", w["message"], code=w["code"])
        job_warnings += export_warnings
    try:
        hparams = flat_hparams(hp.model_dump(mode="json"), student_arch=spec.student.arch,
                               teacher_arch=spec.teacher.arch, teacher_format=teacher.format, baseline=spec.baseline)
        files.append(write_tensorboard(out_dir, history, hparams, metrics, started=started_at))
    except Exception as e:  # the student is good whatever happened to its logs: say so, keep the job
        w = {"code": "tensorboard_failed", "message": f"the TensorBoard event files could not be written "
             f"({type(e).__name__}: {e}); the job's other artifacts are complete"}
        cb.event("warning", w["message"], code=w["code"])
        job_warnings.append(w)
    dataset = {"format": data.format, "num_train": data.num_train_labelled, "num_unlabeled": data.num_unlabeled,
               "num_val": data.num_val, "val_source": data.val_source, "num_test": data.num_test,
               "test_source": data.test_source}
    metadata = {
        "kdistill_version": _version(),
        "created_at": datetime.now(UTC).isoformat(),
        "architecture": spec.student.arch,
        "classes": data.classes,  # the student's outputs, in order
        "num_classes": data.num_classes,
        "input": student_input.describe() | {"layout": "NCHW", "dtype": "float32",
                                              "preprocessing": "x / 255, then (x - mean) / std per channel"},
        "teacher": teacher.describe(),
        "metrics": metrics,
        "efficiency": metrics["efficiency"],
        "warnings": job_warnings,
        "hyperparameters": hp.model_dump(mode="json"),
        "dataset": dataset,
        "device": describe_device(device),
        "torch_version": torch.__version__,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    files.append(write_metadata(out_dir, metadata, files))
    return RunResult(metrics=metrics, files=files, history=history, device=describe_device(device),
                     output_dir=out_dir, seconds=time.monotonic() - started, teacher=teacher.describe(),
                     dataset=dataset, warnings=job_warnings)


def _measure_splits(data: DatasetSplits, spec: InputSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validation and test as the student sees them, for the reduced-precision exports; the first
    MEASURE_SAMPLES of each keep large splits at 224 px from needing gigabytes (the report gives `samples`)."""
    return {name: (to_model_input(part.images[:MEASURE_SAMPLES], spec).numpy(), part.labels[:MEASURE_SAMPLES].numpy())
            for name, part in (("validation", data.val), ("test", data.test)) if part is not None}


def _score(data: DatasetSplits, student: nn.Module, baseline: nn.Module | None, teacher: LoadedTeacher,
           result: TrainResult, base: TrainResult | None, student_input: InputSpec, device: torch.device,
           amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """Validation and test reports of the chosen epochs; the top-level figures come from test when there is one."""
    def logits(model: nn.Module | LoadedTeacher, images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
        return predict(model, images, spec, device, amp_dtype)

    splits: dict[str, dict[str, Any] | None] = {"validation": None, "test": None}
    per_class = confusion = None
    for name, part in (("validation", data.val), ("test", data.test)):
        if part is None:
            continue
        s_logits = logits(student, part.images, student_input)
        t_logits = result.teacher_val_logits if name == "validation" else None
        if t_logits is None:
            t_logits = logits(teacher, part.images, teacher.input)
        b_logits = logits(baseline, part.images, student_input) if baseline is not None else None
        splits[name] = split_report(part.labels, s_logits, t_logits, b_logits)
        per_class = per_class_report(s_logits.cpu(), part.labels, data.classes)
        confusion = {"split": name, "classes": data.classes,
                     "matrix": confusion_matrix(s_logits.cpu(), part.labels, len(data.classes)).tolist()}
    reported = "test" if splits["test"] is not None else "validation"
    top = splits[reported] or {}
    metrics: dict[str, Any] = {k: top.get(k) for k in (
        "student_accuracy", "student_accuracy_ci", "student_top5", "teacher_accuracy", "teacher_accuracy_ci",
        "agreement", "baseline_accuracy", "baseline_accuracy_ci", "gain", "gain_ci", "gain_p_value")
        if k in top}
    metrics |= {"accuracy_split": reported, "validation": splits["validation"], "test": splits["test"],
                "best_epoch": result.best_epoch, "per_class": per_class, "confusion": confusion,
                "teacher_top5": result.metrics.get("teacher_top5")}
    if base is not None:
        metrics["baseline_best_epoch"] = base.best_epoch
        metrics["baseline_agreement"] = base.metrics.get("agreement")
    return metrics


def _score_sentence(m: dict[str, Any]) -> str:
    split = m["accuracy_split"]
    n = (m.get(split) or {}).get("n")
    lo, hi = m["student_accuracy_ci"]
    text = f"student accuracy on {split} ({n} samples): {m['student_accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f})"
    if m.get("gain") is not None:
        glo, ghi = m["gain_ci"]
        text += f"; gain over labels alone {m['gain']:+.4f} (95% CI {glo:+.4f} to {ghi:+.4f})"
    return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdistill")
    except PackageNotFoundError:
        return "0+unknown"
