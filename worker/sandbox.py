"""What every child process that touches untrusted files gets: no credentials, and death with its parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

# Settings carry the database URL and object-store secrets; a checkpoint that runs code must not see them.
SECRET_PREFIXES = ("KDISTILL_", "AWS_")
SECRET_NAMES = ("DATABASE_URL",)


def child_env() -> dict[str, str]:
    """This process's environment without credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SECRET_PREFIXES) and k not in SECRET_NAMES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_undumpable() -> None:
    """Keep same-user children (an uploaded TorchScript, say) from reading this process's environment and
    memory through /proc (PR_SET_DUMPABLE 0; Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(4, 0)  # PR_SET_DUMPABLE


def die_with_parent() -> None:
    """`preexec_fn`: the child gets SIGKILL when its parent dies, however it dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
