"""`python -m worker.with_parent`: a launched program dies with the process that launched it."""

from __future__ import annotations

import subprocess
import sys
import time


def test_the_launched_program_dies_with_its_parent(tmp_path):
    # A middle process starts `sleep` through the launcher, prints its pid, then is killed.
    middle = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'worker.with_parent', str(os.getpid()), 'sleep', '60'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert middle.stdout is not None
    child = int(middle.stdout.readline())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b"sleep" not in _cmdline(child):
        time.sleep(0.05)
    assert b"sleep" in _cmdline(child)  # exec'd in place: the same pid runs the program
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the launched program outlived its parent"


def test_bad_arguments_exit_2():
    proc = subprocess.run([sys.executable, "-m", "worker.with_parent", "sleep", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
