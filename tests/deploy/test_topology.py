"""The production topology, run as plain processes: docker-compose.yml's own commands and environment for
the migration, the API, two CPU workers and Flower, against the real PostgreSQL and Redis, with artifacts on
a real S3 endpoint (moto's server over HTTP standing in for MinIO). No Docker engine runs here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from digits_data import DIGITS_MEAN, DIGITS_STD, few_label_npz
from services import fresh_postgres, fresh_redis
from sqlalchemy import select

from app.db import session_scope
from app.keys import create_key
from app.models import WorkerRecord

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")
# Infrastructure images and what stands in for each here.
STAND_INS = {"postgres": "the machine's PostgreSQL", "redis": "the machine's Redis", "minio": "moto's S3 server"}


class ComposeSafeLoader(yaml.SafeLoader):
    """Compose's YAML with its `!reset` / `!override` tags."""


ComposeSafeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeSafeLoader.add_constructor("!override", lambda loader, node: loader.construct_object(node, deep=True))


def load_compose(*names: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in names:
        doc = yaml.load((REPO / name).read_text(), Loader=ComposeSafeLoader)
        for svc, spec in doc.get("services", {}).items():
            base = merged.setdefault(svc, {})
            for key, value in spec.items():
                if isinstance(value, dict) and isinstance(base.get(key), dict):
                    base[key] = {**base[key], **value}
                else:
                    base[key] = value
    return merged


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}`."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in variables:
            return variables[name]
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return arg or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value).replace("$$", "$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the process exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered 200")


def live_workers(db_url: str) -> list[WorkerRecord]:
    with session_scope(db_url) as s:
        return list(s.scalars(select(WorkerRecord)))


def test_compose_file_names_only_services_this_test_runs():
    services = load_compose("docker-compose.yml", "docker-compose.cpu.yml")
    tools = {name for name, spec in services.items() if spec.get("profiles")}  # run only when asked
    assert tools == {"backup"}
    ours = {name for name, spec in services.items() if "command" in spec and name not in {*STAND_INS, *tools}}
    assert ours == {"migrate", "api", "worker", "flower"}
    assert set(services) == ours | set(STAND_INS) | tools
    gpu = load_compose("docker-compose.yml")["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"].get("deploy") is None  # the CPU override drops the GPU reservation
    assert "--appendonly" in services["redis"]["command"]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER" in text and "torch==2.14.1" in text


def test_topology_two_jobs_at_once_on_two_cpu_workers_with_artifacts_on_s3(tmp_path, digits, digits_teacher):
    services = load_compose("docker-compose.yml", "docker-compose.cpu.yml")
    procs: dict[str, subprocess.Popen] = {}
    s3_port, api_port, flower_port = free_port(), free_port(), free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs["minio"] = moto
    try:
        with fresh_postgres() as db_url, fresh_redis(db=9) as redis_url:
            secrets = {"POSTGRES_PASSWORD": "pw", "MINIO_ROOT_USER": "testing", "MINIO_ROOT_PASSWORD": "testing"}
            s3_url = f"http://127.0.0.1:{s3_port}"

            def env_for(name: str, data_dir: Path) -> dict[str, str]:
                env = {k: interpolate(str(v), secrets) for k, v in services[name].get("environment", {}).items()}
                # The compose host names point at the stand-ins on this machine.
                assert env["KDISTILL_DATABASE_URL"].startswith("postgresql+psycopg://")
                assert env["KDISTILL_BROKER_URL"] == "redis://redis:6379/0"
                assert env["KDISTILL_S3_ENDPOINT_URL"] == "http://minio:9000"
                env.update(KDISTILL_DATABASE_URL=db_url, KDISTILL_BROKER_URL=redis_url,
                           KDISTILL_S3_ENDPOINT_URL=s3_url, KDISTILL_DATA_DIR=str(data_dir),
                           KDISTILL_PROGRESS_INTERVAL="0.5", KDISTILL_HEARTBEAT_INTERVAL="1")
                data_dir.mkdir(parents=True, exist_ok=True)
                return {**os.environ, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

            def start(name: str, command: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
                out = (tmp_path / f"{log}.log").open("ab")
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                procs[log] = proc
                return proc

            wait_http(f"{s3_url}/", moto)
            migrate = subprocess.run(services["migrate"]["command"], cwd=REPO, capture_output=True, text=True,
                                     env=env_for("migrate", tmp_path / "migrate"), timeout=120)
            assert migrate.returncode == 0, migrate.stderr
            with session_scope(db_url) as s:
                key = create_key(s, "platform-team")

            api_cmd = [str(api_port) if prev == "--port" else a
                       for prev, a in zip([None, *services["api"]["command"]], services["api"]["command"],
                                          strict=False)]
            api_cmd = [a.replace("0.0.0.0", "127.0.0.1") for a in api_cmd]
            api = start("api", api_cmd, env_for("api", tmp_path / "api"), "api")
            for n in (1, 2):
                env = env_for("worker", tmp_path / f"worker{n}")
                env["KDISTILL_WORKER_NAME"] = f"w{n}"  # docker gives each container its own host name
                start("worker", services["worker"]["command"], env, f"worker{n}")
            flower_cmd = [f"--port={flower_port}" if a.startswith("--port=") else a
                          for a in services["flower"]["command"]]
            flower = start("flower", flower_cmd, env_for("flower", tmp_path / "flower"), "flower")
            def health(n: int) -> tuple[int, str]:
                check = services["worker"]["healthcheck"]["test"]
                assert check[0] == "CMD"
                proc = subprocess.run(check[1:], cwd=REPO, env=env_for("worker", tmp_path / f"worker{n}"),
                                      capture_output=True, text=True, timeout=60)
                return proc.returncode, proc.stdout + proc.stderr

            wait_http(f"http://127.0.0.1:{api_port}/readyz", api)
            wait_http(f"http://127.0.0.1:{flower_port}/flower/healthcheck", flower)

            client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120,
                                  headers={"Authorization": f"Bearer {key}"})
            with open(digits_teacher.path, "rb") as f:
                teacher = client.post("/v1/teachers", files={"file": ("teacher.safetensors", f)}, data={
                    "arch": digits_teacher.arch, "input_channels": 1, "input_size": 8, "mean": str(DIGITS_MEAN),
                    "std": str(DIGITS_STD)}).raise_for_status().json()
            data = few_label_npz(tmp_path / "digits.npz", digits, labels_per_class=10, val_per_class=10)
            with open(data, "rb") as f:
                dataset = client.post("/v1/datasets", files={"file": ("digits.npz", f)}).raise_for_status().json()

            deadline = time.monotonic() + 90  # both workers announce themselves before jobs are routed
            while len(live_workers(db_url)) < 2:
                assert time.monotonic() < deadline, "the workers never registered"
                time.sleep(0.5)
            assert all(w.queues == ["cpu"] for w in live_workers(db_url))
            jobs = []
            for seed in (0, 1):
                r = client.post("/v1/jobs", json={
                    "teacher_id": teacher["id"], "dataset_id": dataset["id"], "student": {"arch": "resnet8"},
                    "hyperparameters": {"epochs": 8, "batch_size": 32, "seed": seed, "device": "cpu"},
                    "export_formats": ["onnx"]})
                assert r.status_code == 202, r.text
                jobs.append(r.json())
            assert {j["queue"] for j in jobs} == {"cpu"}  # no GPU worker is alive, so the cpu queue

            both_running, seen_workers, busy_health = False, set(), []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                now = [client.get(f"/v1/jobs/{j['id']}").json() for j in jobs]
                running = [j for j in now if j["status"] == "running"]
                seen_workers |= {j["worker"] for j in running}
                both_running |= len(running) == 2
                if len(running) == 2 and not busy_health:  # compose's own health check, on busy workers
                    busy_health = [health(n) for n in (1, 2)]
                if all(j["status"] in TERMINAL for j in now):
                    break
                time.sleep(0.3)
            assert [j["status"] for j in now] == ["succeeded", "succeeded"], now
            assert both_running, "the two jobs never ran at the same time"
            assert [code for code, _ in busy_health] == [0, 0], busy_health
            assert len({j["worker"] for j in now}) == 2, seen_workers

            x = (digits.x_test[:, None].astype(np.float32) / 255 - DIGITS_MEAN) / DIGITS_STD
            s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket="kdistill").get("Contents", [])}
            for j in now:
                onnx = client.get(f"/v1/jobs/{j['id']}/artifacts/student.onnx")
                assert onnx.status_code == 200
                # written by the worker under its attempt's keys, served by the API
                assert f"jobs/{j['id']}/1/student.onnx" in keys
                path = tmp_path / f"{j['id']}.onnx"
                path.write_bytes(onnx.content)
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                pred = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
                assert (pred == digits.y_test).mean() > 0.8
            assert any(k.startswith("teachers/") for k in keys) and any(k.startswith("datasets/") for k in keys)

            metrics = client.get("/metrics").text
            assert 'kdistill_jobs{status="succeeded"} 2.0' in metrics
            assert "kdistill_http_request_duration_seconds_bucket" in metrics

            # A worker that stops is unhealthy at once; the other stays healthy.
            procs["worker1"].send_signal(signal.SIGTERM)
            procs["worker1"].wait(timeout=60)
            assert health(1)[0] != 0 and health(2)[0] == 0, (health(1), health(2))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
