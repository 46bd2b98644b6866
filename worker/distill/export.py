"""Export the student (ONNX, TorchScript, torch.export, fp16 and int8 ONNX), reload each file, and refuse any
that disagrees."""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .errors import ExportError

FILE_NAMES = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt", "torch_export": "student.pt2",
              "onnx_fp16": "student.fp16.onnx", "onnx_int8": "student.int8.onnx"}
RTOL = 1e-3
REDUCED_FORMATS = ("onnx_fp16", "onnx_int8")  # derived from the verified fp32 ONNX file
# Reduced precision cannot meet the fp32 tolerance, so these files must pick the eager student's class (or one
# within TIE_FRACTION of its logit spread from the top) on at least MIN_AGREEMENT of the example rows.
MIN_AGREEMENT = 0.75
TIE_FRACTION = 0.05


@dataclass
class ExportedFile:
    name: str
    format: str
    path: Path
    size_bytes: int
    sha256: str
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "size_bytes": self.size_bytes, "sha256": self.sha256,
                "max_abs_diff": self.max_abs_diff}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_student(model: nn.Module, example: torch.Tensor, out_dir: Path, formats: list[str], *,
                   atol: float = 1e-4, metadata: dict[str, Any] | None = None,
                   calibration: torch.Tensor | None = None) -> list[ExportedFile]:
    """Write each format plus `student.safetensors` and `metadata.json`; every export is reloaded and
    compared with the eager model on `example` (a real, normalised batch) before it is kept.

    `onnx_fp16` and `onnx_int8` are made from the fp32 ONNX file (a temporary one unless `onnx` is asked for);
    `onnx_int8` calibrates on `calibration`, normalised images shaped like `example` (a few hundred suffice).
    """
    reduced = [f for f in formats if f in REDUCED_FORMATS]
    calib = _calibration_array(calibration, example) if "onnx_int8" in reduced else None
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float().eval()
    example = example.to("cpu").float().contiguous()
    with torch.inference_mode():
        reference = model(example)
    files = []
    weights = out_dir / "student.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    files.append(_describe(weights, "safetensors", None))
    written = {fmt: _export_verified(fmt, model, example, reference, out_dir / FILE_NAMES[fmt], atol)
               for fmt in formats if fmt not in REDUCED_FORMATS}
    if reduced:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-fp32-") as work:
            source = written["onnx"].path if "onnx" in written else _export_verified(
                "onnx", model, example, reference, Path(work) / FILE_NAMES["onnx"], atol).path
            for fmt in reduced:
                written[fmt] = _export_reduced(fmt, source, out_dir / FILE_NAMES[fmt], example, reference, calib)
    files.extend(written[fmt] for fmt in formats)
    if metadata is not None:
        write_metadata(out_dir, metadata, files)
    return files


def _export_verified(fmt: str, model: nn.Module, example: torch.Tensor, reference: torch.Tensor, path: Path,
                     atol: float) -> ExportedFile:
    writer, runner = EXPORTERS[fmt]
    try:
        writer(model, example, path)
    except ExportError:
        raise
    except Exception as e:  # exporters raise a zoo of types; the job needs one readable error
        raise ExportError(f"{fmt} export of the student failed: {_first_line(e)}", code="export_failed") from None
    diff = _verify(fmt, runner, path, example, reference, atol)
    return _describe(path, fmt, diff)


def _export_reduced(fmt: str, source: Path, path: Path, example: torch.Tensor, reference: torch.Tensor,
                    calibration: np.ndarray | None) -> ExportedFile:
    from .quantize import write_fp16, write_int8  # onnxruntime's quantisation tools load only when asked for

    try:
        if fmt == "onnx_fp16":
            write_fp16(source, path)
        else:
            assert calibration is not None  # checked before any file was written
            write_int8(source, path, calibration)
    except Exception as e:  # converters raise a zoo of types; the job needs one readable error
        path.unlink(missing_ok=True)
        raise ExportError(f"{fmt} export of the student failed: {_first_line(e)}", code="export_failed") from None
    try:
        diff = _verify_reduced(fmt, path, example, reference)
    except ExportError:
        path.unlink(missing_ok=True)
        raise
    return _describe(path, fmt, diff)


def _calibration_array(calibration: torch.Tensor | None, example: torch.Tensor) -> np.ndarray:
    if calibration is None or not isinstance(calibration, torch.Tensor) or len(calibration) == 0:
        raise ExportError("the onnx_int8 export needs calibration images (normalised float32 [N, C, H, W], a few "
                          "hundred training images); none were given", code="export_failed")
    if calibration.dim() != 4 or tuple(calibration.shape[1:]) != tuple(example.shape[1:]):
        raise ExportError(f"onnx_int8 calibration images are shaped {list(calibration.shape)}; they must be "
                          f"[N, {', '.join(str(d) for d in example.shape[1:])}] like the student's input",
                          code="export_failed")
    array = calibration.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(array).all():
        raise ExportError("onnx_int8 calibration images contain NaN or infinite values", code="export_failed")
    return array


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def write_metadata(out_dir: Path, metadata: dict[str, Any], files: list[ExportedFile]) -> ExportedFile:
    """Write `metadata.json` (the run's description plus the files it describes) and describe it in turn."""
    path = out_dir / "metadata.json"
    path.write_text(json.dumps(dict(metadata, files=[f.to_dict() for f in files]), indent=2,
                               default=_json_default))
    return _describe(path, "metadata", None)


def _describe(path: Path, fmt: str, diff: float | None) -> ExportedFile:
    return ExportedFile(name=path.name, format=fmt, path=path, size_bytes=path.stat().st_size,
                        sha256=sha256_file(path), max_abs_diff=diff)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _verify(fmt: str, runner: Callable[[Path, torch.Tensor], torch.Tensor], path: Path,
            example: torch.Tensor, reference: torch.Tensor, atol: float) -> float:
    """Reload and run the file on the example batch and on a smaller one (the batch axis is dynamic)."""
    worst = 0.0
    for x, ref in ((example, reference), (example[:1], reference[:1])):
        out = _run_checked(fmt, runner, path, x, ref)
        diff = float((out - ref).abs().max())
        worst = max(worst, diff)
        if not torch.allclose(out, ref, rtol=RTOL, atol=atol):
            raise ExportError(f"the {fmt} file disagrees with the trained student (max abs diff {diff:.3g}, "
                              f"tolerance {atol:g} + {RTOL:g}*|x|); it was not published")
    return worst


def _run_checked(fmt: str, runner: Callable[[Path, torch.Tensor], torch.Tensor], path: Path, x: torch.Tensor,
                 ref: torch.Tensor) -> torch.Tensor:
    """The file's output on `x`, or ExportError when it cannot run or its shape is not the student's."""
    try:
        out = runner(path, x)
    except Exception as e:  # a file we cannot run is as bad as a wrong one
        raise ExportError(f"the {fmt} file could not be reloaded and run: {_first_line(e)}",
                          code="export_failed") from None
    if out.shape != ref.shape:
        raise ExportError(f"the {fmt} file outputs shape {list(out.shape)} where the student outputs "
                          f"{list(ref.shape)}; it was not published")
    return out


def _verify_reduced(fmt: str, path: Path, example: torch.Tensor, reference: torch.Tensor) -> float:
    """Reload and run an fp16/int8 file on the example batch and on a batch of one: right shape, finite
    outputs, and the eager student's class on most rows. Returns the worst absolute logit difference."""
    worst = 0.0
    outputs = []
    for x, ref in ((example, reference), (example[:1], reference[:1])):
        out = _run_checked(fmt, _run_onnx, path, x, ref).float()
        if not torch.isfinite(out).all():
            raise ExportError(f"the {fmt} file outputs NaN or infinite logits; it was not published")
        worst = max(worst, float((out - ref).abs().max()))
        outputs.append(out)
    agreement = class_agreement(outputs[0], reference)
    if agreement < MIN_AGREEMENT:
        raise ExportError(f"the {fmt} file picks the trained student's class on only {agreement:.0%} of the "
                          f"example batch (at least {MIN_AGREEMENT:.0%} required); it was not published")
    return worst


def class_agreement(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows where `out`'s top class is the reference's, or within TIE_FRACTION of the reference's
    logit spread from its top (a near tie that rounding may legitimately flip)."""
    top = reference.max(1).values
    spread = top - reference.min(1).values
    picked = reference.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    return float((picked >= top - TIE_FRACTION * spread).float().mean())


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """One self-contained ONNX file with a dynamic batch axis (input "input", output "logits")."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, external_data=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    program.save(str(path), external_data=False)


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
        except Exception:  # many torchvision models trace but do not script; tracing is exact for them
            scripted = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(scripted, str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    module = torch.jit.load(str(path), map_location="cpu")  # our own file, written a moment ago
    with torch.inference_mode():
        return module(x)


def _write_torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _run_torch_export(path: Path, x: torch.Tensor) -> torch.Tensor:
    program = torch.export.load(str(path))
    with torch.inference_mode():
        return program.module()(x)


EXPORTERS: dict[str, tuple[Callable[..., None], Callable[[Path, torch.Tensor], torch.Tensor]]] = {
    "onnx": (write_onnx, _run_onnx),
    "torchscript": (_write_torchscript, _run_torchscript),
    "torch_export": (_write_torch_export, _run_torch_export),
}
