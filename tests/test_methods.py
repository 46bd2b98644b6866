"""Every distillation method on real data: with 5 labels per digit and the rest as a transfer set, each one
teaches the student far more than its labels alone; plus the mixing that function matching uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_data import Digits, TrainedTeacher, few_label_npz, teacher_input_spec

from worker.distill.data import ImageSet
from worker.distill.data.transforms import mix_batch
from worker.distill.errors import ConfigError
from worker.distill.progress import Callbacks
from worker.distill.spec import Hyperparameters, InputSpec, TeacherSpec
from worker.distill.students import create_model
from worker.distill.teachers import load_teacher
from worker.distill.trainer import TrainResult, TrainSetup, predict, train

CPU = torch.device("cpu")
SPEC = InputSpec(**teacher_input_spec())
BASE = {"epochs": 8, "batch_size": 64, "learning_rate": 0.05, "seed": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def few_labels(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> tuple[ImageSet, ImageSet]:
    npz = np.load(few_label_npz(tmp_path_factory.mktemp("few") / "few.npz", digits, labels_per_class=5,
                                val_per_class=10))
    train_set = ImageSet(torch.from_numpy(np.concatenate([npz["x"], npz["x_unlabeled"]]))[:, None],
                         torch.cat([torch.from_numpy(npz["y"]), torch.full((len(npz["x_unlabeled"]),), -1)]))
    return train_set, ImageSet(torch.from_numpy(npz["x_val"])[:, None], torch.from_numpy(npz["y_val"]))


def _run(few_labels: tuple[ImageSet, ImageSet], teacher_file: TrainedTeacher | None, digits: Digits,
         augment: bool | str = False, events: list | None = None, **hp: object) -> tuple[float, TrainResult]:
    train_set, val_set = few_labels
    teacher = None if teacher_file is None else load_teacher(
        TeacherSpec(path=str(teacher_file.path), arch=teacher_file.arch, input=SPEC), num_classes=10)
    torch.manual_seed(1)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    cb = Callbacks(on_event=lambda kind, message, data: events.append((kind, message))) if events is not None \
        else None
    result = train(TrainSetup(student=student, student_input=SPEC, train=train_set, val=val_set,
                              classes=[str(i) for i in range(10)], teacher=teacher, device=CPU, augment=augment,
                              epoch_samples=len(train_set.labels)), Hyperparameters(**BASE, **hp), cb)
    logits = predict(student, torch.from_numpy(digits.x_test)[:, None], SPEC, CPU)
    return float((logits.argmax(1) == torch.from_numpy(digits.y_test)).float().mean()), result


@pytest.fixture(scope="module")
def labels_only(few_labels, digits) -> float:
    return _run(few_labels, None, digits)[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    pytest.param({"distillation": "dkd", "temperature": 4.0, "alpha": 0.9}, id="dkd"),
    pytest.param({"distillation": "soft", "standardize": True, "temperature": 2.0, "alpha": 0.9},
                 id="soft-standardized"),
    pytest.param({"distillation": "dkd", "standardize": True, "temperature": 2.0, "alpha": 0.9},
                 id="dkd-standardized"),
    pytest.param({"distillation": "soft", "alpha": 0.9, "feature_distillation": "attention"}, id="attention"),
    pytest.param({"distillation": "soft", "alpha": 0.9, "augment": "consistent"}, id="function-matching"),
])
def test_each_method_teaches_far_more_than_labels_alone(few_labels, digits, digits_teacher, labels_only, method):
    method = dict(method)
    augment = method.pop("augment", False)
    events: list = []
    accuracy, result = _run(few_labels, digits_teacher, digits, augment=augment, events=events, **method)
    print(f"{method} augment={augment}: held-out {accuracy:.4f}, labels alone {labels_only:.4f}")
    assert accuracy - labels_only >= 0.05
    assert accuracy >= 0.85
    if method.get("feature_distillation"):
        assert all(m.train_loss_feature is not None and m.train_loss_feature > 0 for m in result.history)
        assert any("feature distillation" in note for note in result.notes)
    if augment == "consistent":
        assert any("not cached" in note for note in result.notes)
        assert ("info", next(n for n in result.notes if "not cached" in n)) in events


def test_standardize_with_hard_distillation_is_refused():
    with pytest.raises(ValueError, match="standardize applies to soft and dkd"):
        Hyperparameters(distillation="hard", standardize=True)


def test_feature_distillation_needs_a_teacher_with_a_graph(few_labels, digits):
    # an opaque teacher (a function, as ONNX and TorchScript teachers are) cannot give its features
    from worker.distill.teachers import LoadedTeacher

    opaque = LoadedTeacher(format="onnx", arch=None, num_classes=10, input=SPEC,
                           logits_fn=lambda x: torch.zeros(len(x), 10))
    train_set, val_set = few_labels
    with pytest.raises(ConfigError) as e:
        train(TrainSetup(student=create_model("resnet8", num_classes=10, in_channels=1), student_input=SPEC,
                         train=train_set, val=val_set, classes=[str(i) for i in range(10)], teacher=opaque,
                         device=CPU), Hyperparameters(**BASE | {"epochs": 1}, feature_distillation="attention"))
    assert e.value.code == "feature_distillation_unsupported"
    assert e.value.field == "hyperparameters.feature_distillation"


def test_mixing_is_mixup_or_cutmix_with_the_lam_it_reports():
    images = torch.stack([torch.full((1, 16, 16), v, dtype=torch.uint8) for v in (0, 100, 200, 250)])
    kinds = set()
    for seed in range(40):
        m = mix_batch(images, torch.Generator().manual_seed(seed))
        again = mix_batch(images, torch.Generator().manual_seed(seed))
        assert torch.equal(m.images, again.images) and m.lam == again.lam  # replayable from the seed
        assert sorted(m.perm.tolist()) == [0, 1, 2, 3] and 0.0 <= m.lam <= 1.0
        kinds.add(m.kind)
        if m.kind == "mixup":
            expected = (images.float() * m.lam + images[m.perm].float() * (1 - m.lam)).round()
            assert torch.equal(m.images.float(), expected)
        else:
            # the share of pixels still from the original image is exactly lam
            same = (m.images == images).float().mean(dim=(1, 2, 3))
            moved = images != images[m.perm]  # where the partner differs, a pasted pixel shows
            for i in range(4):
                if moved[i].all():
                    assert float(same[i]) == pytest.approx(m.lam, abs=1e-6)
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.slow
def test_a_job_with_the_new_methods_publishes_reduced_exports_with_their_measured_cost(tmp_path, digits,
                                                                                        digits_teacher):
    import onnxruntime as ort

    from worker.distill.data.transforms import to_model_input
    from worker.distill.runner import run_job
    from worker.distill.spec import DataSpec, JobSpec, StudentSpec

    data = few_label_npz(tmp_path / "few.npz", digits, labels_per_class=10, val_per_class=10, with_test=True)
    spec = JobSpec(teacher=TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch, input=SPEC),
                   student=StudentSpec(arch="resnet8"), data=DataSpec(path=str(data), augment="consistent"),
                   hyperparameters=Hyperparameters(**BASE | {"epochs": 3}, distillation="dkd", standardize=True,
                                                   temperature=2.0),
                   export_formats=["onnx_fp16", "onnx_int8"],  # no fp32 onnx asked for: measured all the same
                   max_export_accuracy_drop=0.0, output_dir=str(tmp_path / "out"))
    result = run_job(spec)
    m = result.metrics
    assert any("not cached" in note for note in m["notes"])
    names = {f.name: f for f in result.files}
    assert {"student.fp16.onnx", "student.int8.onnx"} <= set(names) and "student.onnx" not in names
    x_test = to_model_input(torch.from_numpy(digits.x_test)[:, None], SPEC).numpy()
    reference = m["exports"]["onnx"]
    assert reference["published"] is False and reference["size_bytes"] > 0
    for fmt, file in (("onnx_fp16", "student.fp16.onnx"), ("onnx_int8", "student.int8.onnx")):
        report = m["exports"][fmt]
        assert report["size_bytes"] == names[file].size_bytes < reference["size_bytes"]
        session = ort.InferenceSession(str(names[file].path), providers=["CPUExecutionProvider"])
        predicted = session.run(None, {session.get_inputs()[0].name: x_test})[0].argmax(1)
        # the published file scores exactly what the job reports for it on the test split
        test = report["splits"]["test"]
        assert test["accuracy"] == pytest.approx(float((predicted == digits.y_test).mean()))
        assert test["accuracy_change"] == pytest.approx(test["accuracy"] - reference["splits"]["test"]["accuracy"])
        lost = test["accuracy_change"] < 0 or report["splits"]["validation"]["accuracy_change"] < 0
        warned = [w for w in result.warnings if w["code"] == "export_accuracy_drop" and fmt in w["message"]]
        assert bool(warned) == lost, (fmt, report, result.warnings)
