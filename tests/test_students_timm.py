"""timm students (`timm:<name>`): names, sizes, builds for any channels, exports, offline builds, a real job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from digits_data import DIGITS_MEAN, DIGITS_STD, Digits, TrainedTeacher, teacher_input_spec
from model_tools import scramble_batchnorm
from torch import nn

from worker.distill.errors import StudentError
from worker.distill.export import export_student
from worker.distill.students import (
    check_input_size,
    create_model,
    list_models,
    model_info,
    model_params,
    resolve_arch,
)

timm = pytest.importorskip("timm")
torch.set_num_threads(2)

# The smallest member of each efficient family the registry promises.
FAMILIES = {
    "mobilenetv3": "timm:mobilenetv3_small_050",
    "mobilenetv4": "timm:mobilenetv4_conv_small",
    "efficientnet_lite": "timm:efficientnet_lite0",
    "ghostnet": "timm:ghostnet_050",
    "convnext": "timm:convnext_atto",
    "regnet": "timm:regnetx_002",
}
ALL_FORMATS = ["onnx", "torchscript", "torch_export"]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def run(model: nn.Module, channels: int, size: int, *, train: bool, batch: int = 2) -> torch.Tensor:
    x = torch.randn(batch, channels, size, size)
    if train:
        return model.train()(x)
    with torch.inference_mode():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------------ names


def test_timm_names_resolve_case_insensitively() -> None:
    assert resolve_arch(" TIMM:MobileNetV3_Small_050 ") == "timm:mobilenetv3_small_050"
    assert model_info("Timm:ConvNeXt_Atto") == model_info("timm:convnext_atto")


@pytest.mark.parametrize(("arch", "suggested"), [
    ("timm:mobilenetv3_smal_050", "timm:mobilenetv3_small_050"),
    ("timm:efficientnet-lite0", "timm:efficientnet_lite0"),
    ("mobilenetv4_conv_small", "timm:mobilenetv4_conv_small"),  # a timm name without its prefix
])
def test_unknown_timm_names_suggest_close_matches(arch: str, suggested: str) -> None:
    for call in (resolve_arch, model_info, lambda a: create_model(a, num_classes=10)):
        with pytest.raises(StudentError) as e:
            call(arch)
        assert e.value.code == "unknown_architecture" and e.value.field == "student.arch"
        assert suggested in e.value.message


@pytest.mark.parametrize("arch", ["timm:hf-hub:timm/mobilenetv3_small_050.lamb_in1k",
                                  "timm:local-dir:/tmp", "timm:mobilenetv3_small_050.lamb_in1k", "timm:"])
def test_only_registry_names_are_accepted(arch: str) -> None:
    # timm.create_model would download hub models or read local folders for these; they are never passed on.
    with pytest.raises(StudentError) as e:
        create_model(arch, num_classes=10)
    assert e.value.code == "unknown_architecture"


def test_distillation_variants_are_not_students() -> None:
    timm_listed = list_models(family="timm")
    assert "timm:deit_tiny_patch16_224" in timm_listed
    assert not [n for n in timm_listed if "distilled" in n or n.endswith("_dist")]
    with pytest.raises(StudentError, match="timm:deit_tiny_patch16_224") as e:
        resolve_arch("timm:deit_tiny_distilled_patch16_224")
    assert e.value.code == "unknown_architecture" and "distillation variant" in e.value.message


def test_encoder_towers_are_not_students() -> None:
    # gemma4/qwen3 `_enc` models return token features whatever num_classes is; their full models are listed.
    timm_listed = list_models(family="timm")
    assert "timm:qwen3_vit_88m" in timm_listed and not [n for n in timm_listed if n.endswith("_enc")]
    with pytest.raises(StudentError, match="encoder") as e:
        resolve_arch("timm:qwen3_vit_88m_enc")
    assert e.value.code == "unknown_architecture"


def test_a_model_that_cannot_take_the_datasets_channels_fails_before_training() -> None:
    # CSATv2's DCT stem converts RGB: timm builds it for in_chans=1, but its forward would fail in the first step.
    with pytest.warns(UserWarning), pytest.raises(StudentError, match="1-channel") as e:
        create_model("timm:csatv2", num_classes=10, in_channels=1)
    assert e.value.code == "invalid_student" and e.value.field == "student.arch"
    with torch.device("meta"):  # shapes only: the same model takes 3 channels
        assert create_model("timm:csatv2", num_classes=10, in_channels=3)(torch.empty(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["timm:levit_128s", "timm:efficientformer_l1", "timm:swiftformer_xs"])
def test_models_with_a_built_in_distillation_head_return_one_logits_tensor(arch: str) -> None:
    # timm gives these a second (distillation) head whatever the name; in training their forward must still
    # return one tensor, not the (logits, logits_dist) pair. Shapes only, on the meta device.
    size = model_info(arch).default_input_size
    with torch.device("meta"):
        model = create_model(arch, num_classes=10)
        for train in (True, False):
            out = model.train(train)(torch.empty(2, 3, size, size))
            assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


# ---------------------------------------------------------------------------------------------- listing


def test_the_old_listing_is_unchanged_and_timm_is_added_on_request() -> None:
    old = list_models()
    assert not [n for n in old if n.startswith("timm:")] and "resnet20" in old and "resnet18" in old
    timm_listed = list_models(family="timm")
    assert len(timm_listed) > 1000 and timm_listed == sorted(timm_listed)
    assert set(timm_listed) == {f"timm:{n}" for n in timm.list_models()
                                if "distilled" not in n and not n.endswith(("_dist", "_enc"))}
    everything = list_models(include_timm=True)
    assert everything == sorted(everything) and set(everything) == set(old) | set(timm_listed)
    assert set(FAMILIES.values()) <= set(timm_listed)


def test_listing_filters_by_substring_and_family() -> None:
    mobile = list_models(filter="MobileNetV4", include_timm=True)
    assert "timm:mobilenetv4_conv_small" in mobile and all("mobilenetv4" in n for n in mobile)
    assert list_models(filter="mobilenet_v3") == ["mobilenet_v3_large", "mobilenet_v3_small"]
    assert list_models(filter="wrn_16", family="small") == ["wrn_16_1", "wrn_16_2"]
    assert list_models(filter="convnext_atto", family="torchvision") == []
    assert "timm:convnext_atto" in list_models(filter="convnext_atto", family="timm")
    with pytest.raises(StudentError) as e:
        list_models(family="keras")
    assert e.value.code == "unknown_family" and "timm" in e.value.message


@pytest.mark.parametrize("arch", sorted(FAMILIES.values()))
def test_parameter_counts_from_meta_builds_match_real_builds(arch: str) -> None:
    for classes in (1000, 10):
        real = sum(p.numel() for p in create_model(arch, num_classes=classes).parameters())
        assert model_params(arch, num_classes=classes) == real
    assert model_params(arch) == model_params(arch, num_classes=1000)


@pytest.mark.parametrize("classes", [10, 1000])
def test_parameter_counts_of_the_builtin_families(classes: int) -> None:
    for arch in ("resnet20", "resnet18", "regnet_x_400mf"):  # torchvision's RegNets cannot build on meta
        real = sum(p.numel() for p in create_model(arch, num_classes=classes).parameters())
        assert model_params(arch, classes) == real


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("arch", sorted(FAMILIES.values()))
def test_sizes_come_from_timm_and_the_minimum_really_runs(arch: str) -> None:
    info = model_info(arch)
    cfg = timm.models.get_pretrained_cfg(arch.removeprefix("timm:"))
    assert info.family == "timm" and not info.fixed_size
    assert info.default_input_size == cfg.input_size[-1]
    assert info.min_input_size <= 32  # the efficient families all take CIFAR-sized images
    model = create_model(arch, num_classes=10)
    for train in (True, False):
        assert run(model, 3, info.min_input_size, train=train).shape == (2, 10)
    check_input_size(arch, (info.min_input_size, info.min_input_size))
    check_input_size(arch, (info.min_input_size, 3 * info.min_input_size))


def test_the_measured_minimum_is_where_the_real_model_stops_running() -> None:
    # ConvNeXt's 4x4 patchify stem and three 2x2 downsamples need 32 pixels; 24 fails on real tensors too.
    info = model_info("timm:convnext_atto")
    assert info.min_input_size == 32
    model = create_model("timm:convnext_atto", num_classes=10)
    with pytest.raises(RuntimeError):
        run(model, 3, 24, train=False)
    with pytest.raises(StudentError, match="at least 32x32") as e:
        check_input_size("timm:convnext_atto", (24, 24))
    assert e.value.code == "input_too_small" and e.value.field == "student.input.size"


def test_fixed_size_timm_models_take_only_their_size() -> None:
    info = model_info("timm:vit_tiny_patch16_224")  # position embeddings for 14x14 patches of 16 pixels
    assert info.fixed_size and info.default_input_size == info.min_input_size == 224
    check_input_size("timm:vit_tiny_patch16_224", (224, 224))
    with pytest.raises(StudentError, match="exactly 224x224") as e:
        check_input_size("timm:vit_tiny_patch16_224", (256, 256))
    assert e.value.code == "input_too_small"
    model = create_model("timm:vit_tiny_patch16_224", num_classes=4, in_channels=1)
    assert run(model, 1, 224, train=False, batch=1).shape == (1, 4)
    with pytest.raises(AssertionError, match="doesn't match model"):
        run(model, 1, 256, train=False, batch=1)


def test_a_fixed_size_flag_is_believed_only_when_other_sizes_fail() -> None:
    # timm's tiny test ViT has fixed_input_size in its pretrained_cfg but is built with dynamic_img_size.
    assert timm.models.get_pretrained_cfg("test_vit").fixed_input_size
    info = model_info("timm:test_vit")
    assert not info.fixed_size and info.default_input_size == 160 and info.min_input_size <= 32
    model = create_model("timm:test_vit", num_classes=4, in_channels=1)
    for size in (info.min_input_size, 192):
        check_input_size("timm:test_vit", (size, size))
        assert run(model, 1, size, train=False).shape == (2, 4)


# ------------------------------------------------------------------------------------------------ builds


@pytest.mark.parametrize("arch", sorted(FAMILIES.values()))
@pytest.mark.parametrize("channels", [1, 3])
def test_builds_for_the_datasets_channels_and_classes(arch: str, channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=channels)
    assert first_conv(model).in_channels == channels
    size = min(32, max(model_info(arch).min_input_size, 16))
    out = run(model, channels, size, train=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    out = run(model, channels, size, train=False)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(FAMILIES.values()))
def test_runs_at_its_full_default_size(arch: str) -> None:
    size = model_info(arch).default_input_size
    out = run(create_model(arch, num_classes=10, in_channels=1), 1, size, train=False, batch=1)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_builds_never_touch_the_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during a student build: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = create_model("timm:ghostnet_050", num_classes=3, in_channels=1)
    assert model_info("timm:regnetx_004").family == "timm" and model_params("timm:regnetx_004") > 0
    # Random init, not downloaded weights: two seeds give two different stems.
    torch.manual_seed(1)
    other = create_model("timm:ghostnet_050", num_classes=3, in_channels=1)
    assert not torch.equal(first_conv(model).weight, first_conv(other).weight)


def test_without_timm_the_registry_still_works_and_timm_names_say_how_to_install() -> None:
    # A fresh interpreter where `import timm` fails, as in the base install.
    code = """
import json, sys
sys.modules["timm"] = None
from worker.distill.errors import StudentError
from worker.distill.students import create_model, list_models, model_info
out = {"info": model_info("resnet20").family, "same": list_models() == list_models(include_timm=True),
       "timm_loaded": sys.modules["timm"] is not None}
for call in (lambda: create_model("timm:ghostnet_050", num_classes=3), lambda: model_info("timm:ghostnet_050"),
             lambda: list_models(family="timm")):
    try:
        call()
    except StudentError as e:
        out.setdefault("errors", []).append([e.code, e.message])
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["info"] == "small" and out["same"] and not out["timm_loaded"]
    assert len(out["errors"]) == 3
    for code_, message in out["errors"]:
        assert code_ == "timm_not_installed" and "pip install 'kdistill[timm]'" in message


# ----------------------------------------------------------------------------------------------- exports


# MobileNetV3 is exported in all three formats by the job below, verified by export_student the same way.
@pytest.mark.slow  # ONNX export through dynamo takes most of the time: 5-15 s a model on 2 cores
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mobilenetv3"}))
def test_every_family_exports_to_every_format(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(FAMILIES[family], num_classes=10, in_channels=1)
    scramble_batchnorm(model)
    example = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    files = export_student(model.eval(), example, tmp_path, list(ALL_FORMATS), atol=1e-4)
    assert [f.format for f in files] == ["safetensors", *ALL_FORMATS]
    with torch.inference_mode():
        scale = float(model(example).abs().max())
    # export_student refuses a file outside atol + rtol * |logit|; the worst difference it saw is recorded.
    assert all(f.max_abs_diff is not None and f.max_abs_diff <= 1e-4 + 1e-3 * scale for f in files[1:])
    for f in files[1:]:
        assert (tmp_path / f.name).stat().st_size > 0.5 * (tmp_path / "student.safetensors").stat().st_size


# ------------------------------------------------------------------------------------------- a real job


@pytest.mark.slow
def test_a_job_distills_a_timm_student_and_its_exports_load(tmp_path: Path, digits: Digits,
                                                            digits_teacher: TrainedTeacher) -> None:
    from worker.distill.data.transforms import to_model_input
    from worker.distill.runner import run_job
    from worker.distill.spec import DataSpec, Hyperparameters, InputSpec, JobSpec, StudentSpec, TeacherSpec

    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x_train, y=digits.y_train, x_test=digits.x_test, y_test=digits.y_test)
    student_input = InputSpec(channels=1, size=32, mean=[DIGITS_MEAN], std=[DIGITS_STD])
    spec = JobSpec(
        teacher=TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch,
                            input=InputSpec(**teacher_input_spec())),
        student=StudentSpec(arch="timm:mobilenetv3_small_050", input=student_input),
        data=DataSpec(path=str(data)),
        hyperparameters=Hyperparameters(epochs=2, batch_size=32, optimizer="adamw", learning_rate=3e-3, seed=0,
                                        device="cpu"),
        export_formats=list(ALL_FORMATS), output_dir=str(tmp_path / "out"))
    result = run_job(spec)
    m = result.metrics
    assert m["accuracy_split"] == "test" and m["student_accuracy"] > 0.3, m  # 10 classes: chance is 0.1
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0], losses

    out = tmp_path / "out"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["architecture"] == "timm:mobilenetv3_small_050"
    x = to_model_input(torch.from_numpy(digits.x_test)[:, None], student_input)  # 8x8 digits up to 32x32
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        ts_logits = torch.jit.load(str(out / "student.torchscript.pt"))(x).numpy()
    assert onnx_logits.shape == ts_logits.shape == (len(digits.y_test), 10)
    np.testing.assert_allclose(ts_logits, onnx_logits, atol=1e-3, rtol=1e-3)
    assert float((onnx_logits.argmax(1) == digits.y_test).mean()) > 0.3


def test_kdistill_models_filter_lists_timm_students_with_their_parameter_counts() -> None:
    import shutil

    from worker.distill.students import model_params

    exe = shutil.which("kdistill")
    assert exe, "the kdistill command is installed with the package"
    out = subprocess.run([exe, "models", "--filter", "mobilenetv3_small_0"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:] if line.strip()}
    assert {"timm:mobilenetv3_small_050", "timm:mobilenetv3_small_075"} <= set(rows)
    assert all("mobilenetv3_small_0" in name for name in rows)
    assert rows["timm:mobilenetv3_small_050"][2] == f"{model_params('timm:mobilenetv3_small_050') / 1e6:.2f}M"
    bad = subprocess.run([exe, "models", "--family", "keras"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "the families are torchvision, small, timm" in bad.stderr
