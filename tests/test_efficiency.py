"""Efficiency report: true parameter and MAC counts (hand-checked), ONNX Runtime latency of teacher vs student
for torch, ONNX (dynamic or fixed batch) and TorchScript teachers, a torch fallback when the teacher will not
export, and a report that never raises for a measuring failure and always serialises to JSON."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from worker.distill.efficiency import (
    MIN_RUNS,
    count_parameters,
    cpu_eval_copy,
    efficiency_report,
    export_onnx,
    flop_counter_macs,
    onnx_graph_macs,
    onnx_parameters,
)
from worker.distill.students import create_model

DIGIT = (1, 8, 8)
BUDGET = 1.0  # seconds of timing per report: plenty for 8x8 models, and keeps the file fast


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def fake_file(path: Path, size: int) -> Path:
    path.write_bytes(b"\0" * size)
    return path


def check_report_shape(report: dict) -> None:
    assert json.loads(json.dumps(report)) == report  # plain JSON types only: no tensors, numpy scalars, tuples
    assert set(report) == {"runtime", "threads", "teacher", "student", "speedup", "compression", "size_ratio",
                           "runs", "notes"}
    for who in ("teacher", "student"):
        assert set(report[who]) == {"parameters", "macs", "macs_source", "file_size_bytes", "onnx_size_bytes",
                                    "latency_ms"}
        assert set(report[who]["latency_ms"]) == {"batch_1", "batch_32"}
    assert set(report["speedup"]) == set(report["runs"]) == {"batch_1", "batch_32"}


def check_timed(report: dict) -> None:
    for key in ("batch_1", "batch_32"):
        assert report["runs"][key] >= MIN_RUNS
        t_ms, s_ms = report["teacher"]["latency_ms"][key], report["student"]["latency_ms"][key]
        assert t_ms > 0 and s_ms > 0
        assert report["speedup"][key] == pytest.approx(t_ms / s_ms, rel=0.05, abs=0.01)


@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A resnet8 digits student and its verified ONNX export, as a job that exported ONNX would hold."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1).eval()
    path = tmp_path_factory.mktemp("student") / "student.onnx"
    export_onnx(model, DIGIT, path)
    return model, path


# ------------------------------------------------------------------------------------------ counting


class Everything(nn.Module):
    """One of each counted op, on a 4x8x8 input; MACs by hand in HAND_MACS."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=2)  # -> 8x4x4
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)  # -> 6x8x8
        self.w = nn.Parameter(torch.randn(384, 20) / 20)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.conv(x)))
        return self.fc(torch.relu(x.flatten(1) @ self.w))


HAND_MACS = (8 * 4 * 4) * (4 // 2) * 3 * 3 + (8 * 4 * 4) * 6 * 2 * 2 + 384 * 20 + 20 * 10  # 13256
HAND_PARAMS = (8 * 2 * 9 + 8) + (8 * 6 * 4 + 6) + 384 * 20 + (20 * 10 + 10)  # 8240


def test_macs_and_parameters_of_known_layers_match_hand_counts(tmp_path):
    model = Everything().eval()
    assert count_parameters(model) == HAND_PARAMS
    assert flop_counter_macs(model, (4, 8, 8)) == HAND_MACS

    dynamic = tmp_path / "dynamic.onnx"
    export_onnx(model, (4, 8, 8), dynamic)  # dynamo exporter, symbolic batch
    proto = load_onnx(dynamic)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert onnx_graph_macs(proto, (4, 8, 8)) == (HAND_MACS, 0)
    assert onnx_parameters(proto) == HAND_PARAMS

    fixed = tmp_path / "fixed3.onnx"  # a fixed batch of 3: the estimate is still per image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(3, 4, 8, 8),), str(fixed), dynamo=False)
    proto = load_onnx(fixed)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert onnx_graph_macs(proto, (4, 8, 8)) == (HAND_MACS, 0)
    assert onnx_parameters(proto) == HAND_PARAMS


@pytest.mark.parametrize("arch,channels", [("resnet18", 3), ("mobilenet_v3_small", 3), ("resnet8", 1)])
def test_parameters_are_the_sum_of_numel_for_torchvision_and_cifar_students(arch, channels):
    model = create_model(arch, num_classes=10, in_channels=channels)
    want = sum(p.numel() for p in model.parameters())
    assert want > 10_000
    assert count_parameters(model) == want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert count_parameters(torch.jit.script(model)) == want


def test_cpu_copy_is_eval_mode_and_leaves_the_callers_module_alone():
    model = create_model("resnet8", num_classes=10, in_channels=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = cpu_eval_copy(model)
    assert model.training and all(m.training for m in model.modules())
    assert not copy.training and not any(m.training for m in copy.modules())
    for k, v in copy.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert v.data_ptr() != model.state_dict()[k].data_ptr()
    flop_counter_macs(copy, DIGIT)  # a forward pass of the copy must not touch the original's BN statistics
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ reports


def test_a_deep_teacher_is_bigger_and_slower_than_a_small_student(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("resnet32", num_classes=10, in_channels=1).train()  # mid-training, as a job holds it
    student = create_model("resnet8", num_classes=10, in_channels=1).train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_file = fake_file(tmp_path / "teacher.safetensors", 1_900_000)

    report = efficiency_report(teacher_module=teacher, teacher_onnx=None, teacher_file=teacher_file,
                               teacher_input=DIGIT, student=student, student_onnx=None, student_input=DIGIT,
                               workdir=tmp_path / "work", budget_seconds=BUDGET)

    check_report_shape(report)
    assert report["notes"] == []
    assert report["runtime"] == "onnxruntime"
    assert report["threads"] == torch.get_num_threads()
    t, s = report["teacher"], report["student"]
    assert t["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert s["parameters"] == sum(p.numel() for p in student.parameters())
    assert report["compression"] == round(t["parameters"] / s["parameters"], 3) > 5
    assert t["macs_source"] == s["macs_source"] == "flop_counter"
    assert t["macs"] > 4 * s["macs"] > 0
    # The exported graphs agree with the flop counter (BN folding does not change conv MACs).
    assert onnx_graph_macs(load_onnx(tmp_path / "work" / "teacher.onnx"), DIGIT)[0] == t["macs"]
    assert onnx_graph_macs(load_onnx(tmp_path / "work" / "student.onnx"), DIGIT)[0] == s["macs"]
    assert t["file_size_bytes"] == 1_900_000
    assert t["onnx_size_bytes"] == (tmp_path / "work" / "teacher.onnx").stat().st_size
    assert s["onnx_size_bytes"] == s["file_size_bytes"] == (tmp_path / "work" / "student.onnx").stat().st_size
    assert report["size_ratio"] == round(1_900_000 / s["onnx_size_bytes"], 3)
    check_timed(report)
    assert report["speedup"]["batch_32"] > 1
    # The caller's modules are untouched: still training, same weights (BN statistics included).
    assert teacher.training and student.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)


@pytest.mark.parametrize("batch", ["dynamic", "fixed_1"])
def test_an_onnx_teacher_is_counted_from_its_graph_and_timed(tmp_path, student_onnx, batch):
    torch.manual_seed(0)
    module = create_model("resnet20", num_classes=10, in_channels=1).eval()
    path = tmp_path / "teacher.onnx"
    if batch == "dynamic":
        export_onnx(module, DIGIT, path)
    else:  # the TorchScript exporter without dynamic axes fixes the batch to the example's 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.randn(1, *DIGIT),), str(path), dynamo=False)
        assert load_onnx(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    student, student_path = student_onnx

    report = efficiency_report(teacher_module=None, teacher_onnx=path, teacher_file=path, teacher_input=DIGIT,
                               student=student, student_onnx=student_path, student_input=DIGIT,
                               workdir=tmp_path / "work", budget_seconds=BUDGET)

    check_report_shape(report)
    assert report["runtime"] == "onnxruntime"
    t = report["teacher"]
    assert t["macs_source"] == "onnx_graph_estimate"
    assert t["macs"] == flop_counter_macs(module, DIGIT)
    assert t["parameters"] == pytest.approx(count_parameters(module), rel=0.02)  # BN may be folded into convs
    assert t["file_size_bytes"] == t["onnx_size_bytes"] == path.stat().st_size
    assert report["student"]["macs_source"] == "flop_counter"
    assert report["student"]["onnx_size_bytes"] == student_path.stat().st_size
    assert report["compression"] > 3
    check_timed(report)
    assert not (tmp_path / "work" / "student.onnx").exists()  # the job's own export was used
    if batch == "dynamic":
        assert report["notes"] == []
    else:
        assert len(report["notes"]) == 1 and "fixed batch of 1" in report["notes"][0]
        # batch 32 is 32 calls of one image: far slower than one call.
        assert t["latency_ms"]["batch_32"] > 4 * t["latency_ms"]["batch_1"]


def test_a_torchscript_teacher_is_counted_and_exported_with_the_torchscript_exporter(tmp_path, student_onnx):
    torch.manual_seed(0)
    eager = create_model("resnet14", num_classes=10, in_channels=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(eager)
        teacher_file = tmp_path / "teacher.torchscript.pt"
        torch.jit.save(scripted, str(teacher_file))
    student, student_path = student_onnx

    report = efficiency_report(teacher_module=scripted, teacher_onnx=None, teacher_file=teacher_file,
                               teacher_input=DIGIT, student=student, student_onnx=student_path,
                               student_input=DIGIT, workdir=tmp_path / "work", budget_seconds=BUDGET)

    check_report_shape(report)
    assert report["notes"] == []
    assert report["runtime"] == "onnxruntime"
    t = report["teacher"]
    assert t["parameters"] == count_parameters(eager)
    assert t["macs"] == flop_counter_macs(eager, DIGIT) and t["macs_source"] == "flop_counter"
    assert t["file_size_bytes"] == teacher_file.stat().st_size
    assert t["onnx_size_bytes"] == (tmp_path / "work" / "teacher.onnx").stat().st_size
    check_timed(report)


class SvdTeacher(nn.Module):
    """Runs in torch, but linalg.svd has no ONNX lowering: the export fails."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        s = torch.linalg.svdvals(y.flatten(2)).sum(-1, keepdim=True)
        return self.fc(y.mean((2, 3))) + s


def test_a_teacher_that_will_not_export_is_timed_with_torch_against_a_torch_student(tmp_path, student_onnx):
    student, student_path = student_onnx
    report = efficiency_report(teacher_module=SvdTeacher(), teacher_onnx=None,
                               teacher_file=fake_file(tmp_path / "t.pt", 1000), teacher_input=DIGIT,
                               student=student, student_onnx=student_path, student_input=DIGIT,
                               workdir=tmp_path / "work", budget_seconds=BUDGET)

    check_report_shape(report)
    assert report["runtime"] == "torch"
    assert any("exporting the teacher to ONNX failed" in n for n in report["notes"])
    assert any("torch on CPU for both" in n for n in report["notes"])
    assert not (tmp_path / "work" / "teacher.onnx").exists()  # a failed export leaves nothing behind
    t = report["teacher"]
    assert t["onnx_size_bytes"] is None
    assert t["macs"] == 16 * 8 * 8 * 9 + 16 * 10  # conv + fc; the flop counter does not count the SVD
    check_timed(report)


def test_measuring_failures_become_notes_not_errors(tmp_path, student_onnx):
    student, student_path = student_onnx
    wrong_input = create_model("resnet8", num_classes=10, in_channels=3)  # fed 1-channel images below
    report = efficiency_report(teacher_module=wrong_input, teacher_onnx=None,
                               teacher_file=tmp_path / "missing.safetensors", teacher_input=DIGIT,
                               student=student, student_onnx=student_path, student_input=DIGIT,
                               workdir=tmp_path / "work", budget_seconds=BUDGET)

    check_report_shape(report)
    t, s = report["teacher"], report["student"]
    assert t["parameters"] == count_parameters(wrong_input)  # what could be measured still is
    assert t["macs"] is None and t["file_size_bytes"] is None
    assert t["latency_ms"] == {"batch_1": None, "batch_32": None}
    assert report["speedup"] == {"batch_1": None, "batch_32": None} and report["size_ratio"] is None
    assert s["parameters"] == count_parameters(student) and s["macs"] > 0
    notes = " | ".join(report["notes"])
    for what in ("MACs", "exporting the teacher", "file size", "timing"):
        assert what in notes


class Interrupted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def test_keyboard_interrupt_is_not_swallowed(tmp_path, student_onnx):
    student, student_path = student_onnx
    with pytest.raises(KeyboardInterrupt):
        efficiency_report(teacher_module=Interrupted(), teacher_onnx=None,
                          teacher_file=fake_file(tmp_path / "t.pt", 10), teacher_input=DIGIT, student=student,
                          student_onnx=student_path, student_input=DIGIT, workdir=tmp_path / "work")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_modules_are_measured_on_cpu_copies_and_stay_on_the_gpu(tmp_path):
    teacher = create_model("resnet20", num_classes=10, in_channels=1).cuda().train()
    student = create_model("resnet8", num_classes=10, in_channels=1).cuda().train()
    report = efficiency_report(teacher_module=teacher, teacher_onnx=None,
                               teacher_file=fake_file(tmp_path / "t.pt", 10), teacher_input=DIGIT,
                               student=student, student_onnx=None, student_input=DIGIT,
                               workdir=tmp_path / "work", budget_seconds=BUDGET)
    assert report["notes"] == [] and report["runtime"] == "onnxruntime"
    assert report["teacher"]["parameters"] == count_parameters(teacher)
    check_timed(report)
    assert teacher.training and all(p.is_cuda for p in teacher.parameters())
    assert student.training and all(p.is_cuda for p in student.parameters())
