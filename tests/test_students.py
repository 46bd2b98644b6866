"""The student registry: every listed arch builds and runs, sizes are honest, weights load strictly."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from worker.distill.errors import DistillError, StudentError, UnsafeCheckpointError
from worker.distill.students import ArchInfo, check_input_size, create_model, list_models, model_info

torch.set_num_threads(2)

SMALL = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
         "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
TORCHVISION = sorted(torchvision.models.list_models(module=torchvision.models))
# Seconds each to initialise and run on 2 CPU cores, so they are built on the meta device (shapes only).
# regnet_y_128gf would belong here, but RegNet computes its widths with tensors and cannot build on meta.
GIANTS = frozenset({"vit_h_14", "vit_l_16", "vit_l_32", "convnext_large", "efficientnet_v2_l"})
# RegNets cannot build on meta (see above); these stay on the CPU for the grey-input sweep.
NO_META = frozenset(n for n in TORCHVISION if n.startswith("regnet"))


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def smoke_size(arch: str) -> int:
    return model_info(arch).min_input_size


def test_list_models_is_torchvision_plus_small_family_sorted() -> None:
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    assert len(TORCHVISION) == 80
    assert set(names) == set(TORCHVISION) | set(SMALL)
    assert set(names) >= GIANTS | NO_META


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_builds_and_runs(arch: str) -> None:
    size = smoke_size(arch)
    if arch in GIANTS:
        with torch.device("meta"):
            model = create_model(arch, num_classes=10)
            for train in (True, False):
                assert model.train(train)(torch.empty(2, 3, size, size)).shape == (2, 10)
        return
    model = create_model(arch, num_classes=10)
    x = torch.randn(2, 3, size, size)  # batch 2: train-mode BatchNorm needs more than one value per channel
    out = model.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10) and torch.isfinite(out).all()
    with torch.inference_mode():
        out = model.eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["resnet18", "inception_v3", "googlenet", "vit_b_32", "swin_t",
                                  "efficientnet_b0", "densenet121", "squeezenet1_1", "regnet_x_400mf"])
def test_torchvision_grey_input(arch: str) -> None:
    model = create_model(arch, num_classes=7, in_channels=1).eval()
    assert first_conv(model).in_channels == 1
    size = smoke_size(arch)
    with torch.inference_mode():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(set(TORCHVISION) - NO_META))
def test_every_torchvision_stem_is_the_first_conv(arch: str) -> None:
    # Shapes only: a wrong "first conv" shows up as a channel mismatch somewhere in the forward.
    size = smoke_size(arch)
    with torch.device("meta"):
        model = create_model(arch, num_classes=7, in_channels=4).eval()
        assert model(torch.empty(2, 4, size, size)).shape == (2, 7)


@pytest.mark.parametrize("arch", SMALL)
def test_small_family_grey_input_from_8_to_64_pixels(arch: str) -> None:
    model = create_model(arch, num_classes=7, in_channels=1)
    assert first_conv(model).in_channels == 1
    out = model.train()(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 7)
    out.sum().backward()  # in-place ReLUs must not break autograd
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    for size in (8, 64):
        with torch.inference_mode():
            out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(("arch", "millions"), [("resnet8", 0.08), ("resnet20", 0.27), ("resnet56", 0.86),
                                                ("resnet110", 1.7), ("resnet8x4", 1.2), ("resnet32x4", 7.4),
                                                ("wrn_16_2", 0.70), ("wrn_40_1", 0.57), ("wrn_40_2", 2.2)])
def test_small_family_parameter_counts(arch: str, millions: float) -> None:
    params = sum(p.numel() for p in create_model(arch, num_classes=100).parameters())
    assert params / 1e6 == pytest.approx(millions, rel=0.05)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", SMALL)
def test_small_family_scripts_to_the_same_outputs(arch: str) -> None:
    model = create_model(arch, num_classes=10, in_channels=3).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_small_family_exports_with_torch_export_and_onnx(arch: str, tmp_path) -> None:
    model = create_model(arch, num_classes=5, in_channels=2).eval()
    x = torch.randn(2, 2, 12, 12)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(StudentError) as e:
        create_model("resnet19", num_classes=10)
    assert e.value.code == "unknown_architecture" and e.value.field == "student.arch"
    assert "resnet18" in e.value.message and "kdistill models" in e.value.message
    with pytest.raises(StudentError, match="wrn_40_2") as e:
        model_info("WRN-40-2")
    assert e.value.code == "unknown_architecture"


def test_names_are_case_insensitive() -> None:
    assert model_info("ResNet20") == model_info("resnet20")
    assert first_conv(create_model("ResNet8", num_classes=3)).in_channels == 3


@pytest.mark.parametrize(("num_classes", "in_channels"), [(1, 3), (0, 3), (10, 0), (10, 5)])
def test_invalid_student_settings(num_classes: int, in_channels: int) -> None:
    with pytest.raises(StudentError) as e:
        create_model("resnet8", num_classes=num_classes, in_channels=in_channels)
    assert e.value.code == "invalid_student"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize(("arch", "in_channels"), [("resnet20", 3), ("resnet18", 1)])
def test_weights_round_trip(arch: str, in_channels: int, fmt: str, tmp_path) -> None:
    source = create_model(arch, num_classes=5, in_channels=in_channels).eval()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = create_model(arch, num_classes=5, in_channels=in_channels, weights=str(path)).eval()
    x = torch.randn(2, in_channels, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_mismatched_weights_name_the_keys(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(create_model("resnet20", num_classes=10).state_dict(), str(path))
    with pytest.raises(StudentError) as e:
        create_model("resnet20", num_classes=7, weights=path)
    assert e.value.code == "student_weights_mismatch" and e.value.field == "student.weights"
    assert "fc.weight" in e.value.message and "[10, 64]" in e.value.message
    with pytest.raises(StudentError) as e:
        create_model("resnet32", num_classes=10, weights=path)
    assert e.value.code == "student_weights_mismatch" and "missing" in e.value.message
    with pytest.raises(StudentError) as e:
        create_model("resnet8", num_classes=10, weights=path)
    assert e.value.code == "student_weights_mismatch" and "unexpected" in e.value.message


def test_pickled_module_is_refused(tmp_path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(create_model("resnet8", num_classes=10), path)
    with pytest.raises(UnsafeCheckpointError) as e:
        create_model("resnet8", num_classes=10, weights=path)
    assert e.value.code == "unsafe_checkpoint" and e.value.field == "student.weights"


def test_missing_weights_file_names_the_field(tmp_path) -> None:
    with pytest.raises(DistillError) as e:
        create_model("resnet8", num_classes=10, weights=tmp_path / "absent.safetensors")
    assert e.value.code == "file_not_found" and e.value.field == "student.weights"


def test_model_info_sizes() -> None:
    assert model_info("resnet20") == ArchInfo("resnet20", "small", 32, 8)
    assert model_info("vit_h_14") == ArchInfo("vit_h_14", "torchvision", 224, 224, fixed_size=True)
    assert model_info("maxvit_t").fixed_size and model_info("maxvit_t").min_input_size == 224
    assert model_info("inception_v3") == ArchInfo("inception_v3", "torchvision", 299, 75)
    assert not model_info("swin_t").fixed_size and model_info("alexnet").min_input_size == 63


@pytest.mark.parametrize("arch", ["vit_b_32", "maxvit_t"])
def test_fixed_size_archs_really_refuse_other_sizes(arch: str) -> None:
    with torch.device("meta"), pytest.raises((AssertionError, RuntimeError)):
        create_model(arch, num_classes=10).eval()(torch.empty(2, 3, 256, 256))


def test_check_input_size() -> None:
    check_input_size("resnet20", (8, 8))
    check_input_size("alexnet", (63, 100))
    check_input_size("vit_b_16", (224, 224))
    for arch, size, hint in [("resnet20", (8, 7), "at least 8x8"), ("alexnet", (62, 224), "at least 63x63"),
                             ("vit_b_16", (256, 256), "exactly 224x224"), ("vit_b_16", (224, 200), "224")]:
        with pytest.raises(StudentError, match=hint) as e:
            check_input_size(arch, size)
        assert e.value.code == "input_too_small" and e.value.field == "student.input.size"
    with pytest.raises(StudentError) as e:
        check_input_size("nope", (32, 32))
    assert e.value.code == "unknown_architecture"
