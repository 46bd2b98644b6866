"""`kdistill serve`: the whole service on one machine, with no external service.

Runs the database migrations, then the API (uvicorn, in a thread of this process) and one local Celery
worker (a child process, `--pool=solo`), with SQLite in the data folder and Celery's `filesystem://`
transport unless KDISTILL_DATABASE_URL / KDISTILL_BROKER_URL say otherwise. The API and the worker see the
same settings: this process passes them on as KDISTILL_* environment variables.

The main thread owns the worker (app.workers.WorkerProcess, as `kdistill worker` does): it restarts a
worker that dies (a few times), and on SIGINT or SIGTERM stops the API and the worker: SIGTERM (Celery's
warm shutdown: an idle worker is gone in seconds), then, if a job still keeps it busy after WARM_STOP
seconds, SIGKILL of its process group. The worker is in its own session, so a terminal's Ctrl-C reaches
only this process, and it is killed if this process dies, however it dies (PR_SET_PDEATHSIG); the
worker's training process dies with the worker in turn.

A job that was running when the worker stopped this way stays `running` in the database. The worker is
known dead when serve restarts it or starts again on the same folder, so its leases are expired at once
(app.lifecycle.abandon): the job resumes from its last checkpoint right away.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("kdistill.serve")


class ServeError(Exception):
    """A reason `serve` cannot start, worded for the user."""


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_auth(host: str, flag: bool | None, env: dict[str, str] | None = None) -> str:
    """`required` or `disabled`: the flag if given, else KDISTILL_AUTH if set, else off only on loopback."""
    if flag is not None:
        return "required" if flag else "disabled"
    env_value = (os.environ if env is None else env).get("KDISTILL_AUTH", "").strip().lower()
    if env_value in ("required", "disabled"):
        return env_value
    return "disabled" if is_loopback(host) else "required"


def default_queue() -> str:
    """KDISTILL_DEFAULT_QUEUE if set; else `gpu` where PyTorch sees a GPU, `cpu` where it does not."""
    if os.environ.get("KDISTILL_DEFAULT_QUEUE"):
        return os.environ["KDISTILL_DEFAULT_QUEUE"]
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def worker_name() -> str:
    """The local worker's Celery hostname, which the supervisor records as the job's `worker`."""
    return f"kdistill@{socket.gethostname()}"


def _running_pid(pidfile: Path) -> int | None:
    """The pid in a worker pidfile if that process still runs a celery worker."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"celery" in cmdline else None


class _Stop:
    """Set by SIGINT/SIGTERM in the main thread; a second signal marks it forced."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.forced = False

    def handler(self, sig: int, _frame: FrameType | None) -> None:
        if self.event.is_set():
            self.forced = True
            raise KeyboardInterrupt
        self.event.set()


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def serve(host: str = "127.0.0.1", port: int = 8000, data_dir: Path = Path("kdistill-data"),
          auth: bool | None = None, log_level: str = "info") -> int:
    """Run the API and one worker until SIGINT/SIGTERM; return the exit status."""
    # Handlers first: a signal during start-up stops serve once it has started nothing yet. (They also
    # replace an inherited SIG_IGN: a shell starts background commands with SIGINT ignored.)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(stop, host, port, data_dir, auth, log_level)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(stop: _Stop, host: str, port: int, data_dir: Path, auth: bool | None, log_level: str) -> int:
    import uvicorn

    from app import lifecycle
    from app.db import session_scope
    from app.logs import setup_logging
    from app.main import create_app
    from app.migrate import upgrade
    from app.settings import Settings, get_settings
    from app.workers import RESTART_WINDOW, RESTARTS, WARM_STOP, WorkerProcess, celery_command, release_jobs_of

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    auth_mode = resolve_auth(host, auth)
    queue = default_queue()
    # One set of settings for the API (this process) and the worker (its environment). A person reads
    # this terminal: plain-text logs unless KDISTILL_LOG_FORMAT says otherwise.
    os.environ.update({"KDISTILL_DATA_DIR": str(data_dir), "KDISTILL_AUTH": auth_mode,
                       "KDISTILL_DEFAULT_QUEUE": queue, "KDISTILL_LOG_LEVEL": log_level.upper()})
    os.environ.setdefault("KDISTILL_LOG_FORMAT", "text")
    get_settings.cache_clear()
    settings = Settings()
    setup_logging(settings.log_format, settings.log_level)
    pidfile = data_dir / "worker.pid"
    other = _running_pid(pidfile)
    if other is not None:
        raise ServeError(f"another kdistill worker (pid {other}) already serves {data_dir}; stop that "
                         "`kdistill serve` first, or pick another --data-dir")

    db_url = settings.resolved_database_url
    _say(f"kdistill: migrating the database ({_redact(db_url)})")
    upgrade(db_url)

    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, server_header=False,
                            # longer than clients keep idle connections (httpx: 5 s), so a request never
                            # crosses the server's close of a connection it is reusing
                            timeout_keep_alive=75)
    try:
        sock = config.bind_socket()
    except SystemExit:
        raise ServeError(f"cannot listen on {host}:{port} (in use? try another --port)") from None
    if stop.event.is_set():
        sock.close()
        _say("kdistill: stopped before it started")
        return 0
    server = uvicorn.Server(config)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    _banner(url, data_dir, settings, auth_mode, host, queue, db_url)

    worker = WorkerProcess(worker_name(), celery_command(worker_name(), [queue], log_level, pidfile, events=False),
                           env=dict(os.environ))
    api = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="api", daemon=True)
    status = 0
    try:
        worker.start()
        # No worker of ours runs (the pidfile said so): the jobs it held when it stopped resume now.
        if (n := len(release_jobs_of(worker_name()))):
            _say(f"kdistill: {n} job(s) were running when the worker last stopped; they resume from their last "
                 "checkpoint")
        with session_scope(db_url) as s:
            if (n := len(lifecycle.sweep(s, settings, never_sent_grace=0).sent)):
                _say(f"kdistill: {n} queued job(s) had not reached the broker; sent them again")
        api.start()
        while not stop.event.wait(0.5):
            if not api.is_alive():
                _say("kdistill: the API server stopped; shutting down")
                status = 1
                break
            code = worker.exited()
            if code is not None:
                if not worker.may_restart():
                    _say(f"kdistill: the worker exited with status {code} {RESTARTS + 1} times in "
                         f"{RESTART_WINDOW:.0f} s; shutting down (see its log above)")
                    status = 1
                    break
                _say(f"kdistill: the worker exited with status {code}; restarting it")
                time.sleep(1.0)
                worker.start()
                release_jobs_of(worker_name())  # the job it was running, if any
    except KeyboardInterrupt:
        pass
    finally:
        _say("kdistill: stopping the API and the worker...")
        server.should_exit = True
        try:
            worker.stop(warm=0.0 if stop.forced else WARM_STOP)
        except KeyboardInterrupt:
            worker.stop(warm=0.0)
        api.join(timeout=10)
        sock.close()
        _say("kdistill: stopped")
    return status


def _banner(url: str, data_dir: Path, settings: Settings, auth_mode: str, host: str, queue: str, db_url: str) -> None:
    lines = [
        "",
        f"  kdistill is serving at {url}",
        f"  dashboard:  {url}/ui/   (open it in a browser: submit, watch, download)",
        f"  API docs:   {url}/docs",
        f"  data dir:   {data_dir}",
        f"  database:   {_redact(db_url)}",
        f"  broker:     {_redact(settings.resolved_broker_url)}"
        + (f" ({settings.broker_dir.resolve()})" if settings.resolved_broker_url.startswith("filesystem") else ""),
        f"  worker:     1 local Celery worker on queue {queue!r}",
    ]
    if auth_mode == "disabled" and is_loopback(host):
        lines.append("  auth:       OFF - API keys are not needed: this server listens on loopback only, so only "
                     "this machine can call it (pass --auth to require keys)")
    elif auth_mode == "disabled":
        warning = [f"WARNING: API keys are switched OFF and the API listens on {host}, which other machines",
                   "can reach: ANYONE who can reach this port can upload models and run jobs on this machine.",
                   "Drop --no-auth (and create keys with `kdistill keys create`) unless the network is yours alone."]
        width = max(map(len, warning))
        lines += ["", "  " + "!" * (width + 6), *(f"  !! {w:<{width}} !!" for w in warning), "  " + "!" * (width + 6)]
    else:
        lines.append("  auth:       API keys required (Authorization: Bearer <key>); create one with")
        lines.append(f"              kdistill keys create --tenant NAME --data-dir {data_dir}")
    lines.append("  Press Ctrl-C to stop.")
    _say("\n".join(lines) + "\n")


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
