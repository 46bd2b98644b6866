"""What the sandbox says about this host, and what it does where Landlock is missing (made real with a
seccomp filter that answers the Landlock system calls with ENOSYS)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sandbox_support import Plain, inspect_command, last_json, scripted, without_landlock

from worker import landlock, seccomp
from worker.sandbox import Config, inspect_policy, job_policy, probe

linux = pytest.mark.skipif(platform.system() != "Linux", reason="Landlock and seccomp are Linux's")


@linux
def test_probe_reports_what_the_kernel_offers():
    p = probe()
    assert p["landlock_abi"] == landlock.abi_version()
    assert p["landlock"] == (p["landlock_abi"] >= 1) == p["torchscript_contained"]
    assert p["seccomp"] == seccomp.available()
    if platform.machine() in ("x86_64", "aarch64"):
        assert p["seccomp"] and p["seccomp_arch"] == platform.machine()
    # a root worker either runs children as the separate uid, or says why not and bounds them otherwise
    assert p["separate_uid"] or p["uid_note"]
    assert p["processes"] in ("rlimit", "no new processes (seccomp)")


@linux
def test_probe_and_doctor_without_landlock():
    code = "import json; from worker.sandbox import probe; print(json.dumps(probe()))"
    p = json.loads(subprocess.run(without_landlock([sys.executable, "-c", code]), capture_output=True, text=True,
                                  check=True).stdout)
    assert p["landlock_abi"] == 0 and not p["landlock"] and not p["torchscript_contained"]

    kdistill = shutil.which("kdistill") or pytest.skip("the kdistill command is not installed")
    here = subprocess.run([kdistill, "doctor"], capture_output=True, text=True, timeout=60)
    assert here.returncode == (0 if probe()["landlock"] else 1), here.stdout + here.stderr
    assert "Landlock" in here.stdout + here.stderr
    there = subprocess.run(without_landlock([kdistill, "doctor"]), capture_output=True, text=True, timeout=60)
    assert there.returncode == 1, there.stdout + there.stderr
    assert "cannot be contained" in there.stdout + there.stderr


@linux
def test_torchscript_is_refused_without_landlock_unless_allowed(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "ts.pt").write_bytes(scripted(Plain()))
    args = {"spec": {"path": str(upload / "ts.pt"), "input": {"channels": 1, "size": 8}}}

    def inspect(config: Config) -> dict:
        policy = inspect_policy(config, upload / "work", [upload / "ts.pt"], timeout=60)
        proc = subprocess.run(without_landlock(inspect_command("teacher", args, policy)), capture_output=True,
                              text=True, timeout=120, cwd=policy.write[0])
        return last_json(proc)

    refused = inspect(Config(protect=[str(tmp_path / "data")]))
    assert not refused["ok"] and refused["code"] == "torchscript_unsandboxed", refused
    assert "Landlock" in refused["message"]
    accepted = inspect(Config(protect=[str(tmp_path / "data")], allow_unconfined_torchscript=True))
    assert accepted["ok"] and accepted["format"] == "torchscript" and accepted["num_classes"] == 10


@linux
def test_a_torchscript_job_is_refused_without_landlock(tmp_path):
    (tmp_path / "ts.pt").write_bytes(scripted(Plain()))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 4)
    job = tmp_path / "job"
    job.mkdir()
    (job / "spec.json").write_text(json.dumps({
        "teacher": {"path": str(tmp_path / "ts.pt"), "input": {"channels": 1, "size": 8}},
        "student": {"arch": "resnet8"}, "data": {"path": str(tmp_path / "d.npz")},
        "hyperparameters": {"epochs": 1, "device": "cpu"}, "output_dir": str(job / "out")}))
    policy = job_policy(Config(), job, [tmp_path / "ts.pt", tmp_path / "d.npz"], "cpu")
    command = [sys.executable, "-P", "-m", "worker.run", str(job / "spec.json"), "--sandbox", policy.to_json()]
    proc = subprocess.run(without_landlock(command), capture_output=True, text=True, timeout=120, cwd=job)
    error = last_json(proc)
    assert proc.returncode == 2 and error["type"] == "error" and error["code"] == "torchscript_unsandboxed", error
    assert not (job / "out").exists()
