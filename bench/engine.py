"""Engine throughput: plain cross-entropy vs distillation (teacher every step) vs cached teacher logits.

All three modes train the same student on the same synthetic batches in one process through the real
training loop (`worker.distill.trainer.train`); figures are samples/s of the training steps (evaluation
excluded). The modes take turns one epoch at a time, so a busy machine slows all three alike; each figure
is the median over the rounds after the first (warm-up). Ratios are against plain cross-entropy (a).

    python bench/engine.py                       # CPU: resnet56 -> resnet20 at 32x32
    python bench/engine.py --device cuda --precision bf16 --channels-last \\
        --teacher resnet34 --student resnet18 --size 224 --batch 256 --samples 20480
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from worker.distill.data import ImageSet
from worker.distill.data.transforms import to_model_input
from worker.distill.progress import Callbacks, EpochMetrics
from worker.distill.spec import Hyperparameters, InputSpec
from worker.distill.students import create_model
from worker.distill.teachers import Teacher
from worker.distill.trainer import TrainSetup, resolve_device, resolve_precision, train


def synthetic(n: int, size: int, classes: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    labels=torch.randint(0, classes, (n,), generator=g))


def measure(mode: str, args: argparse.Namespace, data: ImageSet, val: ImageSet, teacher: Teacher) -> dict:
    hp = Hyperparameters(epochs=1, batch_size=args.batch, learning_rate=0.05, precision=args.precision,
                         channels_last=args.channels_last, device=args.device, seed=0)
    spec = InputSpec(channels=3, size=args.size)
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=args.classes)
    epochs: list[EpochMetrics] = []
    t0 = time.perf_counter()
    classes = [str(i) for i in range(args.classes)]
    train(TrainSetup(student=student, student_input=spec, train=data, val=val, classes=classes,
                     teacher=None if mode == "ce" else teacher, device=resolve_device(args.device),
                     cache_teacher_logits=mode == "cached_logits", progress_interval=1e9),
          hp, Callbacks(on_epoch=epochs.append))
    return {"mode": mode, "samples_per_s": epochs[0].samples_per_s, "wall_s": time.perf_counter() - t0}


def teacher_rate(teacher: Teacher, data: ImageSet, batch: int, device: torch.device, amp: torch.dtype | None,
                 channels_last: bool) -> float:
    """Samples/s of the teacher's forward pass alone (input preparation included, as in training)."""
    images = data.images.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for i in range(0, len(images), batch):
            x = to_model_input(images[i:i + batch], teacher.input)
            teacher.logits(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    sync()
    return len(images) / (time.perf_counter() - t0)


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
    p.add_argument("--rounds", type=int, default=4, help="epochs per mode, taken in turns; the first is warm-up")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = synthetic(args.samples, args.size, args.classes, seed=1)
    val = synthetic(min(512, args.samples // 4), args.size, args.classes, seed=2)
    tmodel = create_model(args.teacher, num_classes=args.classes).to(device).eval()
    if args.channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
    teacher = Teacher("state_dict", args.teacher, args.classes, InputSpec(channels=3, size=args.size), tmodel,
                      module=tmodel)

    amp = resolve_precision(args.precision, device)
    modes = ("ce", "teacher_every_step", "cached_logits")
    rates: dict[str, list[float]] = {m: [] for m in (*modes, "teacher_forward")}
    for _ in range(max(2, args.rounds)):
        for m in modes:
            rates[m].append(measure(m, args, data, val, teacher)["samples_per_s"])
        # the teacher's own forward pass at the training batch size, to state goal (b)
        rates["teacher_forward"].append(teacher_rate(teacher, data, args.batch, device, amp, args.channels_last))
    results = {m: {"samples_per_s": statistics.median(r[1:])} for m, r in rates.items()}
    teacher_fwd = results["teacher_forward"]["samples_per_s"]
    a = results["ce"]["samples_per_s"]
    b_bound = 1 / (1 / a + 1 / teacher_fwd)  # throughput of (a) plus one teacher forward per sample
    summary = {
        "device": str(device), "precision": str(amp), "teacher": args.teacher, "student": args.student,
        "size": args.size, "batch": args.batch, "samples": args.samples,
        "teacher_forward_samples_per_s": teacher_fwd,
        "a_ce_samples_per_s": a,
        "b_teacher_every_step_samples_per_s": results["teacher_every_step"]["samples_per_s"],
        "c_cached_logits_samples_per_s": results["cached_logits"]["samples_per_s"],
        "ratio_b_to_a": results["teacher_every_step"]["samples_per_s"] / a,
        "ratio_c_to_a": results["cached_logits"]["samples_per_s"] / a,
        "ratio_b_to_bound": results["teacher_every_step"]["samples_per_s"] / b_bound,
    }
    if args.json:
        print(json.dumps(summary))
        return
    for k, v in summary.items():
        print(f"{k:40s} {v:,.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    print(f"goal (c)/(a) >= 0.95: {'met' if summary['ratio_c_to_a'] >= 0.95 else 'NOT met'}; "
          f"goal (b) >= 1/(1/a + 1/teacher): {'met' if summary['ratio_b_to_bound'] >= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
