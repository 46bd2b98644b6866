"""Following a job to its end on the console: a live progress bar on a terminal, else plain progress lines,
with the job's events as they come."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from app.cli import common
from app.cli.common import EXIT_TIMEOUT, PROGRESS_INTERVAL, _emit_json
from app.report import duration, progress_line, result_tables

QUEUED_HINT = 60.0  # seconds queued before the watch suggests why


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
    with Progress(*columns, console=common.console) if common.console.is_terminal else nullcontext() as bar:
        out = bar.console if bar is not None else common.console
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
        common.console.print(f"[yellow]timeout[/] {escape(str(e))}; it goes on (`kdistill status {job_id} --watch`)")
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
