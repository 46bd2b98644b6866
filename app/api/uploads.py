"""Receiving untrusted uploads: streamed to disk in chunks, hashed, bounded, then inspected elsewhere."""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Settings
from worker.sandbox import child_env

from .errors import ApiError

CHUNK = 1 << 20
MULTIPART_OVERHEAD = 1 << 20  # room for the form's other fields and boundaries
STATUS_BY_CODE = {"unsupported_dataset_format": 415, "archive_too_large": 413, "archive_too_many_files": 413,
                  "dataset_too_large": 413}


class UploadTooLarge(StarletteHTTPException):
    code = "file_too_large"


class UploadGuard:
    """ASGI middleware for the upload routes: refuses a wrong content type (415) or a declared size past
    the limit (413) before the body is read, and stops a body that streams past the limit (413)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limits = {"/v1/teachers": settings.max_teacher_bytes, "/v1/datasets": settings.max_dataset_bytes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            await _refuse(415, "unsupported_media_type", "send the file as multipart/form-data (field 'file'), "
                          f"not {ctype or 'no content type'}", scope, receive, send)
            return
        allowed = limit + MULTIPART_OVERHEAD
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > allowed:
            await _refuse(413, "file_too_large", f"the upload is {int(length):,} bytes; this server takes files "
                          f"of at most {limit:,} bytes", scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > allowed:  # a chunked body that never declared its size
                raise UploadTooLarge(413, f"the upload is larger than this server's limit of {limit:,} bytes")
            return message

        # save_upload makes each upload's folder; they go before the answer's last byte (the route is done
        # with them by then), or when the request ends however it ends.
        folders: list[Path] = []

        async def remove_folders() -> None:
            while folders:
                await run_in_threadpool(release_folder, folders.pop())

        async def send_after_cleanup(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await remove_folders()
            await send(message)

        token = _upload_dirs.set(folders)
        try:
            await self.app(scope, counting_receive, send_after_cleanup)
        finally:
            _upload_dirs.reset(token)
            await remove_folders()


# The upload folders made during the current request (set by UploadGuard, filled by save_upload).
_upload_dirs: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("kdistill_upload_dirs", default=None)


async def _refuse(status: int, code: str, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    # Connection: close, so that the server hangs up instead of reading (and discarding) the refused body.
    await JSONResponse({"code": code, "message": message}, status_code=status,
                       headers={"Connection": "close"})(scope, receive, send)


def safe_filename(name: str | None, default: str) -> str:
    base = Path(name or default).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:200] or default


async def save_upload(upload: UploadFile, dest_dir: Path, limit: int) -> tuple[Path, int, str]:
    """Copy the upload chunk by chunk to `<dest_dir>/<fresh folder>/<its own name, made safe>`, so that
    every message about the file names it as the user did; return (path, size, sha256). The folder goes
    when the request ends (UploadGuard), or with `discard_upload`."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=dest_dir, prefix=UPLOAD_PREFIX))
    _hold(folder)
    folders = _upload_dirs.get()
    if folders is not None:
        folders.append(folder)
    path = folder / safe_filename(upload.filename, "upload")
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "xb") as f:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "file_too_large", f"the upload is larger than this server's limit of "
                                   f"{limit:,} bytes")
                h.update(chunk)
                await run_in_threadpool(f.write, chunk)
    except BaseException:
        discard_upload(path)
        raise
    if size == 0:
        discard_upload(path)
        raise ApiError(422, "empty_file", "the uploaded file is empty", "file")
    return path, size, h.hexdigest()


def discard_upload(path: Path) -> None:
    """Remove a file from save_upload and its folder."""
    release_folder(path.parent)


# An upload folder is held by an exclusive flock on its `.owner` file for as long as its request runs; the
# kernel drops the lock when the process dies, however it dies, so a folder nobody holds is an orphan of a
# killed server (any of several uvicorn workers sharing the folder) and goes at the next start-up.
UPLOAD_PREFIX = "upload-"
OWNER_FILE = ".owner"
ORPHAN_MIN_AGE = 60.0  # a folder without its lock file yet may be a fresh one, not an orphan
_held: dict[Path, int] = {}


def _hold(folder: Path) -> None:
    fd = os.open(folder / OWNER_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[folder] = fd


def release_folder(folder: Path) -> None:
    """Remove an upload folder and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def remove_orphaned_uploads(tmp_dir: Path) -> int:
    """Remove the upload folders in `tmp_dir` that no live process holds; return how many."""
    removed = 0
    for folder in tmp_dir.glob(f"{UPLOAD_PREFIX}*") if tmp_dir.is_dir() else []:
        owner = folder / OWNER_FILE
        try:
            if not owner.exists():
                if time.time() - folder.stat().st_mtime < ORPHAN_MIN_AGE:
                    continue
            else:
                fd = os.open(owner, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a request in another process still uses it
                finally:
                    os.close(fd)
        except FileNotFoundError:
            continue  # its request just finished and removed it
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


# The engine names fields as in a job spec; an upload's form fields are named differently.
FORM_FIELDS = {"teacher.arch": "arch", "teacher.num_classes": "num_classes", "teacher.input": "input_size",
               "teacher.path": "file", "teacher.format": "format", "teacher.classes": "classes",
               "teacher.input.channels": "input_channels"}


def inspect_in_child(kind: str, args: dict[str, Any], timeout: float,
                     fields: dict[str, str] | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Run `python -m worker.inspect` on an upload; a failure is the upload's 4xx, never our 500. `fields`
    renames the engine's fields for this request, over FORM_FIELDS.

    The child confines itself (worker.sandbox) to reading the upload and writing a fresh folder beside it,
    within the sandbox settings of `settings` (default: the environment's)."""
    import signal

    from app.settings import get_settings
    from worker.sandbox import Config, inspect_policy, log_protections_once

    settings = settings or get_settings()
    log_protections_once(settings)
    upload = Path(args["spec"]["path"] if kind == "teacher" else args["path"])
    work = Path(tempfile.mkdtemp(prefix="inspect-", dir=upload.parent))
    try:
        policy = inspect_policy(Config.from_settings(settings), work, [upload], timeout)
        command = [sys.executable, "-P", "-m", "worker.inspect", kind, json.dumps({**args, "workdir": str(work)}),
                   "--sandbox", policy.to_json()]  # -P: nothing in the child's folder is ever imported
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=child_env(),
                              cwd=str(work))
    except subprocess.TimeoutExpired:
        raise ApiError(422, f"{kind}_inspection_timeout", f"inspecting the {kind} took longer than {timeout:.0f} s; "
                       "it is too large or too slow to load") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode == -signal.SIGXCPU:
        raise ApiError(422, f"{kind}_inspection_timeout", f"inspecting the {kind} used more than its "
                       f"{policy.cpu_seconds} CPU seconds; it is too large or too slow to load")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ApiError(422, f"unreadable_{kind}", f"the {kind} could not be inspected (the inspector exited "
                       f"with status {proc.returncode}: {tail[0][:300]})")
    result = json.loads(lines[-1])
    if not result.pop("ok", False):
        code = result.get("code", f"invalid_{kind}")
        if code == "sandbox_failed":  # this server's fault, not the upload's
            raise ApiError(503, code, result.get("message", "the upload could not be inspected in a sandbox"))
        field = result.get("field")
        names = {**FORM_FIELDS, **(fields or {})}
        raise ApiError(STATUS_BY_CODE.get(code, 422), code, result.get("message", "invalid upload"),
                       names.get(field, field) if field else "file")
    return result
