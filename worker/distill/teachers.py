"""Teachers: load a checkpoint of any supported format, describe it, and check it behaves like a classifier."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import StudentError, TeacherError
from .spec import InputSpec, TeacherSpec
from .statedict import is_safetensors, is_torchscript, library_detail, load_state_dict_file

ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class LoadedTeacher:
    """A loaded teacher: `logits(x)` maps a normalised batch on `device` to float logits `[N, num_classes]`."""

    format: str
    arch: str | None
    num_classes: int
    input: InputSpec
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None = None  # torch-native teachers only
    classes: list[str] | None = None  # names of outputs 0..num_classes-1, when known
    path: Path | None = None  # the file it was loaded from
    outputs: list[int] | None = None  # set by `restricted_to`: which of the file's outputs `logits` returns

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.logits_fn(x).float()
            return out if self.outputs is None else out[:, self._index(out.device)]

    def _index(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.outputs, dtype=torch.long, device=device)

    def restricted_to(self, outputs: list[int]) -> LoadedTeacher:
        """This teacher answering only `outputs` of its file's outputs, in that order (a dataset's classes)."""
        names = None if self.classes is None else [self.classes[i] for i in outputs]
        return replace(self, num_classes=len(outputs), classes=names, outputs=list(outputs))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "arch": self.arch, "num_classes": self.num_classes,
                               "input": self.input.describe(), "classes": self.classes}
        if self.outputs is not None:
            out["outputs_used"] = self.outputs
        if self.module is not None:
            out["parameters"] = sum(p.numel() for p in self.module.parameters())
        return out


def detect_format(path: Path) -> str:
    """Tell the format by content first, suffix second: uploads are often misnamed."""
    if is_safetensors(path):
        return "safetensors"
    if zipfile.is_zipfile(path):
        return "torchscript" if is_torchscript(path) else "state_dict"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    with path.open("rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle
        return "state_dict"
    return "onnx"  # protobuf has no magic number; onnx.load tells us soon enough


def load_teacher(spec: TeacherSpec, *, device: torch.device | str = "cpu", num_classes: int | None = None,
                 allow_torchscript: bool = True, validate: bool = True) -> LoadedTeacher:
    """Load the teacher safely, put it in eval mode on `device`, and (by default) validate its output."""
    path = Path(spec.path)
    if not path.is_file():
        raise TeacherError(f"teacher file {path.name} does not exist", code="file_not_found",
                           field="teacher.path")
    fmt = spec.format or detect_format(path)
    device = torch.device(device)
    if fmt in ("safetensors", "state_dict"):
        teacher = _load_state_dict_teacher(path, spec, device)
    elif fmt == "torchscript":
        if not allow_torchscript:
            raise TeacherError("TorchScript teachers are switched off on this deployment; upload ONNX, "
                               "safetensors or a state dict instead", code="torchscript_disabled")
        teacher = _load_torchscript_teacher(path, spec, device)
    else:
        teacher = _load_onnx_teacher(path, spec, device)
    teacher.path = path
    if spec.classes is not None:
        teacher.classes = list(spec.classes)
    if teacher.classes is not None and len(teacher.classes) != teacher.num_classes:
        source = "the given classes" if spec.classes is not None else "the class names stored in the file"
        raise TeacherError(f"{source} list {len(teacher.classes)} names but the teacher has {teacher.num_classes} "
                           "outputs; give one name per output, in output order", code="class_count_mismatch",
                           field="teacher.classes")
    if validate:
        validate_teacher(teacher, device=device, num_classes=num_classes or spec.num_classes)
    return teacher


def _embedded_classes(raw: str | bytes | None, where: str) -> list[str] | None:
    """Class names stored inside a teacher file (a JSON list), validated like the upload's `classes`."""
    from .label_map import parse_class_names

    if raw is None or raw in ("", b""):
        return None
    try:
        names = json.loads(raw)
        if not isinstance(names, list):
            raise ValueError("it is not a JSON list")
        return parse_class_names(names)
    except ValueError as e:
        raise TeacherError(f"the class names in the teacher's {where} cannot be used ({e}); store a JSON list of "
                           "unique names, or pass `classes` with the upload", code="invalid_classes",
                           field="teacher.classes") from None


def _load_state_dict_teacher(path: Path, spec: TeacherSpec, device: torch.device) -> LoadedTeacher:
    from .students import create_model  # the registry builds teachers and students alike

    state = load_state_dict_file(path, what="teacher")  # first: a pickled module is refused as such
    if not spec.arch:
        raise TeacherError("a state-dict teacher needs its architecture name ('arch'), e.g. resnet34",
                           code="missing_arch", field="teacher.arch")

    def build(n: int) -> nn.Module:
        try:
            return create_model(spec.arch, num_classes=n, in_channels=spec.input.channels)
        except StudentError as e:
            raise TeacherError(e.message.replace("student", "teacher"), code=e.code,
                               field="teacher.arch") from None

    num_classes = spec.num_classes or _infer_num_classes(state, build)
    model = build(num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        raise TeacherError(
            f"the weights do not fit architecture {spec.arch!r} with {num_classes} classes and "
            f"{spec.input.channels} input channels: " + _describe_mismatch(missing, unexpected, wrong_shape),
            code="teacher_weights_mismatch", field=_mismatch_field(state, expected, build, missing or unexpected))
    model.load_state_dict(state)
    model.to(device).eval()
    names = None
    if is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = _embedded_classes((f.metadata() or {}).get("classes"), "safetensors metadata 'classes'")
    return LoadedTeacher("safetensors" if is_safetensors(path) else "state_dict", spec.arch, num_classes,
                         spec.input, model, module=model, classes=names)


def _mismatch_field(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                    build: Callable[[int], nn.Module], other_keys: list[str]) -> str:
    """Which setting the user got wrong: the architecture, unless only the classifier head differs (the
    class count) or only the first layer's input depth (the input channels)."""
    bad = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if other_keys or not bad:
        return "teacher.arch"
    two, three = build(2).state_dict(), build(3).state_dict()
    if all(two[k].shape != three[k].shape for k in bad):
        return "teacher.num_classes"
    first = next(k for k, v in expected.items() if v.ndim == 4)  # the first convolution's weight
    if bad == [first] and state[first].shape[0] == expected[first].shape[0] and \
            state[first].shape[2:] == expected[first].shape[2:]:
        return "teacher.input.channels"
    return "teacher.arch"


def _infer_num_classes(state: dict[str, torch.Tensor], build: Callable[[int], nn.Module]) -> int:
    """Read the class count off the head: the parameters whose shape follows num_classes."""
    two, three = build(2).state_dict(), build(3).state_dict()
    heads = [k for k in two if two[k].shape != three[k].shape]
    for k in heads:
        if k in state and state[k].ndim >= 1:
            return int(state[k].shape[0])
    raise TeacherError("cannot tell the teacher's class count from its weights (no classifier head "
                       f"{heads[:2]} in the file); give 'num_classes'", code="missing_num_classes",
                       field="teacher.num_classes")


def _describe_mismatch(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    return "; ".join(parts)


def _load_torchscript_teacher(path: Path, spec: TeacherSpec, device: torch.device) -> LoadedTeacher:
    extra = {"classes.json": ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        detail = library_detail(e)
        raise TeacherError(f"teacher {path.name} is not a loadable TorchScript archive"
                           f"{f' ({detail})' if detail else ''}: it is truncated, damaged or needs operators "
                           "this PyTorch lacks; save it again with torch.jit.save, or export ONNX",
                           code="unreadable_teacher") from None
    module.eval()
    probe = _probe_output(module, spec.input, device)
    return LoadedTeacher("torchscript", None, int(probe.shape[1]), spec.input, module, module=module,
                         classes=_embedded_classes(extra["classes.json"], "extra file classes.json"))


def _load_onnx_teacher(path: Path, spec: TeacherSpec, device: torch.device) -> LoadedTeacher:
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises DecodeError and friends from protobuf
        raise TeacherError(f"teacher {path.name} is not a readable ONNX model, safetensors file or torch "
                           "checkpoint; check that the upload is complete, or export the model again",
                           code="unreadable_teacher") from None
    # External data would make onnxruntime read files named inside an untrusted model.
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _onnx_tensors(proto.graph)):
        raise TeacherError(f"teacher {path.name} keeps weights in external data files; export it as one "
                           "self-contained file (`torch.onnx.export(..., external_data=False)`)",
                           code="onnx_external_data")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=providers)
    except Exception as e:  # onnxruntime's own exception types are not importable in a stable way
        detail = library_detail(e) or "the model is invalid or uses operators it does not support"
        raise TeacherError(f"onnxruntime cannot run teacher {path.name} ({detail}); export it again, with an "
                           "older opset if needed", code="unreadable_teacher") from None
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    np_dtype = ONNX_FLOAT_TYPES.get(inp.type)
    if np_dtype is None:
        raise TeacherError(f"teacher {path.name} takes {inp.type} input; kdistill feeds float images",
                           code="unsupported_teacher_input")
    _check_onnx_input_shape(inp.shape, spec.input, path.name)
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy().astype(np_dtype, copy=False)
        if fixed_batch is None:
            chunks = [session.run([out.name], {inp.name: arr})[0]]
        else:  # a model exported with a fixed batch: run it chunk by chunk, padding the last one
            chunks = []
            for i in range(0, len(arr), fixed_batch):
                part = arr[i:i + fixed_batch]
                pad = fixed_batch - len(part)
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                chunks.append(session.run([out.name], {inp.name: part})[0][:fixed_batch - pad])
        return torch.from_numpy(np.concatenate(chunks).astype(np.float32)).to(x.device)

    probe = _probe_output(run, spec.input, torch.device("cpu"))
    props = {p.key: p.value for p in proto.metadata_props}
    return LoadedTeacher("onnx", None, int(probe.shape[1]), spec.input, run,
                         classes=_embedded_classes(props.get("classes"), "ONNX metadata_props 'classes'"))


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds, subgraphs (If/Loop/Scan bodies) and sparse initializers included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _onnx_tensors(sub)


def _check_onnx_input_shape(shape: list[Any], spec: InputSpec, name: str) -> None:
    want = [None, spec.channels, *spec.size]
    if len(shape) != 4:
        raise TeacherError(f"teacher {name} takes a {len(shape)}-D input; kdistill feeds [N, C, H, W] images",
                           code="unsupported_teacher_input")
    for axis, (got, expect) in enumerate(zip(shape, want, strict=True)):
        if axis and isinstance(got, int) and got > 0 and got != expect:
            raise TeacherError(
                f"teacher {name} expects input {shape} but the input spec says channels={spec.channels}, "
                f"size={list(spec.size)}; set the teacher's input spec to match the model",
                code="input_spec_mismatch", field="teacher.input")


def _dummy_batch(spec: InputSpec, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, spec.channels, *spec.size, generator=g).to(device)


def _probe_output(module: Callable[[torch.Tensor], Any], spec: InputSpec, device: torch.device) -> torch.Tensor:
    try:
        with torch.inference_mode():
            out = module(_dummy_batch(spec, device))
    except Exception as e:  # any failure of an arbitrary model on the declared input
        raise TeacherError(
            f"the teacher failed on a dummy batch of shape [2, {spec.channels}, {spec.size[0]}, {spec.size[1]}] "
            f"({library_detail(e) or type(e).__name__}); check its input spec",
            code="teacher_forward_failed", field="teacher.input") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"the teacher outputs {shape}; a classifier outputs logits [N, num_classes]",
                           code="teacher_output_shape")
    return out


def validate_teacher(teacher: LoadedTeacher, *, device: torch.device | str = "cpu",
                     num_classes: int | None = None) -> None:
    """Run a dummy batch: the output must be finite logits `[2, num_classes]`."""
    out = _probe_output(teacher.logits, teacher.input, torch.device(device))
    if out.shape[0] != 2:
        raise TeacherError(f"the teacher returned {out.shape[0]} rows for a batch of 2",
                           code="teacher_output_shape")
    check_finite(out, "a dummy batch")
    if num_classes is not None and out.shape[1] != num_classes:
        raise TeacherError(f"the teacher predicts {out.shape[1]} classes but the dataset has {num_classes}; "
                           "use a teacher trained for this dataset's classes",
                           code="class_count_mismatch", field="teacher")


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Raise when the teacher's logits hold NaN or infinity: distilling them would poison the student."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise TeacherError(f"the teacher produced NaN or infinite logits on {where} ({bad} of {len(logits)} "
                           "samples); check the checkpoint and its input spec (mean/std)",
                           code="teacher_nonfinite_output")
