"""Engine throughput, end to end: plain cross-entropy vs distillation (teacher every step) vs cached teacher logits.

Each mode trains the same student from the same initial weights on the same synthetic data for N epochs
(`--epochs`) through the real training loop (`worker.distill.trainer.train`), and the figure is the wall time
of that whole call: the teacher's pass over the validation images (modes b and c), the teacher's one-time
pass over the training set (mode c: the cache), N epochs of steps, and the evaluation after each epoch (the
same in every mode). samples/s = N x training samples / that time; the ratios against plain cross-entropy
(a) come from the same process, so (c)/(a) carries the cache's cost spread over N epochs, not just the
cheaper steps. "steps-only samples/s" (the training steps alone, as the engine reports them per epoch) is
printed for context. The modes take turns, one N-epoch run each per round, so a busy machine slows all three
alike; each figure is the median over the rounds after the first (a 1-epoch warm-up per mode, not counted).

    python bench/engine.py                       # CPU: resnet56 -> resnet20 at 32x32
    python bench/engine.py --device cuda --precision bf16 --channels-last \\
        --teacher resnet34 --student resnet18 --size 224 --batch 256 --samples 20480
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from worker.distill.data import ImageSet
from worker.distill.data.transforms import to_model_input
from worker.distill.progress import Callbacks, EpochMetrics
from worker.distill.spec import Hyperparameters, InputSpec, TeacherSpec
from worker.distill.students import create_model
from worker.distill.teachers import load_teacher
from worker.distill.trainer import TrainSetup, resolve_device, resolve_precision, train

MODES = {"ce": "(a) cross-entropy only", "teacher_every_step": "(b) teacher every step",
         "cached_logits": "(c) cached teacher logits"}


def synthetic(n: int, size: int, classes: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    labels=torch.randint(0, classes, (n,), generator=g))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, args: argparse.Namespace, data: ImageSet, val: ImageSet, teacher: Any, epochs: int) -> dict:
    """One `train` call of `epochs` epochs in `mode`: its wall time end to end, and its steps alone."""
    hp = Hyperparameters(epochs=epochs, batch_size=args.batch, learning_rate=0.05, precision=args.precision,
                         channels_last=args.channels_last, device=args.device, seed=0)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=args.classes)
    history: list[EpochMetrics] = []
    classes = [str(i) for i in range(args.classes)]
    setup = TrainSetup(student=student, student_input=InputSpec(channels=3, size=args.size), train=data, val=val,
                       classes=classes, teacher=None if mode == "ce" else teacher, device=device,
                       cache_teacher_logits=mode == "cached_logits", progress_interval=1e9)
    sync(device)
    t0 = time.perf_counter()
    train(setup, hp, Callbacks(on_epoch=history.append))
    sync(device)
    seconds = time.perf_counter() - t0
    samples = epochs * len(data.labels)
    return {"mode": mode, "seconds": seconds, "samples_per_s": samples / seconds,
            "steps_only_samples_per_s": samples / sum(e.seconds for e in history)}


def teacher_rate(teacher: Any, data: ImageSet, batch: int, device: torch.device, amp: torch.dtype | None,
                 channels_last: bool) -> float:
    """Samples/s of the teacher's forward pass alone (input preparation included, as in training)."""
    images = data.images.to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for i in range(0, len(images), batch):
            x = to_model_input(images[i:i + batch], teacher.input)
            teacher.logits(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def build_teacher(args: argparse.Namespace, device: torch.device, folder: Path) -> Any:
    """A randomly initialised teacher, loaded the way the engine loads one (a safetensors state dict)."""
    torch.manual_seed(1)
    path = folder / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(args.teacher, num_classes=args.classes).state_dict().items()},
              str(path))
    spec = TeacherSpec(path=str(path), arch=args.teacher, num_classes=args.classes,
                       input=InputSpec(channels=3, size=args.size))
    teacher = load_teacher(spec, device=device, num_classes=args.classes)
    if args.channels_last and teacher.module is not None:
        teacher.module.to(memory_format=torch.channels_last)  # in place: the teacher's forward uses this module
    return teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs of each measured run; the cached mode's one-time teacher pass is spread over these")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of runs, the modes taking turns; the first is a 1-epoch warm-up (at least 2)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()
    if args.epochs < 1:
        p.error("--epochs must be at least 1")

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = synthetic(args.samples, args.size, args.classes, seed=1)
    val = synthetic(min(512, args.samples // 4), args.size, args.classes, seed=2)
    amp = resolve_precision(args.precision, device)
    precision = "fp32" if amp is None else str(amp).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_teacher(args, device, Path(tmp))
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        forward: list[float] = []
        for r in range(max(2, args.rounds)):
            for m in MODES:  # round 0 warms up (allocator, cudnn autotuning) with 1-epoch runs, not counted
                runs[m].append(measure(m, args, data, val, teacher, epochs=1 if r == 0 else args.epochs))
            # the teacher's own forward pass at the training batch size, to state goal (b)
            forward.append(teacher_rate(teacher, data, args.batch, device, amp, args.channels_last))

    def median(m: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[m][1:])

    seconds = {m: median(m, "seconds") for m in MODES}
    rate = {m: args.epochs * args.samples / seconds[m] for m in MODES}
    steps_rate = {m: median(m, "steps_only_samples_per_s") for m in MODES}
    teacher_fwd = statistics.median(forward[1:])
    a = rate["ce"]
    b_bound = 1 / (1 / a + 1 / teacher_fwd)  # end-to-end throughput of (a) plus one teacher forward per sample
    summary = {
        "device": str(device), "precision": precision, "teacher": args.teacher, "student": args.student,
        "size": args.size, "batch": args.batch, "samples": args.samples, "epochs": args.epochs,
        "rounds_measured": max(2, args.rounds) - 1,
        "teacher_forward_samples_per_s": teacher_fwd,
        "a_ce_seconds": seconds["ce"],
        "b_teacher_every_step_seconds": seconds["teacher_every_step"],
        "c_cached_logits_seconds": seconds["cached_logits"],
        "a_ce_samples_per_s": a,
        "b_teacher_every_step_samples_per_s": rate["teacher_every_step"],
        "c_cached_logits_samples_per_s": rate["cached_logits"],
        "ratio_b_to_a": rate["teacher_every_step"] / a,
        "ratio_c_to_a": rate["cached_logits"] / a,
        "ratio_b_to_bound": rate["teacher_every_step"] / b_bound,
        "a_ce_steps_only_samples_per_s": steps_rate["ce"],
        "b_teacher_every_step_steps_only_samples_per_s": steps_rate["teacher_every_step"],
        "c_cached_logits_steps_only_samples_per_s": steps_rate["cached_logits"],
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.teacher} -> {args.student}, {args.size}x{args.size}, batch {args.batch}, {args.samples} samples, "
          f"{args.epochs} epochs per run, on {device} ({precision}); median of {summary['rounds_measured']} "
          "round(s) after a warm-up")
    print(f"{'mode':28s} {'end-to-end s':>13s} {'samples/s':>10s} {'ratio to (a)':>13s} {'steps-only samples/s':>21s}")
    for m, label in MODES.items():
        print(f"{label:28s} {seconds[m]:13.2f} {rate[m]:10,.1f} {rate[m] / a:13.3f} {steps_rate[m]:21,.1f}")
    print(f"{'teacher forward alone':28s} {'':13s} {teacher_fwd:10,.1f}")
    print("end-to-end: the whole training call for the N epochs, including (c)'s one-time teacher pass and "
          "each epoch's evaluation; samples/s and ratios come from it")
    print(f"goal (c)/(a) >= 0.95 over {args.epochs} epochs: {'met' if summary['ratio_c_to_a'] >= 0.95 else 'NOT met'}; "
          f"goal (b) >= 1/(1/a + 1/teacher): {'met' if summary['ratio_b_to_bound'] >= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
