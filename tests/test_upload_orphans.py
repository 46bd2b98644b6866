"""Upload folders of a server killed mid-upload are removed at the next start; folders that a live
request holds, in this process or another, are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.api.uploads import UPLOAD_PREFIX, _hold, release_folder, remove_orphaned_uploads

HOLDER = """
import sys, time
from pathlib import Path
from app.api.uploads import _hold
_hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _folder(tmp: Path, name: str) -> Path:
    folder = tmp / f"{UPLOAD_PREFIX}{name}"
    folder.mkdir()
    (folder / "part.bin").write_bytes(b"x" * 1024)
    return folder


def test_only_folders_whose_holder_died_are_removed(tmp_path):
    mine = _folder(tmp_path, "mine")
    _hold(mine)  # a request of this process still uses it
    other = _folder(tmp_path, "other")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(other)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        killed = _folder(tmp_path, "killed")
        victim = subprocess.Popen([sys.executable, "-c", HOLDER, str(killed)], stdout=subprocess.PIPE, text=True)
        assert victim.stdout.readline().strip() == "held"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        fresh = _folder(tmp_path, "fresh")  # no lock file yet: being created right now
        old = _folder(tmp_path, "old")  # no lock file, and old: a server from before the lock files
        past = time.time() - 3600
        os.utime(old, (past, past))

        assert remove_orphaned_uploads(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in (mine, other, fresh))
    finally:
        holder.kill()
        holder.wait()
    release_folder(mine)
    assert not mine.exists()
    assert remove_orphaned_uploads(tmp_path) == 1  # the other process is gone now
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]
