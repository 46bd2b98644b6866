"""Exports: every format reloads to the eager student's logits on any batch size, the ONNX file stands
alone, metadata.json lists true hashes, and an export that disagrees with the student is never kept."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from model_tools import scramble_batchnorm
from safetensors.torch import load_file
from torch import nn

from worker.distill.errors import ExportError
from worker.distill.export import export_student

ALL_FORMATS = ["onnx", "torchscript", "torch_export"]
FILE_OF = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt", "torch_export": "student.pt2"}
TOL = 1e-4


def batch(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)




def run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Reload an exported file the way a user would, and run it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        if fmt == "torchscript":
            with torch.no_grad():
                return torch.jit.load(str(path), map_location="cpu")(x)
        with torch.no_grad():
            return torch.export.load(str(path)).module()(x)


# ------------------------------------------------------------------------------------------------- parity

STUDENTS = {
    "torchvision_resnet18": ("resnet18", 3, 32),
    "small_resnet20": ("resnet20", 1, 16),
}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def exported(request, tmp_path_factory):
    from worker.distill.students import create_model

    arch, channels, size = STUDENTS[request.param]
    torch.manual_seed(0)
    model = create_model(arch, num_classes=5, in_channels=channels)
    scramble_batchnorm(model)
    model.eval()
    out_dir = tmp_path_factory.mktemp(request.param) / "artifacts"  # does not exist yet
    example = batch(4, channels, size, seed=0)
    metadata = {"architecture": arch, "classes": ["a", "b", "c", "d", "e"], "input": {"size": (size, size)}}
    files = export_student(model, example, out_dir, list(ALL_FORMATS), atol=TOL, metadata=metadata)
    return {"arch": arch, "channels": channels, "size": size, "model": model, "files": files,
            "out_dir": out_dir, "metadata": metadata}


def test_export_returns_every_requested_file(exported):
    files = exported["files"]
    assert [f.name for f in files] == ["student.safetensors", *(FILE_OF[f] for f in ALL_FORMATS)]
    assert [f.format for f in files] == ["safetensors", *ALL_FORMATS]
    for f in files:
        assert f.path == exported["out_dir"] / f.name
        assert f.path.is_file()
        assert f.size_bytes == f.path.stat().st_size > 0
        assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest()
        if f.format == "safetensors":
            assert f.max_abs_diff is None
        else:
            assert f.max_abs_diff is not None and 0 <= f.max_abs_diff <= TOL


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_reloaded_files_match_the_eager_student_on_another_batch_size(exported, fmt):
    model = exported["model"]
    n = 3  # the export example had 4 rows, and export_student itself checked 4 and 1
    x = batch(n, exported["channels"], exported["size"], seed=100)
    with torch.no_grad():
        want = model(x)
    assert want.shape == (n, 5)
    assert float(want.std(dim=0).max()) > 1e-3, "logits must depend on the input for a meaningful check"
    got = run_file(fmt, exported["out_dir"] / FILE_OF[fmt], x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= TOL


def test_onnx_file_is_self_contained_with_a_dynamic_batch_axis(exported):
    out_dir = exported["out_dir"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["metadata.json", "student.safetensors", *(FILE_OF[f] for f in ALL_FORMATS)])
    proto = onnx.load(str(out_dir / "student.onnx"), load_external_data=False)
    assert len(proto.graph.initializer) > 0
    for t in proto.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
        assert not t.external_data, t.name
    n_params = sum(p.numel() for p in exported["model"].parameters())
    n_inline = sum(onnx.numpy_helper.to_array(t).size for t in proto.graph.initializer)
    assert n_inline >= 0.9 * n_params  # the weights really are inside (BN may be folded into convs)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not fixed to the example's 4


def test_metadata_lists_every_file_with_its_true_hash(exported):
    out_dir = exported["out_dir"]
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["architecture"] == exported["arch"]
    assert meta["classes"] == exported["metadata"]["classes"]
    assert meta["input"] == {"size": [exported["size"], exported["size"]]}
    listed = {f["name"]: f for f in meta["files"]}
    on_disk = {p.name for p in out_dir.iterdir()} - {"metadata.json"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        data = (out_dir / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size_bytes"] == len(data)
    assert {name: e["format"] for name, e in listed.items()} == {
        "student.safetensors": "safetensors", **{FILE_OF[f]: f for f in ALL_FORMATS}}


def test_safetensors_reloads_into_a_fresh_student(exported):
    from worker.distill.students import create_model

    fresh = create_model(exported["arch"], num_classes=5, in_channels=exported["channels"])
    fresh.load_state_dict(load_file(str(exported["out_dir"] / "student.safetensors")), strict=True)
    fresh.eval()
    x = batch(3, exported["channels"], exported["size"], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), exported["model"](x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- exports that disagree


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


class DiffersWhenScripted(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if torch.jit.is_scripting():
            return y + 0.5
        return y


class DiffersInOnnx(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if torch.onnx.is_in_onnx_export():
            return y + 0.5
        return y


class DiffersWhenExported(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if torch.compiler.is_exporting():
            return y + 0.5
        return y


class SlightlyOffWhenScripted(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if torch.jit.is_scripting():
            return y + 5e-3
        return y


class DropsAClassWhenScripted(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if torch.jit.is_scripting():
            return y[:, :-1]
        return y


class DataDependent(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if y.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot capture it
            return y * 2
        return y


def tiny_example() -> torch.Tensor:
    return batch(4, 1, 8, seed=3)


@pytest.mark.parametrize(("fmt", "cls"), [
    ("torchscript", DiffersWhenScripted), ("onnx", DiffersInOnnx), ("torch_export", DiffersWhenExported),
])
def test_an_export_that_disagrees_is_refused(fmt, cls, tmp_path):
    torch.manual_seed(0)
    model = cls().eval()
    with pytest.raises(ExportError) as err:
        export_student(model, tiny_example(), tmp_path, [fmt], metadata={"architecture": "tiny"})
    assert err.value.code == "export_mismatch"
    msg = err.value.message
    assert "not published" in msg, msg
    assert fmt in msg, msg
    # the divergence that was caught is the one the module injects in the exported graph only
    assert re.search(r"max abs diff 0\.5\b", msg), msg
    assert not (tmp_path / "metadata.json").exists(), "no manifest may be written for a refused export"


def test_the_injected_divergences_do_trigger_outside_export_student():
    # The modules above behave like TinyNet eagerly and differ only once scripted / exported.
    torch.manual_seed(0)
    x = tiny_example()
    for cls in (DiffersWhenScripted, DiffersWhenExported):
        model = cls().eval()
        with torch.no_grad():
            eager = model(x)
            torch.testing.assert_close(eager, TinyNet.forward(model, x))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = (torch.jit.script(model)(x) if cls is DiffersWhenScripted
                            else torch.export.export(model, (x,)).module()(x))
        torch.testing.assert_close(exported - eager, torch.full_like(eager, 0.5))


def test_a_disagreeing_export_is_refused_whatever_formats_came_before(tmp_path):
    # The first format is fine, the second is not: the call must still fail as a whole.
    torch.manual_seed(0)
    with pytest.raises(ExportError) as err:
        export_student(DiffersWhenScripted().eval(), tiny_example(), tmp_path,
                       ["torch_export", "torchscript"], metadata={})
    assert err.value.code == "export_mismatch"
    assert not (tmp_path / "metadata.json").exists()


def test_an_export_that_changes_the_output_shape_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportError) as err:
        export_student(DropsAClassWhenScripted().eval(), tiny_example(), tmp_path, ["torchscript"],
                       metadata={})
    assert err.value.code == "export_mismatch"
    assert "not published" in err.value.message, err.value.message
    assert not (tmp_path / "metadata.json").exists()


def test_atol_is_the_tolerance(tmp_path):
    torch.manual_seed(0)
    model = SlightlyOffWhenScripted().eval()
    with pytest.raises(ExportError) as err:
        export_student(model, tiny_example(), tmp_path / "strict", ["torchscript"])
    assert err.value.code == "export_mismatch"
    files = export_student(model, tiny_example(), tmp_path / "loose", ["torchscript"], atol=1e-2)
    assert [f.name for f in files] == ["student.safetensors", "student.torchscript.pt"]
    assert files[1].max_abs_diff == pytest.approx(5e-3, abs=1e-6)
    assert not (tmp_path / "loose" / "metadata.json").exists()  # metadata=None writes none


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_model_that_cannot_be_exported_is_export_failed(fmt, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportError) as err:
        export_student(DataDependent().eval(), tiny_example(), tmp_path, [fmt], metadata={})
    assert err.value.code == "export_failed"
    assert fmt in err.value.message
    assert not (tmp_path / "metadata.json").exists()
