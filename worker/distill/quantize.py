"""Reduced-precision ONNX students (float16 weights and compute; int8 static QDQ) and what they cost in accuracy.

Both are derived from the verified fp32 ONNX file. `measure_exports` puts accuracy, agreement, size and CPU
latency of each next to the fp32 file's, for the job's `metrics.exports`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from .efficiency import BATCHES, cpu_eval_copy, measure_latency, ort_runs
from .export import ExportedFile, write_onnx

FP32 = "onnx"
QUANTIZED = ("onnx_fp16", "onnx_int8")
CALIBRATION_BATCH = 32
# Activation ranges are calibrated by MinMax. On the digits-trained resnet8 of the tests MinMax, Percentile and
# Entropy give the same predictions; over resnet8/resnet20 x 3 seeds MinMax lost no test accuracy in total
# (Percentile lost 4 of 540 images, Entropy 1) and agreed with fp32 most often. It keeps ReLU outputs' ranges
# one-sided ([0, max], all 256 codes; onnxruntime's Percentile makes them symmetric), needs no histograms (which
# refuse activations spanning a few float steps), and costs least.
CALIBRATION_METHOD = "minmax"
EVAL_BATCH = 256  # rows per onnxruntime call when scoring: bounds the activations held at once

Split = tuple[np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------------ writing


def write_fp16(src: Path, dst: Path) -> None:
    """Convert the fp32 ONNX file `src` to float16 weights and compute, keeping float32 input and output."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it clamps to the float16 range
        converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds a float32 NCHW array to onnxruntime's calibrator in batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches = [np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)
                         for i in range(0, len(images), batch_size)]
        self._name = input_name
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def __len__(self) -> int:
        return len(self._batches)


def write_int8(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """Statically quantise the fp32 ONNX file `src` to int8 (QDQ, per-channel weights, MinMax-calibrated
    activations) using `calibration`, float32 normalised images [N, C, H, W]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration images must be a non-empty [N, C, H, W] array, got shape {calibration.shape}")
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as work, _quiet():
        # Shape inference plus onnxruntime's graph fusions first, as its quantisation guide asks: scales are
        # then calibrated on the graph that will actually run.
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared))
        except Exception:  # symbolic shape inference gives up on some graphs; quantising the raw one still works
            prepared = src
        quantize_static(
            str(prepared), str(dst), ArrayCalibrationReader(calibration, _input_name(prepared)),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,  # S8S8: onnxruntime's CPU default
            # The calibration graph reduces each activation to its batch min and max, so memory does not grow
            # with the number of calibration images.
            calibrate_method=CalibrationMethod.MinMax)
    _tag(dst, {"kdistill.calibration_method": CALIBRATION_METHOD,
               "kdistill.calibration_images": str(len(calibration))})


def _tag(path: Path, props: dict[str, str]) -> None:
    """Record how the file was made in its own metadata_props, where any ONNX viewer shows it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in init)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's calibrators print progress lines and log hints; a worker's log wants neither."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


# ------------------------------------------------------------------------------------------ measuring


def measure_exports(files: list[ExportedFile], splits: dict[str, Split], *, max_drop: float,
                    student: nn.Module | None = None, budget_seconds: float = 10.0,
                    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Accuracy (and its change), agreement with the fp32 ONNX, size and CPU latency of each onnx_fp16 /
    onnx_int8 file, beside the fp32 ONNX; returns (report keyed by format, warnings).

    `splits` maps a split name to (float32 normalised NCHW images, int labels). The fp32 reference is the
    published `onnx` file, else one exported from `student` for the measurement. A format whose accuracy falls
    by more than `max_drop` (absolute) on any split gets an `export_accuracy_drop` warning; it stays published.
    """
    derived = [f for f in files if f.format in QUANTIZED]
    splits = {name: split for name, split in splits.items() if len(split[1])}
    if not derived or not splits:
        return {}, []
    published = next((f for f in files if f.format == FP32), None)
    with tempfile.TemporaryDirectory(prefix=".measure-exports-", dir=derived[0].path.parent) as work:
        if published is not None:
            fp32_path, fp32_size = published.path, published.size_bytes
        else:
            if student is None:
                raise ValueError("measuring onnx_fp16/onnx_int8 needs the fp32 ONNX file or the student to export it")
            fp32_path = Path(work) / "student.onnx"
            first_x = next(iter(splits.values()))[0]
            write_onnx(cpu_eval_copy(student), torch.from_numpy(np.ascontiguousarray(first_x[:2])), fp32_path)
            fp32_size = fp32_path.stat().st_size
        try:
            return _measure(fp32_path, fp32_size, published is not None, derived, splits, max_drop, budget_seconds)
        except Exception as e:  # measuring must not fail a job whose files are already verified and written
            return {FP32: {"error": f"measuring the fp32 ONNX student failed: {_error_text(e)}"}}, []


def _measure(fp32_path: Path, fp32_size: int, published: bool, derived: list[ExportedFile],
             splits: dict[str, Split], max_drop: float, budget: float) -> tuple[dict[str, Any], list[dict[str, str]]]:
    threads = torch.get_num_threads()
    shape = tuple(next(iter(splits.values()))[0].shape[1:])
    fp32_preds = {name: predict_onnx(fp32_path, x, threads) for name, (x, _) in splits.items()}
    fp32: dict[str, Any] = {
        "file": fp32_path.name if published else None, "published": published, "size_bytes": fp32_size,
        "splits": {name: {"accuracy": _accuracy(fp32_preds[name], y), "samples": len(y)}
                   for name, (_, y) in splits.items()},
        "latency_ms": {f"batch_{b}": None for b in BATCHES}}
    report: dict[str, Any] = {FP32: fp32}
    warns: list[dict[str, str]] = []
    fp32_runs, _ = ort_runs(fp32_path, shape, threads)
    for f in derived:
        # size_ratio and speedup read like efficiency's: how many times smaller / faster than the fp32 file
        entry: dict[str, Any] = {"file": f.name, "published": True, "size_bytes": f.size_bytes,
                                 "size_ratio": round(fp32_size / f.size_bytes, 3) if f.size_bytes else None,
                                 "splits": {}, "latency_ms": None, "speedup": None}
        report[f.format] = entry
        try:
            if f.format == "onnx_int8":
                props = file_metadata(f.path)
                images = props.get("kdistill.calibration_images")
                entry["calibration"] = {"method": props.get("kdistill.calibration_method"),
                                        "images": int(images) if images and images.isdigit() else None}
            for name, (x, y) in splits.items():
                entry["splits"][name], warning = _score_split(f, name, predict_onnx(f.path, x, threads),
                                                              fp32_preds[name], np.asarray(y), max_drop)
                if warning is not None:
                    warns.append(warning)
            # Timed interleaved with the fp32 file, so the speedup compares like with like on this worker.
            runs, _ = ort_runs(f.path, shape, threads)
            medians = measure_latency(fp32_runs, runs, budget_seconds=budget / len(derived))["median_s"]
        except Exception as e:  # measuring must not fail a job whose files are already verified and written
            entry["error"] = _error_text(e)
            continue
        entry["latency_ms"] = {f"batch_{b}": round(medians[b][1] * 1000, 3) for b in BATCHES}
        entry["speedup"] = {f"batch_{b}": round(medians[b][0] / medians[b][1], 3) for b in BATCHES}
        for b in BATCHES:  # the fp32 figure comes from its first pairing
            if fp32["latency_ms"][f"batch_{b}"] is None:
                fp32["latency_ms"][f"batch_{b}"] = round(medians[b][0] * 1000, 3)
    return report, warns


def _score_split(f: ExportedFile, split: str, preds: np.ndarray, base: np.ndarray, y: np.ndarray,
                 max_drop: float) -> tuple[dict[str, Any], dict[str, str] | None]:
    acc, acc_fp32 = _accuracy(preds, y), _accuracy(base, y)
    figures = {"accuracy": acc, "accuracy_change": None if acc is None else round(acc - acc_fp32, 6),
               "agreement": round(float((preds == base).mean()), 6) if len(y) else None, "samples": len(y)}
    # Counted in samples, so losing exactly max_drop (or nothing, with max_drop 0) never warns.
    lost = int((base == y).sum()) - int((preds == y).sum())
    if lost <= max_drop * len(y) + 1e-9:
        return figures, None
    return figures, {"code": "export_accuracy_drop", "message": (
        f"the {f.format} export scores {acc:.4f} accuracy on {split} where the fp32 ONNX student scores "
        f"{acc_fp32:.4f} (a drop of {acc_fp32 - acc:.4f}, more than the allowed {max_drop:g}); "
        f"{f.name} is still published")}


def predict_onnx(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Argmax class of each row of `x` (float32 NCHW) under onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a shared worker's cores stay free
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: np.ascontiguousarray(x[i:i + EVAL_BATCH], dtype=np.float32)})[0].argmax(1)
           for i in range(0, len(x), EVAL_BATCH)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _accuracy(preds: np.ndarray, y: np.ndarray) -> float | None:
    return round(float((preds == np.asarray(y)).mean()), 6) if len(y) else None


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
