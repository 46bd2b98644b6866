"""What the `kdistill` commands share: the typer apps, exit codes, common options, the stderr console, and the
client's error handling and JSON output."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from app.report import stderr_console

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
OUTCOMES = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
# parsed from the docstring of the package (app.cli), which sys.modules holds before its first import runs
EXIT_CODES = (sys.modules[__package__].__doc__ or "").partition("\n\nExit codes:")[2].strip("\n")

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill small, fast student models from large teachers.",
                  epilog="Exit codes:\n" + EXIT_CODES)
keys_cli = typer.Typer(no_args_is_help=True, help="API keys of a kdistill database.")
cli.add_typer(keys_cli, name="keys")
delete_cli = typer.Typer(no_args_is_help=True, help="Delete teachers, datasets or finished jobs on the server.")
cli.add_typer(delete_cli, name="delete")
sweep_cli = typer.Typer(no_args_is_help=True, help="Hyperparameter sweeps: many jobs, one search (Optuna).")
cli.add_typer(sweep_cli, name="sweep")
console = stderr_console()


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table (for people) or json (for scripts: "
                                              "the JSON alone on stdout)")]
JsonFlag = Annotated[bool, typer.Option("--json", hidden=True, help="the same as --output json")]

# The inputs `submit` and `sweep submit` share: the teacher and dataset, as files to upload or uploaded ids.
TeacherFile = Annotated[Path | None, typer.Option("--teacher", exists=True, dir_okay=False,
                                                  help="teacher file to upload")]
TeacherId = Annotated[str | None, typer.Option("--teacher-id", help="an uploaded teacher")]
DatasetFile = Annotated[Path | None, typer.Option("--dataset", exists=True, dir_okay=False,
                                                  help="dataset to upload")]
DatasetId = Annotated[str | None, typer.Option("--dataset-id", help="an uploaded dataset")]
TeacherArch = Annotated[str | None, typer.Option("--arch", help="teacher architecture (state-dict teachers)")]
TeacherClasses = Annotated[int | None, typer.Option("--num-classes", help="teacher classes (state-dict teachers)")]
InputChannels = Annotated[int, typer.Option("--input-channels", help="teacher input channels")]
InputSize = Annotated[int, typer.Option("--input-size", help="teacher input size (square)")]
InputMean = Annotated[str | None, typer.Option("--mean", help="teacher input mean, comma-separated per channel")]
InputStd = Annotated[str | None, typer.Option("--std", help="teacher input std, comma-separated per channel")]
Epochs = Annotated[int | None, typer.Option("--epochs")]
BatchSize = Annotated[int | None, typer.Option("--batch-size")]
Queue = Annotated[str | None, typer.Option("--queue", help="worker queue (default: the server's)")]
IdempotencyKey = Annotated[str | None, typer.Option("--idempotency-key")]


def _emit_json(value: Any) -> None:
    """The command's result on stdout as JSON, and nothing else there."""
    typer.echo(json.dumps(value, indent=2, default=str))


# -- options of the client verbs ----------------------------------------------------------------------------
DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option("--url", envvar="KDISTILL_URL", help="the kdistill server")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="KDISTILL_API_KEY", show_default=False,
                                            help="API key (where the server requires keys)")]
PROGRESS_INTERVAL = 5.0  # seconds between two plain progress lines of the same epoch
ProgressInterval = Annotated[float, typer.Option("--progress-interval", min=0.0, help="without a terminal: "
                                                 "seconds between two progress lines within one epoch")]
Limit = Annotated[int, typer.Option("--limit", min=1, help="how many, newest first")]


# -- the client's calls -------------------------------------------------------------------------------------
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
