"""Running the real service in tests: the `kdistill` command as a subprocess and a `kdistill serve` server
(API + a local Celery worker on SQLite and the filesystem broker) with its data dir and log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.client import Client, KdistillError

KDISTILL = str(Path(sys.executable).with_name("kdistill"))
ARCH_ARGS = ["--arch", "resnet20", "--num-classes", "10", "--input-channels", "1", "--input-size", "8",
             "--mean", "0.3", "--std", "0.37"]


def _env(**extra: str) -> dict[str, str]:
    """This environment without any KDISTILL_* setting of the developer's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def kdistill(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KDISTILL, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kdistill {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Server:
    """A `kdistill serve` subprocess with its data dir and log."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path

    @classmethod
    def start(cls, tmp: Path, *args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> Server:
        port = free_port()
        data_dir = data_dir or tmp / "data"
        log = tmp / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([KDISTILL, "serve", "--port", str(port), "--data-dir", str(data_dir), *args],
                                    cwd=tmp, env=env or _env(), stdout=out, stderr=subprocess.STDOUT)
        server = cls(proc, f"http://127.0.0.1:{port}", data_dir, log)
        server.wait_ready()
        return server

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.output()}"
                try:
                    if client.readyz()["status"] == "ready":
                        return
                except KdistillError:
                    pass
                time.sleep(0.3)
        raise AssertionError(f"serve not ready after {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> float:
        """Signal serve; return the seconds until it and every process naming its data dir were gone."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"serve still running {timeout} s after signal {sig}:\n{self.output()}") from None
        while pids_matching(str(self.data_dir)) and time.monotonic() - started < timeout:
            time.sleep(0.2)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("example")
    result = kdistill("example", str(tmp / "ex"), cwd=tmp)
    (tmp / "stdout.txt").write_text(result.stdout)
    yield tmp / "ex"


def upload_example(url: str, example_dir: Path) -> tuple[str, str]:
    """The `kdistill example` teacher and digits dataset uploaded to the server at `url`: (teacher id, dataset id)."""
    with Client(url) as kd:
        teacher = kd.upload_teacher(example_dir / "teacher.safetensors", arch="resnet20", num_classes=10,
                                    input_channels=1, input_size=8, mean=[0.3], std=[0.37])
        dataset = kd.upload_dataset(example_dir / "digits.npz")
    return teacher["id"], dataset["id"]
