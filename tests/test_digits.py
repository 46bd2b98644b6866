"""On real data (scikit-learn's digits): distillation with few labels beats the same student on labels alone."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from digits_data import DIGITS_MEAN, DIGITS_STD, Digits, TrainedTeacher, few_label_npz, teacher_input_spec

from worker.distill.data import ImageSet
from worker.distill.progress import Callbacks
from worker.distill.runner import run_job
from worker.distill.spec import DataSpec, Hyperparameters, InputSpec, JobSpec, StudentSpec, TeacherSpec
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
    data = few_label_npz(tmp_path / "few.npz", digits, labels_per_class=10, val_per_class=10)
    spec = JobSpec(
        teacher=TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch, input=SPEC),
        student=StudentSpec(arch="resnet8"),
        data=DataSpec(path=str(data)),
        hyperparameters=HP.model_copy(update={"epochs": 10}),
        export_formats=["onnx", "torchscript", "torch_export"],
        baseline=True,
        output_dir=str(tmp_path / "out"),
    )
    phases, epochs = [], []
    result = run_job(spec, Callbacks(on_phase=phases.append, on_epoch=epochs.append))
    m = result.metrics
    assert m["gain"] == pytest.approx(m["student_accuracy"] - m["baseline_accuracy"])
    assert m["gain"] > 0.03, m
    assert m["teacher_accuracy"] > 0.9 and 0 <= m["agreement"] <= 1
    assert {e.run for e in epochs} == {"student", "baseline"} and len(epochs) == 20
    assert phases[0] == "loading" and phases[-1] == "exporting"

    out = tmp_path / "out"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["architecture"] == "resnet8" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"]["mean"] == [DIGITS_MEAN] and meta["input"]["std"] == [DIGITS_STD]
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
    # The job's accuracy was measured on its validation split; the held-out set agrees within sampling noise.
    assert onnx_acc == pytest.approx(m["student_accuracy"], abs=0.06)
    assert onnx_acc > 0.9
