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

from app.cli.common import EXIT_CODES, cli

# Importing each module registers its commands; `kdistill --help` lists them in that order (the groups keys,
# delete and sweep come after them, in the order common.py adds them), so keep these imports in this order.
# isort: off
from app.cli import local  # noqa: F401  run, models, doctor, serve, worker, worker-health
from app.cli import keys  # noqa: F401  keys create|list|webhook-secret|revoke
from app.cli import jobs  # noqa: F401  submit, status, jobs, teachers, datasets, cancel, delete ..., download
from app.cli import tensorboard  # noqa: F401  tensorboard
from app.cli import example  # noqa: F401  example
from app.cli import sweeps  # noqa: F401  sweep submit|status|list|cancel
# isort: on
from app.cli.tensorboard import UnsafeArchive, extract_events
from app.cli.watch import _watch

__all__ = ["EXIT_CODES", "UnsafeArchive", "_watch", "cli", "extract_events", "main"]


def main() -> None:
    cli()
