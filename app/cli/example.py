"""`kdistill example`: a small teacher and dataset to try kdistill on, and the commands to distil it."""

from __future__ import annotations

from pathlib import Path

import typer

from app.cli.common import cli, console


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
