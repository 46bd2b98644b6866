"""`kdistill tensorboard`: a job's TensorBoard event files, downloaded, safely unpacked and opened."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from app.cli.common import DEFAULT_URL, EXIT_ERROR, EXIT_INTERRUPTED, ApiKey, Url, _client, _fail, cli, console

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
