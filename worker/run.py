"""`python -m worker.run SPEC`: one distillation job for a supervising process.

Reads a job spec (JSON or YAML of file paths and settings), writes one JSON object per line on stdout
(`phase`, `progress`, `epoch`, `event`, then `result` or `error`), and resumes from the checkpoints in the
spec's checkpoint folder. Exit status: 0 done, 2 bad input (an `error` line with its code), 3 cancelled,
1 unexpected failure. Needs no database, network or credentials.

With `--sandbox POLICY` (JSON from worker.sandbox, as the supervisor passes it) the process confines itself
before it reads anything else: Landlock, seccomp, rlimits and a separate uid. A TorchScript teacher is then
refused (`torchscript_unsandboxed`) where Landlock is missing, unless the policy accepts that risk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


class JsonLines:
    """Writes events to the real stdout; anything else printing to stdout is sent to stderr instead."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, line_type: str, /, **payload: Any) -> None:
        line = json.dumps({"type": line_type, "time": time.time(), **_jsonable(payload)}, default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


def _jsonable(o: Any) -> Any:
    # NaN and infinity are not JSON; a reader in another language would choke on them.
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    return o


def _cancel_check(cancel_file: Path | None) -> Any:
    state = {"at": 0.0, "cancelled": False}

    def cancelled() -> bool:
        now = time.monotonic()
        if cancel_file is not None and not state["cancelled"] and now - state["at"] > 0.2:
            state["at"] = now
            state["cancelled"] = cancel_file.exists()
        return state["cancelled"] or _TERMINATED
    return cancelled


_TERMINATED = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _TERMINATED
    _TERMINATED = True  # stop at the next step, so the last epoch's checkpoint stays consistent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.run", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="job spec file (.json, .yaml); '-' reads JSON from stdin")
    parser.add_argument("--output-dir", help="where the artifacts go (overrides the spec)")
    parser.add_argument("--checkpoint-dir", help="checkpoint folder to resume from (overrides the spec)")
    parser.add_argument("--fresh", action="store_true", help="delete the checkpoints first: never resume")
    parser.add_argument("--cancel-file", help="stop cleanly at the next step once this file exists")
    parser.add_argument("--sandbox", metavar="POLICY", help="confine this process first (JSON, worker.sandbox)")
    args = parser.parse_args(argv)

    out = JsonLines(sys.stdout)
    sys.stdout = sys.stderr  # library chatter must not corrupt the JSON stream
    from worker.sandbox import SandboxError, as_violation, enter_from_argv, torchscript_refusal

    try:  # first of all: nothing untrusted has been opened yet, and no thread runs
        confinement = enter_from_argv(args.sandbox)
    except (SandboxError, OSError) as e:
        out.emit("error", code="sandbox_failed", message=f"the job could not be sandboxed: {e}")
        return EXIT_INTERNAL
    if confinement is not None:
        print(f"sandbox: {confinement.summary()}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)

    from worker.distill.errors import Cancelled, DistillError
    from worker.distill.progress import Callbacks
    from worker.distill.runner import run_job
    from worker.distill.spec import JobSpec, checkpoint_folder, load_spec, parse_model, resolve_paths
    from worker.distill.teachers import detect_format

    try:
        if args.spec == "-":
            spec = resolve_paths(parse_model(JobSpec, json.load(sys.stdin)), Path.cwd())
        else:
            spec = load_spec(args.spec)
        overrides = {k: str(Path(v).resolve()) for k, v in
                     (("output_dir", args.output_dir), ("checkpoint_dir", args.checkpoint_dir)) if v}
        spec = spec.model_copy(update=overrides)
        teacher = Path(spec.teacher.path)
        if spec.allow_torchscript_teacher and (refusal := torchscript_refusal(confinement)) and (
                spec.teacher.format or (detect_format(teacher) if teacher.is_file() else None)) == "torchscript":
            out.emit("error", code="torchscript_unsandboxed", message=refusal, field="teacher.path")
            return EXIT_BAD_INPUT
        if args.fresh:
            shutil.rmtree(checkpoint_folder(spec), ignore_errors=True)
        out.emit("started", pid=os.getpid(), spec=spec.model_dump(mode="json"),
                 sandbox=confinement.to_dict() if confinement is not None else None)
        callbacks = Callbacks(
            on_progress=lambda p: out.emit("progress", **p.to_dict()),
            on_epoch=lambda m: out.emit("epoch", **m.to_dict()),
            on_event=lambda kind, message, data: out.emit("event", kind=kind, message=message, data=data),
            on_phase=lambda phase: out.emit("phase", phase=phase),
            cancelled=_cancel_check(Path(args.cancel_file) if args.cancel_file else None),
        )
        result = run_job(spec, callbacks)
        out.emit("result", **result.to_dict())
        return EXIT_OK
    except Cancelled as e:
        out.emit("error", **e.to_dict())
        return EXIT_CANCELLED
    except DistillError as e:
        out.emit("error", **as_violation(confinement, e.to_dict()), traceback=traceback.format_exc())
        return EXIT_BAD_INPUT
    except Exception as e:  # the supervisor gets a readable line; the traceback travels beside it
        error = as_violation(confinement, {"code": "internal_error", "message": f"unexpected {type(e).__name__}: {e}"})
        out.emit("error", **error, traceback=traceback.format_exc())
        return EXIT_BAD_INPUT if error["code"] == "sandbox_violation" else EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
