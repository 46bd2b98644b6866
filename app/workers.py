"""Celery worker processes as `kdistill worker` and `kdistill serve` run them: one per GPU (pinned with
CUDA_VISIBLE_DEVICES) or one on the CPU, each running one job at a time, restarted when it dies.

A worker process that died held its job's lease; whoever restarts it knows that for certain, so it expires
those leases at once (app.lifecycle.abandon) and the job resumes from its checkpoint without waiting
STALE_AFTER.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kdistill.workers")

RESTARTS = 3  # restarts allowed within RESTART_WINDOW seconds before giving up (a crash loop)
RESTART_WINDOW = 120.0
WARM_STOP = 10.0  # seconds for Celery's warm shutdown before SIGKILL (a running job does not end by itself)


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    queues: list[str]
    env: dict[str, str]

    @property
    def node(self) -> str:
        """The Celery node name, which the supervisor records as the job's `worker`."""
        return f"{self.name}@{socket.gethostname()}"


def visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_workers(gpus: str, queues: list[str] | None, name: str = "") -> list[WorkerPlan]:
    """`gpus`: "auto" (every visible GPU, else the CPU), "none", or a list such as "0,1". `name` prefixes
    the Celery node names, which must be unique among workers sharing a host name."""
    ids = visible_gpus() if gpus == "auto" else [] if gpus == "none" else [g for g in gpus.split(",") if g]
    prefix = f"{name}-" if name else ""
    if not ids:
        return [WorkerPlan(f"{prefix}cpu", queues or ["cpu"], {"CUDA_VISIBLE_DEVICES": ""})]
    return [WorkerPlan(f"{prefix}gpu{g}", queues or ["gpu"], {"CUDA_VISIBLE_DEVICES": g}) for g in ids]


def celery_command(node: str, queues: list[str], loglevel: str, pidfile: Path | None = None,
                   events: bool = True) -> list[str]:
    """The Celery worker command line. `events`: task events for Flower (not on the filesystem broker)."""
    # --pool=solo: the job runs in the worker's main thread, one at a time; the registry's heartbeat
    # thread keeps reporting health meanwhile (worker.registry), which `inspect ping` could not.
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo",
               "--concurrency=1", "-Q", ",".join(queues), "-n", node, f"--loglevel={loglevel.upper()}",
               "--without-gossip", "--without-mingle", "-E" if events else "--without-heartbeat"]
    return [*command, "--pidfile", str(pidfile)] if pidfile is not None else command


@dataclass
class WorkerProcess:
    """One Celery worker process: started so that it dies with us, watched, restarted and stopped."""

    node: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.starts.append(time.monotonic())
        # worker.with_parent arms PR_SET_PDEATHSIG in the child and execs Celery: no code runs between fork
        # and exec here, which a process with threads must not do. Its own session: a terminal's Ctrl-C
        # reaches only us, and we pass it on.
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.with_parent", str(os.getpid()), *self.command],
                                     env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("worker %s started (pid %d)", self.node, self.proc.pid)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def may_restart(self) -> bool:
        now = time.monotonic()
        return len([t for t in self.starts if now - t < RESTART_WINDOW]) <= RESTARTS

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, warm: float = WARM_STOP) -> None:
        """Warm shutdown; SIGKILL of its process group if a job still keeps it busy after `warm` seconds."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, warm), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            if sig == signal.SIGKILL and warm > 0:
                log.warning("worker %s is still busy after %.0f s; killing it. Its job resumes from its last "
                            "checkpoint", self.node, warm)
            self.signal(sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            except KeyboardInterrupt:  # a second Ctrl-C: stop now
                self.signal(signal.SIGKILL)
                proc.wait(timeout=5)
                break
        self.signal(signal.SIGKILL)  # anything it left in its process group (it should have left nothing)


def release_jobs_of(node: str) -> list[str]:
    """Expire the leases of a worker process that is gone, and send its jobs again; [] when the database
    cannot be reached (the sweep then finds them after STALE_AFTER)."""
    from app import lifecycle
    from app.db import session_scope
    from app.settings import get_settings

    settings = get_settings()
    try:
        with session_scope(settings.resolved_database_url) as s:
            ids = lifecycle.abandon(s, settings, node)
    except Exception:
        log.warning("could not release the jobs of worker %s; the sweep will", node, exc_info=True)
        return []
    if ids:
        log.info("worker %s was running %s; it resumes from its last checkpoint", node, ", ".join(ids))
    return ids


def run_workers(plans: list[WorkerPlan], loglevel: str = "INFO") -> int:
    """Start every planned worker, restart one that dies (unless it keeps dying), pass SIGINT/SIGTERM on
    (Celery's warm shutdown: a running job ends first), and return when all have stopped."""
    workers = [WorkerProcess(p.node, celery_command(p.node, p.queues, loglevel), {**os.environ, **p.env})
               for p in plans]
    stopping = False
    status = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.exited() is None:
                w.signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for w in workers:
        w.start()
    while any(w.exited() is None for w in workers) or not stopping:
        for w in workers:
            code = w.exited()
            if code is None or stopping:
                continue
            if not w.may_restart():
                log.error("worker %s exited with status %s %d times in %.0f s; stopping", w.node, code,
                          RESTARTS + 1, RESTART_WINDOW)
                status = 1
                stop(signal.SIGTERM, None)
                break
            log.warning("worker %s exited with status %s; restarting it", w.node, code)
            release_jobs_of(w.node)
            w.start()
        time.sleep(0.5)
    return status or max(w.exited() or 0 for w in workers)
