"""Log a succeeded job to MLflow (the `mlflow` extra), from the worker's supervising process.

With `KDISTILL_MLFLOW_TRACKING_URI` set, each succeeded job becomes a run named after the job, in the experiment
`KDISTILL_MLFLOW_EXPERIMENT` (created when missing):
- tags: `kdistill.job_id`, `kdistill.teacher_id`, `kdistill.dataset_id`, `kdistill.student_arch`,
  `kdistill.accuracy_split` (where the `final_*` figures come from: test when the job has a test split);
- params: the hyperparameters (lists as JSON), `student_arch`, `baseline`, `export_formats` and the data options;
- metrics per epoch (step = the epoch): `val_accuracy`, `val_top5`, `teacher_val_accuracy`, `agreement`,
  `train_loss`, `train_loss_distill`, `train_loss_label`, `train_loss_feature`, `learning_rate`, `samples_per_s`,
  `epoch_seconds`, and the baseline's as `baseline_val_accuracy`, `baseline_train_loss`, ... (same names, prefixed);
- final metrics (step 0): `final_accuracy`, `final_teacher_accuracy`, `final_baseline_accuracy`, `final_gain`,
  `final_agreement`, `test_accuracy` / `validation_accuracy` (and their teacher's and baseline's), `speedup_batch_1`,
  `speedup_batch_32`, `compression`;
- the ONNX student as the MLflow model `student` (when the job exported `onnx`), and `metadata.json`.

The training child is sandboxed without network, so this runs in the parent. Requests are bounded (a few
retries, short timeouts) so that an unreachable server fails the logging within about 30 s, never the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.settings import Settings

log = logging.getLogger("kdistill.worker")
# An unreachable server fails within ~30 s instead of MLflow's default of minutes of retries; a deployment
# may still set its own values.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "8"}
EPOCH_METRICS = {"student_accuracy": "val_accuracy", "student_top5": "val_top5",
                 "teacher_accuracy": "teacher_val_accuracy", "agreement": "agreement", "train_loss": "train_loss",
                 "train_loss_distill": "train_loss_distill", "train_loss_label": "train_loss_label",
                 "train_loss_feature": "train_loss_feature", "learning_rate": "learning_rate",
                 "samples_per_s": "samples_per_s", "seconds": "epoch_seconds"}
BASELINE_SKIPS = ("teacher_accuracy",)  # the same teacher figure as the student run's
MAX_PARAM_CHARS = 6000  # MLflow refuses longer parameter values
BATCH = 500  # metrics per request (MLflow accepts up to 1000)


class MlflowNotInstalled(RuntimeError):
    """The `mlflow` extra is not installed in the worker's environment."""


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str

    def to_dict(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id}


def log_job(settings: Settings, job_id: str, request: dict[str, Any], result_metrics: dict[str, Any],
            history: Iterable[dict[str, Any]], out_dir: Path) -> TrackedRun:
    """Log the succeeded job `job_id` to MLflow as a finished run named after it; returns its run and experiment."""
    uri = settings.mlflow_tracking_uri
    if not uri:
        raise ValueError("no MLflow tracking URI is set (KDISTILL_MLFLOW_TRACKING_URI)")
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
    except ImportError as e:
        raise MlflowNotInstalled(f"MLflow is not installed ({e}); install kdistill[mlflow]") from None

    # The fluent API (needed to log a model into an existing run) reads the process-wide URI; every job of
    # this worker uses the same one.
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment(client, settings.mlflow_experiment)
    tags = {"kdistill.job_id": job_id, "kdistill.teacher_id": str(request.get("teacher_id")),
            "kdistill.dataset_id": str(request.get("dataset_id")),
            "kdistill.student_arch": str((request.get("student") or {}).get("arch")),
            "kdistill.accuracy_split": str(result_metrics.get("accuracy_split"))}
    run_id = client.create_run(experiment_id, run_name=job_id, tags=tags).info.run_id
    try:
        params = [Param(k, v) for k, v in params_of(request).items()]
        metrics = [Metric(key, value, ts, step) for key, value, ts, step in epoch_metrics(history)]
        metrics += [Metric(k, v, _now_ms(), 0) for k, v in final_metrics(result_metrics).items()]
        client.log_batch(run_id, params=params)
        for i in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + BATCH])
        client.log_artifact(run_id, str(out_dir / "metadata.json"))
        onnx_file = out_dir / "student.onnx"
        if onnx_file.is_file():
            _log_onnx_model(mlflow, run_id, onnx_file)
        else:
            client.set_tag(run_id, "kdistill.model", "none: the job did not export onnx")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # the server that failed us may be gone; the original error says more
            client.set_terminated(run_id, "FAILED")
        raise
    return TrackedRun(run_id=run_id, experiment_id=experiment_id)


def _experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another worker created it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(f"the MLflow experiment {name!r} is deleted; restore it or set KDISTILL_MLFLOW_EXPERIMENT")
    return found.experiment_id


def _log_onnx_model(mlflow: Any, run_id: str, path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    # The fluent API's active run is per thread; the context manager ends it (FINISHED or FAILED) whatever
    # happens, so no run stays active in this worker.
    with mlflow.start_run(run_id=run_id):
        mlflow.onnx.log_model(model, name="student", save_as_external_data=False,
                              pip_requirements=["onnx", "onnxruntime"])


def params_of(request: dict[str, Any]) -> dict[str, str]:
    """The job's settings as flat MLflow params (strings); empty values and the callback URL are left out."""
    flat: dict[str, Any] = dict(request.get("hyperparameters") or {})
    student = request.get("student") or {}
    flat |= {"student_arch": student.get("arch"), "student_input_size": student.get("input_size"),
             "baseline": request.get("baseline", False), "export_formats": request.get("export_formats"),
             "max_export_accuracy_drop": request.get("max_export_accuracy_drop")}
    flat |= {f"data.{k}": v for k, v in (request.get("data") or {}).items()}
    out = {}
    for k, v in flat.items():
        if v is None:
            continue
        text = v if isinstance(v, str) else json.dumps(v)
        if len(text) <= MAX_PARAM_CHARS:
            out[k] = text
    return out


def epoch_metrics(history: Iterable[dict[str, Any]]) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) per epoch figure: the student's as named in EPOCH_METRICS, the
    baseline's with `baseline_` in front."""
    out = []
    now = _now_ms()
    for m in history:
        run = m.get("run")
        if run not in ("student", "baseline"):
            continue
        for field, key in EPOCH_METRICS.items():
            value = m.get(field)
            if value is None or (run == "baseline" and field in BASELINE_SKIPS):
                continue
            out.append((key if run == "student" else f"baseline_{key}", float(value), now, int(m["epoch"])))
    return out


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The job's final figures: top level (on `accuracy_split`), per split, and the efficiency ratios."""
    out: dict[str, Any] = {
        "final_accuracy": metrics.get("student_accuracy"), "final_teacher_accuracy": metrics.get("teacher_accuracy"),
        "final_baseline_accuracy": metrics.get("baseline_accuracy"), "final_gain": metrics.get("gain"),
        "final_agreement": metrics.get("agreement"), "best_epoch": metrics.get("best_epoch")}
    for split in ("validation", "test"):
        report = metrics.get(split) or {}
        out |= {f"{split}_accuracy": report.get("student_accuracy"),
                f"{split}_teacher_accuracy": report.get("teacher_accuracy"),
                f"{split}_baseline_accuracy": report.get("baseline_accuracy")}
    efficiency = metrics.get("efficiency") or {}
    out |= {f"speedup_{k}": v for k, v in (efficiency.get("speedup") or {}).items()}
    out["compression"] = efficiency.get("compression")
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _now_ms() -> int:
    return int(time.time() * 1000)


def track(settings: Settings, job_id: str, request: dict[str, Any], result: dict[str, Any],
          out_dir: Path) -> tuple[dict[str, str] | None, tuple[str, str] | None]:
    """log_job for the supervisor: ({mlflow_run_id, mlflow_experiment_id}, None) when logged, else (None,
    (warning code, message)); the job succeeds either way."""
    where = redact(settings.mlflow_tracking_uri or "")
    try:
        run = log_job(settings, job_id, request, result.get("metrics") or {}, result.get("history") or [], out_dir)
    except MlflowNotInstalled as e:
        log.warning("job %s: not logged to MLflow at %s: %s", job_id, where, e)
        return None, ("mlflow_not_installed", f"the job was not logged to MLflow at {where}: {e}")
    except Exception as e:  # whatever MLflow or the network raise, the job itself is done
        log.warning("job %s: logging to MLflow at %s failed", job_id, where, exc_info=True)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        if secret := urlsplit(settings.mlflow_tracking_uri or "").password:
            reason = reason.replace(secret, "***")
        return None, ("mlflow_failed", f"logging the job to MLflow at {where} failed ({reason}); the job's "
                      "artifacts are complete")
    log.info("job %s: logged to MLflow at %s as run %s", job_id, where, run.run_id)
    return run.to_dict(), None


def redact(uri: str) -> str:
    """The URI without a password in it (http://user:secret@host -> http://user:***@host)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
