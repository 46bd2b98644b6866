"""The training loop: resume equivalence, teacher-logit caching, progress, cancellation, schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from worker.distill.data import ImageSet
from worker.distill.errors import Cancelled, TeacherError
from worker.distill.progress import Callbacks, Progress
from worker.distill.schedules import lr_factor
from worker.distill.spec import Hyperparameters, InputSpec
from worker.distill.students import create_model
from worker.distill.teachers import LoadedTeacher
from worker.distill.trainer import TrainSetup, epoch_batches, train

SPEC = InputSpec(channels=1, size=8, mean=[0.3], std=[0.37])


def tiny_data(n: int = 96, unlabeled: int = 32, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n + unlabeled, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.cat([torch.randint(0, 4, (n,), generator=g), torch.full((unlabeled,), -1)])
    val = ImageSet(torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g),
                   torch.randint(0, 4, (24,), generator=g))
    return ImageSet(images, labels), val


class CountingTeacher:
    """A fixed random conv teacher that counts how many samples it has seen."""

    def __init__(self) -> None:
        torch.manual_seed(123)
        self.model = create_model("resnet8", num_classes=4, in_channels=1).eval()
        self.samples = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += len(x)
        return self.model(x)

    def teacher(self) -> LoadedTeacher:
        return LoadedTeacher("state_dict", "resnet8", 4, SPEC, self, module=self.model)


def setup_for(train_set, val_set, teacher, **kw) -> TrainSetup:
    torch.manual_seed(7)
    student = create_model("resnet8", num_classes=4, in_channels=1)
    return TrainSetup(student=student, student_input=SPEC, train=train_set, val=val_set,
                      classes=["a", "b", "c", "d"], teacher=teacher, device=torch.device("cpu"), **kw)


HP = Hyperparameters(epochs=3, batch_size=16, learning_rate=0.05, seed=3, device="cpu", warmup_epochs=0.5)


@pytest.mark.parametrize("augment", [False, True])
def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, augment):
    train_set, val_set = tiny_data()
    full = setup_for(train_set, val_set, CountingTeacher().teacher(), augment=augment,
                     checkpoint_path=tmp_path / "full.ckpt", fingerprint="f")
    full_result = train(full, HP)

    # Cancel the second run in the middle of epoch 3: the epoch-2 checkpoint is all it leaves behind.
    steps = {"n": 0}
    steps_per_epoch = math.ceil(128 / 16)

    def cancel_mid_epoch_3() -> bool:
        steps["n"] += 1
        return steps["n"] > 2 * steps_per_epoch + 3

    broken = setup_for(train_set, val_set, CountingTeacher().teacher(), augment=augment,
                       checkpoint_path=tmp_path / "resumed.ckpt", fingerprint="f")
    with pytest.raises(Cancelled):
        train(broken, HP, Callbacks(cancelled=cancel_mid_epoch_3))
    assert torch.load(tmp_path / "resumed.ckpt", weights_only=True)["epoch"] == 2

    events = []
    resumed = setup_for(train_set, val_set, CountingTeacher().teacher(), augment=augment,
                        checkpoint_path=tmp_path / "resumed.ckpt", fingerprint="f")
    result = train(resumed, HP, Callbacks(on_event=lambda kind, msg, data: events.append(kind)))
    assert result.resumed_from_epoch == 2
    assert "resumed" in events
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    last_full = torch.load(tmp_path / "full.ckpt", weights_only=True)["model"]
    last_resumed = torch.load(tmp_path / "resumed.ckpt", weights_only=True)["model"]
    for k in last_full:
        assert torch.equal(last_full[k], last_resumed[k]), k
    assert [m.train_loss for m in result.history] == [m.train_loss for m in full_result.history]


def test_a_checkpoint_of_another_job_is_not_resumed(tmp_path):
    train_set, val_set = tiny_data()
    train(setup_for(train_set, val_set, None, checkpoint_path=tmp_path / "c.ckpt", fingerprint="one"),
          HP.model_copy(update={"epochs": 1}))
    with pytest.raises(Exception) as err:
        train(setup_for(train_set, val_set, None, checkpoint_path=tmp_path / "c.ckpt", fingerprint="two"), HP)
    assert getattr(err.value, "code", None) == "checkpoint_mismatch"


def test_teacher_runs_once_per_sample_when_logits_are_cached():
    train_set, val_set = tiny_data()
    counting = CountingTeacher()
    train(setup_for(train_set, val_set, counting.teacher()), HP)
    # once over the training set for the cache, once over the validation set
    assert counting.samples == len(train_set.labels) + len(val_set.labels)


def test_teacher_runs_every_step_with_augmentation():
    train_set, val_set = tiny_data()
    counting = CountingTeacher()
    train(setup_for(train_set, val_set, counting.teacher(), augment=True), HP)
    assert counting.samples == HP.epochs * len(train_set.labels) + len(val_set.labels)


def test_cached_and_uncached_teacher_train_the_same_student():
    train_set, val_set = tiny_data()
    a = setup_for(train_set, val_set, CountingTeacher().teacher())
    b = setup_for(train_set, val_set, CountingTeacher().teacher(), cache_teacher_logits=False)
    ra, rb = train(a, HP), train(b, HP)
    assert ra.history[-1].train_loss == pytest.approx(rb.history[-1].train_loss, rel=1e-4)
    for x, y in zip(a.student.parameters(), b.student.parameters(), strict=True):
        assert torch.allclose(x, y, atol=1e-4)


def test_progress_is_rate_limited_and_complete():
    train_set, val_set = tiny_data()
    every: list[Progress] = []
    train(setup_for(train_set, val_set, CountingTeacher().teacher(), progress_interval=0.0), HP,
          Callbacks(on_progress=every.append))
    assert len(every) == HP.epochs * 8  # 128 samples / 16 per batch
    assert [p.step for p in every] == list(range(1, 25))
    assert every[-1].fraction == pytest.approx(1.0)
    assert all(b.fraction > a.fraction for a, b in itertools.pairwise(every))
    assert every[-1].eta_seconds == pytest.approx(0.0, abs=1e-6)
    assert all(p.samples_per_s > 0 and math.isfinite(p.loss) and p.loss_distill > 0 for p in every)

    sparse: list[Progress] = []
    epochs = []
    train(setup_for(train_set, val_set, CountingTeacher().teacher(), progress_interval=3600.0), HP,
          Callbacks(on_progress=sparse.append, on_epoch=epochs.append))
    # the first step passes the limiter, then only each epoch's last step (forced)
    assert [p.step for p in sparse] == [1, 8, 16, 24]
    assert [m.epoch for m in epochs] == [1, 2, 3]
    assert all(m.teacher_accuracy is not None and 0 <= m.agreement <= 1 for m in epochs)


def test_best_epoch_student_is_kept():
    train_set, val_set = tiny_data()
    setup = setup_for(train_set, val_set, CountingTeacher().teacher())
    result = train(setup, HP)
    best = max(result.history, key=lambda m: m.student_accuracy)
    assert result.best_epoch == next(m.epoch for m in result.history if m.student_accuracy == best.student_accuracy)
    assert result.metrics["student_accuracy"] == pytest.approx(best.student_accuracy)
    assert len(result.metrics["per_class"]) == 4


def test_baseline_trains_on_labelled_samples_only():
    train_set, val_set = tiny_data(n=40, unlabeled=200)
    seen = []
    train(setup_for(train_set, val_set, None), HP.model_copy(update={"epochs": 1}),
          Callbacks(on_epoch=lambda m: seen.append(m)))
    assert seen[0].train_loss_distill == 0.0


def test_nan_teacher_fails_the_run_with_a_clear_error():
    train_set, val_set = tiny_data()

    def nan_teacher(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 4), float("nan"))

    with pytest.raises(TeacherError) as err:
        train(setup_for(train_set, val_set, LoadedTeacher("onnx", None, 4, SPEC, nan_teacher)), HP)
    assert err.value.code == "teacher_nonfinite_output"


def test_cancel_stops_between_steps():
    train_set, val_set = tiny_data()
    with pytest.raises(Cancelled):
        train(setup_for(train_set, val_set, None), HP, Callbacks(cancelled=lambda: True))


def test_epoch_batches_cover_the_pool_and_never_leave_a_single_sample():
    pool = torch.arange(33)
    batches = epoch_batches(pool, 33, 16, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [16, 17]
    assert sorted(torch.cat(batches).tolist()) == list(range(33))
    longer = epoch_batches(torch.arange(5), 20, 4, torch.Generator().manual_seed(0))
    assert sum(len(b) for b in longer) == 20 and set(torch.cat(longer).tolist()) == set(range(5))


def hp(**kw) -> Hyperparameters:
    return Hyperparameters(epochs=10, **kw)


def test_cosine_with_warmup_by_hand():
    h = hp(scheduler="cosine", warmup_epochs=1)
    assert lr_factor(0, 100, 10, h) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, h) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, h) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, h) == pytest.approx(0.5)  # halfway through the 90 cosine steps
    assert lr_factor(100, 100, 10, h) == pytest.approx(0.0, abs=1e-9)


def test_step_constant_and_onecycle_by_hand():
    step = hp(scheduler="step", step_size=3, gamma=0.5)
    assert [lr_factor(s, 100, 10, step) for s in (29, 30, 59, 60)] == pytest.approx([1.0, 0.5, 0.5, 0.25])
    assert lr_factor(77, 100, 10, hp(scheduler="constant")) == 1.0
    one = hp(scheduler="onecycle")
    assert lr_factor(0, 100, 10, one) == pytest.approx(1 / 25)
    assert lr_factor(30, 100, 10, one) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, one) == pytest.approx(1e-4)


def test_nan_from_a_teacher_run_every_step_is_caught_without_a_sync_per_step():
    train_set, val_set = tiny_data()

    def nan_on_training(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 4), float("nan"))

    finite_val = torch.zeros(len(val_set.labels), 4)  # the validation pass is given, so only training sees NaN
    setup = setup_for(train_set, val_set, LoadedTeacher("onnx", None, 4, SPEC, nan_on_training),
                      cache_teacher_logits=False, teacher_val_logits=finite_val, progress_interval=3600.0)
    with pytest.raises(TeacherError) as err:
        train(setup, HP)
    assert err.value.code == "teacher_nonfinite_output" and "epoch 1" in err.value.message
