"""The `kdistill` command line: local runs (`run`, `example`), the one-machine service (`serve`, `keys`)
and the service's client verbs (`submit`, `status`, `jobs`, `teachers`, `datasets`, `cancel`, `delete`,
`download`, `tensorboard`, `sweep ...`).

For scripts: every read command takes `--output json` (`-o json`), which prints JSON alone on stdout (messages
and progress go to stderr); tables piped elsewhere than a terminal are never cut; without a terminal, progress
is printed as plain lines. The exit code carries the outcome:

Exit codes:
  0    success (with --wait/--watch: the job or sweep succeeded)
  1    error: the service is unreachable, or it refused the request
  2    usage error (a bad option or argument; `run`: an invalid job spec)
  3    the job (or sweep) failed
  4    the job (or sweep) was cancelled
  5    --timeout passed while the job (or sweep) still runs
  130  interrupted (Ctrl-C); a submitted job goes on
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from app.report import (
    datasets_table,
    duration,
    jobs_table,
    progress_line,
    result_tables,
    stderr_console,
    stdout_console,
    sweeps_table,
    teachers_table,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
OUTCOMES = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
EXIT_CODES = (__doc__ or "").partition("\n\nExit codes:")[2].strip("\n")

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill small, fast student models from large teachers.",
                  epilog="Exit codes:\n" + EXIT_CODES)
keys_cli = typer.Typer(no_args_is_help=True, help="API keys of a kdistill database.")
cli.add_typer(keys_cli, name="keys")
delete_cli = typer.Typer(no_args_is_help=True, help="Delete teachers, datasets or finished jobs on the server.")
cli.add_typer(delete_cli, name="delete")
console = stderr_console()


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table (for people) or json (for scripts: "
                                              "the JSON alone on stdout)")]
JsonFlag = Annotated[bool, typer.Option("--json", hidden=True, help="the same as --output json")]


def _emit_json(value: Any) -> None:
    """The command's result on stdout as JSON, and nothing else there."""
    typer.echo(json.dumps(value, indent=2, default=str))


@cli.command()
def run(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec, YAML or JSON"),
    out: Path | None = typer.Option(None, "--out", "-o", help="artifact folder (overrides output_dir)"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the spec's checkpoints first and start over "
                               "(default: resume from them)"),
) -> None:
    """Run a whole distillation locally and write the student's exports to a folder (exit 2: the spec is
    invalid, 3: the run failed)."""
    from worker.distill.errors import DistillError
    from worker.distill.progress import Callbacks
    from worker.distill.runner import run_job
    from worker.distill.spec import load_spec

    try:
        job = load_spec(spec)
    except DistillError as e:
        console.print(f"[red]error[/] [bold]{e.code}[/]: {escape(e.message)}")
        raise typer.Exit(EXIT_USAGE) from None
    if out is not None:
        job = job.model_copy(update={"output_dir": str(out.resolve())})
    if fresh:
        _remove_checkpoints(job)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("loading", total=1.0, info="")
            callbacks = Callbacks(
                on_phase=lambda phase: bar.update(task, description=phase),
                on_progress=lambda p: bar.update(
                    task, completed=p.fraction,
                    info=f"{p.run} epoch {p.epoch}/{p.epochs} loss {p.loss:.3f} {p.samples_per_s:,.0f}/s"),
                on_epoch=lambda m: bar.console.print(
                    f"[dim]{m.run} epoch {m.epoch}/{m.epochs}[/] loss {m.train_loss:.4f}  "
                    f"val acc {m.student_accuracy:.4f}"
                    + (f"  teacher {m.teacher_accuracy:.4f}  agreement {m.agreement:.4f}"
                       if m.teacher_accuracy is not None else "") + ("  [green]best[/]" if m.best else "")
                    + ("  [dim](from the checkpoint)[/]" if m.replayed else "")),
                on_event=lambda kind, message, data: bar.console.print(_run_event_line(kind, message, data),
                                                                       soft_wrap=True),
            )
            result = run_job(job, callbacks)
    except DistillError as e:
        console.print(f"[red]error[/] [bold]{e.code}[/]: {escape(e.message)}")
        raise typer.Exit(_run_exit(e)) from None
    for table in result_tables(result.metrics):
        console.print(table)
    for w in getattr(result, "warnings", None) or []:
        code, message = (w.get("code"), w.get("message")) if isinstance(w, dict) else (None, str(w))
        console.print(_run_event_line("warning", str(message), {"code": code}), soft_wrap=True)
    for f in result.files:
        console.print(f"  {result.output_dir / f.name}  {f.size_bytes:,} bytes  sha256 {f.sha256[:12]}…")
    json.dump(result.metrics, sys.stdout, default=str)
    sys.stdout.write("\n")


def _run_exit(e: Exception) -> int:
    """`kdistill run`'s exit code for an engine error: a setting out of range is the spec's fault (2)."""
    from worker.distill.errors import Cancelled, ConfigError

    return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_CANCELLED if isinstance(e, Cancelled) else EXIT_FAILED


def _remove_checkpoints(job: Any) -> None:
    """`run --fresh`: delete the checkpoint folder the spec resumes from (checkpoint_dir, else
    <output_dir>/checkpoints), so the run starts at epoch 0."""
    import shutil

    from worker.distill.spec import checkpoint_folder

    folder = checkpoint_folder(job)
    if folder.is_dir():
        shutil.rmtree(folder)
        console.print(f"[yellow]--fresh[/]: removed the checkpoints in {escape(str(folder))}", soft_wrap=True)
    elif folder.exists():
        folder.unlink()


def _run_event_line(kind: str, message: str, data: dict[str, Any]) -> str:
    """One engine event of `kdistill run` as a console line; a resumed run and a warning stand out."""
    if kind == "resumed":
        epoch = data.get("epoch")
        where = f"the checkpoint of epoch {epoch}" if epoch is not None else "a checkpoint"
        return f"[bold yellow]resuming from {where}[/] ({escape(message)}); pass --fresh to start over"
    if kind == "warning":
        code = data.get("code")
        return f"[bold yellow]warning[/]{f' [bold]{escape(str(code))}[/]' if code else ''}: {escape(message)}"
    return f"[cyan]{escape(kind)}[/] {escape(message)}"


@cli.command()
def models(name_filter: str | None = typer.Option(None, "--filter", help="part of the name, e.g. mobile"),
           family: str | None = typer.Option(None, help="torchvision, small or timm"),
           output: OutputOption = Output.table) -> None:
    """List the student (and state-dict teacher) architectures kdistill can build, with parameter counts;
    timm's (`timm:<name>`, with `pip install 'kdistill\\[timm]'`) are listed with --filter or --family timm."""
    from worker.distill.errors import StudentError
    from worker.distill.students import list_models, model_info, model_params

    try:
        # timm has over a thousand models, each counted on first sight: listed when a filter narrows them
        names = list_models(filter=name_filter, family=family, include_timm=name_filter is not None)
    except StudentError as e:
        console.print(f"[red]{escape(e.message)}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    rows = []
    for name in names:
        info = model_info(name)
        rows.append({"name": name, "family": info.family, "parameters": model_params(name),
                     "input_size": info.default_input_size, "min_input_size": info.min_input_size})
    if not rows:
        typer.echo(f"no architecture matches {name_filter!r}" + (f" in family {family}" if family else ""), err=True)
        raise typer.Exit(EXIT_ERROR)
    if output is Output.json:
        _emit_json(rows)
        return
    table = Table("name", "family", "parameters", "input", "min input", box=None)
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['parameters'] / 1e6:.2f}M", str(r["input_size"]),
                      str(r["min_input_size"]))
    stdout_console().print(table)


@cli.command()
def doctor() -> None:
    """Say which sandbox protections work on this host, with the KDISTILL_* settings of the environment;
    exit 1 when TorchScript teachers are allowed but cannot be contained (no Landlock)."""
    from app.settings import get_settings
    from worker.sandbox import Config, probe

    settings = get_settings()
    p = probe(Config.from_settings(settings))
    ok, bad = "[green]yes[/]", "[red]no[/]"
    limits = p["rlimits"]

    def size(n: int | None) -> str:
        return "no limit" if not n else f"{n / (1 << 30):.0f} GiB"

    table = Table("protection", "active", "detail", title="kdistill sandbox on this host")
    table.add_row("Landlock (files)", ok if p["landlock"] else bad,
                  f"ABI {p['landlock_abi']}" if p["landlock"] else "missing: children can read and write this "
                  "user's files")
    table.add_row("seccomp (network)", ok if p["seccomp"] else bad,
                  f"{p['seccomp_arch']}: sockets other than AF_UNIX refused" if p["seccomp"] else
                  "missing: children can open network connections")
    table.add_row("separate uid", ok if p["separate_uid"] else "[yellow]no[/]", escape(p["uid_note"]))
    table.add_row("process limit", ok if p["processes"] != "unbounded" else bad, p["processes"])
    table.add_row("memory limit", ok if limits["inspect_memory"] else bad,
                  f"inspection {size(limits['inspect_memory'])}, job {size(limits['job_memory'])} "
                  f"(on a GPU {size(limits['job_memory_gpu'])})")
    table.add_row("file size limit", ok if limits["max_file_bytes"] else bad, size(limits["max_file_bytes"]))
    console.print(table)
    if not settings.allow_torchscript:
        console.print("TorchScript teachers: switched off (KDISTILL_ALLOW_TORCHSCRIPT=false)")
    elif p["torchscript_contained"]:
        console.print("TorchScript teachers: allowed, and confined by Landlock")
    else:
        allowed = settings.allow_unconfined_torchscript
        console.print("[red]TorchScript teachers cannot be contained here[/] (no Landlock): "
                      + ("KDISTILL_ALLOW_UNCONFINED_TORCHSCRIPT lets them run anyway" if allowed else
                         "uploads and jobs are refused with torchscript_unsandboxed; set "
                         "KDISTILL_ALLOW_TORCHSCRIPT=false to say so"))
        raise typer.Exit(1)


# -- the one-machine service ------------------------------------------------------------------------------
DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option("--url", envvar="KDISTILL_URL", help="the kdistill server")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="KDISTILL_API_KEY", show_default=False,
                                            help="API key (where the server requires keys)")]
QUEUED_HINT = 60.0  # seconds queued before the watch suggests why


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=1, max=65535),
    data_dir: Path = typer.Option(Path("kdistill-data"), "--data-dir", envvar="KDISTILL_DATA_DIR",
                                  help="database, broker folder, uploads and artifacts"),
    auth: bool | None = typer.Option(None, "--auth/--no-auth", show_default=False,
                                     help="require API keys (default: off on a loopback host, on otherwise)"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run the API and one local worker on this machine (SQLite, filesystem broker; nothing else needed)."""
    from app.serve import ServeError
    from app.serve import serve as run_service

    try:
        code = run_service(host=host, port=port, data_dir=data_dir, auth=auth, log_level=log_level)
    except ServeError as e:
        console.print(f"[red]error[/] {e}")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@cli.command()
def worker(
    gpus: str = typer.Option("auto", help='"auto" (every visible GPU, else the CPU), "none", or ids such as "0,1"'),
    queues: str | None = typer.Option(None, help="comma-separated queues (default: gpu on GPUs, cpu on the CPU)"),
    name: str = typer.Option("", envvar="KDISTILL_WORKER_NAME",
                             help="prefix of the Celery node names (unique among workers of one host)"),
    loglevel: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Run this machine's Celery workers for a shared deployment: one per GPU (or one on the CPU), each
    running one job at a time, with the KDISTILL_* settings of the API (database, broker, store)."""
    from app.workers import plan_workers, run_workers

    plans = plan_workers(gpus, [q for q in queues.split(",") if q.strip()] if queues else None, name)
    for plan in plans:
        console.print(f"worker [bold]{plan.name}[/]: queues {', '.join(plan.queues)}, "
                      f"CUDA_VISIBLE_DEVICES={plan.env.get('CUDA_VISIBLE_DEVICES')!r}")
    raise typer.Exit(run_workers(plans, loglevel))


@cli.command("worker-health")
def worker_health(
    max_age: float = typer.Option(60.0, help="seconds since a worker's last heartbeat before it counts as dead"),
) -> None:
    """Exit 0 when every kdistill worker process of this host beat within MAX_AGE seconds (busy or idle):
    the container health check. It reads the heartbeat files in the data folder, not the broker or the
    database, so a worker busy with a job, or a database outage, does not make it fail."""
    import socket
    import time

    from app.settings import get_settings

    folder = get_settings().data_dir / "workers"
    host = socket.gethostname()
    beats = {p.name.removesuffix(".alive"): time.time() - p.stat().st_mtime
             for p in folder.glob(f"*@{host}.alive")} if folder.is_dir() else {}
    if not beats:
        console.print(f"no kdistill worker of host {host} has started (no heartbeat in {folder})")
        raise typer.Exit(1)
    for node, age in sorted(beats.items()):
        console.print(f"{node}: last heartbeat {age:.0f} s ago" + ("" if age <= max_age else " (too old)"))
    raise typer.Exit(0 if max(beats.values()) <= max_age else 1)


@keys_cli.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="the tenant the key acts for (created if new)"),
    name: str = typer.Option("", help="a label to recognise the key by"),
    data_dir: Path | None = typer.Option(None, "--data-dir", show_default=False,
                                         help="data dir of `kdistill serve` "
                                              "(default: KDISTILL_DATA_DIR, else kdistill-data)"),
    database_url: str | None = typer.Option(None, "--database-url", show_default=False,
                                            help="(default: KDISTILL_DATABASE_URL, else SQLite in the data dir)"),
) -> None:
    """Create an API key and print it (only it, on stdout: KEY=$(kdistill keys create --tenant t))."""
    from app.db import session_scope
    from app.keys import create_key

    url = _keys_database(data_dir, database_url)
    with session_scope(url) as session:
        key = create_key(session, tenant, name)
    console.print(f"created an API key for tenant [bold]{tenant}[/]; it is shown only now")
    typer.echo(key)


def _keys_database(data_dir: Path | None, database_url: str | None) -> str:
    """The database of `kdistill serve` (or of the settings), migrated to the current schema."""
    from app.migrate import upgrade
    from app.settings import Settings

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir.expanduser().resolve()
    if database_url is not None:
        overrides["database_url"] = database_url
    settings = Settings(**overrides)
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    return url


KeysDataDir = Annotated[Path | None, typer.Option("--data-dir", show_default=False,
                                                  help="data dir of `kdistill serve` (default: KDISTILL_DATA_DIR)")]
KeysDatabase = Annotated[str | None, typer.Option("--database-url", show_default=False,
                                                  help="(default: KDISTILL_DATABASE_URL, else SQLite in the data dir)")]


@keys_cli.command("list")
def keys_list(data_dir: KeysDataDir = None, database_url: KeysDatabase = None,
              output: OutputOption = Output.table) -> None:
    """List API keys (their id and first characters, never the key)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ApiKey, Tenant

    def when(t: Any) -> str | None:
        return f"{t:%Y-%m-%dT%H:%M:%S}Z" if t else None

    with session_scope(_keys_database(data_dir, database_url)) as s:
        rows = [{"id": key.id, "tenant": tenant.name, "name": key.name or None, "starts_with": key.prefix,
                 "created": when(key.created_at), "last_used": when(key.last_used_at),
                 "revoked": when(key.revoked_at)}
                for key, tenant in s.execute(select(ApiKey, Tenant).join(Tenant).order_by(ApiKey.created_at))]
    if output is Output.json:
        _emit_json(rows)
        return
    # one line per key, tab-separated, so that scripts can read it too
    typer.echo("\t".join(("id", "tenant", "name", "starts_with", "created", "last_used", "revoked")))
    for r in rows:
        typer.echo("\t".join("-" if not v else f"{v[:16]}Z" if k in ("created", "last_used", "revoked") else v
                             for k, v in r.items()))


@keys_cli.command("webhook-secret")
def keys_webhook_secret(
    tenant: str | None = typer.Option(None, "--tenant", show_default=False,
                                      help="the tenant (default: local, the tenant of a server without API keys)"),
    rotate: bool = typer.Option(False, "--rotate", help="replace the secret by a new one: receivers must switch to "
                                "it, as deliveries are signed with the new one from now on"),
    data_dir: KeysDataDir = None,
    database_url: KeysDatabase = None,
) -> None:
    """Print the tenant's webhook signing secret (only it, on stdout), made on first use: receivers of
    callback_url verify the Kdistill-Signature header with it."""
    from app.db import session_scope
    from app.keys import LOCAL_TENANT, webhook_secret

    name = tenant or LOCAL_TENANT
    with session_scope(_keys_database(data_dir, database_url)) as session:
        secret = webhook_secret(session, name, rotate=rotate)
    console.print(f"{'a new' if rotate else 'the'} webhook signing secret of tenant [bold]{escape(name)}[/]")
    typer.echo(secret)


@keys_cli.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key's id from `kdistill keys list`"),
                data_dir: KeysDataDir = None, database_url: KeysDatabase = None) -> None:
    """Revoke an API key: the API refuses it within seconds (its lookups are cached for 10 s)."""
    from app.db import session_scope
    from app.models import ApiKey, utcnow

    with session_scope(_keys_database(data_dir, database_url)) as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            console.print(f"[red]error[/] no API key with id {key_id!r}; see `kdistill keys list`")
            raise typer.Exit(1)
        key.revoked_at = key.revoked_at or utcnow()
    console.print(f"revoked {key_id}")


# -- client verbs ------------------------------------------------------------------------------------------
PROGRESS_INTERVAL = 5.0  # seconds between two plain progress lines of the same epoch
ProgressInterval = Annotated[float, typer.Option("--progress-interval", min=0.0, help="without a terminal: "
                                                 "seconds between two progress lines within one epoch")]


def _client(url: str, api_key: str | None) -> Any:
    from app.client import Client

    return Client(url, api_key=api_key)


def _fail(e: Exception) -> NoReturn:
    from app.client import KdistillError

    if isinstance(e, KdistillError):
        where = f" (field {e.field})" if e.field else ""
        console.print(f"[red]error[/] [bold]{e.code}[/]{escape(where)}: {escape(e.message)}")
    else:
        console.print(f"[red]error[/] {escape(str(e))}")
    raise typer.Exit(EXIT_ERROR)


def _outcome(status: str) -> None:
    """End a --wait/--watch with the exit code of the final status: 0 succeeded, 3 failed, 4 cancelled."""
    code = OUTCOMES.get(status, EXIT_ERROR)
    if code:
        raise typer.Exit(code)


def _csv_floats(value: str | None, option: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=option) from None


def _hp_pairs(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--hp")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _event_line(event: dict[str, Any]) -> str:
    kind = event["kind"]
    style = {"status": "bold", "epoch": "dim", "error": "red", "warning": "yellow",
             "resumed": "yellow"}.get(kind, "cyan")
    return f"[{style}]{escape(kind)}[/] {escape(event['message'])}"


class _Lines:
    """Progress without a terminal: a plain line on each change of status, phase, run or epoch, and within an
    epoch at most every `interval` s (a log or CI output gets a readable trace rather than a bar)."""

    def __init__(self, out: Console, interval: float) -> None:
        self.out, self.interval = out, interval
        self.key: tuple[Any, ...] | None = None
        self.line: str | None = None
        self.at = 0.0

    def show(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        key = (job["status"], job.get("phase"), p.get("run"), p.get("epoch"))
        line = progress_line(job)
        now = time.monotonic()
        if line == self.line or (key == self.key and now - self.at < self.interval):
            return
        self.out.print(line, markup=False, highlight=False, soft_wrap=True)
        self.key, self.line, self.at = key, line, now


def _watch(client: Any, job_id: str, timeout: float | None,
           interval: float = PROGRESS_INTERVAL) -> dict[str, Any]:
    """Follow the job until it ends, with its events as they come: on a terminal a live progress bar, else
    plain progress lines (see _Lines). From the job's stream, or by polling a server without one."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    seen: dict[str, Any] = {"after": None, "job": None, "hinted": False, "timed": False}
    columns = (TextColumn("[bold]{task.description:<10}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TextColumn("{task.fields[info]}"), TextColumn("[cyan]{task.fields[eta]}"))
    with Progress(*columns, console=console) if console.is_terminal else nullcontext() as bar:
        out = bar.console if bar is not None else console
        task = bar.add_task("queued", total=1.0, info="", eta="") if bar is not None else None
        lines = _Lines(out, interval)

        def show(job: dict[str, Any]) -> None:
            seen["job"] = job
            if job["status"] == "queued" and not seen["hinted"] and time.monotonic() - started > QUEUED_HINT:
                seen["hinted"] = True
                out.print(f"[yellow]still queued after {QUEUED_HINT:.0f} s[/]: the workers may be busy, or none "
                          f"serves queue {job['queue']!r} (`kdistill serve` runs one; `kdistill worker`)")
            if bar is None:
                lines.show(job)
                return
            p = job.get("progress") or {}
            info = ""
            if p.get("epochs"):
                info = f"{p.get('run') or 'student'} epoch {p.get('epoch', 0)}/{p['epochs']}"
                if p.get("loss") is not None:
                    info += f"  loss {p['loss']:.4f}"
                if p.get("samples_per_s"):
                    info += f"  {p['samples_per_s']:,.0f} samples/s"
            eta = p.get("eta_seconds")
            bar.update(task, completed=p.get("fraction") or 0.0, info=info,
                       description=job.get("phase") or job["status"],
                       eta=f"ETA {duration(eta)}" if eta is not None and job["status"] == "running" else "")

        while True:
            # A job that stays queued gets the hint above, but a quiet stream says nothing: until the job is seen
            # to leave the queue, follow it only until the hint is due.
            timed = not seen["timed"] and not seen["hinted"]
            until = min((t for t in (deadline, started + QUEUED_HINT if timed else None) if t is not None),
                        default=None)
            try:
                job = _watch_updates(client, job_id, until, seen, show, out, restart_on_start=timed)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    status = seen["job"]["status"] if seen["job"] else "queued"
                    raise TimeoutError(f"job {job_id} is still {status} after {timeout} s") from None
                seen["timed"] = True
                if seen["job"] is not None:
                    show(seen["job"])
                continue
            if job is not None:
                return job
            seen["timed"] = True  # the job left the queue: follow it without the hint's clock


def _watch_updates(client: Any, job_id: str, until: float | None, seen: dict[str, Any], show: Any, out: Console, *,
                   restart_on_start: bool) -> dict[str, Any] | None:
    """Show the job's updates until it ends (return it, as GET shows it), or until it runs when
    `restart_on_start` (return None). TimeoutError at `until` (a monotonic time)."""
    from contextlib import closing

    timeout = None if until is None else max(0.0, until - time.monotonic())
    job = seen["job"]
    with closing(client.follow(job_id, after=seen["after"], timeout=timeout)) as updates:
        for update in updates:
            if update.kind in ("epoch", "event"):
                out.print(_event_line(update.data), soft_wrap=True)
                seen["after"] = update.id
            elif update.kind == "job":
                job = update.data
                show(job)
                if restart_on_start and job["status"] == "running":
                    return None
            elif update.kind == "progress" and job is not None:
                job = {**job, "progress": update.data}
                show(job)
            elif update.kind == "end":
                job = client.get_job(job_id)
                show(job)
                return job
    raise RuntimeError(f"the updates of job {job_id} stopped before its end")  # follow() ends with `end`


def _watch_to_end(client: Any, job_id: str, timeout: float | None, interval: float, as_json: bool) -> dict[str, Any]:
    """_watch; past `timeout`, exit 5 (printing the job as it is with --output json)."""
    try:
        return _watch(client, job_id, timeout, interval)
    except TimeoutError as e:
        console.print(f"[yellow]timeout[/] {escape(str(e))}; it goes on (`kdistill status {job_id} --watch`)")
        if as_json:
            _emit_json(client.get_job(job_id))
        raise typer.Exit(EXIT_TIMEOUT) from None


def _report(job: dict[str, Any], out: Console) -> None:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(job["status"], "cyan")
    line = f"job [bold]{job['id']}[/] [{colour}]{job['status']}[/]"
    if job.get("phase"):
        line += f" ({job['phase']})"
    p = job.get("progress") or {}
    if job["status"] == "running" and p.get("epochs"):
        line += f"  epoch {p.get('epoch', 0)}/{p['epochs']}, {100 * (p.get('fraction') or 0):.1f}%"
        if p.get("eta_seconds") is not None:
            line += f", ETA {duration(p['eta_seconds'])}"
    out.print(line)
    if job.get("error"):
        out.print(f"[red]error[/] [bold]{escape(job['error']['code'])}[/]: {escape(job['error']['message'])}")
    for w in job.get("warnings") or []:
        out.print(f"[yellow]warning[/] [bold]{escape(str(w.get('code')))}[/]: {escape(str(w.get('message')))}")
    for table in result_tables(job.get("metrics") or {}):
        out.print(table)
    for a in job.get("artifacts") or []:
        out.print(f"  {a['name']:28s} {a['format']:12s} {a['size_bytes']:>12,} bytes  sha256 {a['sha256'][:12]}…",
                  soft_wrap=True)
    if job.get("artifacts_expired_at"):
        out.print(f"[yellow]artifacts expired[/] at {job['artifacts_expired_at']} (the retention period)")


def _check_inputs(teacher: Path | None, teacher_id: str | None, dataset: Path | None, dataset_id: str | None) -> None:
    if (teacher is None) == (teacher_id is None):
        raise typer.BadParameter("give exactly one of --teacher FILE and --teacher-id ID", param_hint="--teacher")
    if (dataset is None) == (dataset_id is None):
        raise typer.BadParameter("give exactly one of --dataset FILE and --dataset-id ID", param_hint="--dataset")


def _upload_inputs(client: Any, teacher: Path | None, teacher_id: str | None, dataset: Path | None,
                   dataset_id: str | None, teacher_form: dict[str, Any]) -> tuple[str, str]:
    """Upload the teacher and dataset files given (else take the ids given); the ids to submit with."""
    if teacher is not None:
        with console.status(f"uploading {teacher.name}..."):
            t = client.upload_teacher(teacher, **teacher_form)
        teacher_id = t["id"]
        named = f" ({escape(', '.join(t['classes'][:5]))}{', ...' if len(t['classes']) > 5 else ''})" \
            if t.get("classes") else ""
        console.print(f"teacher [bold]{teacher_id}[/]: {t['format']}, {t['num_classes']} classes{named}, "
                      f"input {t['input_channels']}x{t['input_size'][0]}x{t['input_size'][-1]}")
    if dataset is not None:
        with console.status(f"uploading {dataset.name}..."):
            d = client.upload_dataset(dataset)
        dataset_id = d["id"]
        console.print(f"dataset [bold]{dataset_id}[/]: {d['format']}, {d['num_classes']} classes, "
                      f"{d['num_train']} train / {d['num_val']} val / {d['num_unlabeled']} unlabeled")
    assert teacher_id is not None and dataset_id is not None
    return teacher_id, dataset_id


@cli.command()
def submit(
    student: str = typer.Option(..., "--student", help="student architecture (see `kdistill models`)"),
    teacher: Path | None = typer.Option(None, "--teacher", exists=True, dir_okay=False, help="teacher file to upload"),
    teacher_id: str | None = typer.Option(None, "--teacher-id", help="an uploaded teacher"),
    dataset: Path | None = typer.Option(None, "--dataset", exists=True, dir_okay=False, help="dataset to upload"),
    dataset_id: str | None = typer.Option(None, "--dataset-id", help="an uploaded dataset"),
    arch: str | None = typer.Option(None, "--arch", help="teacher architecture (state-dict teachers)"),
    num_classes: int | None = typer.Option(None, "--num-classes", help="teacher classes (state-dict teachers)"),
    input_channels: int = typer.Option(3, "--input-channels", help="teacher input channels"),
    input_size: int = typer.Option(224, "--input-size", help="teacher input size (square)"),
    mean: str | None = typer.Option(None, "--mean", help="teacher input mean, comma-separated per channel"),
    std: str | None = typer.Option(None, "--std", help="teacher input std, comma-separated per channel"),
    classes: str | None = typer.Option(None, "--classes", help="names of the teacher's outputs 0..N-1, "
                                       'comma-separated ("cat,dog,fox") or a JSON list (default: from the file)'),
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    learning_rate: float | None = typer.Option(None, "--learning-rate"),
    temperature: float | None = typer.Option(None, "--temperature"),
    alpha: float | None = typer.Option(None, "--alpha", help="weight of the distillation loss"),
    distillation: str | None = typer.Option(None, "--distillation", help="soft or hard"),
    hp: list[str] = typer.Option([], "--hp", help="any other hyperparameter, KEY=VALUE (repeatable)"),
    baseline: bool = typer.Option(False, "--baseline", help="also train the student on labels alone"),
    export: str = typer.Option("onnx,torchscript", "--export", help="comma-separated: onnx, torchscript, torch_export"),
    queue: str | None = typer.Option(None, "--queue", help="worker queue (default: the server's)"),
    max_run_seconds: float | None = typer.Option(None, "--max-run-seconds", min=0.001, show_default=False,
                                                 help="stop the job (failed, job_timeout) after this long running"),
    callback_url: str | None = typer.Option(None, "--callback-url", show_default=False, help="http(s) URL the "
                                            "server POSTs the job to, signed, when it ends (see `kdistill keys "
                                            "webhook-secret`)"),
    callback_epochs: bool = typer.Option(False, "--callback-epochs", help="also call --callback-url after each "
                                         "epoch"),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    wait: bool = typer.Option(False, "--wait", help="watch the job until it ends; the exit code tells how it "
                              "ended (0 succeeded, 3 failed, 4 cancelled, 5 timeout)"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --wait: give up after this many seconds"),
    progress_interval: ProgressInterval = PROGRESS_INTERVAL,
    output: OutputOption = Output.table,
    as_json: JsonFlag = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a distillation job (uploading the teacher and dataset files first when given); print its id,
    or with --output json the job (with --wait: the final job)."""
    _check_inputs(teacher, teacher_id, dataset, dataset_id)
    if callback_epochs and not callback_url:
        raise typer.BadParameter("--callback-epochs needs --callback-url", param_hint="--callback-epochs")
    json_out = as_json or output is Output.json
    hyper = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                               "temperature": temperature, "alpha": alpha, "distillation": distillation}.items()
             if v is not None}
    hyper.update(_hp_pairs(hp))
    formats = [f.strip() for f in export.split(",") if f.strip()]
    extra: dict[str, Any] = {k: v for k, v in {"queue": queue, "max_run_seconds": max_run_seconds}.items() if v}
    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            teacher_id, dataset_id = _upload_inputs(
                client, teacher, teacher_id, dataset, dataset_id, dict(
                    arch=arch, num_classes=num_classes, input_channels=input_channels, input_size=input_size,
                    mean=_csv_floats(mean, "--mean"), std=_csv_floats(std, "--std"), classes=classes))
            job = client.create_job(teacher_id, dataset_id, student, hyperparameters=hyper or None,
                                    export_formats=formats, baseline=baseline, idempotency_key=idempotency_key,
                                    callback_url=callback_url, callback_epochs=callback_epochs, **extra)
            console.print(f"job [bold]{job['id']}[/] {job['status']} on queue {job['queue']}")
            if wait:
                job = _watch_to_end(client, job["id"], timeout, progress_interval, json_out)
                _report(job, console)
    except KdistillError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped watching; the job goes on (`kdistill status ID --watch`, `kdistill cancel ID`)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_out:
        _emit_json(job)
    else:
        typer.echo(job["id"])
    if wait:
        _outcome(job["status"])


@cli.command()
def status(
    job_id: str = typer.Argument(..., help="the job's id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow the job until it ends; the exit code tells "
                               "how it ended (0 succeeded, 3 failed, 4 cancelled, 5 timeout)"),
    events: bool = typer.Option(False, "--events", help="also print the job's timeline (JSON: as `events`)"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --watch: give up after this many seconds"),
    progress_interval: ProgressInterval = PROGRESS_INTERVAL,
    output: OutputOption = Output.table,
    as_json: JsonFlag = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job: status, progress, metrics, artifacts."""
    from app.client import KdistillError

    json_out = as_json or output is Output.json
    timeline: list[dict[str, Any]] = []
    try:
        with _client(url, api_key) as client:
            job = _watch_to_end(client, job_id, timeout, progress_interval, json_out) if watch \
                else client.get_job(job_id)
            if events and not watch:
                timeline = client.events(job_id)
    except KdistillError as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_out:
        _emit_json({**job, "events": timeline} if events and not watch else job)
    else:
        out = stdout_console()
        for event in timeline:
            out.print(_event_line(event), soft_wrap=True)
        _report(job, out)
    if watch:
        _outcome(job["status"])


def _listing(fetch: Callable[[Any], Iterator[dict[str, Any]]], limit: int, output: Output,
             table: Callable[[Iterable[dict[str, Any]]], Table], url: str, api_key: str | None) -> None:
    """A list command: the first `limit` items `fetch(client)` gives, as a table or JSON."""
    from itertools import islice

    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            items = list(islice(fetch(client), limit))
    except KdistillError as e:
        _fail(e)
    if output is Output.json:
        _emit_json(items)
    else:
        stdout_console().print(table(items))


Limit = Annotated[int, typer.Option("--limit", min=1, help="how many, newest first")]


@cli.command()
def jobs(
    job_status: str | None = typer.Option(None, "--status", help="queued, running, succeeded, failed, cancelled"),
    limit: Limit = 20,
    output: OutputOption = Output.table,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List jobs, newest first."""
    _listing(lambda c: c.list_jobs(status=job_status, limit=min(limit, 200)), limit, output, jobs_table, url, api_key)


@cli.command()
def teachers(limit: Limit = 20, output: OutputOption = Output.table, url: Url = DEFAULT_URL,
             api_key: ApiKey = None) -> None:
    """List uploaded teachers, newest first."""
    _listing(lambda c: c.list_teachers(limit=min(limit, 200)), limit, output, teachers_table, url, api_key)


@cli.command()
def datasets(limit: Limit = 20, output: OutputOption = Output.table, url: Url = DEFAULT_URL,
             api_key: ApiKey = None) -> None:
    """List uploaded datasets, newest first."""
    _listing(lambda c: c.list_datasets(limit=min(limit, 200)), limit, output, datasets_table, url, api_key)


@cli.command()
def cancel(job_id: str = typer.Argument(...), url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job (queued: at once; running: at its next training step)."""
    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            job = client.cancel(job_id)
    except KdistillError as e:
        _fail(e)
    console.print(f"job {job_id}: {job['status']}" + (" (cancel requested)" if job["status"] == "running" else ""))


def _delete(kind: str, ids: list[str], url: str, api_key: str | None) -> None:
    """Delete each id in turn (each error is printed); exit 1 when any was refused."""
    from app.client import KdistillError

    refused = 0
    with _client(url, api_key) as client:
        remove = {"teacher": client.delete_teacher, "dataset": client.delete_dataset, "job": client.delete_job}[kind]
        for object_id in ids:
            try:
                remove(object_id)
            except KdistillError as e:
                refused += 1
                console.print(f"[red]error[/] {kind} {escape(object_id)}: [bold]{e.code}[/]: {escape(e.message)}")
                if e.code == "unreachable":
                    break
            else:
                console.print(f"deleted {kind} {object_id}")
    if refused:
        raise typer.Exit(EXIT_ERROR)


Ids = Annotated[list[str], typer.Argument(help="one or more ids (see `kdistill teachers`, `datasets`, `jobs`)")]


@delete_cli.command("teacher")
def delete_teacher(ids: Ids, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete teachers (refused while a queued or running job uses one: teacher_in_use)."""
    _delete("teacher", ids, url, api_key)


@delete_cli.command("dataset")
def delete_dataset(ids: Ids, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete datasets (refused while a queued or running job uses one: dataset_in_use)."""
    _delete("dataset", ids, url, api_key)


@delete_cli.command("job")
def delete_job(ids: Ids, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete finished jobs and their artifacts (refused while a job is queued or running: job_not_finished)."""
    _delete("job", ids, url, api_key)


@cli.command()
def download(
    job_id: str = typer.Argument(...),
    dest: Path | None = typer.Option(None, "--dest", help="folder (default: ./<job id>)"),
    names: list[str] = typer.Option([], "--name", help="artifact name (repeatable) (default: all)"),
    output: OutputOption = Output.table,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's artifacts (checked against their sha256, resuming an interrupted download); print each
    file's path (JSON: a list of {name, path, size_bytes, sha256})."""
    from app.client import KdistillError

    folder = dest or Path(job_id)
    written: list[dict[str, Any]] = []
    try:
        with _client(url, api_key) as client:
            job = client.get_job(job_id)
            artifacts = {a["name"]: a for a in job.get("artifacts") or []}
            wanted = names or list(artifacts)
            if not wanted:
                console.print(f"job {job_id} is {job['status']} and has no artifacts" +
                              (" (they expired)" if job.get("artifacts_expired_at") else " yet"))
                raise typer.Exit(EXIT_ERROR)
            folder.mkdir(parents=True, exist_ok=True)
            for name in wanted:
                path = client.download(job_id, name, folder)
                written.append({"name": name, "path": str(path), "size_bytes": path.stat().st_size,
                                "sha256": (artifacts.get(name) or {}).get("sha256")})
                if output is Output.table:
                    typer.echo(str(path))
    except KdistillError as e:
        _fail(e)
    if output is Output.json:
        _emit_json(written)


TENSORBOARD_ARTIFACT = "tensorboard.tar.gz"


class UnsafeArchive(Exception):
    """A tensorboard.tar.gz that is unreadable, or has a member that would land outside its folder or that is
    not a file or folder."""


def extract_events(archive: Path, dest: Path) -> int:
    """Unpack a job's tensorboard.tar.gz into `dest`; the number of files. Absolute paths, `..`, links and
    devices are refused (UnsafeArchive) before anything is written; tarfile's "data" filter checks again."""
    import tarfile
    from pathlib import PurePosixPath

    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name)
                if path.is_absolute() or m.name.startswith("\\") or ".." in path.parts or \
                        not (m.isfile() or m.isdir()):
                    raise UnsafeArchive(f"{archive.name} holds {m.name!r}, which is a link, a device, or a path "
                                        "outside its folder; nothing was extracted")
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError) as e:  # a damaged archive, or one the "data" filter refused
        raise UnsafeArchive(f"{archive.name} cannot be extracted: {e}") from None
    return sum(m.isfile() for m in members)


@cli.command()
def tensorboard(
    job_id: str = typer.Argument(..., help="a succeeded job"),
    logdir: Path | None = typer.Option(None, "--dir", show_default=False,
                                       help="folder for the event files (default: ./<job id>/tensorboard)"),
    port: int = typer.Option(6006, "--port", min=1, max=65535, help="TensorBoard's port"),
    launch: bool = typer.Option(True, "--launch/--no-launch", help="run TensorBoard on the files, or only "
                                "download them and print their folder"),
    command: str = typer.Option("tensorboard", "--tensorboard", envvar="KDISTILL_TENSORBOARD",
                                help="the tensorboard command (pip install 'kdistill\\[tensorboard]')"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's TensorBoard event files (its tensorboard.tar.gz artifact) and open them in TensorBoard."""
    import shutil
    import subprocess
    import tempfile

    from app.client import KdistillError

    folder = (logdir or Path(job_id) / "tensorboard").resolve()
    try:
        with _client(url, api_key) as client, tempfile.TemporaryDirectory(prefix="kdistill-tb-") as tmp:
            files = extract_events(client.download(job_id, TENSORBOARD_ARTIFACT, Path(tmp)), folder)
    except (KdistillError, UnsafeArchive) as e:
        _fail(e)
    console.print(f"{files} event file(s) of job {job_id} in {escape(str(folder))}", soft_wrap=True)
    if not launch:
        typer.echo(str(folder))
        return
    found = shutil.which(command)
    if found is None:
        console.print(f"[red]error[/] no {escape(command)!r} command: install TensorBoard with "
                      f"[bold]pip install 'kdistill\\[tensorboard]'[/], then run "
                      f"`tensorboard --logdir {escape(str(folder))}`", soft_wrap=True)
        typer.echo(str(folder))
        raise typer.Exit(EXIT_ERROR)
    console.print(f"TensorBoard on http://localhost:{port}/ (Ctrl-C stops it)")
    try:
        code = subprocess.call([found, "--logdir", str(folder), "--port", str(port)])
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@cli.command()
def example(
    dest: Path = typer.Argument(..., file_okay=False, help="folder to write the example into"),
    epochs: int = typer.Option(20, min=1, help="teacher training epochs"),
    seed: int = typer.Option(0),
) -> None:
    """Write a small teacher trained on scikit-learn's digits, a dataset, and the commands to distil it."""
    from app.example import commands, write_example

    files = write_example(dest, epochs=epochs, seed=seed, log=lambda m: console.print(f"[dim]{m}[/]"))
    console.print(f"wrote the example into {files.dir.resolve()} in {files.seconds:.0f} s "
                  f"(teacher held-out accuracy {files.teacher_test_accuracy:.4f}); see README.txt there.\n")
    typer.echo(commands(dest))


# -- sweeps ----------------------------------------------------------------------------------------------
sweep_cli = typer.Typer(no_args_is_help=True, help="Hyperparameter sweeps: many jobs, one search (Optuna).")
cli.add_typer(sweep_cli, name="sweep")


def _space_param(spec: str) -> tuple[str, Any]:
    """NAME=SPEC of --param: `a,b,c` a list, `low..high` a range, `low..high:log` a log range."""
    import yaml

    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise typer.BadParameter(f"expected NAME=VALUES or NAME=LOW..HIGH[:log], got {spec!r}", param_hint="--param")
    value = value.strip()
    if ".." in value:
        bounds, _, scale = value.partition(":")
        low, _, high = bounds.partition("..")
        try:
            return name.strip(), {"low": float(low), "high": float(high), "log": scale.strip() == "log"}
        except ValueError:
            raise typer.BadParameter(f"expected LOW..HIGH numbers, got {value!r}", param_hint="--param") from None
    return name.strip(), [yaml.safe_load(v) for v in value.split(",") if v.strip()]


def _sweep_space(space: str | None, params: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if space:
        try:
            out = json.loads(Path(space[1:]).read_text() if space.startswith("@") else space)
        except (OSError, ValueError) as e:
            raise typer.BadParameter(f"not a JSON object nor @FILE of one: {e}", param_hint="--space") from None
        if not isinstance(out, dict):
            raise typer.BadParameter("the space is a JSON object of dimensions", param_hint="--space")
    out.update(_space_param(p) for p in params)
    if not out:
        raise typer.BadParameter("give the search space: --space JSON or --param NAME=SPEC", param_hint="--space")
    return out


def _sweep_report(sweep: dict[str, Any], out: Console) -> None:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(sweep["status"], "cyan")
    c = sweep["counts"]
    out.print(f"sweep [bold]{sweep['id']}[/] [{colour}]{sweep['status']}[/]  {sweep['trials_started']}/"
              f"{sweep['max_trials']} trials started (" + ", ".join(f"{n} {k}" for k, n in c.items()
                                                                     if n and k != "total") + ")")
    if sweep.get("error"):
        out.print(f"[red]error[/] [bold]{escape(sweep['error']['code'])}[/]: {escape(sweep['error']['message'])}")
    names = sorted({k for t in sweep["trials"] for k in t["params"]})
    table = Table("#", Column("job", no_wrap=True, overflow="fold", min_width=28), "state", *names, "epochs",
                  sweep["metric"], box=None)
    for t in sweep["trials"]:
        mark = " [green]★[/]" if t["job_id"] == sweep.get("best_job_id") else ""
        table.add_row(str(t["number"]), t["job_id"], t["state"], *(_cell(t["params"].get(k)) for k in names),
                      str(t["epochs"]), (f"{t['value']:.4f}" if t["value"] is not None else "") + mark)
    if sweep["trials"]:
        out.print(table)
    if sweep.get("best_job_id"):
        params = ", ".join(f"{k}={_cell(v)}" for k, v in (sweep.get("best_params") or {}).items())
        out.print(f"best: job [bold]{sweep['best_job_id']}[/] {sweep['metric']} {sweep['best_value']:.4f}  {params}")


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


@sweep_cli.command("submit")
def sweep_submit(
    student: str = typer.Option(..., "--student", help="student architecture (see `kdistill models`)"),
    space: str | None = typer.Option(None, "--space", help="the search space as JSON (or @FILE), e.g. "
                                     '{"temperature": {"low": 1, "high": 8, "log": true}, "alpha": [0.5, 0.9]}'),
    param: list[str] = typer.Option([], "--param", help="one dimension, NAME=a,b,c or NAME=LOW..HIGH[:log] "
                                    "(repeatable): temperature, alpha, learning_rate, distillation, standardize"),
    max_trials: int = typer.Option(10, "--max-trials", min=1),
    max_parallel: int = typer.Option(2, "--max-parallel", min=1, help="trials running at once"),
    sampler_seed: int = typer.Option(0, "--seed", help="seed of the TPE sampler"),
    no_prune: bool = typer.Option(False, "--no-prune", help="let every trial run all its epochs"),
    teacher: Path | None = typer.Option(None, "--teacher", exists=True, dir_okay=False, help="teacher file to upload"),
    teacher_id: str | None = typer.Option(None, "--teacher-id", help="an uploaded teacher"),
    dataset: Path | None = typer.Option(None, "--dataset", exists=True, dir_okay=False, help="dataset to upload"),
    dataset_id: str | None = typer.Option(None, "--dataset-id", help="an uploaded dataset"),
    arch: str | None = typer.Option(None, "--arch", help="teacher architecture (state-dict teachers)"),
    num_classes: int | None = typer.Option(None, "--num-classes", help="teacher classes (state-dict teachers)"),
    input_channels: int = typer.Option(3, "--input-channels", help="teacher input channels"),
    input_size: int = typer.Option(224, "--input-size", help="teacher input size (square)"),
    mean: str | None = typer.Option(None, "--mean", help="teacher input mean, comma-separated per channel"),
    std: str | None = typer.Option(None, "--std", help="teacher input std, comma-separated per channel"),
    classes: str | None = typer.Option(None, "--classes", help="names of the teacher's outputs 0..N-1"),
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    hp: list[str] = typer.Option([], "--hp", help="any other hyperparameter of every trial, KEY=VALUE (repeatable)"),
    baseline: bool = typer.Option(False, "--baseline", help="also train each student on labels alone"),
    export: str = typer.Option("onnx", "--export", help="comma-separated: onnx, torchscript, torch_export"),
    queue: str | None = typer.Option(None, "--queue", help="worker queue (default: the server's)"),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    wait: bool = typer.Option(False, "--wait", help="follow the sweep until it ends; the exit code tells how it "
                              "ended (0 succeeded, 3 failed, 4 cancelled, 5 timeout)"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --wait: give up after this many seconds"),
    output: OutputOption = Output.table,
    as_json: JsonFlag = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a sweep: the inputs of `kdistill submit` plus a search space; print its id, or with --output json
    the sweep (with --wait: the final sweep)."""
    _check_inputs(teacher, teacher_id, dataset, dataset_id)
    search = _sweep_space(space, param)
    hyper = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size}.items() if v is not None}
    hyper.update(_hp_pairs(hp))
    extra: dict[str, Any] = {"queue": queue} if queue else {}
    if no_prune:
        extra["pruning"] = {"enabled": False}
    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            teacher_id, dataset_id = _upload_inputs(
                client, teacher, teacher_id, dataset, dataset_id, dict(
                    arch=arch, num_classes=num_classes, input_channels=input_channels, input_size=input_size,
                    mean=_csv_floats(mean, "--mean"), std=_csv_floats(std, "--std"), classes=classes))
            sweep = client.create_sweep(teacher_id, dataset_id, student, search, max_trials=max_trials,
                                        max_parallel=max_parallel, hyperparameters=hyper or None,
                                        export_formats=[f.strip() for f in export.split(",") if f.strip()],
                                        baseline=baseline, idempotency_key=idempotency_key,
                                        sampler_seed=sampler_seed, **extra)
            console.print(f"sweep [bold]{sweep['id']}[/] {sweep['status']}: {sweep['trials_started']} trial(s) "
                          f"queued, up to {max_trials}")
            if wait:
                sweep = _wait_sweep(client, sweep["id"], timeout, as_json or output is Output.json)
                _sweep_report(sweep, console)
    except KdistillError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped following; the sweep goes on (`kdistill sweep status ID`, `kdistill sweep cancel ID`)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json or output is Output.json:
        _emit_json(sweep)
    else:
        typer.echo(sweep["id"])
    if wait:
        _outcome(sweep["status"])


def _wait_sweep(client: Any, sweep_id: str, timeout: float | None, as_json: bool) -> dict[str, Any]:
    """Follow a sweep to its end, a line per change on stderr; past `timeout`, exit 5 (printing the sweep as
    it is with --output json)."""
    try:
        return client.wait_sweep(sweep_id, timeout=timeout, on_progress=lambda s: console.print(
            f"[dim]{s['status']}: " + ", ".join(f"{n} {k}" for k, n in s["counts"].items()
                                                if n and k != "total") + "[/]"))
    except TimeoutError as e:
        console.print(f"[yellow]timeout[/] {escape(str(e))}; it goes on (`kdistill sweep status {sweep_id} -w`)")
        if as_json:
            _emit_json(client.get_sweep(sweep_id))
        raise typer.Exit(EXIT_TIMEOUT) from None


@sweep_cli.command("status")
def sweep_status(
    sweep_id: str = typer.Argument(..., help="the sweep's id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow the sweep until it ends; the exit code tells "
                               "how it ended (0 succeeded, 3 failed, 4 cancelled, 5 timeout)"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --watch: give up after this many seconds"),
    output: OutputOption = Output.table,
    as_json: JsonFlag = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a sweep: its trials (params, state, epochs, value) and the best one."""
    from app.client import KdistillError

    json_out = as_json or output is Output.json
    try:
        with _client(url, api_key) as client:
            sweep = _wait_sweep(client, sweep_id, timeout, json_out) if watch else client.get_sweep(sweep_id)
    except KdistillError as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_out:
        _emit_json(sweep)
    else:
        _sweep_report(sweep, stdout_console())
    if watch:
        _outcome(sweep["status"])


@sweep_cli.command("list")
def sweep_list(
    sweep_status: str | None = typer.Option(None, "--status", help="running, succeeded, failed, cancelled"),
    limit: Limit = 20,
    output: OutputOption = Output.table,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List sweeps, newest first."""
    _listing(lambda c: c.list_sweeps(status=sweep_status, limit=min(limit, 200)), limit, output, sweeps_table, url,
             api_key)


@sweep_cli.command("cancel")
def sweep_cancel(sweep_id: str = typer.Argument(...), url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a sweep and its queued and running trials (completed ones keep their results)."""
    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            sweep = client.cancel_sweep(sweep_id)
    except KdistillError as e:
        _fail(e)
    console.print(f"sweep {sweep_id}: {sweep['status']}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
