"""`kdistill example DIR`: a small, real teacher and dataset to try the service with, made in seconds.

Everything comes from scikit-learn's digits (1,797 8x8 grey images of 0-9, shipped inside its wheel):
the same split as the tests (70 % train, 30 % held out, stratified, seed 0), then

- `teacher.safetensors`: a resnet20 (in_channels=1, 10 classes) trained on the labels of the training
  split minus the validation images, by the engine's own training loop;
- `digits.npz`, the dataset for distillation, deliberately short of labels: `x`/`y` hold 20 labelled
  images per class (200), `x_val`/`y_val` 30 per class (300) for model selection, `x_unlabeled` the ~750
  other training images without labels (the transfer set: the teacher labels them, softly), and
  `x_test`/`y_test` the 540 held-out images, which a job only scores;
- `digits_test.npz` (`x`, `y`): the same 540 held-out images, to check a downloaded student;
- `job.yaml` for `kdistill run` (the README shows it verbatim; tests/test_example.py checks that) and
  `README.txt` with the commands.

Images are uint8 [N, 8, 8] (grey); the model input is x / 255 normalised with mean 0.3, std 0.37.

The teacher trains on one CPU thread: for a model this small a second thread gains little on an idle machine,
and on a busy one (two cores shared with other work) two spinning threads made the same training ~7x slower.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEACHER_ARCH = "resnet20"
STUDENT_ARCH = "resnet8"
NUM_CLASSES = 10
INPUT_CHANNELS, INPUT_SIZE = 1, 8
MEAN, STD = 0.3, 0.37
LABELS_PER_CLASS, VAL_PER_CLASS = 20, 30
STUDENT_EPOCHS = 20  # in job.yaml and the printed commands
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]  # the digits' classes, as the .npz names them


@dataclass(frozen=True)
class ExampleFiles:
    dir: Path
    teacher: Path
    dataset: Path
    test: Path
    job: Path
    readme: Path
    teacher_test_accuracy: float
    seconds: float


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8] images and int64 labels: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = np.clip(np.round(x.reshape(-1, 8, 8) * 255 / 16), 0, 255).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, y, test_size=0.3, stratify=y, random_state=0)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def write_example(dest: Path, *, epochs: int = 20, seed: int = 0,
                  log: Callable[[str], None] = lambda _msg: None) -> ExampleFiles:
    """Write the example files into `dest` (created if missing) and return their paths."""
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        return _write_example(dest, epochs=epochs, seed=seed, log=log, started=started)
    finally:
        torch.set_num_threads(threads)


def _write_example(dest: Path, *, epochs: int, seed: int, log: Callable[[str], None], started: float) -> ExampleFiles:
    import torch
    from safetensors.torch import save_file

    from worker.distill.data import ImageSet
    from worker.distill.spec import Hyperparameters, InputSpec
    from worker.distill.students import create_model
    from worker.distill.trainer import TrainSetup, predict, train

    dest.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = digits_split()

    rng = np.random.default_rng(seed)
    labelled, val = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y_tr == c))
        labelled.extend(idx[:LABELS_PER_CLASS])
        val.extend(idx[LABELS_PER_CLASS:LABELS_PER_CLASS + VAL_PER_CLASS])
    labelled_idx, val_idx = np.sort(labelled), np.sort(val)
    rest = np.setdiff1d(np.arange(len(y_tr)), np.concatenate([labelled_idx, val_idx]))
    dataset = dest / "digits.npz"
    # The held-out images go in as the test split too: the job reports its score on them, never on the
    # validation images that picked its epoch.
    np.savez(dataset, x=x_tr[labelled_idx], y=y_tr[labelled_idx], x_val=x_tr[val_idx], y_val=y_tr[val_idx],
             x_unlabeled=x_tr[rest], x_test=x_te, y_test=y_te)
    test = dest / "digits_test.npz"
    np.savez(test, x=x_te, y=y_te)
    log(f"wrote {dataset.name}: {len(labelled_idx)} labelled, {len(val_idx)} validation, {len(rest)} unlabeled "
        f"and {len(y_te)} test images; {test.name}: the same {len(y_te)} held-out images")

    # The teacher: trained on every training label except the validation images', selected on those.
    spec = InputSpec(channels=INPUT_CHANNELS, size=INPUT_SIZE, mean=[MEAN], std=[STD])
    train_idx = np.setdiff1d(np.arange(len(y_tr)), val_idx)
    torch.manual_seed(seed)
    model = create_model(TEACHER_ARCH, num_classes=NUM_CLASSES, in_channels=INPUT_CHANNELS)
    cpu = torch.device("cpu")
    hp = Hyperparameters(epochs=epochs, batch_size=64, learning_rate=0.05, optimizer="sgd", scheduler="cosine",
                         weight_decay=5e-4, seed=seed, device="cpu")
    log(f"training the teacher ({TEACHER_ARCH}, {epochs} epochs on {len(train_idx)} labelled images, CPU)...")
    train(TrainSetup(student=model, student_input=spec,
                     train=ImageSet(torch.from_numpy(x_tr[train_idx])[:, None], torch.from_numpy(y_tr[train_idx])),
                     val=ImageSet(torch.from_numpy(x_tr[val_idx])[:, None], torch.from_numpy(y_tr[val_idx])),
                     classes=[str(i) for i in range(NUM_CLASSES)], teacher=None, device=cpu, run="teacher"), hp)
    logits = predict(model, torch.from_numpy(x_te)[:, None], spec, cpu)
    accuracy = float((logits.argmax(1).numpy() == y_te).mean())
    teacher = dest / "teacher.safetensors"
    # The names of its outputs travel inside the file, so jobs match them to a dataset's classes by name.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(teacher),
              metadata={"classes": json.dumps(CLASS_NAMES)})
    log(f"wrote {teacher.name}: held-out accuracy {accuracy:.4f}")

    job = dest / "job.yaml"
    job.write_text(job_yaml(teacher.name, dataset.name))
    readme = dest / "README.txt"
    readme.write_text(README.format(commands=commands(dest), accuracy=accuracy, labelled=len(labelled_idx),
                                    val=len(val_idx), unlabeled=len(rest), test=len(y_te), teacher_arch=TEACHER_ARCH,
                                    student=STUDENT_ARCH, epochs=STUDENT_EPOCHS))
    return ExampleFiles(dir=dest, teacher=teacher, dataset=dataset, test=test, job=job, readme=readme,
                        teacher_test_accuracy=accuracy, seconds=time.monotonic() - started)


def commands(dest: Path, url: str = "http://127.0.0.1:8000") -> str:
    """The shell commands that use the example with a running `kdistill serve`."""
    d = dest.resolve()
    body = json.dumps({"teacher_id": "TEACHER_ID", "dataset_id": "DATASET_ID", "student": {"arch": STUDENT_ARCH},
                       "hyperparameters": {"epochs": STUDENT_EPOCHS, "batch_size": 64},
                       "export_formats": ["onnx", "torchscript"]})
    return f"""\
# 1. start the service (another terminal):
kdistill serve

# 2a. with the kdistill command line:
kdistill submit --teacher {d}/teacher.safetensors --arch {TEACHER_ARCH} --num-classes {NUM_CLASSES} \\
    --input-channels {INPUT_CHANNELS} --input-size {INPUT_SIZE} --mean {MEAN} --std {STD} \\
    --dataset {d}/digits.npz --student {STUDENT_ARCH} --epochs {STUDENT_EPOCHS} --batch-size 64 \\
    --export onnx,torchscript --wait
kdistill download JOB_ID --dest {d}/out

# 2b. or with curl (add -H "Authorization: Bearer $KDISTILL_API_KEY" where the server requires keys):
curl -F file=@{d}/teacher.safetensors -F arch={TEACHER_ARCH} -F num_classes={NUM_CLASSES} \\
    -F input_channels={INPUT_CHANNELS} -F input_size={INPUT_SIZE} -F mean={MEAN} -F std={STD} {url}/v1/teachers
curl -F file=@{d}/digits.npz {url}/v1/datasets
curl -H 'Content-Type: application/json' -d '{body}' {url}/v1/jobs
curl {url}/v1/jobs/JOB_ID
curl -o student.onnx {url}/v1/jobs/JOB_ID/artifacts/student.onnx

# 3. or without any server, in this process:
kdistill run {d}/job.yaml
"""


def job_yaml(teacher: str = "teacher.safetensors", dataset: str = "digits.npz") -> str:
    """The text of the example's job.yaml (README.md shows it as is)."""
    spec = f"{{channels: {INPUT_CHANNELS}, size: {INPUT_SIZE}, mean: [{MEAN}], std: [{STD}]}}"
    return JOB_YAML.format(teacher=teacher, dataset=dataset, arch=TEACHER_ARCH, input=spec, student=STUDENT_ARCH,
                           epochs=STUDENT_EPOCHS)


JOB_YAML = """\
# kdistill run job.yaml: distil the example teacher into a {student} here, without the service.
# Relative paths are taken from this file's folder.
teacher: {{path: {teacher}, arch: {arch}, input: {input}}}
student: {{arch: {student}}}
data: {{path: {dataset}, augment: false}}
hyperparameters: {{epochs: {epochs}, batch_size: 64, learning_rate: 0.05, temperature: 4.0, alpha: 0.9}}
export_formats: [onnx, torchscript]
baseline: true          # also train the student on labels alone and report the gain
output_dir: student
"""

README = """\
kdistill example: scikit-learn's digits (8x8 grey images of 0-9)

teacher.safetensors  a {teacher_arch} state dict (10 classes, 1 input channel, 8x8 input, mean 0.3, std 0.37),
                     held-out accuracy {accuracy:.4f}; the names of its outputs are in its metadata
digits.npz           the distillation dataset, short of labels on purpose:
                       x, y                 {labelled} labelled images (20 per class)
                       x_val, y_val         {val} labelled validation images (model selection)
                       x_unlabeled          {unlabeled} images without labels (the teacher labels them)
                       x_test, y_test       {test} held-out images: the reported scores come from them
digits_test.npz      x, y: the same {test} held-out images, to check a downloaded student
job.yaml             the same job for `kdistill run` (no server)

Images are uint8 [N, 8, 8]; a model's input is x / 255, normalised with mean 0.3 and std 0.37, shape
[N, 1, 8, 8]. The {student} student usually ends near the teacher's accuracy with {epochs} epochs.

{commands}"""
