"""Every real part at once: PostgreSQL, Redis, uvicorn serving the API, Celery worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from services import fresh_postgres, fresh_redis

from app.db import session_scope
from app.keys import create_key
from app.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
QUEUE = "e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    api_key: str
    data_dir: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120)

    def start_worker(self, name: str) -> subprocess.Popen:
        log = (self.data_dir / f"worker-{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo", "-Q", QUEUE,
             "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[name] = proc
        return proc

    def stop_worker(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.workers.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_job(self, job_id: str, until: Callable[[dict], bool], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if until(job):
                    return job
                time.sleep(0.3)
        raise AssertionError(f"job {job_id} never reached the expected state; last: {job}\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
                         for p in sorted(self.data_dir.glob("*.log")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("e2e")
    with fresh_postgres() as db_url, fresh_redis(db=12) as redis_url:
        upgrade(db_url)
        with session_scope(db_url) as s:
            key = create_key(s, "e2e-team", "tests")
        port = free_port()
        env = {**os.environ, "KDISTILL_DATABASE_URL": db_url, "KDISTILL_BROKER_URL": redis_url,
               "KDISTILL_DATA_DIR": str(data_dir), "KDISTILL_AUTH": "required", "KDISTILL_DEFAULT_QUEUE": QUEUE,
               "KDISTILL_HEARTBEAT_INTERVAL": "1", "KDISTILL_PROGRESS_INTERVAL": "0.5",
               # production's recovery path (the API's sweep, not the broker's redelivery) on a shorter clock;
               # tests/faults runs it on the shipped defaults
               "KDISTILL_STALE_AFTER": "6", "KDISTILL_SWEEP_INTERVAL": "2", "KDISTILL_CANCEL_GRACE": "10",
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        api_log = (data_dir / "api.log").open("ab")
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory",
                                "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
        st = Stack(env=env, url=f"http://127.0.0.1:{port}", api_key=key, data_dir=data_dir)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{st.url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and api.poll() is None, "API did not start\n" + st.logs()
                time.sleep(0.3)
            yield st
        finally:
            for name in list(st.workers):
                st.stop_worker(name, signal.SIGKILL)
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
