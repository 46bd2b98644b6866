"""The `kdistill` command line: local runs (`run`, `example`), the one-machine service (`serve`, `keys`)
and the service's client verbs (`submit`, `status`, `jobs`, `cancel`, `download`, `sweep ...`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from app.report import result_tables

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill small, fast student models from large teachers.")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys of a kdistill database.")
cli.add_typer(keys_cli, name="keys")
console = Console(stderr=True)


@cli.command()
def run(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec, YAML or JSON"),
    out: Path | None = typer.Option(None, "--out", "-o", help="artifact folder (overrides output_dir)"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the spec's checkpoints first and start over "
                               "(default: resume from them)"),
) -> None:
    """Run a whole distillation locally and write the student's exports to a folder."""
    from worker.distill.errors import DistillError
    from worker.distill.progress import Callbacks
    from worker.distill.runner import run_job
    from worker.distill.spec import load_spec

    try:
        job = load_spec(spec)
        if out is not None:
            job = job.model_copy(update={"output_dir": str(out.resolve())})
        if fresh:
            _remove_checkpoints(job)
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
        raise typer.Exit(2) from None
    for table in result_tables(result.metrics):
        console.print(table)
    for w in getattr(result, "warnings", None) or []:
        code, message = (w.get("code"), w.get("message")) if isinstance(w, dict) else (None, str(w))
        console.print(_run_event_line("warning", str(message), {"code": code}), soft_wrap=True)
    for f in result.files:
        console.print(f"  {result.output_dir / f.name}  {f.size_bytes:,} bytes  sha256 {f.sha256[:12]}…")
    json.dump(result.metrics, sys.stdout, default=str)
    sys.stdout.write("\n")


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
           family: str | None = typer.Option(None, help="torchvision, small or timm")) -> None:
    """List the student (and state-dict teacher) architectures kdistill can build, with parameter counts;
    timm's (`timm:<name>`, with `pip install 'kdistill[timm]'`) are listed with --filter or --family timm."""
    from worker.distill.errors import StudentError
    from worker.distill.students import list_models, model_info, model_params

    table = Table("name", "family", "parameters", "input", "min input", box=None)
    try:
        # timm has over a thousand models, each counted on first sight: listed when a filter narrows them
        names = list_models(filter=name_filter, family=family, include_timm=name_filter is not None)
    except StudentError as e:
        console.print(f"[red]{escape(e.message)}[/]")
        raise typer.Exit(2) from None
    for name in names:
        info = model_info(name)
        table.add_row(name, info.family, f"{model_params(name) / 1e6:.2f}M", str(info.default_input_size),
                      str(info.min_input_size))
    if not table.row_count:
        typer.echo(f"no architecture matches {name_filter!r}" + (f" in family {family}" if family else ""), err=True)
        raise typer.Exit(1)
    Console().print(table)


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
def keys_list(data_dir: KeysDataDir = None, database_url: KeysDatabase = None) -> None:
    """List API keys (their id and first characters, never the key)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ApiKey, Tenant

    def when(t: Any) -> str:
        return f"{t:%Y-%m-%dT%H:%M}Z" if t else "-"

    # one line per key, tab-separated, so that scripts can read it too
    typer.echo("\t".join(("id", "tenant", "name", "starts_with", "created", "last_used", "revoked")))
    with session_scope(_keys_database(data_dir, database_url)) as s:
        for key, tenant in s.execute(select(ApiKey, Tenant).join(Tenant).order_by(ApiKey.created_at)):
            typer.echo("\t".join((key.id, tenant.name, key.name or "-", key.prefix, when(key.created_at),
                                  when(key.last_used_at), when(key.revoked_at))))


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
def _client(url: str, api_key: str | None) -> Any:
    from app.client import Client

    return Client(url, api_key=api_key)


def _fail(e: Exception) -> NoReturn:
    from app.client import KdistillError

    if isinstance(e, KdistillError):
        where = f" (field {e.field})" if e.field else ""
        console.print(f"[red]error[/] [bold]{e.code}[/]{escape(where)}: {escape(e.message)}")
    else:
        console.print(f"[red]error[/] {e}")
    raise typer.Exit(1)


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


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _event_line(event: dict[str, Any]) -> str:
    kind = event["kind"]
    style = {"status": "bold", "epoch": "dim", "error": "red", "warning": "yellow",
             "resumed": "yellow"}.get(kind, "cyan")
    return f"[{style}]{escape(kind)}[/] {escape(event['message'])}"


def _watch(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    """A live progress bar (and the job's events as they come) until the job ends: from the job's stream, or
    by polling a server without one."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    seen: dict[str, Any] = {"after": None, "job": None, "hinted": False, "timed": False}
    columns = (TextColumn("[bold]{task.description:<10}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TextColumn("{task.fields[info]}"), TextColumn("[cyan]{task.fields[eta]}"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("queued", total=1.0, info="", eta="")

        def show(job: dict[str, Any]) -> None:
            seen["job"] = job
            if job["status"] == "queued" and not seen["hinted"] and time.monotonic() - started > QUEUED_HINT:
                seen["hinted"] = True
                bar.console.print(f"[yellow]still queued after {QUEUED_HINT:.0f} s[/]: the workers may be busy, or "
                                  f"none serves queue {job['queue']!r} (`kdistill serve` runs one; `kdistill worker`)")
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
                       eta=f"ETA {_duration(eta)}" if eta is not None and job["status"] == "running" else "")

        while True:
            # A job that stays queued gets the hint above, but a quiet stream says nothing: until the job is seen
            # to leave the queue, follow it only until the hint is due.
            timed = not seen["timed"] and not seen["hinted"]
            until = min((t for t in (deadline, started + QUEUED_HINT if timed else None) if t is not None),
                        default=None)
            try:
                job = _watch_updates(client, job_id, until, seen, show, bar.console, restart_on_start=timed)
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


def _report(job: dict[str, Any], out: Console) -> None:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(job["status"], "cyan")
    line = f"job [bold]{job['id']}[/] [{colour}]{job['status']}[/]"
    if job.get("phase"):
        line += f" ({job['phase']})"
    p = job.get("progress") or {}
    if job["status"] == "running" and p.get("epochs"):
        line += f"  epoch {p.get('epoch', 0)}/{p['epochs']}, {100 * (p.get('fraction') or 0):.1f}%"
        if p.get("eta_seconds") is not None:
            line += f", ETA {_duration(p['eta_seconds'])}"
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
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    wait: bool = typer.Option(False, "--wait", help="watch the job until it ends"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --wait: give up after this many seconds"),
    as_json: bool = typer.Option(False, "--json", help="print the job as JSON instead of its id"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a distillation job (uploading the teacher and dataset files first when given); print its id."""
    _check_inputs(teacher, teacher_id, dataset, dataset_id)
    hyper = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                               "temperature": temperature, "alpha": alpha, "distillation": distillation}.items()
             if v is not None}
    hyper.update(_hp_pairs(hp))
    formats = [f.strip() for f in export.split(",") if f.strip()]
    extra: dict[str, Any] = {"queue": queue} if queue else {}
    from app.client import KdistillError

    try:
        with _client(url, api_key) as client:
            teacher_id, dataset_id = _upload_inputs(
                client, teacher, teacher_id, dataset, dataset_id, dict(
                    arch=arch, num_classes=num_classes, input_channels=input_channels, input_size=input_size,
                    mean=_csv_floats(mean, "--mean"), std=_csv_floats(std, "--std"), classes=classes))
            job = client.create_job(teacher_id, dataset_id, student, hyperparameters=hyper or None,
                                    export_formats=formats, baseline=baseline, idempotency_key=idempotency_key,
                                    **extra)
            console.print(f"job [bold]{job['id']}[/] {job['status']} on queue {job['queue']}")
            if wait:
                job = _watch(client, job["id"], timeout)
                _report(job, console)
    except (KdistillError, TimeoutError) as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped watching; the job goes on (`kdistill status ID --watch`, `kdistill cancel ID`)")
        raise typer.Exit(130) from None
    typer.echo(json.dumps(job, indent=2) if as_json else job["id"])
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


@cli.command()
def status(
    job_id: str = typer.Argument(..., help="the job's id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="a live progress bar until the job ends"),
    events: bool = typer.Option(False, "--events", help="also print the job's timeline"),
    as_json: bool = typer.Option(False, "--json", help="print the job as JSON"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --watch: give up after this many seconds"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job: status, progress, metrics, artifacts (exit 1 when --watch ends in failed/cancelled)."""
    from app.client import KdistillError

    out = Console()
    try:
        with _client(url, api_key) as client:
            job = _watch(client, job_id, timeout) if watch else client.get_job(job_id)
            if events and not watch:
                for event in client.events(job_id):
                    out.print(_event_line(event), soft_wrap=True)
    except (KdistillError, TimeoutError) as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        _report(job, out)
    if watch and job["status"] != "succeeded":
        raise typer.Exit(1)


@cli.command()
def jobs(
    job_status: str | None = typer.Option(None, "--status", help="queued, running, succeeded, failed, cancelled"),
    limit: int = typer.Option(20, min=1, help="how many, newest first"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List jobs, newest first."""
    from itertools import islice

    from app.client import KdistillError

    table = Table("status", "student", "progress", "student acc", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=28))
    try:
        with _client(url, api_key) as client:
            for job in islice(client.list_jobs(status=job_status, limit=min(limit, 200)), limit):
                acc = (job.get("metrics") or {}).get("student_accuracy")
                table.add_row(job["id"], job["status"], job["request"]["student"]["arch"],
                              f"{100 * ((job.get('progress') or {}).get('fraction') or 0):.0f}%",
                              f"{acc:.4f}" if isinstance(acc, float) else "", str(job["created_at"])[:19])
    except KdistillError as e:
        _fail(e)
    Console().print(table)


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


@cli.command()
def download(
    job_id: str = typer.Argument(...),
    dest: Path | None = typer.Option(None, "--dest", help="folder (default: ./<job id>)"),
    names: list[str] = typer.Option([], "--name", help="artifact name (repeatable) (default: all)"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's artifacts (checked against their sha256); print each file's path."""
    from app.client import KdistillError

    folder = dest or Path(job_id)
    try:
        with _client(url, api_key) as client:
            job = client.get_job(job_id)
            available = [a["name"] for a in job.get("artifacts") or []]
            wanted = names or available
            if not wanted:
                console.print(f"job {job_id} is {job['status']} and has no artifacts yet")
                raise typer.Exit(1)
            folder.mkdir(parents=True, exist_ok=True)
            for name in wanted:
                path = client.download(job_id, name, folder)
                typer.echo(str(path))
    except KdistillError as e:
        _fail(e)


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
    table = Table("#", Column("job", no_wrap=True, min_width=28), "state", *names, "epochs", sweep["metric"],
                  box=None)
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
    wait: bool = typer.Option(False, "--wait", help="follow the sweep until it ends"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --wait: give up after this many seconds"),
    as_json: bool = typer.Option(False, "--json", help="print the sweep as JSON instead of its id"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a sweep: the inputs of `kdistill submit` plus a search space; print its id."""
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
                sweep = client.wait_sweep(sweep["id"], timeout=timeout, on_progress=lambda s: console.print(
                    f"[dim]{s['status']}: " + ", ".join(f"{n} {k}" for k, n in s["counts"].items()
                                                        if n and k != "total") + "[/]"))
                _sweep_report(sweep, console)
    except (KdistillError, TimeoutError) as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped following; the sweep goes on (`kdistill sweep status ID`, `kdistill sweep cancel ID`)")
        raise typer.Exit(130) from None
    typer.echo(json.dumps(sweep, indent=2) if as_json else sweep["id"])
    if wait and sweep["status"] != "succeeded":
        raise typer.Exit(1)


@sweep_cli.command("status")
def sweep_status(
    sweep_id: str = typer.Argument(..., help="the sweep's id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow the sweep until it ends"),
    as_json: bool = typer.Option(False, "--json", help="print the sweep as JSON"),
    timeout: float | None = typer.Option(None, "--timeout", help="with --watch: give up after this many seconds"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a sweep: its trials (params, state, epochs, value) and the best one."""
    from app.client import KdistillError

    out = Console()
    try:
        with _client(url, api_key) as client:
            sweep = client.wait_sweep(sweep_id, timeout=timeout) if watch else client.get_sweep(sweep_id)
    except (KdistillError, TimeoutError) as e:
        _fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(sweep, indent=2))
    else:
        _sweep_report(sweep, out)
    if watch and sweep["status"] != "succeeded":
        raise typer.Exit(1)


@sweep_cli.command("list")
def sweep_list(
    sweep_status: str | None = typer.Option(None, "--status", help="running, succeeded, failed, cancelled"),
    limit: int = typer.Option(20, min=1, help="how many, newest first"),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List sweeps, newest first."""
    from itertools import islice

    from app.client import KdistillError

    table = Table("status", "student", "trials", "best", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=28))
    try:
        with _client(url, api_key) as client:
            for s in islice(client.list_sweeps(status=sweep_status, limit=min(limit, 200)), limit):
                table.add_row(s["id"], s["status"], s["request"]["student"]["arch"],
                              f"{s['trials_started']}/{s['max_trials']}",
                              f"{s['best_value']:.4f}" if s.get("best_value") is not None else "",
                              str(s["created_at"])[:19])
    except KdistillError as e:
        _fail(e)
    Console().print(table)


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
