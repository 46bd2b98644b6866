"""The training loop: one readable loop (after nanoGPT's train.py) for distillation and its baseline."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import ImageSet
from .data.transforms import augment_batch, mix_batch, to_model_input
from .errors import Cancelled, ConfigError, DistillError, TeacherError
from .feature_distill import attach_feature_taps
from .losses import UNLABELED, DistillationLoss, inverse_frequency_weights
from .metrics import accuracy, agreement, per_class_report, topk_accuracy
from .progress import Callbacks, EpochMetrics, Progress, RateLimiter
from .schedules import build_optimizer, build_scheduler
from .spec import AugmentMode, Hyperparameters, InputSpec, augment_mode
from .teachers import LoadedTeacher, check_finite

EVAL_BATCH = 512
DEVICE_DATA_BYTES = 4 << 30  # datasets up to this size live on the GPU; larger ones move batch by batch


@dataclass
class TrainSetup:
    """Everything one training run needs besides its hyperparameters."""

    student: nn.Module
    student_input: InputSpec
    train: ImageSet  # labels of -1 mark the transfer (unlabeled) samples
    val: ImageSet
    classes: list[str]
    teacher: LoadedTeacher | None  # None: train on labels alone (the baseline)
    device: torch.device
    augment: AugmentMode = False  # False/"none", True/"standard" (crop, flip) or "consistent" (function matching)
    cache_teacher_logits: bool = True  # without augmentation, run the teacher once, not every step
    run: str = "student"
    checkpoint_path: Path | None = None
    fingerprint: str = ""  # a checkpoint with another fingerprint belongs to another job
    epoch_samples: int | None = None  # samples per epoch; default: every usable training sample once
    progress_interval: float = 1.0
    # Progress counts optimiser steps over the whole job (distillation run, then baseline run): this run's
    # steps start after `step_offset` of the job's `job_total_steps` (None: this run is the whole job).
    step_offset: int = 0
    job_total_steps: int | None = None
    teacher_val_logits: torch.Tensor | None = None  # reused across runs when given


@dataclass
class TrainResult:
    best_epoch: int
    history: list[EpochMetrics]
    metrics: dict[str, Any]  # of the best student on the validation split
    resumed_from_epoch: int = 0
    teacher_val_logits: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no GPU is visible to this worker; use 'auto' or "
                          "'cpu'", field="hyperparameters.device", code="device_unavailable")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. CPU always trains in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def predict(model: nn.Module | LoadedTeacher, images: torch.Tensor, spec: InputSpec, device: torch.device,
            autocast_dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Float32 logits for uint8 images, batch by batch, in eval mode and without autograd."""
    outs = []
    if isinstance(model, nn.Module):
        model.eval()
    with torch.inference_mode(), _autocast(device, autocast_dtype):
        for i in range(0, len(images), EVAL_BATCH):
            x = to_model_input(images[i:i + EVAL_BATCH].to(device, non_blocking=True), spec)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append((model.logits(x) if isinstance(model, LoadedTeacher) else model(x)).float())
    return torch.cat(outs) if outs else torch.empty(0)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_batches(pool: torch.Tensor, epoch_samples: int, batch_size: int,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle `pool` (repeating it when an epoch is longer) into batches; a trailing batch of one
    joins the one before, because BatchNorm cannot train on a single sample."""
    reps = math.ceil(epoch_samples / len(pool))
    order = torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(reps)])
    batches = list(order[:epoch_samples].split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        tail = batches.pop()
        batches[-1] = torch.cat([batches[-1], tail])
    return batches


def steps_in_epoch(epoch_samples: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of `epoch_samples` (as `epoch_batches` cuts it)."""
    batch_size = min(batch_size, epoch_samples)
    steps = math.ceil(epoch_samples / batch_size)
    if steps > 1 and epoch_samples - (steps - 1) * batch_size == 1:
        steps -= 1  # a trailing batch of one joins the one before
    return steps


def train(setup: TrainSetup, hp: Hyperparameters, callbacks: Callbacks | None = None) -> TrainResult:
    """Train `setup.student` (distilling from `setup.teacher` when given); return the best epoch's student."""
    cb = callbacks or Callbacks()
    dev, teacher, run = setup.device, setup.teacher, setup.run
    mode = augment_mode(setup.augment)
    notes: list[str] = []
    amp_dtype = resolve_precision(hp.precision, dev)
    torch.manual_seed(hp.seed)
    student = setup.student.to(dev)
    if hp.channels_last:
        student = student.to(memory_format=torch.channels_last)

    labels_all = setup.train.labels
    labelled = (labels_all != UNLABELED).nonzero().squeeze(1)
    # Without a teacher the unlabeled samples carry no signal: the baseline draws labelled ones only.
    pool = torch.arange(len(labels_all)) if teacher is not None else labelled
    if len(pool) == 0:
        raise DistillError("the dataset has no labelled training samples to train the baseline on",
                           code="no_labelled_samples")
    epoch_samples = setup.epoch_samples or len(pool)
    steps_per_epoch = steps_in_epoch(epoch_samples, hp.batch_size)
    batch_size = min(hp.batch_size, epoch_samples)
    total_steps = hp.epochs * steps_per_epoch
    job_total = setup.job_total_steps or total_steps

    data_dev = dev if setup.train.images.numel() <= DEVICE_DATA_BYTES else torch.device("cpu")
    images = setup.train.images.to(data_dev)
    labels = labels_all.to(dev)
    val_labels = setup.val.labels.to(dev)

    class_weights = _class_weights(hp, labels_all, len(setup.classes))
    loss_fn = DistillationLoss(kind=hp.distillation, temperature=hp.temperature, alpha=hp.alpha,
                               label_smoothing=hp.label_smoothing, class_weights=class_weights,
                               standardize=hp.standardize, dkd_alpha=hp.dkd_alpha, dkd_beta=hp.dkd_beta,
                               dkd_warmup=hp.dkd_warmup).to(dev)
    optimizer = build_optimizer(student, hp)
    scheduler = build_scheduler(optimizer, hp, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)

    teacher_val = setup.teacher_val_logits
    teacher_cache = None
    taps = None
    if teacher is not None and hp.feature_distillation:
        taps = attach_feature_taps(student, teacher, _example(setup, student_input=True),
                                   _example(setup, student_input=False))
        _note(cb, notes, f"feature distillation ({hp.feature_distillation} transfer, weight {hp.feature_weight:g}) "
              f"pairs student stages {taps.student_nodes} with teacher stages {taps.teacher_nodes}; the teacher "
              "runs on every training step")
    if teacher is not None and mode == "consistent":
        _note(cb, notes, "augment 'consistent' (function matching): teacher and student see the same crop, flip "
              "and mixup/cutmix view, so the teacher runs on every training step and its logits are not cached "
              "(about one teacher forward pass per student step)")
    if teacher is not None:
        if teacher_val is None:
            teacher_val = predict(teacher, setup.val.images, teacher.input, dev, amp_dtype)
            check_finite(teacher_val, "the validation images")
        teacher_val = teacher_val.to(dev)
        if mode == "none" and setup.cache_teacher_logits and taps is None:
            # Inputs never change without augmentation, so the teacher's answers never do either.
            cb.event("info", "computing the teacher's logits once for the whole training set")
            teacher_cache = predict(teacher, setup.train.images, teacher.input, dev, amp_dtype)
            check_finite(teacher_cache, "the training images")
            teacher_cache = teacher_cache.to(dev)

    state = _TrainState()
    if setup.checkpoint_path is not None and setup.checkpoint_path.exists():
        state = _load_checkpoint(setup, student, optimizer, scheduler, scaler)
        if state.epoch:
            cb.event("resumed", f"{run}: resuming from the checkpoint of epoch {state.epoch}/{hp.epochs} "
                     f"({setup.checkpoint_path.parent.name}/{setup.checkpoint_path.name}); delete it, or run with "
                     "--fresh, to start over", epoch=state.epoch)
    resumed_from = state.epoch
    for past in state.history:
        cb.epoch(replace(past, replayed=True))

    limiter = RateLimiter(setup.progress_interval)
    started = time.monotonic()
    for epoch in range(state.epoch, hp.epochs):
        # Seeds derive from the epoch so a run resumed at an epoch boundary replays exactly.
        gen = torch.Generator().manual_seed(hp.seed * 1_000_003 + epoch)
        torch.manual_seed(hp.seed * 1_000_003 + epoch)
        (taps.student if taps is not None else student).train()  # a tap's graph follows its own mode
        sums = torch.zeros(4, device=dev)
        teacher_finite = torch.ones((), dtype=torch.bool, device=dev)  # checked per report: no sync per step
        seen, epoch_t0 = 0, time.monotonic()
        window_t0, window_n = epoch_t0, 0
        for i, idx in enumerate(epoch_batches(pool, epoch_samples, batch_size, gen)):
            if cb.is_cancelled():
                raise Cancelled(f"{run} training was cancelled in epoch {epoch + 1}")
            batch = images[idx.to(data_dev)].to(dev, non_blocking=True)
            if mode != "none":
                batch = augment_batch(batch, gen)
            y = labels[idx.to(dev)]
            mixed = mix_batch(batch, gen) if mode == "consistent" else None
            if mixed is not None:
                batch = mixed.images
            t_logits, t_feats = None, None
            if teacher is not None:
                if teacher_cache is not None:
                    t_logits = teacher_cache[idx.to(dev)]
                else:
                    tx = to_model_input(batch, teacher.input)
                    if hp.channels_last and teacher.module is not None:
                        tx = tx.contiguous(memory_format=torch.channels_last)
                    with _autocast(dev, amp_dtype):
                        t_logits, t_feats = taps.teacher(tx) if taps is not None else (teacher.logits(tx), None)
                    t_logits = t_logits.float()
                    teacher_finite &= torch.isfinite(t_logits).all()
            x = to_model_input(batch, setup.student_input)
            if hp.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(dev, amp_dtype):
                s_logits, s_feats = taps.student(x) if taps is not None else (student(x), None)
                parts = loss_fn(s_logits, y, t_logits, epoch=epoch + (i + 1) / steps_per_epoch,
                                mixed_labels=y[mixed.perm] if mixed is not None else None,
                                lam=mixed.lam if mixed is not None else 1.0)
                feature = (taps.loss(s_feats, t_feats) * hp.feature_weight if s_feats is not None
                           else torch.zeros((), device=dev))
            total = parts.total + feature
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if hp.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(student.parameters(), hp.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            n = len(idx)
            sums += torch.stack([total.detach(), parts.distill.detach(), parts.label.detach(),
                                 feature.detach()]).float() * n
            seen += n
            window_n += n
            step = epoch * steps_per_epoch + i + 1
            last = i + 1 == steps_per_epoch
            if limiter.ready(force=last):
                now = time.monotonic()
                losses = (sums / seen).tolist()  # one device sync per report, not per step
                _check_teacher(teacher_finite, epoch)
                _check_loss(losses[0], run, epoch, hp)
                done = (step - resumed_from * steps_per_epoch) / max(1, total_steps - resumed_from * steps_per_epoch)
                elapsed = now - started
                cb.progress(Progress(
                    run=run, epoch=epoch + 1, epochs=hp.epochs, step=setup.step_offset + step,
                    total_steps=job_total, fraction=(setup.step_offset + step) / job_total,
                    loss=losses[0], loss_distill=losses[1], loss_label=losses[2],
                    learning_rate=optimizer.param_groups[0]["lr"],
                    samples_per_s=window_n / max(now - window_t0, 1e-9),
                    eta_seconds=elapsed / done - elapsed if done > 0 else None))
                window_t0, window_n = now, 0

        epoch_seconds = time.monotonic() - epoch_t0
        losses = (sums / seen).tolist()
        _check_teacher(teacher_finite, epoch)
        _check_loss(losses[0], run, epoch, hp)
        cb.phase("evaluating")
        logits = predict(student, setup.val.images, setup.student_input, dev, amp_dtype, hp.channels_last)
        acc = accuracy(logits, val_labels)
        is_best = acc > state.best_accuracy
        if is_best:
            state.best_accuracy, state.best_epoch = acc, epoch + 1
            state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        metrics = EpochMetrics(
            run=run, epoch=epoch + 1, epochs=hp.epochs, train_loss=losses[0], train_loss_distill=losses[1],
            train_loss_label=losses[2], student_accuracy=acc, student_top5=topk_accuracy(logits, val_labels),
            teacher_accuracy=accuracy(teacher_val, val_labels) if teacher_val is not None else None,
            teacher_top5=topk_accuracy(teacher_val, val_labels) if teacher_val is not None else None,
            agreement=agreement(logits, teacher_val) if teacher_val is not None else None,
            learning_rate=optimizer.param_groups[0]["lr"], seconds=epoch_seconds,
            samples_per_s=seen / max(epoch_seconds, 1e-9), best=is_best,
            train_loss_feature=losses[3] if taps is not None else None)
        state.history.append(metrics)
        state.epoch = epoch + 1
        if setup.checkpoint_path is not None:
            _save_checkpoint(setup, state, student, optimizer, scheduler, scaler)
        cb.epoch(metrics)
        cb.phase("training")

    if state.best_state is not None:
        student.load_state_dict(state.best_state)
    logits = predict(student, setup.val.images, setup.student_input, dev, amp_dtype, hp.channels_last)
    final = {
        "student_accuracy": accuracy(logits, val_labels),
        "student_top5": topk_accuracy(logits, val_labels),
        "best_epoch": state.best_epoch,
        "per_class": per_class_report(logits.cpu(), setup.val.labels, setup.classes),
    }
    if teacher_val is not None:
        final.update(teacher_accuracy=accuracy(teacher_val, val_labels),
                     teacher_top5=topk_accuracy(teacher_val, val_labels),
                     agreement=agreement(logits, teacher_val))
    return TrainResult(best_epoch=state.best_epoch, history=state.history, metrics=final,
                       resumed_from_epoch=resumed_from,
                       teacher_val_logits=teacher_val.cpu() if teacher_val is not None else None, notes=notes)


def _note(cb: Callbacks, notes: list[str], text: str) -> None:
    notes.append(text)
    cb.event("info", text)


def _example(setup: TrainSetup, *, student_input: bool) -> torch.Tensor:
    """Two training images as the student (or teacher) sees them: enough to trace feature shapes."""
    spec = setup.student_input if student_input or setup.teacher is None else setup.teacher.input
    return to_model_input(setup.train.images[:2], spec).to(setup.device)


def _class_weights(hp: Hyperparameters, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    if hp.class_weights is None:
        return None
    if hp.class_weights == "auto":
        known = labels[labels != UNLABELED]
        return inverse_frequency_weights(torch.bincount(known, minlength=num_classes))
    if len(hp.class_weights) != num_classes:
        raise ConfigError(f"class_weights has {len(hp.class_weights)} values but the dataset has "
                          f"{num_classes} classes", field="hyperparameters.class_weights",
                          code="invalid_hyperparameter")
    return torch.tensor(hp.class_weights, dtype=torch.float32)


def _check_teacher(finite: torch.Tensor, epoch: int) -> None:
    if not bool(finite):
        raise TeacherError(f"the teacher produced NaN or infinite logits on training batches of epoch {epoch + 1}; "
                           "check the checkpoint and its input spec (mean/std)", code="teacher_nonfinite_output")


def _check_loss(loss: float, run: str, epoch: int, hp: Hyperparameters) -> None:
    if not math.isfinite(loss):
        raise DistillError(
            f"{run} training diverged in epoch {epoch + 1} (the loss became {loss}); lower the learning rate "
            f"(now {hp.learning_rate}), add grad_clip, or use precision 'fp32'", code="training_diverged")


@dataclass
class _TrainState:
    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[EpochMetrics] = field(default_factory=list)


def _save_checkpoint(setup: TrainSetup, state: _TrainState, student: nn.Module, optimizer: Any,
                     scheduler: Any, scaler: Any) -> None:
    path = setup.checkpoint_path
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "fingerprint": setup.fingerprint, "run": setup.run, "epoch": state.epoch,
        "model": student.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "best_accuracy": state.best_accuracy, "best_epoch": state.best_epoch, "best_state": state.best_state,
        "history": [m.to_dict() for m in state.history],
    }, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint whole


def _load_checkpoint(setup: TrainSetup, student: nn.Module, optimizer: Any, scheduler: Any,
                     scaler: Any) -> _TrainState:
    assert setup.checkpoint_path is not None
    ckpt = torch.load(setup.checkpoint_path, map_location="cpu", weights_only=True)
    if ckpt.get("fingerprint") != setup.fingerprint or ckpt.get("run") != setup.run:
        raise DistillError(f"the checkpoint {setup.checkpoint_path.name} in {setup.checkpoint_path.parent.name}/ "
                           "was written by another run (the teacher, the dataset, the student's initial weights or "
                           "the settings differ); run with --fresh to start over, remove the file, or point "
                           "checkpoint_dir elsewhere", code="checkpoint_mismatch")
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return _TrainState(epoch=ckpt["epoch"], best_accuracy=ckpt["best_accuracy"], best_epoch=ckpt["best_epoch"],
                       best_state=ckpt["best_state"],
                       history=[EpochMetrics(**m) for m in ckpt["history"]])
