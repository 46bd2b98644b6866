"""Helpers of the sandbox suite: hostile TorchScript teachers, checksums, confined children, no Landlock."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from worker.sandbox import Policy, child_env

HERE = Path(__file__).resolve().parent
NO_LANDLOCK = HERE / "no_landlock.py"
# What a confined child runs first: the same entry worker.run and worker.inspect use.
PRELUDE = ("import json, os, sys\n"
           "from worker.sandbox import Policy, enter\n"
           "confinement = enter(Policy.from_json(sys.argv[1]))\n")


class WritesFile(nn.Module):
    """A 10-class "teacher" whose forward maps a file shared and overwrites its first bytes with 'A'."""

    def __init__(self, path: str, size: int = 64) -> None:
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        t.fill_(65)
        return x.flatten(1)[:, :10] + t[0].float() * 0  # uses t, so the write is not optimised away


class ReadsFile(nn.Module):
    """A 10-class "teacher" whose forward reads a file's first bytes (into its outputs)."""

    def __init__(self, path: str, size: int = 64) -> None:
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        return x.flatten(1)[:, :10] + t[:10].float().unsqueeze(0)


class Plain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def scripted(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_confined(policy: Policy, code: str, *, python: str = sys.executable, cwd: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 60) -> dict:
    """Run PRELUDE + `code` in a fresh interpreter confined by `policy`; `code` prints one JSON line last."""
    proc = subprocess.run([python, "-P", "-c", PRELUDE + code, policy.to_json()], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd or policy.write[0]), env=env or child_env(), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def without_landlock(command: list[str]) -> list[str]:
    """`command` run where landlock_create_ruleset fails with ENOSYS, as on a kernel without Landlock."""
    return [sys.executable, str(NO_LANDLOCK), *command]


def inspect_command(kind: str, args: dict, policy: Policy) -> list[str]:
    return [sys.executable, "-P", "-m", "worker.inspect", kind, json.dumps(args), "--sandbox", policy.to_json()]


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def env_with(**values: str) -> dict[str, str]:
    return {**os.environ, **values}
