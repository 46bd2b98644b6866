"""`kdistill sweep ...`: hyperparameter sweeps on the service (many jobs, one Optuna search)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from app.cli.common import (
    DEFAULT_URL,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    ApiKey,
    BatchSize,
    DatasetFile,
    DatasetId,
    Epochs,
    IdempotencyKey,
    InputChannels,
    InputMean,
    InputSize,
    InputStd,
    JsonFlag,
    Limit,
    Output,
    OutputOption,
    Queue,
    TeacherArch,
    TeacherClasses,
    TeacherFile,
    TeacherId,
    Url,
    _client,
    _csv_floats,
    _emit_json,
    _fail,
    _hp_pairs,
    _outcome,
    console,
    sweep_cli,
)
from app.cli.jobs import _check_inputs, _listing, _upload_inputs
from app.report import stdout_console, sweeps_table


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
    teacher: TeacherFile = None,
    teacher_id: TeacherId = None,
    dataset: DatasetFile = None,
    dataset_id: DatasetId = None,
    arch: TeacherArch = None,
    num_classes: TeacherClasses = None,
    input_channels: InputChannels = 3,
    input_size: InputSize = 224,
    mean: InputMean = None,
    std: InputStd = None,
    classes: str | None = typer.Option(None, "--classes", help="names of the teacher's outputs 0..N-1"),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    hp: list[str] = typer.Option([], "--hp", help="any other hyperparameter of every trial, KEY=VALUE (repeatable)"),
    baseline: bool = typer.Option(False, "--baseline", help="also train each student on labels alone"),
    export: str = typer.Option("onnx", "--export", help="comma-separated: onnx, torchscript, torch_export"),
    queue: Queue = None,
    idempotency_key: IdempotencyKey = None,
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
