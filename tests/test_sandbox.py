"""Children that open untrusted files get no credentials and die with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from worker.sandbox import child_env


def test_child_env_drops_credentials(monkeypatch):
    monkeypatch.setenv("KDISTILL_DATABASE_URL", "postgresql://u:secret@db/k")
    monkeypatch.setenv("KDISTILL_S3_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@db/k")
    env = child_env()
    assert "secret" not in json.dumps(env)
    assert env["PATH"] == os.environ["PATH"]


def test_a_child_dies_with_its_parent(tmp_path):
    # parent: starts a sleeping grandchild with die_with_parent, prints its pid, then is killed
    script = (
        "import subprocess, sys, time\n"
        "from worker.sandbox import die_with_parent\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=die_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
            # a dead child not yet reaped by init still answers; its state says so
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    raise AssertionError("the child outlived its killed parent")
