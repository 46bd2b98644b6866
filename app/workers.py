"""`kdistill worker`: one Celery worker process per GPU (pinned with CUDA_VISIBLE_DEVICES), or one on the
CPU, each running one job at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    queues: list[str]
    env: dict[str, str]


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


def celery_command(plan: WorkerPlan, loglevel: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo",
            "--concurrency=1", "-Q", ",".join(plan.queues), "-n", f"{plan.name}@%h", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", "-E"]


def run_workers(plans: list[WorkerPlan], loglevel: str = "INFO") -> int:
    """Start every planned worker, pass SIGINT/SIGTERM on to them, and return when all have stopped."""
    procs = [subprocess.Popen(celery_command(p, loglevel), env={**os.environ, **p.env}) for p in plans]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown: the running job ends first

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while any(p.poll() is None for p in procs):
        if not stopping and any(p.poll() not in (None, 0) for p in procs):
            stop(signal.SIGTERM, None)  # one worker crashed: stop the rest so a supervisor restarts us whole
        time.sleep(0.5)
    return max(p.returncode or 0 for p in procs)
