"""The `kdistill` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill small, fast student models from large teachers.")
console = Console(stderr=True)


@cli.command()
def run(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec, YAML or JSON"),
    out: Path | None = typer.Option(None, "--out", "-o", help="artifact folder (overrides output_dir)"),
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
                       if m.teacher_accuracy is not None else "") + ("  [green]best[/]" if m.best else "")),
                on_event=lambda kind, message, data: bar.console.print(f"[cyan]{kind}[/] {message}"),
            )
            result = run_job(job, callbacks)
    except DistillError as e:
        console.print(f"[red]error[/] [bold]{e.code}[/]: {e.message}")
        raise typer.Exit(2) from None
    table = Table("metric", "value", title="result")
    for k, v in result.metrics.items():
        if k != "per_class":
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    for f in result.files:
        console.print(f"  {result.output_dir / f.name}  {f.size_bytes:,} bytes  sha256 {f.sha256[:12]}…")
    json.dump(result.metrics, sys.stdout, default=str)
    sys.stdout.write("\n")


@cli.command()
def models(family: str | None = typer.Option(None, help="torchvision or small")) -> None:
    """List the student (and state-dict teacher) architectures kdistill can build."""
    from worker.distill.students import list_models, model_info

    for name in list_models():
        info = model_info(name)
        if family in (None, info.family):
            typer.echo(f"{name:28s} {info.family:12s} input {info.default_input_size} (min {info.min_input_size})")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
