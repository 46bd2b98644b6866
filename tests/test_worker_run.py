"""`python -m worker.run` and `kdistill run` as a supervising process and a person would use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from digits_data import few_label_npz, teacher_input_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def job(tmp_path: Path, digits, digits_teacher, **hyper) -> dict:
    data = few_label_npz(tmp_path / "data.npz", digits, labels_per_class=10, val_per_class=5)
    return {
        "teacher": {"path": str(digits_teacher.path), "arch": digits_teacher.arch, "input": teacher_input_spec()},
        "student": {"arch": "resnet8"},
        "data": {"path": str(data)},
        "hyperparameters": {"epochs": 3, "batch_size": 64, "device": "cpu", **hyper},
        "export_formats": ["onnx", "torchscript"],
        "output_dir": str(tmp_path / "out"),
        "progress_interval": 0.0,
    }


def lines_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_json_lines_from_start_to_result(tmp_path, digits, digits_teacher):
    (tmp_path / "job.json").write_text(json.dumps(job(tmp_path, digits, digits_teacher)))
    proc = subprocess.run([sys.executable, "-m", "worker.run", str(tmp_path / "job.json")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = lines_of(proc.stdout)  # every stdout line is JSON
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result"
    assert [e["phase"] for e in events if e["type"] == "phase"][:2] == ["loading", "training"]
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2, 3]
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and progress[-1]["fraction"] == pytest.approx(1.0)
    assert {"epoch", "step", "total_steps", "samples_per_s", "eta_seconds", "loss_distill"} <= set(progress[0])
    result = events[-1]
    assert {a["name"] for a in result["artifacts"]} >= {"student.onnx", "student.torchscript.pt", "metadata.json"}
    assert result["metrics"]["student_accuracy"] > 0.5
    for a in result["artifacts"]:
        assert (tmp_path / "out" / a["name"]).stat().st_size == a["size_bytes"]


def test_bad_input_exits_2_with_a_json_error_line(tmp_path, digits, digits_teacher):
    spec = job(tmp_path, digits, digits_teacher, temperature=-1)
    (tmp_path / "job.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "worker.run", str(tmp_path / "job.json")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error = lines_of(proc.stdout)[-1]
    assert error["type"] == "error" and error["code"] == "invalid_hyperparameter"
    assert error["field"] == "hyperparameters.temperature"

    spec = job(tmp_path, digits, digits_teacher)
    spec["student"]["arch"] = "resnet9000"
    proc = subprocess.run([sys.executable, "-m", "worker.run", "-"], cwd=REPO, env=ENV, input=json.dumps(spec),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error = lines_of(proc.stdout)[-1]
    assert error["code"] == "unknown_architecture" and "resnet" in error["message"]


def test_cancel_file_stops_the_run_and_a_rerun_resumes_from_its_checkpoint(tmp_path, digits, digits_teacher):
    spec = job(tmp_path, digits, digits_teacher, epochs=6, batch_size=16)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    cancel = tmp_path / "cancel"
    cmd = [sys.executable, "-m", "worker.run", str(tmp_path / "job.yaml"), "--cancel-file", str(cancel),
           "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["type"] == "epoch" and seen[-1]["epoch"] == 2:
            cancel.touch()
    proc.wait(timeout=120)
    assert proc.returncode == 3, proc.stderr.read()[-2000:] if proc.stderr else ""
    assert seen[-1]["type"] == "error" and seen[-1]["code"] == "cancelled"
    assert (tmp_path / "ckpt" / "student.ckpt").exists()

    cancel.unlink()
    t0 = time.monotonic()
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    events = lines_of(again.stdout)
    resumed = [e for e in events if e["type"] == "event" and e["kind"] == "resumed"]
    assert resumed and resumed[0]["data"]["epoch"] >= 2
    replayed = [e["epoch"] for e in events if e["type"] == "epoch" and e["replayed"]]
    assert replayed == list(range(1, resumed[0]["data"]["epoch"] + 1))  # the checkpoint's epochs, sent again
    assert next(e["epoch"] for e in events if e["type"] == "epoch" and not e["replayed"]) == \
        resumed[0]["data"]["epoch"] + 1
    assert events[-1]["metrics"]["resumed_from_epoch"] == resumed[0]["data"]["epoch"]
    assert time.monotonic() - t0 < 600


def test_kdistill_run_cli_writes_the_artifacts(tmp_path, digits, digits_teacher):
    spec = job(tmp_path, digits, digits_teacher, epochs=2)
    spec["export_formats"] = ["onnx"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    kdistill = Path(sys.executable).with_name("kdistill")
    proc = subprocess.run([str(kdistill), "run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "cli-out")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cli-out" / "student.onnx").stat().st_size > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["student_accuracy"] > 0.3

    spec["hyperparameters"]["alpha"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    bad = subprocess.run([str(kdistill), "run", str(tmp_path / "bad.yaml")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "invalid_hyperparameter" in bad.stderr and "alpha" in bad.stderr


def test_a_retrained_teacher_never_resumes_the_old_students_checkpoint_and_fresh_starts_over(
        tmp_path, digits, digits_teacher):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(digits_teacher.path.read_bytes())
    spec = job(tmp_path, digits, digits_teacher, epochs=2)
    spec["teacher"]["path"] = str(teacher)
    spec["export_formats"] = ["onnx"]
    (tmp_path / "job.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "worker.run", str(tmp_path / "job.json")]
    first = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "student.ckpt").exists()

    # "Retrain" the teacher: same path, same architecture, other weights.
    from safetensors.torch import load_file, save_file

    state = load_file(str(teacher))
    save_file({k: (v * 1.01 if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(teacher))
    stale = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert stale.returncode == 2
    error = lines_of(stale.stdout)[-1]
    assert error["code"] == "checkpoint_mismatch" and "--fresh" in error["message"]
    assert "the teacher" in error["message"] and str(tmp_path) not in error["message"]

    fresh = subprocess.run([*cmd, "--fresh"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    events = lines_of(fresh.stdout)
    assert not [e for e in events if e["type"] == "event" and e["kind"] == "resumed"]
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2]
    assert events[-1]["metrics"]["resumed_from_epoch"] == 0

    # Unchanged inputs resume, and say so plainly.
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    resumed = [e for e in lines_of(again.stdout) if e["type"] == "event" and e["kind"] == "resumed"]
    assert resumed and "--fresh" in resumed[0]["message"] and "epoch 2/2" in resumed[0]["message"]
