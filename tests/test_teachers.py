"""Teachers: every supported checkpoint format loads to the same logits, and every bad upload becomes a
TeacherError with a stable code instead of a crash (or, worse, code execution)."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_tools import scramble_batchnorm
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file
from torch import nn

from worker.distill.errors import TeacherError, UnsafeCheckpointError
from worker.distill.spec import InputSpec, TeacherSpec
from worker.distill.statedict import load_state_dict_file
from worker.distill.teachers import check_finite, detect_format, load_teacher

# ---------------------------------------------------------------------------------------------- helpers


class TinyNet(nn.Module):
    """A two-layer conv classifier that scripts, traces and exports at any input size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class FlattenNet(nn.Module):
    """Only works on 1x8x8 inputs: the linear layer is sized for 64 features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class NaNNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3)).unsqueeze(1).expand(-1, 4) * float("nan")


class InfNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3)).expand(-1, 4).clone()
        y[0, 0] = float("inf")
        return y


class FeatureMapNet(nn.Module):
    """Returns a 4-D feature map rather than logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FirstRowNet(nn.Module):
    """Returns one row whatever the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))[:1]


UNPICKLED: list[str] = []  # set by the traps below if anything in a checkpoint gets unpickled


class BoobyTrappedNet(TinyNet):
    """Unpickling an instance calls __setstate__, which records it."""

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append("BoobyTrappedNet.__setstate__")
        super().__setstate__(state)


def _spring_trap() -> str:
    UNPICKLED.append("_spring_trap")
    return "sprung"


class ReduceTrap:
    """The classic pickle exploit: __reduce__ makes the unpickler call an arbitrary function."""

    def __reduce__(self):
        return (_spring_trap, ())


def grey8() -> InputSpec:
    return InputSpec(channels=1, size=8, mean=[0.3], std=[0.37])


def batch(n: int, channels: int = 1, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)




def export_onnx_legacy(model: nn.Module, example: torch.Tensor, path: Path,
                       dynamic_axes: dict[int, str] | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": dynamic_axes} if dynamic_axes else None)
    return path


def script_to(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def code_of(spec: TeacherSpec, **kwargs) -> str:
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu", **kwargs)
    assert err.value.message, "a TeacherError must carry a message a person can act on"
    return err.value.code


# ------------------------------------------------------------------------------------ state-dict teachers


@pytest.fixture(scope="module")
def resnet8() -> nn.Module:
    from worker.distill.students import create_model

    torch.manual_seed(123)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    scramble_batchnorm(model)
    return model.eval()


@pytest.fixture(scope="module")
def resnet8_safetensors(resnet8: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sd") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in resnet8.state_dict().items()}, str(path))
    return path


def _save_state_dict(kind: str, model: nn.Module, directory: Path) -> Path:
    sd = model.state_dict()
    if kind == "safetensors":
        path = directory / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif kind == "pt":
        path = directory / "teacher.pt"
        torch.save(sd, path)
    elif kind == "legacy_pt":  # the pre-1.6 non-zip serialisation
        path = directory / "teacher.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif kind == "wrapped":
        path = directory / "checkpoint.pt"
        torch.save({"state_dict": sd, "epoch": 7}, path)
    elif kind == "dataparallel":
        path = directory / "ddp.pt"
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif kind == "wrapped_dataparallel":
        path = directory / "ddp_ckpt.pt"
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(("kind", "fmt"), [
    ("safetensors", "safetensors"), ("pt", "state_dict"), ("legacy_pt", "state_dict"),
    ("wrapped", "state_dict"), ("dataparallel", "state_dict"), ("wrapped_dataparallel", "state_dict"),
])
def test_state_dict_teacher_reproduces_the_original_logits(kind, fmt, resnet8, tmp_path):
    path = _save_state_dict(kind, resnet8, tmp_path)
    spec = TeacherSpec(path=str(path), arch="resnet8", input=grey8())  # num_classes left to inference
    teacher = load_teacher(spec, device="cpu", num_classes=10)
    assert teacher.format == fmt
    assert teacher.arch == "resnet8"
    assert teacher.num_classes == 10
    assert teacher.module is not None and not teacher.module.training
    x = batch(5)
    with torch.no_grad():
        want = resnet8(x)
    got = teacher.logits(x)
    assert got.shape == (5, 10) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    desc = teacher.describe()
    assert desc["format"] == fmt and desc["arch"] == "resnet8" and desc["num_classes"] == 10
    assert desc["parameters"] == sum(p.numel() for p in resnet8.parameters())
    assert desc["input"]["channels"] == 1 and desc["input"]["size"] == [8, 8]


def test_explicit_num_classes_is_used_and_validated(resnet8_safetensors, resnet8):
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet8", num_classes=10, input=grey8())
    teacher = load_teacher(spec, device="cpu")  # validated against spec.num_classes
    torch.testing.assert_close(teacher.logits(batch(3)), resnet8(batch(3)).detach(), rtol=0, atol=1e-6)


def test_num_classes_inference_survives_the_safetensors_key_order(tmp_path):
    # safetensors hands keys back in its own storage order (by dtype, then name), not in module order. For
    # convnext that puts the 768x3072 MLP weights of `features.*` after the `classifier.2.weight` head, so
    # "the last 2-D weight" of a loaded safetensors file is not the head. Shapes come from a meta-device
    # build; the file holds placeholder tensors with the same key names, ranks and leading dimensions.
    from worker.distill.students import create_model
    from worker.distill.teachers import _infer_num_classes

    def build(n: int) -> torch.nn.Module:
        with torch.device("meta"):
            return create_model("convnext_tiny", num_classes=n)

    sd = build(5).state_dict()
    assert _infer_num_classes(sd, build) == 5
    path = tmp_path / "convnext_shapes.safetensors"
    save_file({k: torch.zeros(v.shape[0], *[1] * (v.ndim - 1), dtype=v.dtype) if v.ndim else
               torch.zeros((), dtype=v.dtype) for k, v in sd.items()}, str(path))
    loaded = load_file(str(path))
    assert set(loaded) == set(sd)
    assert _infer_num_classes(loaded, build) == 5


# --------------------------------------------------------------------------------- unsafe checkpoints


def test_pickled_whole_module_is_refused_without_unpickling_it(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(BoobyTrappedNet(), path)
    UNPICKLED.clear()
    spec = TeacherSpec(path=str(path), arch="resnet8", input=grey8())
    with pytest.raises(UnsafeCheckpointError) as err:
        load_teacher(spec, device="cpu", num_classes=4)
    assert err.value.code == "unsafe_checkpoint"
    msg = err.value.message
    assert "state_dict" in msg and "safetensors" in msg and "ONNX" in msg, msg
    assert UNPICKLED == [], "the whole-module checkpoint was unpickled"
    # The trap is real: a plain unpickle of this test's own file springs it (a control, never an upload).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=False)
    assert UNPICKLED == ["BoobyTrappedNet.__setstate__"]
    UNPICKLED.clear()


def test_reduce_exploit_inside_a_state_dict_checkpoint_is_never_executed(resnet8, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": resnet8.state_dict(), "payload": ReduceTrap()}, path)
    UNPICKLED.clear()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_teacher(TeacherSpec(path=str(path), arch="resnet8", input=grey8()), device="cpu")
    assert err.value.code == "unsafe_checkpoint"
    assert UNPICKLED == []
    # The trap is real: a plain unpickle of this test's own file springs it (a control, never an upload).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.load(path, weights_only=False)["payload"] == "sprung"
    assert UNPICKLED == ["_spring_trap"]
    UNPICKLED.clear()


# ------------------------------------------------------------------------------ state-dict error codes


def test_state_dict_without_arch_is_missing_arch(resnet8_safetensors):
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(resnet8_safetensors), input=grey8()), device="cpu")
    assert err.value.code == "missing_arch"
    assert err.value.field == "teacher.arch"


def test_state_dict_of_a_deeper_sibling_arch_is_a_weights_mismatch(resnet8_safetensors):
    # resnet20 has the same widths but more blocks: missing keys, no shape conflicts.
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet20", input=grey8())
    assert code_of(spec) == "teacher_weights_mismatch"
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu")
    assert err.value.field == "teacher.arch"


def test_state_dict_of_a_different_family_is_a_weights_mismatch(resnet8_safetensors):
    # torchvision resnet18: conv1 and fc exist in both but with other shapes.
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet18", input=grey8())
    assert code_of(spec) == "teacher_weights_mismatch"


def test_state_dict_with_wrong_num_classes_is_a_weights_mismatch(resnet8_safetensors):
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet8", num_classes=7, input=grey8())
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu")
    assert err.value.code == "teacher_weights_mismatch"
    assert "7 classes" in err.value.message
    assert err.value.field == "teacher.num_classes"  # the head is what differs, not the architecture


def test_state_dict_with_wrong_input_channels_is_a_weights_mismatch(resnet8_safetensors):
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet8", input=InputSpec(channels=3, size=8))
    assert code_of(spec) == "teacher_weights_mismatch"
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu")
    assert err.value.field == "teacher.input.channels"


def test_unknown_arch_is_unknown_architecture(resnet8_safetensors):
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet_does_not_exist", input=grey8())
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu")
    assert err.value.code == "unknown_architecture"
    assert err.value.field == "teacher.arch"
    assert "resnet_does_not_exist" in err.value.message


def test_dataset_class_count_differs_from_state_dict_teacher(resnet8_safetensors):
    spec = TeacherSpec(path=str(resnet8_safetensors), arch="resnet8", input=grey8())
    assert code_of(spec, num_classes=5) == "class_count_mismatch"


def test_missing_file_is_file_not_found(tmp_path):
    spec = TeacherSpec(path=str(tmp_path / "nope.safetensors"), arch="resnet8", input=grey8())
    assert code_of(spec) == "file_not_found"


def _zip_of(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, "not a checkpoint")
    return buf.getvalue()


GARBAGE = {
    "random.pt": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "random.safetensors": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "random.onnx": np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "notes.pt": b"this is not a model, just some text someone uploaded\n" * 20,
    "empty.pt": b"",
    "bad_header.safetensors": (20).to_bytes(8, "little") + b"{not json at all...." + b"\0" * 40,
    "corrupt_pickle.pt": b"\x80" + b"garbage" * 100,  # starts like a legacy torch.save pickle
    "not_torch_zip.pt": _zip_of("foo.txt"),  # torch.load says "[enforce fail at inline_container.cc:180] ..."
}
INTERNALS = ("enforce fail", "inline_container", "PytorchStreamReader", "miniz", "WeightsUnpickler", "Traceback")


def assert_readable(message: str, name: str) -> None:
    """Names the upload, not a path or temp file, and says nothing of the loaders' internals."""
    assert name in message and "/" not in message.split(name)[0], message
    assert not any(word.lower() in message.lower() for word in INTERNALS), message


@pytest.mark.parametrize("name", sorted(GARBAGE))
@pytest.mark.parametrize("arch", [None, "resnet8"])
def test_garbage_bytes_are_a_readable_teacher_error(name, arch, tmp_path):
    path = tmp_path / name
    path.write_bytes(GARBAGE[name])
    spec = TeacherSpec(path=str(path), arch=arch, input=grey8())
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu", num_classes=10)
    assert err.value.code in {"unreadable_teacher", "unreadable_weights", "missing_arch"}, err.value.code
    assert err.value.code != "missing_arch" or arch is None
    if err.value.code != "missing_arch":
        assert_readable(err.value.message, name)
    if name.endswith(".pt") and GARBAGE[name]:  # the loader every .pt state dict goes through
        with pytest.raises(TeacherError) as direct:
            load_state_dict_file(path)
        assert direct.value.code == "unreadable_weights"
        assert_readable(direct.value.message, name)


def test_truncated_checkpoint_is_a_readable_teacher_error(resnet8, tmp_path):
    full = _save_state_dict("pt", resnet8, tmp_path)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    spec = TeacherSpec(path=str(path), arch="resnet8", input=grey8())
    assert code_of(spec) in {"unreadable_teacher", "unreadable_weights"}
    with pytest.raises(TeacherError) as err:
        load_teacher(spec, device="cpu")
    assert_readable(err.value.message, "truncated.pt")
    for cut in (full.stat().st_size // 2, full.stat().st_size - 10):  # torch.load's own zip reader fails
        path.write_bytes(full.read_bytes()[:cut])
        with pytest.raises(TeacherError) as err:
            load_state_dict_file(path)
        assert err.value.code == "unreadable_weights" and "truncated" in err.value.message
        assert_readable(err.value.message, "truncated.pt")


# ------------------------------------------------------------------------------------------ ONNX teachers


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(7)
    return TinyNet(1, 4).eval()


def test_onnx_teacher_of_a_custom_architecture_matches_torch(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "custom.onnx", {0: "N"})
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=4)
    assert teacher.format == "onnx"
    assert teacher.arch is None and teacher.module is None
    assert teacher.num_classes == 4
    x = batch(7, seed=5)
    got = teacher.logits(x)
    assert got.shape == (7, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, tiny(x).detach(), rtol=0, atol=1e-4)
    assert teacher.describe()["format"] == "onnx"


@pytest.mark.parametrize("fixed", [1, 3])
def test_onnx_teacher_with_a_fixed_batch_runs_any_batch(fixed, tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(fixed), tmp_path / f"fixed{fixed}.onnx")  # no dynamic axes
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == fixed
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=4)
    for n in (5, 1, 2 * fixed):
        x = batch(n, seed=n)
        got = teacher.logits(x)
        assert got.shape == (n, 4)
        torch.testing.assert_close(got, tiny(x).detach(), rtol=0, atol=1e-4)


def test_onnx_dynamo_export_loads(tiny, tmp_path):
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = torch.export.Dim("n", min=1, max=1024)
        torch.onnx.export(tiny, (batch(3),), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: n},), verbose=False)
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=4)
    assert teacher.format == "onnx"
    x = batch(6, seed=9)
    torch.testing.assert_close(teacher.logits(x), tiny(x).detach(), rtol=0, atol=1e-4)


def test_onnx_with_external_data_is_refused(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "inline.onnx", {0: "N"})
    proto = onnx.load(str(path))
    ext = tmp_path / "external.onnx"
    onnx.save_model(proto, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0  # the weights really live outside the model
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(ext), input=grey8()), device="cpu")
    assert err.value.code == "onnx_external_data"
    assert "external_data=False" in err.value.message


def _external_constant(location: str, array: np.ndarray, out: str) -> onnx.NodeProto:
    t = TensorProto()
    t.name = f"{out}_value"
    t.data_type = TensorProto.FLOAT
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return helper.make_node("Constant", [], [out], value=t)


def test_onnx_external_data_hidden_in_a_subgraph_is_refused(tmp_path, monkeypatch):
    # The weights of MatMul come from a Constant inside an If branch that points at a file on disk:
    # onnxruntime resolves it against the working directory when the model is loaded from bytes.
    weights = np.linspace(-1, 1, 64 * 4, dtype=np.float32).reshape(64, 4)
    (tmp_path / "secret.bin").write_bytes(weights.tobytes())
    monkeypatch.chdir(tmp_path)

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([_external_constant("secret.bin", weights, "w_out")], name, [],
                                 [helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [64, 4])])

    true = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=true),
        helper.make_node("If", ["cond"], ["w"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "sneaky", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sneaky.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=4)
    assert err.value.code == "onnx_external_data"


def test_onnx_declared_input_channels_must_match_the_spec(tmp_path):
    model = TinyNet(3, 4).eval()
    path = export_onnx_legacy(model, batch(2, channels=3, size=16), tmp_path / "rgb16.onnx", {0: "N"})
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(path), input=InputSpec(channels=1, size=16)), device="cpu")
    assert err.value.code == "input_spec_mismatch"
    assert err.value.field == "teacher.input"
    # and the size too
    spec = TeacherSpec(path=str(path), input=InputSpec(channels=3, size=8))
    assert code_of(spec) == "input_spec_mismatch"
    # the matching spec loads
    assert load_teacher(TeacherSpec(path=str(path), input=InputSpec(channels=3, size=16))).num_classes == 4


def test_onnx_teacher_that_crashes_on_the_declared_size_is_forward_failed(tmp_path):
    # Height and width are declared dynamic, but the Gemm only fits 8x8 inputs.
    path = export_onnx_legacy(FlattenNet(), batch(2), tmp_path / "flat.onnx", {0: "N", 2: "H", 3: "W"})
    assert load_teacher(TeacherSpec(path=str(path), input=grey8())).num_classes == 4
    spec = TeacherSpec(path=str(path), input=InputSpec(channels=1, size=16))
    assert code_of(spec) == "teacher_forward_failed"


def test_onnx_class_count_mismatch(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "custom.onnx", {0: "N"})
    assert code_of(TeacherSpec(path=str(path), input=grey8()), num_classes=10) == "class_count_mismatch"


# ----------------------------------------------------------------------------------- TorchScript teachers


def test_torchscript_teacher_matches_torch(tiny, tmp_path):
    path = script_to(tiny, tmp_path / "teacher.torchscript")
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=4)
    assert teacher.format == "torchscript"
    assert teacher.num_classes == 4
    x = batch(5, seed=3)
    torch.testing.assert_close(teacher.logits(x), tiny(x).detach(), rtol=0, atol=1e-5)


def test_torchscript_disabled(tiny, tmp_path):
    path = script_to(tiny, tmp_path / "teacher.torchscript")
    spec = TeacherSpec(path=str(path), input=grey8())
    assert code_of(spec, allow_torchscript=False) == "torchscript_disabled"
    # renaming the file does not get around the switch
    disguised = tmp_path / "weights.pt"
    disguised.write_bytes(path.read_bytes())
    assert code_of(TeacherSpec(path=str(disguised), input=grey8()), allow_torchscript=False) \
        == "torchscript_disabled"


# ---------------------------------------------------------------------------- format detection by content


def test_safetensors_named_pt_is_detected_by_content(resnet8, resnet8_safetensors, tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(resnet8_safetensors.read_bytes())
    assert detect_format(path) == "safetensors"
    teacher = load_teacher(TeacherSpec(path=str(path), arch="resnet8", input=grey8()), device="cpu")
    assert teacher.format == "safetensors"
    x = batch(3)
    torch.testing.assert_close(teacher.logits(x), resnet8(x).detach(), rtol=0, atol=1e-6)


def test_torchscript_named_pt_is_detected_by_content(tiny, tmp_path):
    path = script_to(tiny, tmp_path / "teacher.pt")
    assert detect_format(path) == "torchscript"
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu")
    assert teacher.format == "torchscript"
    x = batch(3)
    torch.testing.assert_close(teacher.logits(x), tiny(x).detach(), rtol=0, atol=1e-5)


def test_state_dict_and_onnx_detection(resnet8, tiny, tmp_path):
    pt = _save_state_dict("pt", resnet8, tmp_path)
    assert detect_format(pt) == "state_dict"
    legacy = _save_state_dict("legacy_pt", resnet8, tmp_path)
    assert detect_format(legacy) == "state_dict"
    onnx_as_pt = export_onnx_legacy(tiny, batch(2), tmp_path / "model.pt", {0: "N"})
    assert detect_format(onnx_as_pt) == "onnx"
    teacher = load_teacher(TeacherSpec(path=str(onnx_as_pt), input=grey8()), device="cpu")
    assert teacher.format == "onnx"


# ------------------------------------------------------------------------------------- output validation


def test_torchscript_class_count_mismatch(tiny, tmp_path):
    path = script_to(tiny, tmp_path / "t.pt")
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu", num_classes=5)
    assert err.value.code == "class_count_mismatch"
    assert "4" in err.value.message and "5" in err.value.message


def test_spec_num_classes_is_checked_when_no_dataset_count_is_given(tiny, tmp_path):
    path = script_to(tiny, tmp_path / "t.pt")
    assert code_of(TeacherSpec(path=str(path), num_classes=6, input=grey8())) == "class_count_mismatch"


@pytest.mark.parametrize("net", [NaNNet, InfNet])
def test_nonfinite_teacher_output(net, tmp_path):
    path = script_to(net(), tmp_path / "t.pt")
    assert code_of(TeacherSpec(path=str(path), input=grey8()), num_classes=4) == "teacher_nonfinite_output"


def test_nonfinite_onnx_teacher_output(tmp_path):
    path = export_onnx_legacy(NaNNet(), batch(2), tmp_path / "nan.onnx", {0: "N"})
    assert code_of(TeacherSpec(path=str(path), input=grey8()), num_classes=4) == "teacher_nonfinite_output"


def test_feature_map_output_is_teacher_output_shape(tmp_path):
    path = script_to(FeatureMapNet(), tmp_path / "t.pt")
    assert code_of(TeacherSpec(path=str(path), input=grey8())) == "teacher_output_shape"


def test_feature_map_onnx_output_is_teacher_output_shape(tmp_path):
    path = export_onnx_legacy(FeatureMapNet(), batch(2), tmp_path / "t.onnx", {0: "N"})
    assert code_of(TeacherSpec(path=str(path), input=grey8())) == "teacher_output_shape"


def test_wrong_row_count_is_teacher_output_shape(tmp_path):
    path = script_to(FirstRowNet(), tmp_path / "t.pt")
    assert code_of(TeacherSpec(path=str(path), input=grey8())) == "teacher_output_shape"


def test_teacher_that_crashes_on_the_declared_size_is_forward_failed(tmp_path):
    path = script_to(FlattenNet(), tmp_path / "t.pt")
    assert load_teacher(TeacherSpec(path=str(path), input=grey8())).num_classes == 4
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(path), input=InputSpec(channels=1, size=16)), device="cpu")
    assert err.value.code == "teacher_forward_failed"
    assert err.value.field == "teacher.input"
    assert "[2, 1, 16, 16]" in err.value.message


def test_check_finite():
    check_finite(torch.randn(4, 3), "a training batch")  # no error
    check_finite(torch.zeros(0, 3), "an empty batch")
    bad = torch.randn(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(TeacherError) as err:
        check_finite(bad, "batch 17")
    assert err.value.code == "teacher_nonfinite_output"
    assert "batch 17" in err.value.message and "1 of 3" in err.value.message
    worse = torch.randn(4, 2)
    worse[0, 0], worse[2, 1], worse[3, 0] = float("inf"), float("-inf"), float("nan")
    with pytest.raises(TeacherError) as err:
        check_finite(worse, "x")
    assert "3 of 4" in err.value.message


# ----------------------------------------------------------------------------------- class names in files

NAMES4 = ["cat", "dog", "bird", "fish"]


def test_class_names_are_read_from_onnx_metadata_props(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "named.onnx", {0: "N"})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"classes": json.dumps(NAMES4), "author": "someone"})
    onnx.save(proto, str(path))
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu")
    assert teacher.classes == NAMES4 and teacher.describe()["classes"] == NAMES4


def test_class_names_are_read_from_safetensors_metadata(resnet8, tmp_path):
    path = tmp_path / "named.safetensors"
    names = [f"digit {i}" for i in range(10)]
    save_file({k: v.contiguous() for k, v in resnet8.state_dict().items()}, str(path),
              metadata={"classes": json.dumps(names)})
    teacher = load_teacher(TeacherSpec(path=str(path), arch="resnet8", input=grey8()), device="cpu")
    assert teacher.classes == names


def test_class_names_are_read_from_a_torchscript_extra_file(tiny, tmp_path):
    path = tmp_path / "named.torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(tiny), str(path), _extra_files={"classes.json": json.dumps(NAMES4)})
    assert load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu").classes == NAMES4


def test_given_classes_win_over_the_file_and_plain_files_have_none(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "plain.onnx", {0: "N"})
    assert load_teacher(TeacherSpec(path=str(path), input=grey8()), device="cpu").classes is None
    given = load_teacher(TeacherSpec(path=str(path), input=grey8(), classes="a, b ,c,d"), device="cpu")
    assert given.classes == ["a", "b", "c", "d"]


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a", "b", "c", "d", "e"]])
def test_a_name_count_that_differs_from_the_outputs_is_class_count_mismatch(names, tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "t.onnx", {0: "N"})
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherSpec(path=str(path), input=grey8(), classes=names), device="cpu")
    assert err.value.code == "class_count_mismatch" and err.value.field == "teacher.classes"
    assert f"{len(names)} names" in err.value.message and "4 outputs" in err.value.message


@pytest.mark.parametrize("stored", ['["a", "A ", "b", "c"]', '{"0": "a"}', "not json", '["a", "", "b", "c"]'])
def test_unusable_names_in_a_file_are_invalid_classes(stored, tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "t.onnx", {0: "N"})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"classes": stored})
    onnx.save(proto, str(path))
    assert code_of(TeacherSpec(path=str(path), input=grey8())) == "invalid_classes"


def test_restricted_teacher_returns_the_chosen_outputs_in_order(tiny, tmp_path):
    path = export_onnx_legacy(tiny, batch(2), tmp_path / "t.onnx", {0: "N"})
    teacher = load_teacher(TeacherSpec(path=str(path), input=grey8(), classes=NAMES4), device="cpu")
    sub = teacher.restricted_to([3, 1])
    x = batch(6, seed=9)
    torch.testing.assert_close(sub.logits(x), teacher.logits(x)[:, [3, 1]])
    assert sub.num_classes == 2 and sub.classes == ["fish", "dog"] and teacher.num_classes == 4
