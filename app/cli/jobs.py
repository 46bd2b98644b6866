"""The service's client verbs for jobs and their inputs: submit, status, jobs, teachers, datasets, cancel,
delete and download."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import (
    DEFAULT_URL,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    PROGRESS_INTERVAL,
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
    ProgressInterval,
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
    cli,
    console,
    delete_cli,
)
from app.cli.watch import _event_line, _report, _watch_to_end
from app.report import datasets_table, jobs_table, stdout_console, teachers_table


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
    classes: str | None = typer.Option(None, "--classes", help="names of the teacher's outputs 0..N-1, "
                                       'comma-separated ("cat,dog,fox") or a JSON list (default: from the file)'),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate: float | None = typer.Option(None, "--learning-rate"),
    temperature: float | None = typer.Option(None, "--temperature"),
    alpha: float | None = typer.Option(None, "--alpha", help="weight of the distillation loss"),
    distillation: str | None = typer.Option(None, "--distillation", help="soft or hard"),
    hp: list[str] = typer.Option([], "--hp", help="any other hyperparameter, KEY=VALUE (repeatable)"),
    baseline: bool = typer.Option(False, "--baseline", help="also train the student on labels alone"),
    export: str = typer.Option("onnx,torchscript", "--export", help="comma-separated: onnx, torchscript, torch_export"),
    queue: Queue = None,
    max_run_seconds: float | None = typer.Option(None, "--max-run-seconds", min=0.001, show_default=False,
                                                 help="stop the job (failed, job_timeout) after this long running"),
    callback_url: str | None = typer.Option(None, "--callback-url", show_default=False, help="http(s) URL the "
                                            "server POSTs the job to, signed, when it ends (see `kdistill keys "
                                            "webhook-secret`)"),
    callback_epochs: bool = typer.Option(False, "--callback-epochs", help="also call --callback-url after each "
                                         "epoch"),
    idempotency_key: IdempotencyKey = None,
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
