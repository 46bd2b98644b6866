"""The commands that need no server: a local run (`run`), `models`, `doctor`, and the processes of the
service (`serve`, `worker`, `worker-health`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.cli.common import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_USAGE,
    Output,
    OutputOption,
    _emit_json,
    cli,
    console,
)
from app.report import result_tables, stdout_console


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
