"""`python -m worker.inspect teacher|dataset JSON [--sandbox POLICY]`: inspect an untrusted upload in a
throwaway process.

The API never opens uploads itself: a checkpoint or an image decoder can misbehave, and TorchScript can
run code. This process prints one JSON line, `{"ok": true, ...}` or `{"ok": false, "code", "message"}`.
With `--sandbox` it confines itself (worker.sandbox) before it imports torch or opens the upload.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

from worker.sandbox import (
    UNSANDBOXED_CODE,
    Confinement,
    SandboxError,
    as_violation,
    enter_from_argv,
    torchscript_refusal,
)


def inspect_teacher(args: dict[str, Any], confinement: Confinement | None = None) -> dict[str, Any]:
    from worker.distill.errors import TeacherError
    from worker.distill.spec import TeacherSpec, parse_model
    from worker.distill.teachers import detect_format, load_teacher

    spec = parse_model(TeacherSpec, args["spec"], prefix="teacher")
    path = Path(spec.path)
    if args.get("allow_torchscript", True) and (refusal := torchscript_refusal(confinement)) and (
            spec.format or (detect_format(path) if path.is_file() else None)) == "torchscript":
        raise TeacherError(refusal, code=UNSANDBOXED_CODE, field="teacher.path")
    teacher = load_teacher(spec, device="cpu", allow_torchscript=args.get("allow_torchscript", True))
    return teacher.describe()


def inspect_dataset(args: dict[str, Any], confinement: Confinement | None = None) -> dict[str, Any]:
    from worker.distill.data import inspect_dataset as inspect
    from worker.distill.spec import DataSpec, parse_model

    spec = parse_model(DataSpec, {"path": args["path"], **args.get("limits", {})}, prefix="data")
    with tempfile.TemporaryDirectory(dir=args.get("workdir")) as work:
        return inspect(args["path"], spec, workdir=Path(work)).to_dict()


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    out = sys.stdout
    sys.stdout = sys.stderr
    try:  # before torch is imported or the upload opened
        confinement = enter_from_argv(argv[3] if argv[2:3] == ["--sandbox"] else None)
    except (SandboxError, OSError) as e:
        out.write(json.dumps({"ok": False, "code": "sandbox_failed",
                              "message": f"the upload could not be inspected in a sandbox: {e}"}) + "\n")
        return 1
    warnings.simplefilter("ignore")
    from worker.distill.errors import DistillError

    try:
        kind, args = argv[0], json.loads(argv[1])
        result = {"teacher": inspect_teacher, "dataset": inspect_dataset}[kind](args, confinement)
        out.write(json.dumps({"ok": True, **result}) + "\n")
        return 0
    except DistillError as e:
        out.write(json.dumps({"ok": False, **as_violation(confinement, e.to_dict())}) + "\n")
        return 2
    except Exception as e:  # an upload that breaks a library is still the upload's fault
        traceback.print_exc()
        raw = {"code": "unreadable_upload", "message": f"{type(e).__name__}: {e}"}
        error = as_violation(confinement, raw)
        if error is raw:  # the library's own text can name server paths and internals: it went to the log
            error = {"code": "unreadable_upload", "message": f"the file could not be read ({type(e).__name__}); it "
                     "is damaged or not in a supported format"}
        out.write(json.dumps({"ok": False, **error}) + "\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
