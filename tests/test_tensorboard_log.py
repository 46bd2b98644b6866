"""Every job's TensorBoard event files (`tensorboard.tar.gz`), read back with TensorBoard's own reader: one run per
folder (student, baseline, teacher) with the epoch history as scalars, and the hparams in the student run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from digits_data import few_label_npz, teacher_input_spec
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from app.settings import Settings
from worker import landlock
from worker.distill.errors import Cancelled
from worker.distill.export import sha256_file
from worker.distill.progress import Callbacks, EpochMetrics
from worker.distill.runner import run_job
from worker.distill.spec import DataSpec, Hyperparameters, InputSpec, JobSpec, StudentSpec, TeacherSpec
from worker.distill.tensorboard_log import epoch_scalars, teacher_scalars, write_tensorboard
from worker.sandbox import Config, child_env, job_policy

REPO = Path(__file__).resolve().parents[1]
IN_SANDBOX = """
import sys
from pathlib import Path
from worker.sandbox import enter_from_argv
enter_from_argv(sys.argv[1])
from worker.distill.progress import EpochMetrics
from worker.distill.tensorboard_log import write_tensorboard
m = EpochMetrics(run="student", epoch=1, epochs=1, train_loss=1.0, train_loss_distill=0.5, train_loss_label=0.5,
                 student_accuracy=0.5, student_top5=0.9, teacher_accuracy=0.9, teacher_top5=1.0, agreement=0.5,
                 learning_rate=0.1, seconds=1.0, samples_per_s=10.0)
print(write_tensorboard(Path(sys.argv[2]), [m], {"epochs": 1}, {"student_accuracy": 0.5}).name)
"""


def unpack(archive: Path, to: Path) -> dict[str, EventAccumulator]:
    """The archive's runs by folder name, each loaded by TensorBoard's EventAccumulator."""
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert names and all(not n.startswith("/") and ".." not in Path(n).parts for n in names), names
        tar.extractall(to, filter="data")
    runs = {}
    for folder in sorted(p for p in to.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        runs[folder.name] = acc
    return runs


def scalars(acc: EventAccumulator) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected(history: list[EpochMetrics], run: str) -> dict[str, dict[int, float]]:
    """What the history says each tag of `run` holds, by epoch."""
    of_run = [m for m in history if m.run == ("student" if run == "teacher" else run)]
    out: dict[str, dict[int, float]] = {}
    for m in of_run:
        for tag, value in (teacher_scalars(m) if run == "teacher" else epoch_scalars(m)).items():
            out.setdefault(tag, {})[m.epoch] = value
    return out


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert {t for t in got if not t.startswith("final/")} == set(want)
    for tag, by_epoch in want.items():
        assert set(got[tag]) == set(by_epoch), tag
        for epoch, value in by_epoch.items():  # event files keep float32
            assert got[tag][epoch] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, epoch)


def hparams_of(acc: EventAccumulator) -> tuple[dict[str, object], set[str]]:
    """The run's hparams session (name -> value) and the metric tags its experiment declares."""
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, {m.name.tag for m in experiment.metric_infos}


def epoch(run: str, n: int, **kw: object) -> EpochMetrics:
    base = dict(run=run, epoch=n, epochs=3, train_loss=2.0 / n, train_loss_distill=1.5 / n, train_loss_label=0.5 / n,
                student_accuracy=0.3 + 0.1 * n, student_top5=0.8 + 0.01 * n, teacher_accuracy=0.97,
                teacher_top5=0.999, agreement=0.4 + 0.1 * n, learning_rate=0.05 / n, seconds=2.0,
                samples_per_s=1000.0 + n)
    return EpochMetrics(**{**base, **kw})


def test_hand_made_history_becomes_three_runs_with_shared_tags_and_hparams(tmp_path):
    history = [epoch("student", n, train_loss_feature=0.1 * n) for n in (1, 2, 3)]
    history += [epoch("baseline", n, train_loss_distill=0.0, student_accuracy=0.2 + 0.1 * n) for n in (3, 1, 2)]
    final = {"student_accuracy": 0.61, "teacher_accuracy": 0.97, "baseline_accuracy": 0.5, "gain": 0.11,
             "agreement": 0.7}
    hparams = {"learning_rate": 0.05, "epochs": 3, "optimizer": "sgd", "nesterov": False, "grad_clip": None,
               "class_weights": [1.0, 2.0], "student_arch": "resnet8"}
    art = write_tensorboard(tmp_path, history, hparams, final, started=1_000_000.0)

    assert art.name == "tensorboard.tar.gz" and art.format == "tensorboard"
    assert art.size_bytes == art.path.stat().st_size and art.sha256 == sha256_file(art.path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left behind
    runs = unpack(art.path, tmp_path / "unpacked")
    assert set(runs) == {"student", "baseline", "teacher"}
    for run, acc in runs.items():
        assert_same(scalars(acc), expected(history, run))
    assert "loss/feature" in scalars(runs["student"]) and "loss/feature" not in scalars(runs["baseline"])
    assert scalars(runs["teacher"])["accuracy/val"] == {1: pytest.approx(0.97), 2: pytest.approx(0.97),
                                                         3: pytest.approx(0.97)}
    # wall time: the student's epochs one after another, then the baseline's
    walls = {e.step: e.wall_time for e in runs["student"].Scalars("accuracy/val")}
    assert walls == {1: 1_000_002.0, 2: 1_000_004.0, 3: 1_000_006.0}
    assert runs["baseline"].Scalars("accuracy/val")[0].wall_time == 1_000_008.0

    values, metric_tags = hparams_of(runs["student"])
    assert values == {"learning_rate": 0.05, "epochs": 3.0, "optimizer": "sgd", "nesterov": False,
                      "student_arch": "resnet8"}  # lists and empty values are left out
    assert metric_tags == {"final/student_accuracy", "final/teacher_accuracy", "final/baseline_accuracy",
                           "final/gain"}
    final_scalars = {t: v for t, v in scalars(runs["student"]).items() if t.startswith("final/")}
    assert final_scalars == {f"final/{k}": {3: pytest.approx(final[k])} for k in
                             ("student_accuracy", "teacher_accuracy", "baseline_accuracy", "gain")}
    for run in ("baseline", "teacher"):  # one hparams session per job: the student run
        with pytest.raises(KeyError):
            runs[run].PluginTagToContent(hparams_metadata.PLUGIN_NAME)


def test_without_baseline_there_is_no_baseline_run(tmp_path):
    art = write_tensorboard(tmp_path, [epoch("student", 1)], {"epochs": 1}, {"student_accuracy": 0.4})
    runs = unpack(art.path, tmp_path / "unpacked")
    assert set(runs) == {"student", "teacher"}
    assert hparams_of(runs["student"])[1] == {"final/student_accuracy"}


@pytest.mark.skipif(sys.platform != "linux" or landlock.abi_version() < 1, reason="needs Landlock")
def test_the_event_files_are_written_inside_the_job_sandbox(tmp_path):
    # The training child may write its job folder only, and gets no sockets: tensorboardX's SummaryWriter
    # (a multiprocessing queue, whose semaphore lives in /dev/shm) fails there with EACCES.
    job_dir = tmp_path / "job"
    (job_dir / "out").mkdir(parents=True)
    policy = job_policy(Config.from_settings(Settings(data_dir=tmp_path / "data")), job_dir, [], "cpu")
    proc = subprocess.run([sys.executable, "-P", "-c", IN_SANDBOX, policy.to_json(), str(job_dir / "out")],
                          cwd=job_dir, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "tensorboard.tar.gz", proc.stderr[-3000:]
    runs = unpack(job_dir / "out" / "tensorboard.tar.gz", tmp_path / "unpacked")
    assert scalars(runs["student"])["accuracy/val"] == {1: pytest.approx(0.5)}


@pytest.mark.slow
def test_a_resumed_job_publishes_its_whole_history_as_event_files(tmp_path, digits, digits_teacher):
    data = few_label_npz(tmp_path / "few.npz", digits, labels_per_class=10, val_per_class=5)
    spec = JobSpec(
        teacher=TeacherSpec(path=str(digits_teacher.path), arch=digits_teacher.arch,
                            input=InputSpec(**teacher_input_spec())),
        student=StudentSpec(arch="resnet8"), data=DataSpec(path=str(data)),
        hyperparameters=Hyperparameters(epochs=2, batch_size=64, learning_rate=0.05, seed=1, device="cpu"),
        export_formats=["onnx"], baseline=True, output_dir=str(tmp_path / "out"), progress_interval=0.0)
    # The first attempt stops after the student's first epoch; the second resumes from its checkpoint.
    seen: list[EpochMetrics] = []
    with pytest.raises(Cancelled):
        run_job(spec, Callbacks(on_epoch=seen.append, cancelled=lambda: len(seen) >= 1))
    result = run_job(spec)
    assert result.metrics["resumed_from_epoch"] == 1
    assert [(m.run, m.epoch) for m in result.history] == [("student", 1), ("student", 2), ("baseline", 1),
                                                           ("baseline", 2)]

    art = next(f for f in result.files if f.format == "tensorboard")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert {"name": art.name, "format": "tensorboard", "size_bytes": art.size_bytes, "sha256": art.sha256,
            "max_abs_diff": None} in meta["files"]
    assert sha256_file(tmp_path / "out" / "tensorboard.tar.gz") == art.sha256
    runs = unpack(art.path, tmp_path / "unpacked")
    assert set(runs) == {"student", "baseline", "teacher"}
    for run, acc in runs.items():
        assert_same(scalars(acc), expected(result.history, run))
    values, metric_tags = hparams_of(runs["student"])
    assert values["epochs"] == 2 and values["learning_rate"] == 0.05 and values["student_arch"] == "resnet8"
    assert values["baseline"] is True and values["distillation"] == "soft" and values["teacher_format"]
    assert metric_tags == {"final/student_accuracy", "final/teacher_accuracy", "final/baseline_accuracy",
                           "final/gain"}
    final = scalars(runs["student"])
    assert final["final/student_accuracy"] == {2: pytest.approx(result.metrics["student_accuracy"])}
    assert final["final/gain"] == {2: pytest.approx(result.metrics["gain"], abs=1e-7)}
