"""Shared fixtures: scikit-learn's digits (shipped inside its wheel) and a teacher trained on them here."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from digits_data import TEACHER_ARCH, Digits, TrainedTeacher, teacher_input_spec
from safetensors.torch import save_file
from service_support import example_dir  # noqa: F401 (a fixture: `kdistill example` written once per module that asks)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one thread each (and in every process a test starts), as torch threads
    # that contend with other work spin and run many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

@pytest.fixture(scope="session")
def digits() -> Digits:
    x, y = load_digits(return_X_y=True)
    images = np.clip(np.round(x.reshape(-1, 8, 8) * 255 / 16), 0, 255).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, y, test_size=0.3, stratify=y, random_state=0)
    return Digits(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> TrainedTeacher:
    """A resnet20 trained on every digits training label by the engine's own loop (labels only)."""
    from worker.distill.data import ImageSet
    from worker.distill.spec import Hyperparameters, InputSpec
    from worker.distill.students import create_model
    from worker.distill.trainer import TrainSetup, predict, train

    spec = InputSpec(**teacher_input_spec())
    torch.manual_seed(0)
    model = create_model(TEACHER_ARCH, num_classes=10, in_channels=1)
    images = torch.from_numpy(digits.x_train)[:, None]
    labels = torch.from_numpy(digits.y_train)
    hp = Hyperparameters(epochs=12, batch_size=64, learning_rate=0.05, optimizer="sgd", scheduler="cosine",
                         weight_decay=5e-4, seed=0, device="cpu")
    setup = TrainSetup(student=model, student_input=spec, train=ImageSet(images, labels),
                       val=ImageSet(images[:200], labels[:200]), classes=[str(i) for i in range(10)], teacher=None,
                       device=torch.device("cpu"), augment=False, run="teacher")
    train(setup, hp)
    test_logits = predict(model, torch.from_numpy(digits.x_test)[:, None], spec, torch.device("cpu"))
    acc = float((test_logits.argmax(1) == torch.from_numpy(digits.y_test)).float().mean())
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return TrainedTeacher(path=path, arch=TEACHER_ARCH, test_accuracy=acc)
