"""Real processes for the fault suite: a private redis-server, a TCP proxy to cut PostgreSQL, and a Stack of
uvicorn and `kdistill worker` processes at the service's production default timings.

Plain helpers (no fixtures) so that tests, benches and ad-hoc scripts can import them; `conftest.py` wraps
them into fixtures. Only the setting under test may differ from the defaults: pass it in `extra_env`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[2]
QUEUE = "faults"
TERMINAL = ("succeeded", "failed", "cancelled")
GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL at teardown
# The tiny job's teacher: a registry architecture on the digits' grey 8x8 images.
TEACHER_FORM = {"arch": "resnet8", "num_classes": "10", "input_channels": "1", "input_size": "8",
                "mean": "0.3", "std": "0.37"}


# ---------------------------------------------------------------------------------------------- small tools

def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             context: Callable[[], str] | None = None) -> Any:
    """Call `check` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"\n{context()}" if context else ""))
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; nan when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def psycopg_url(sqlalchemy_url: str) -> str:
    """The libpq form of a `postgresql+psycopg://` URL."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - chars))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(unreadable: {e})"


# ---------------------------------------------------------------------------------------------- processes

def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, including those that moved to a session of their own."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_all(pids: set[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = GRACE_S,
                 group: bool = True) -> int | None:
    """Send `sig` to the process (its whole group when `group`), SIGKILL it after `grace`, and kill what it
    started in sessions of their own (Celery, training children); return its exit status. SIGKILL reaches
    the process and everything below it at once, as a machine's crash would."""
    # Collected while the leader lives: once it is gone its children are re-parented and cannot be found.
    below = descendants(proc.pid)
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            _signal_group(proc.pid, sig)
            _kill_all(below)
        elif group:
            _signal_group(proc.pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            below |= descendants(proc.pid)  # anything it started during the grace
            _signal_group(proc.pid, signal.SIGKILL)
            _kill_all(below)
            proc.wait(timeout=30)
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers of its group
    _kill_all(below)
    return proc.returncode


def processes_using(folder: Path) -> set[int]:
    """Live processes (other than this one) whose working directory lies in `folder` or whose environment
    names it: every process of a stack, including children that left its process groups."""
    folder = folder.resolve()
    needle = str(folder).encode()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
            if cwd == folder or folder in cwd.parents or needle in Path(f"/proc/{entry}/environ").read_bytes():
                found.add(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return found


def _spawn(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # a session of its own: a signal to its group reaches everything it started, and nothing of pytest
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


# ---------------------------------------------------------------------------------------------- redis

class RedisServer:
    """A private redis-server with an append-only file fsynced on every write, as the deployment runs it."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = folder / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        """Start it (same port, same folder: the AOF there is loaded) and wait for PING."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server is already running"
        self.proc = _spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                            "--dir", str(self.folder), "--daemonize", "no"], dict(os.environ), self.log, self.folder)
        wait_for(self.ping, timeout, f"redis-server on port {self.port}", context=lambda: _tail(self.log))

    def ping(self) -> bool:
        """True when it answers PING (False while it is down or still loading its AOF)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def client(self) -> Any:
        """A redis-py client of database 0 (the broker's)."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def queue_depth(self, queue: str = QUEUE) -> int:
        """Messages waiting on a kombu queue (a Redis list of that name)."""
        client = self.client()
        try:
            return int(client.llen(queue))
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop it with `sig` (SIGTERM: it writes and fsyncs the AOF first; SIGKILL: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, sig, grace=timeout)

    def restart(self, sig: int = signal.SIGTERM, down_for: float = 0.0) -> float:
        """Stop it, stay down `down_for` seconds, start it again; return time.time() when it answered PING."""
        self.stop(sig)
        time.sleep(down_for)
        self.start()
        return time.time()


# ---------------------------------------------------------------------------------------------- proxy

class TcpProxy:
    """127.0.0.1:<port> -> target, one thread per direction. `cut()` drops every live connection at once and
    refuses new ones (accepted, then reset: clients fail fast instead of hanging); `restore()` undoes it."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._cut = False
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._pairs)

    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._cut

    def cut(self) -> int:
        """Drop every live connection pair and refuse new connections; return how many pairs were dropped."""
        with self._lock:
            self._cut = True
            pairs = list(self._pairs)
            self._pairs.clear()
        for pair in pairs:
            _reset(*pair)
        with self._lock:
            self.dropped += len(pairs)
        return len(pairs)

    def restore(self) -> None:
        """Let new connections through again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and drop every connection."""
        with self._lock:
            self._closed = True
        self.cut()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                refuse = self._cut or self._closed
                self.accepted += 1
            if refuse:
                self._refuse(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._refuse(client)
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                if self._cut or self._closed:
                    refuse = True
                else:
                    self._pairs.add(pair)
            if refuse:
                _reset(*pair)
                continue
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True,
                                 name=f"proxy-{self.port}-pump").start()

    def _refuse(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        _reset(client)

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            mine = pair in self._pairs  # the other direction or cut() may have closed it already
            self._pairs.discard(pair)
        if mine:
            _reset(*pair)


def _reset(*socks: socket.socket) -> None:
    """Close with a TCP reset: the peer sees the connection die at once, as when a network link breaks."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)  # wakes the pump thread blocked in recv() on this socket
        with contextlib.suppress(OSError):
            s.close()


# ---------------------------------------------------------------------------------------------- inputs

@functools.lru_cache
def teacher_bytes(seed: int = 0) -> bytes:
    """A resnet8 (10 classes, 1 channel, untrained) state dict as safetensors: jobs pass with checks=warn."""
    import torch
    from safetensors.torch import save

    from worker.distill.students import create_model

    torch.manual_seed(seed)
    model = create_model(TEACHER_FORM["arch"], num_classes=10, in_channels=1)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@functools.lru_cache
def digits_npz_bytes(labels_per_class: int = 10, val_per_class: int = 5, seed: int = 0) -> bytes:
    """scikit-learn's digits as a few-label .npz (x, y, x_val, y_val, x_unlabeled): about 100 kB."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = np.clip(np.round(x.reshape(-1, 8, 8) * 255 / 16), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    labelled, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        labelled.extend(idx[:labels_per_class])
        val.extend(idx[labels_per_class:labels_per_class + val_per_class])
    rest = np.setdiff1d(np.arange(len(y)), np.concatenate([labelled, val]))
    buf = io.BytesIO()
    np.savez(buf, x=images[labelled], y=y[labelled].astype(np.int64), x_val=images[val],
             y_val=y[val].astype(np.int64), x_unlabeled=images[rest])
    return buf.getvalue()


@functools.lru_cache
def random_npz_bytes(images: int, seed: int = 0) -> bytes:
    """A valid 10-class .npz of `images` random grey 8x8 images (64 bytes each): a body of any size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.arange(images, dtype=np.int64) % 10
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (images, 8, 8), dtype=np.uint8), y=y)
    return buf.getvalue()


def tiny_job_body(teacher_id: str, dataset_id: str, **over: Any) -> dict[str, Any]:
    """A job of a few seconds on one CPU thread: 1 epoch, ONNX only, the untrained teacher's check a warning."""
    body: dict[str, Any] = {
        "teacher_id": teacher_id, "dataset_id": dataset_id, "student": {"arch": "resnet8"},
        "hyperparameters": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "export_formats": ["onnx"], "checks": {"teacher": "warn"}}
    body.update(over)
    return body


def multipart_stream(fields: dict[str, str], filename: str, content: bytes, chunk: int, pause: float,
                     sent: list[int] | None = None) -> tuple[str, Iterator[bytes]]:
    """(content type, body generator) of a multipart form whose file part trickles out `chunk` bytes every
    `pause` seconds; `sent[0]` counts the file bytes handed to the connection so far."""
    boundary = secrets.token_hex(16)
    counter = sent if sent is not None else [0]

    def body() -> Iterator[bytes]:
        for name, value in fields.items():
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for i in range(0, len(content), chunk):
            yield content[i:i + chunk]
            counter[0] += len(content[i:i + chunk])
            time.sleep(pause)
        yield f"\r\n--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body()


# ---------------------------------------------------------------------------------------------- events

@dataclass(frozen=True)
class RunAudit:
    """What a job's event timeline says about how often it ran."""

    job_id: str
    claims: int  # `running` status events: one per worker that took the job
    attempts: tuple[int, ...]  # data.attempt of those events
    epochs_twice: tuple[tuple[str, int], ...]  # (run, epoch) trained (not replayed) more than once
    final: str | None  # the last status event's status

    def duplicated(self, expected_claims: int = 1) -> bool:
        """More claims than expected, or an epoch trained twice."""
        return self.claims > expected_claims or bool(self.epochs_twice)


def job_events(client: httpx.Client, job_id: str, page: int = 1000) -> list[dict[str, Any]]:
    """Every event of a job, oldest first, following the events endpoint's cursor."""
    events: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": page, **({"after": after} if after else {})}
        body = client.get(f"/v1/jobs/{job_id}/events", params=params).raise_for_status().json()
        events.extend(body["items"])
        after = body["next_cursor"]
        if after is None:
            return events


def _trained(event: dict[str, Any]) -> bool:
    """An epoch event of an epoch trained by the attempt that wrote it (not one re-sent from a checkpoint)."""
    return (event["kind"] == "epoch" and not event["data"].get("replayed")
            and "(from the checkpoint)" not in event["message"])


def _resumed_run(event: dict[str, Any]) -> str:
    # the trainer's "resumed" event: data {"epoch": N}, message "<run>: resuming from the checkpoint of ..."
    return str(event["data"].get("run") or event["message"].split(":", 1)[0])


def audit_events(job_id: str, events: list[dict[str, Any]]) -> RunAudit:
    """Count claims and epochs trained twice; an epoch re-sent from a checkpoint (replayed) is no run.

    The supervisor writes each (run, epoch) once, so a second training of an epoch leaves no second event:
    it shows as a later attempt that resumed (its "resumed" event, or none: from scratch) behind an epoch an
    earlier attempt had recorded, and then trained that run (its own epoch events, or the job succeeded on
    it). Two trained events of one (run, epoch) count too."""
    trained = Counter((e["data"].get("run"), e["data"].get("epoch")) for e in events if _trained(e))
    twice = {k for k, n in trained.items() if n > 1}
    claims = [i for i, e in enumerate(events) if e["kind"] == "status" and e["data"].get("status") == "running"]
    statuses = [e["data"] for e in events if e["kind"] == "status"]
    final = statuses[-1].get("status") if statuses else None
    for n, start in enumerate(claims[1:], start=1):
        end = claims[n + 1] if n + 1 < len(claims) else len(events)
        window = events[start:end]
        resumed_at = {_resumed_run(e): int(e["data"].get("epoch") or 0) for e in window if e["kind"] == "resumed"}
        ran = {e["data"].get("run") for e in window if _trained(e)}
        if end == len(events) and final == "succeeded":
            ran |= {run for run, _ in trained}
        for e in events[:start]:
            run, epoch = e["data"].get("run"), e["data"].get("epoch")
            if _trained(e) and run in ran and isinstance(epoch, int) and epoch > resumed_at.get(run, 0):
                twice.add((run, epoch))
    running = [events[i]["data"] for i in claims]
    return RunAudit(job_id=job_id, claims=len(running), attempts=tuple(int(d.get("attempt") or 0) for d in running),
                    epochs_twice=tuple(sorted(twice, key=str)), final=final)


def audit_job(client: httpx.Client, job_id: str) -> RunAudit:
    """`audit_events` of the job's events as the API serves them."""
    return audit_events(job_id, job_events(client, job_id))


def duplicate_runs(audits: list[RunAudit], expected_claims: int = 1) -> int:
    """How many jobs ran more than once (see RunAudit.duplicated)."""
    return sum(a.duplicated(expected_claims) for a in audits)


# ---------------------------------------------------------------------------------------------- figures

@dataclass
class Figure:
    """One fault's row: `duplicate_runs` counts jobs created or run more than once."""

    fault: str
    recovery_s: float | None
    jobs: int
    lost: int
    duplicate_runs: int
    note: str = ""


@dataclass
class Figures:
    """Rows of the session (conftest collects them; bench/faults.py prints them)."""

    rows: list[Figure] = field(default_factory=list)

    def record(self, fault: str, *, recovery_s: float | None, jobs: int, lost: int, duplicate_runs: int,
               note: str = "") -> Figure:
        row = Figure(fault, None if recovery_s is None else round(float(recovery_s), 2), jobs, lost,
                     duplicate_runs, note)
        self.rows.append(row)
        return row

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]


COLUMNS = ("fault", "recovery_s", "jobs", "lost", "duplicate_runs", "note")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def text_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned plain text, for the terminal summary."""
    cells = [list(COLUMNS), *[[_cell(r.get(c)) for c in COLUMNS] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table, one line per fault."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the stack

@dataclass
class Stack:
    """One deployment on this machine: PostgreSQL database, private Redis, uvicorn API, `kdistill worker`s."""

    data_dir: Path
    env: dict[str, str]
    api_key: str
    db_url: str  # direct to PostgreSQL, for the test's own queries (the processes may go through `proxy`)
    redis: RedisServer
    proxy: TcpProxy | None = None
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _spent: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- API ------------------------------------------------------------------------------------------
    def start_api(self, workers: int = 2, timeout: float = 120) -> float:
        """Start uvicorn with `workers` processes on this stack's port; return seconds until all of them had
        started and /healthz said ok."""
        assert self.api is None or self.api.poll() is not None, "the API is already running"
        t0 = time.monotonic()
        log = self.data_dir / "api.log"
        offset = log.stat().st_size if log.exists() else 0
        self.api = _spawn([sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory", "--host",
                           "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
                          self.env, self.data_dir / "api.log", self.data_dir)
        self._spent.append(self.api)

        def healthy() -> bool:
            assert self.api is not None and self.api.poll() is None, "the API exited\n" + self.logs()
            # /healthz answers as soon as one process is up: count every process's start-up line too
            with log.open("rb") as f:
                f.seek(offset)
                if f.read().count(b"Application startup complete") < workers:
                    return False
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout, f"the API's {workers} processes and /healthz", interval=0.2, context=self.logs)
        return time.monotonic() - t0

    def kill_api(self, sig: int = signal.SIGKILL, grace: float = GRACE_S) -> None:
        """Send `sig` to the API's process group (uvicorn, its workers, their inspectors); SIGKILL after grace."""
        if self.api is not None:
            stop_process(self.api, sig, grace=grace)

    # -- workers --------------------------------------------------------------------------------------
    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """`kdistill worker --gpus none --queues QUEUE --name <name>`: one Celery node `<name>-cpu@<host>`."""
        assert name not in self.workers or self.workers[name].poll() is not None, f"worker {name} runs already"
        proc = _spawn([sys.executable, "-m", "app.cli", "worker", "--gpus", "none", "--queues", QUEUE,
                       "--name", name], self.env, self.data_dir / f"worker-{name}.log", self.data_dir)
        self.workers[name] = proc
        self._spent.append(proc)
        return proc

    @staticmethod
    def node(name: str) -> str:
        """The Celery node name (and the jobs' `worker`) of the worker started as `name`."""
        return f"{name}-cpu@{socket.gethostname()}"

    def wait_workers_ready(self, names: list[str], timeout: float = 120) -> float:
        """Wait until each named worker has registered in the database (Celery's worker_ready); return seconds."""
        t0 = time.monotonic()
        nodes = {self.node(n) for n in names}

        def ready() -> bool:
            for n in names:
                assert self.workers[n].poll() is None, f"worker {n} exited\n" + self.logs()
            return nodes <= {row[0] for row in self.sql("SELECT name FROM workers")}

        wait_for(ready, timeout, f"workers {sorted(nodes)} to register", interval=0.2, context=self.logs)
        return time.monotonic() - t0

    def kill_worker(self, name: str, sig: int = signal.SIGKILL, grace: float = 60) -> int | None:
        """SIGKILL: `kdistill worker` and everything below it die at once (a crash). Other signals go to
        its leader only, as `docker stop` does, which passes them on to Celery (warm shutdown); SIGKILL
        after `grace`. Returns the leader's exit status."""
        proc = self.workers[name]
        return stop_process(proc, sig, grace=grace, group=sig == signal.SIGKILL)

    # -- HTTP -----------------------------------------------------------------------------------------
    def client(self, timeout: float = 60, **kwargs: Any) -> httpx.Client:
        """An httpx client of the API with this stack's API key."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=timeout, **kwargs)

    def async_client(self, connections: int = 50, timeout: float = 60) -> httpx.AsyncClient:
        """An async client keeping up to `connections` keep-alive connections."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                                 limits=limits, timeout=timeout)

    def upload_teacher(self, client: httpx.Client, content: bytes | None = None,
                       filename: str = "teacher.safetensors") -> dict[str, Any]:
        """Upload the tiny resnet8 teacher (or `content`: a .onnx `filename` for ONNX); return the teacher."""
        content = content if content is not None else teacher_bytes()
        form = TEACHER_FORM if not filename.endswith(".onnx") else \
            {k: v for k, v in TEACHER_FORM.items() if k not in ("arch", "num_classes")}
        r = client.post("/v1/teachers", files={"file": (filename, content)}, data=form, params={"dedupe": "false"})
        assert r.status_code == 201, r.text
        return r.json()

    def upload_dataset(self, client: httpx.Client, content: bytes | None = None,
                       filename: str = "digits.npz") -> dict[str, Any]:
        """Upload the few-label digits (or `content`); return the dataset."""
        content = content if content is not None else digits_npz_bytes()
        r = client.post("/v1/datasets", files={"file": (filename, content)}, params={"dedupe": "false"})
        assert r.status_code == 201, r.text
        return r.json()

    def upload_inputs(self, client: httpx.Client) -> tuple[str, str]:
        """Upload the tiny teacher and dataset at once (each is inspected for seconds in a child process);
        return (teacher id, dataset id)."""
        from concurrent.futures import ThreadPoolExecutor

        teacher, dataset = teacher_bytes(), digits_npz_bytes()  # built here: the threads only send
        with ThreadPoolExecutor(2) as pool:
            t = pool.submit(self.upload_teacher, client, teacher)
            d = pool.submit(self.upload_dataset, client, dataset)
            return t.result()["id"], d.result()["id"]

    def submit(self, client: httpx.Client, teacher_id: str, dataset_id: str, idempotency_key: str | None = None,
               **over: Any) -> dict[str, Any]:
        """POST a tiny job (see tiny_job_body); return it."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = client.post("/v1/jobs", json=tiny_job_body(teacher_id, dataset_id, **over), headers=headers)
        assert r.status_code == 202, r.text
        return r.json()

    def wait_job(self, job_id: str, predicate: Callable[[dict[str, Any]], bool] = lambda j: j["status"] in TERMINAL,
                 timeout: float = 300) -> dict[str, Any]:
        """Poll the job until `predicate(job)` (default: a final status); return it."""
        last: dict[str, Any] = {}
        with self.client() as c:
            def check() -> bool:
                nonlocal last
                last = c.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                return predicate(last)
            wait_for(check, timeout, f"job {job_id}", interval=0.3,
                     context=lambda: f"last: {json.dumps(last, default=str)[:2000]}\n{self.logs()}")
        return last

    def wait_jobs(self, job_ids: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
        """Wait until every job has a final status; return them (as the API shows them) by id."""
        # Polled in the database: on 2 cores, a GET per job per poll would slow the jobs down measurably.
        counts: dict[str, int] = {}

        def check() -> bool:
            rows = self.sql("SELECT status, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY status", list(job_ids))
            counts.clear()
            counts.update({status: n for status, n in rows})
            return sum(counts.get(s, 0) for s in TERMINAL) == len(set(job_ids))

        wait_for(check, timeout, f"{len(job_ids)} jobs to end", interval=0.5,
                 context=lambda: f"statuses: {counts}\n{self.logs()}")
        with self.client() as c:
            return {job_id: c.get(f"/v1/jobs/{job_id}").raise_for_status().json() for job_id in job_ids}

    # -- inspection -----------------------------------------------------------------------------------
    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the stack's database directly (not through the proxy); return its rows."""
        with psycopg.connect(psycopg_url(self.db_url), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def logs(self, chars: int = 4000) -> str:
        """The tail of every log file of the stack (API, workers, Redis), for assertion messages."""
        paths = [*sorted(self.data_dir.glob("*.log")), self.redis.log]
        return "\n".join(f"--- {p.name}\n{_tail(p, chars)}" for p in paths if p.exists())

    def close(self) -> None:
        """Stop every process this stack started (SIGTERM, SIGKILL after a grace), leaving none behind."""
        for proc in reversed(self._spent):
            stop_process(proc, signal.SIGTERM)
        # whatever escaped the trees above (orphans of a killed worker, say) still runs in or for data_dir
        for _ in range(3):
            left = processes_using(self.data_dir)
            if not left:
                return
            _kill_all(left)
            time.sleep(0.2)


def stack_env(data_dir: Path, db_url: str, broker_url: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The processes' environment: this machine's, minus every KDISTILL_* (production defaults), plus the
    deployment's addresses and `extra_env` (the one setting under test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}
    env.update({"KDISTILL_DATABASE_URL": db_url, "KDISTILL_BROKER_URL": broker_url,
                "KDISTILL_DATA_DIR": str(data_dir), "KDISTILL_AUTH": "required", "KDISTILL_DEFAULT_QUEUE": QUEUE,
                "KDISTILL_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra_env or {})
    return env


@contextmanager
def open_stack(base: Path, *, proxy_db: bool = False, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A fresh database, a private Redis, an API key and the environment; no process but Redis runs yet.
    `proxy_db`: the processes reach PostgreSQL through a TcpProxy (`stack.proxy`). Everything stops on exit."""
    from services import PG_ADMIN, fresh_postgres

    from app.db import session_scope
    from app.keys import create_key
    from app.migrate import upgrade

    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        db_url = stack.enter_context(fresh_postgres())
        upgrade(db_url)
        with session_scope(db_url) as s:
            key = create_key(s, "faults", "fault tests")
        redis = RedisServer(base / "redis")
        stack.callback(redis.stop, signal.SIGKILL)
        proxy = None
        service_db_url = db_url
        if proxy_db:
            host_port = PG_ADMIN.split("@", 1)[1].split("/", 1)[0]
            host, _, port = host_port.partition(":")
            proxy = TcpProxy(host, int(port or 5432))
            stack.callback(proxy.close)
            service_db_url = db_url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/", 1)
        st = Stack(data_dir=data_dir, env=stack_env(data_dir, service_db_url, redis.url, extra_env),
                   api_key=key, db_url=db_url, redis=redis, proxy=proxy)
        stack.callback(st.close)  # first out: the processes go before Redis, the proxy and the database
        yield st


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`, as the API reports uploads and artifacts."""
    return hashlib.sha256(data).hexdigest()
