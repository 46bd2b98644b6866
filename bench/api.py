"""API latency and dispatch: GET /v1/jobs/{id} and POST /v1/jobs under 50 concurrent clients against
uvicorn, and the time from POST /v1/jobs to `running` with an idle worker.

Starts its own stack on this machine (PostgreSQL + Redis by default, or SQLite + the filesystem broker),
prints requests/s and p50/p99 latencies. Goals: polling p99 under 20 ms, dispatch under 1 s.

    python bench/api.py                       # PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379
    python bench/api.py --db sqlite --clients 50 --gets 4000 --posts 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def hammer(url: str, key: str, clients: int, total: int, make_request, interval: float = 0.0) -> dict:
    """`total` requests from `clients` concurrent connections; latency of each, throughput of all. With
    `interval`, each client sends one request per interval (as a poller does) instead of back to back."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30) as client:
        counter = iter(range(total))

        async def one_client() -> None:
            await asyncio.sleep(interval * random.random())  # pollers do not start in lockstep
            for i in counter:
                t0 = time.perf_counter()
                r = await make_request(client, i)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code < 300, r.text
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"requests": total, "rps": total / wall, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "max_ms": max(latencies) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--gets", type=int, default=4000)
    p.add_argument("--posts", type=int, default=1000)
    p.add_argument("--dispatches", type=int, default=5)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls of each paced client")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    args = p.parse_args()

    from services import fresh_postgres, fresh_redis

    from app.db import session_scope
    from app.keys import create_key
    from app.migrate import upgrade
    from worker.distill.students import create_model

    with tempfile.TemporaryDirectory() as tmp_name, fresh_redis(db=10) as redis_url:
        tmp = Path(tmp_name)
        pg = fresh_postgres() if args.db == "postgres" else None
        db_url = pg.__enter__() if pg else f"sqlite:///{tmp / 'kdistill.db'}"
        procs: list[subprocess.Popen] = []
        try:
            upgrade(db_url)
            with session_scope(db_url) as s:
                key = create_key(s, "bench")
            env = {**os.environ, "KDISTILL_DATABASE_URL": db_url, "KDISTILL_DATA_DIR": str(tmp),
                   "KDISTILL_DEFAULT_QUEUE": "parked", "KDISTILL_LOG_LEVEL": "WARNING",
                   "KDISTILL_HEARTBEAT_INTERVAL": "1", "OMP_NUM_THREADS": "1"}
            if args.db == "postgres":
                env["KDISTILL_BROKER_URL"] = redis_url
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory", "--port", str(port),
                 "--workers", str(args.api_workers), "--no-access-log", "--log-level", "warning"],
                cwd=REPO, env=env, start_new_session=True))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo", "-Q", "bench",
                 "-n", "bench@%h", "--loglevel=WARNING", "--without-gossip", "--without-mingle"],
                cwd=REPO, env=env, start_new_session=True))
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            sync = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
            model = create_model("resnet8", num_classes=10, in_channels=1)
            save_file(model.state_dict(), str(tmp / "t.safetensors"))
            rng = np.random.default_rng(0)
            np.savez(tmp / "d.npz", x=rng.integers(0, 255, (200, 8, 8), dtype=np.uint8), y=np.arange(200) % 10)
            with open(tmp / "t.safetensors", "rb") as f:
                teacher = sync.post("/v1/teachers", files={"file": ("t.safetensors", f)},
                                    data={"arch": "resnet8", "input_channels": 1, "input_size": 8}).json()
            with open(tmp / "d.npz", "rb") as f:
                dataset = sync.post("/v1/datasets", files={"file": ("d.npz", f)}).json()
            body = {"teacher_id": teacher["id"], "dataset_id": dataset["id"], "student": {"arch": "resnet8"},
                    "hyperparameters": {"epochs": 1, "batch_size": 64, "device": "cpu"},
                    "export_formats": ["onnx"], "queue": "parked"}
            job_id = sync.post("/v1/jobs", json=body).json()["id"]

            results = {}
            results["GET /v1/jobs/{id}"] = asyncio.run(hammer(
                url, key, args.clients, args.gets, lambda c, i: c.get(f"/v1/jobs/{job_id}")))
            results[f"GET /v1/jobs/{{id}}, each client every {args.poll_interval} s"] = asyncio.run(hammer(
                url, key, args.clients, args.gets // 4, lambda c, i: c.get(f"/v1/jobs/{job_id}"),
                interval=args.poll_interval))
            results["POST /v1/jobs"] = asyncio.run(hammer(
                url, key, args.clients, args.posts,
                lambda c, i: c.post("/v1/jobs", json={**body, "hyperparameters": {**body["hyperparameters"],
                                                                                  "seed": i}})))
            dispatch = []
            for i in range(args.dispatches):
                t0 = time.perf_counter()
                jid = sync.post("/v1/jobs", json={**body, "queue": "bench",
                                                  "hyperparameters": {**body["hyperparameters"], "seed": 10_000 + i}}
                                ).json()["id"]
                while sync.get(f"/v1/jobs/{jid}").json()["status"] == "queued":
                    time.sleep(0.005)
                dispatch.append(time.perf_counter() - t0)
                while sync.get(f"/v1/jobs/{jid}").json()["status"] not in ("succeeded", "failed", "cancelled"):
                    time.sleep(0.2)  # the worker is idle again before the next measurement
            results["dispatch POST -> running"] = {"runs": len(dispatch), "median_s": statistics.median(dispatch),
                                                    "max_s": max(dispatch)}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
            if pg:
                pg.__exit__(None, None, None)
    print(json.dumps({"db": args.db, "clients": args.clients, **results}, indent=2))
    get = results[f"GET /v1/jobs/{{id}}, each client every {args.poll_interval} s"]
    print(f"goal polling p99 < 20 ms: {'met' if get['p99_ms'] < 20 else 'NOT met'} ({get['p99_ms']:.1f} ms, paced); "
          f"goal dispatch < 1 s: {'met' if max(dispatch) < 1 else 'NOT met'} (max {max(dispatch):.2f} s)")


if __name__ == "__main__":
    main()
