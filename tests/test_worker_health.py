"""`kdistill worker-health`, compose's health check: every worker process of this host beat recently."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KDISTILL_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "app.cli", "worker-health"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_healthy_only_while_every_worker_of_this_host_beats(tmp_path):
    folder = tmp_path / "workers"
    assert check(tmp_path).returncode == 1  # nothing started yet
    host = socket.gethostname()
    folder.mkdir()
    for name in ("gpu0", "gpu1"):
        (folder / f"{name}@{host}.alive").touch()
    (folder / "gpu0@another-container.alive").touch()  # an old container's: not ours
    past = time.time() - 3600
    os.utime(folder / "gpu0@another-container.alive", (past, past))
    ok = check(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    said = ok.stdout + ok.stderr
    assert f"gpu0@{host}" in said and "another-container" not in said
    os.utime(folder / f"gpu1@{host}.alive", (past, past))  # one process stopped beating
    bad = check(tmp_path)
    assert bad.returncode == 1 and "too old" in bad.stdout + bad.stderr
