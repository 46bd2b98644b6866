"""On real data (scikit-learn's digits): distillation with few labels beats the same student on labels alone."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from digits_data import DIGITS_MEAN, DIGITS_STD, Digits, TrainedTeacher, few_label_npz, teacher_input_spec
from safetensors.torch import load_file, save_file

from worker.distill.data import ImageSet
from worker.distill.errors import DistillError
from worker.distill.progress import Callbacks
from worker.distill.runner import run_job
from worker.distill.spec import Checks, DataSpec, Hyperparameters, InputSpec, JobSpec, StudentSpec, TeacherSpec
from worker.distill.students import create_model
from worker.distill.teachers import load_teacher
from worker.distill.trainer import TrainSetup, predict, train

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
SPEC = InputSpec(**teacher_input_spec())
HP = Hyperparameters(epochs=15, batch_size=64, learning_rate=0.05, seed=1, device="cpu", temperature=4.0,
                     alpha=0.9)


def held_out_accuracy(model: torch.nn.Module, digits: Digits) -> float:
    logits = predict(model, torch.from_numpy(digits.x_test)[:, None], SPEC, CPU)
    return float((logits.argmax(1) == torch.from_numpy(digits.y_test)).float().mean())


def test_teacher_is_good(digits_teacher: TrainedTeacher):
    assert digits_teacher.test_accuracy > 0.95


def test_distilled_student_beats_label_only_student_on_held_out_digits(tmp_path, digits, digits_teacher):
    # 5 labels per class (50 in all), 10 per class for model selection, the other ~1,100 training images
    # only as the unlabeled transfer set.
    npz = np.load(few_label_npz(tmp_path / "few.npz", digits, labels_per_class=5, val_per_class=10))
    train_set = ImageSet(torch.from_numpy(np.concatenate([npz["x"], npz["x_unlabeled"]]))[:, None],
                         torch.cat([torch.from_numpy(npz["y"]), torch.full((len(npz["x_unlabeled"]),), -1)]))
    val_set = ImageSet(torch.from_numpy(npz["x_val"])[:, None], torch.from_numpy(npz["y_val"]))
    teacher = load_teacher(TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch, input=SPEC),
                           num_classes=10)

    accuracies = {}
    for run, t in (("distilled", teacher), ("labels_only", None)):
        torch.manual_seed(1)
        student = create_model("resnet8", num_classes=10, in_channels=1)
        train(TrainSetup(student=student, student_input=SPEC, train=train_set, val=val_set,
                         classes=[str(i) for i in range(10)], teacher=t, device=CPU, run=run,
                         # the same number of optimiser steps for both: the label-only run cycles its 50 labels
                         epoch_samples=len(train_set.labels)), HP)
        accuracies[run] = held_out_accuracy(student, digits)
    print(f"held-out accuracy: {accuracies}, teacher {digits_teacher.test_accuracy:.4f}")
    assert accuracies["distilled"] >= 0.93
    assert accuracies["distilled"] - accuracies["labels_only"] >= 0.05


def test_a_whole_job_reports_the_gain_and_exports_files_that_score_what_it_reported(tmp_path, digits,
                                                                                        digits_teacher):
    data = few_label_npz(tmp_path / "few.npz", digits, labels_per_class=10, val_per_class=10, with_test=True)
    spec = JobSpec(
        teacher=TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch, input=SPEC),
        student=StudentSpec(arch="resnet8"),
        data=DataSpec(path=str(data)),
        hyperparameters=HP.model_copy(update={"epochs": 10}),
        export_formats=["onnx", "torchscript", "torch_export"],
        baseline=True,
        output_dir=str(tmp_path / "out"),
    )
    phases, epochs, progress = [], [], []
    result = run_job(spec, Callbacks(on_phase=phases.append, on_epoch=epochs.append, on_progress=progress.append))
    m = result.metrics
    assert m["gain"] == pytest.approx(m["student_accuracy"] - m["baseline_accuracy"])
    assert m["gain"] > 0.03, m
    assert m["teacher_accuracy"] > 0.9 and 0 <= m["agreement"] <= 1
    assert {e.run for e in epochs} == {"student", "baseline"} and len(epochs) == 20
    assert phases[0] == "loading" and phases[-1] == "exporting" and "evaluating" in phases

    # Scores come from the held-out test split, with intervals; validation only picked the epochs.
    test, val = m["test"], m["validation"]
    assert m["accuracy_split"] == "test" and test["n"] == len(digits.y_test) and val["n"] == 100
    assert m["student_accuracy"] == test["student_accuracy"] and m["gain"] == test["gain"]
    for who in ("student", "teacher", "baseline"):
        lo, hi = test[f"{who}_accuracy_ci"]
        assert lo < test[f"{who}_accuracy"] < hi and hi - lo < 0.1  # 540 samples: a few points wide
    lo, hi = test["gain_ci"]
    assert lo <= test["gain"] <= hi and lo > 0 and test["distillation_helped"] and test["gain_p_value"] < 0.01
    assert m["best_epoch"] == max((e for e in epochs if e.run == "student"), key=lambda e: e.student_accuracy).epoch

    # One progress scheme for the whole job: steps count on through the baseline run, fraction = step / total.
    totals = {p.total_steps for p in progress}
    assert len(totals) == 1 and [p.step for p in progress] == sorted(p.step for p in progress)
    assert progress[-1].step == progress[-1].total_steps and progress[-1].run == "baseline"
    assert all(p.fraction == pytest.approx(p.step / p.total_steps) for p in progress)
    first_baseline = next(p for p in progress if p.run == "baseline")
    assert first_baseline.step > first_baseline.total_steps // 2 and first_baseline.epoch == 1

    # Size and speed beside accuracy: resnet20 teacher against a resnet8 student, measured in one run.
    eff = m["efficiency"]
    assert eff["compression"] > 3 and eff["teacher"]["parameters"] > eff["student"]["parameters"]
    assert eff["teacher"]["macs"] > eff["student"]["macs"] > 0
    assert eff["speedup"]["batch_32"] > 1 and set(eff["teacher"]["latency_ms"]) == {"batch_1", "batch_32"}

    out = tmp_path / "out"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["architecture"] == "resnet8" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"]["mean"] == [DIGITS_MEAN] and meta["input"]["std"] == [DIGITS_STD]
    assert meta["metrics"]["test"]["n"] == len(digits.y_test) and meta["efficiency"] == eff
    assert meta["dataset"]["num_test"] == len(digits.y_test) and meta["dataset"]["test_source"] == "given"
    names = {f["name"] for f in meta["files"]}
    assert {"student.onnx", "student.torchscript.pt", "student.pt2", "student.safetensors"} <= names

    # Preprocess held-out digits exactly as metadata.json tells a client to, then score each file.
    x = (digits.x_test[:, None].astype(np.float32) / 255 - DIGITS_MEAN) / DIGITS_STD
    y = digits.y_test
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_pred = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    scripted = torch.jit.load(str(out / "student.torchscript.pt"))
    exported = torch.export.load(str(out / "student.pt2")).module()
    with torch.inference_mode():
        ts_pred = scripted(torch.from_numpy(x)).argmax(1).numpy()
        ep_pred = exported(torch.from_numpy(x)).argmax(1).numpy()
    onnx_acc = float((onnx_pred == y).mean())
    assert (ts_pred == onnx_pred).mean() > 0.995 and (ep_pred == onnx_pred).mean() > 0.995
    # The job scored its test split, which is exactly these held-out digits: the file scores what was reported.
    assert onnx_acc == pytest.approx(m["student_accuracy"], abs=2 / len(y))
    assert onnx_acc > 0.9


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def named_teacher(digits_teacher: TrainedTeacher, path) -> str:
    """The digits teacher again, with the names of its outputs stored in the safetensors metadata."""
    save_file(load_file(str(digits_teacher.path)), str(path), metadata={"classes": json.dumps(NAMES)})
    return str(path)


def digits_npz(path, digits: Digits, keep: list[int], names: list[str], *, per_class: int = 40) -> str:
    """A labelled dataset of the digits `keep`, whose class i is `names[i]` (and digit keep[i])."""
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.permutation(np.flatnonzero(digits.y_train == d))[:per_class] for d in keep])
    remap = {d: i for i, d in enumerate(keep)}
    test = np.flatnonzero(np.isin(digits.y_test, keep))
    np.savez(path, x=digits.x_train[pick], y=np.array([remap[d] for d in digits.y_train[pick]]),
             x_test=digits.x_test[test], y_test=np.array([remap[d] for d in digits.y_test[test]]),
             classes=np.array(names))
    return str(path)


def job_spec(tmp_path, teacher_path: str, data: str, **extra) -> JobSpec:
    return JobSpec(teacher=TeacherSpec(path=teacher_path, arch="resnet20", input=SPEC),
                   student=StudentSpec(arch="resnet8"), data=DataSpec(path=data),
                   hyperparameters=HP.model_copy(update={"epochs": 6}), export_formats=["onnx"],
                   output_dir=str(tmp_path / "out"), **extra)


def test_a_teacher_in_another_class_order_fails_before_any_training_step(tmp_path, digits, digits_teacher):
    # The dataset's classes sort differently from the teacher's outputs (as folders named by word would):
    # its class i is digit order[i], so the unnamed teacher's output i means something else.
    order = [8, 5, 4, 9, 1, 7, 6, 3, 2, 0]
    data = digits_npz(tmp_path / "sorted.npz", digits, order, [NAMES[d] for d in order])
    phases, progress = [], []
    with pytest.raises(DistillError) as err:
        run_job(job_spec(tmp_path, str(digits_teacher.path), data),
                Callbacks(on_phase=phases.append, on_progress=progress.append))
    assert err.value.code == "teacher_label_order"
    assert phases == ["loading"] and progress == []  # failed in the checks, before a single step
    # It names the order it detected: output i of the teacher is digit i, i.e. dataset class NAMES[i].
    assert "[" + ", ".join(NAMES) + "]" in err.value.message and "`classes`" in err.value.message

    # With its names, the same teacher is mapped by name and the job succeeds.
    result = run_job(job_spec(tmp_path, named_teacher(digits_teacher, tmp_path / "named.safetensors"), data))
    assert result.metrics["accuracy_split"] == "test" and result.metrics["student_accuracy"] > 0.9
    assert result.metrics["teacher_accuracy"] > 0.95


def test_a_named_ten_class_teacher_distills_a_three_class_student(tmp_path, digits, digits_teacher):
    keep = [8, 3, 7]  # hard to tell apart, and in another order than the teacher's outputs
    data = digits_npz(tmp_path / "three.npz", digits, keep, ["Eight", " three", "SEVEN"])
    events = []
    result = run_job(job_spec(tmp_path, named_teacher(digits_teacher, tmp_path / "named.safetensors"), data),
                     Callbacks(on_event=lambda kind, message, data: events.append((kind, data))))
    m = result.metrics
    assert m["test"]["n"] == int(np.isin(digits.y_test, keep).sum())
    assert m["student_accuracy"] > 0.9 and m["teacher_accuracy"] > 0.95, m
    assert result.teacher["outputs_used"] == keep and result.teacher["num_classes"] == 3
    assert any(kind == "info" and d.get("outputs") == keep for kind, d in events)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["classes"] == ["Eight", " three", "SEVEN"] and meta["num_classes"] == 3  # the dataset's own names
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"), providers=["CPUExecutionProvider"])
    x = (digits.x_test[:5, None].astype(np.float32) / 255 - DIGITS_MEAN) / DIGITS_STD
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (5, 3)


def test_a_named_teacher_that_lacks_a_dataset_class_is_class_mismatch(tmp_path, digits, digits_teacher):
    data = digits_npz(tmp_path / "d.npz", digits, [1, 2], ["one", "tow"])
    with pytest.raises(DistillError) as err:
        run_job(job_spec(tmp_path, named_teacher(digits_teacher, tmp_path / "named.safetensors"), data))
    assert err.value.code == "class_mismatch" and "'tow' (closest: 'two'" in err.value.message


def test_a_teacher_near_chance_fails_unless_checks_say_warn(tmp_path, digits):
    torch.manual_seed(5)
    untrained = tmp_path / "untrained.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet20", num_classes=10, in_channels=1)
               .state_dict().items()}, str(untrained))
    data = digits_npz(tmp_path / "d.npz", digits, list(range(10)), NAMES, per_class=10)
    with pytest.raises(DistillError) as err:
        run_job(job_spec(tmp_path, str(untrained), data))
    assert err.value.code == "teacher_not_predictive" and "warn" in err.value.message

    warned = []
    spec = job_spec(tmp_path, str(untrained), data, checks=Checks(teacher="warn"))
    result = run_job(spec.model_copy(update={"hyperparameters": HP.model_copy(update={"epochs": 1})}),
                     Callbacks(on_event=lambda kind, message, data: warned.append(data.get("code"))
                               if kind == "warning" else None))
    assert [w["code"] for w in result.warnings] == ["teacher_not_predictive"] == warned
    assert result.metrics["teacher_check"]["accuracy"] < 0.3
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["warnings"] == result.warnings
