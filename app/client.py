"""A small typed Python client for the kdistill REST API (v1), on httpx.

    from app.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as kd:
        teacher = kd.upload_teacher("teacher.safetensors", arch="resnet20", num_classes=10,
                                    input_channels=1, input_size=8, mean=[0.3], std=[0.37])
        dataset = kd.upload_dataset("digits.npz")
        job = kd.create_job(teacher["id"], dataset["id"], "resnet8", hyperparameters={"epochs": 5})
        job = kd.wait(job["id"], timeout=600)       # follows the job's live stream
        for update in kd.stream(job["id"]):         # or the stream itself: job, progress, epoch, event, end
            print(update.kind, update.data)
        kd.download(job["id"], "student.onnx", "out/")  # resumes a ".part" left by an interrupted download
        kd.delete_job(job["id"])                    # finished jobs only; their artifacts go too
        sweep = kd.create_sweep(teacher["id"], dataset["id"], "resnet8", {"temperature": [2, 4, 8]}, max_trials=3)
        best = kd.wait_sweep(sweep["id"])["best_job_id"]

Every error the server answers is raised as `KdistillError(status, code, message, field)`; a server that
cannot be reached is `KdistillError(0, "unreachable", ...)`. Uploads and downloads stream from and to
disk; no file is read into memory whole. Uploading a file the tenant already has returns the existing teacher
or dataset (the server's de-duplication) unless `dedupe=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20
# The server sends a keep-alive every 15 s: a stream silent for longer has lost its connection. It is also why
# the last STREAM_SILENCE seconds before a timeout are polled: a read may block that long.
STREAM_SILENCE = 20.0
STREAM_RETRIES = 5  # reconnections in a row, without a message between them, before a stream is given up
STREAM_BACKOFF = 0.5  # seconds before the first reconnection, doubled for each next one
STREAM_MAX_BACKOFF = 4.0


class KdistillError(Exception):
    """An error answer of the API: HTTP `status`, stable machine-readable `code`, human `message`, `field`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field
        self.body = body or {}


@dataclass(frozen=True)
class JobUpdate:
    """One message about a job: `kind` is the stream's event name (job, progress, epoch, event, end), `data` its
    JSON (the job, its progress, an event, {"status"}), `id` the event id of epoch and event messages."""

    kind: str
    data: dict[str, Any]
    id: int | None = None


@dataclass
class _Seen:
    """What a follower of one job has passed on, so that a resumed stream or a poll repeats none of it."""

    after: int | None = None  # the last event id
    job: dict[str, Any] | None = None  # the last job, without its progress
    progress: dict[str, Any] | None = None
    ended: bool = False
    messages: int = 0  # messages received, passed on or not

    def fresh(self, update: JobUpdate) -> bool:
        self.messages += 1
        if update.kind == "job":
            view = {k: v for k, v in update.data.items() if k != "progress"}
            if view == self.job:
                return False
            self.job = view
        elif update.kind == "progress":
            if update.data == self.progress:
                return False
            self.progress = update.data
        elif update.id is not None:
            if self.after is not None and update.id <= self.after:
                return False
            self.after = update.id
        elif update.kind == "end":
            self.ended = True
        return True


class _PollNow(Exception):
    """Fewer than STREAM_SILENCE seconds are left before the caller's timeout: poll the rest."""


def _check_clock(deadline: float | None) -> None:
    if deadline is not None and deadline - time.monotonic() < STREAM_SILENCE:
        raise _PollNow


class _Clocked(httpx.SyncByteStream):
    """A stream's body that checks the clock at every chunk, keep-alives included: a quiet stream hands control
    back at least every 15 s, and a read blocks at most STREAM_SILENCE s, so a timeout holds."""

    def __init__(self, inner: Any, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            _check_clock(self._deadline)
            yield chunk

    def close(self) -> None:
        self._inner.close()


def _update(sse: ServerSentEvent) -> JobUpdate:
    try:
        data = sse.json() if sse.data else {}
    except ValueError as e:
        raise KdistillError(0, "invalid_stream", f"a {sse.event!r} message that is not JSON: {sse.data[:200]!r}") \
            from e
    # SSE keeps the last id for every later message; it names only the epoch or event that set it
    numbered = sse.event in ("epoch", "event") and sse.id.isascii() and sse.id.isdigit()
    return JobUpdate(sse.event, data if isinstance(data, dict) else {"value": data},
                     int(sse.id) if numbered else None)


def _job_updates(job: dict[str, Any], events: list[dict[str, Any]]) -> Iterator[JobUpdate]:
    """A polled job as the messages its stream sends, in the stream's order: job, events, progress, end."""
    yield JobUpdate("job", job)
    for event in events:
        yield JobUpdate("epoch" if event["kind"] == "epoch" else "event", event, event["id"])
    yield JobUpdate("progress", job.get("progress") or {})
    if job["status"] in TERMINAL:
        yield JobUpdate("end", {"status": job["status"]})


def _names(v: Sequence[str] | str | None) -> str | None:
    """Class names as the API takes them: a string as given (comma-separated or a JSON list), a list as
    a JSON list (so that a name may hold a comma)."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps([str(x) for x in v])


def _changes(job: dict[str, Any]) -> tuple[Any, ...]:
    """What `wait` reports a change of: status, phase, progress (and a cancel request, warnings)."""
    return (job.get("status"), job.get("phase"), json.dumps(job.get("progress"), sort_keys=True),
            job.get("cancel_requested"), len(job.get("warnings") or []))


def _floats(v: Sequence[float] | str | float | None) -> str | None:
    """mean/std as the API wants them: comma-separated floats."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return str(float(v))
    return ",".join(str(float(x)) for x in v)


class Client:
    """One connection pool to one kdistill server; use as a context manager or call `close()`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 *, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"User-Agent": "kdistill-client/1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        _raise_for(response)
        return response

    def _unreachable(self, e: httpx.TransportError) -> KdistillError:
        return KdistillError(0, "unreachable", f"cannot reach {self.base_url} ({type(e).__name__}: {e}); "
                             "is `kdistill serve` running there?")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            page = self._json("GET", path, params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["after"] = page["next_cursor"]

    def _upload(self, path: str, file: str | os.PathLike[str], data: dict[str, Any], dedupe: bool) -> dict[str, Any]:
        p = Path(file)
        # the server's default is to de-duplicate: the parameter is sent only to ask for a new object
        params = None if dedupe else {"dedupe": "false"}
        with p.open("rb") as f:  # httpx streams the open file in chunks
            return self._json("POST", path, files={"file": (p.name, f, "application/octet-stream")},
                              data={k: str(v) for k, v in data.items() if v is not None}, params=params)

    # -- health ----------------------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def readyz(self) -> dict[str, Any]:
        return self._json("GET", "/readyz")

    # -- teachers and datasets -------------------------------------------------------------------------
    def upload_teacher(self, path: str | os.PathLike[str], *, arch: str | None = None,
                       num_classes: int | None = None, input_channels: int = 3, input_size: int = 224,
                       mean: Sequence[float] | str | float | None = None,
                       std: Sequence[float] | str | float | None = None, format: str | None = None,
                       classes: Sequence[str] | str | None = None, dedupe: bool = True) -> dict[str, Any]:
        """Upload a checkpoint (safetensors / .pt state dict with `arch`, ONNX, TorchScript). `classes`: the
        names of its outputs 0..N-1 (a list, or one comma-separated or JSON-list string); default: the names
        the file carries, if any. A file the tenant already uploaded returns that teacher unless `dedupe=False`."""
        return self._upload("/v1/teachers", path, {
            "arch": arch, "num_classes": num_classes, "format": format, "input_channels": input_channels,
            "input_size": input_size, "mean": _floats(mean), "std": _floats(std), "classes": _names(classes)}, dedupe)

    def upload_dataset(self, path: str | os.PathLike[str], *, dedupe: bool = True) -> dict[str, Any]:
        """Upload an ImageFolder .zip / .tar.gz or an .npz (x, y, optional x_val, y_val, x_unlabeled); a file
        the tenant already uploaded returns that dataset unless `dedupe=False`."""
        return self._upload("/v1/datasets", path, {}, dedupe)

    def get_teacher(self, teacher_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/teachers/{teacher_id}")

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def list_teachers(self, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every teacher, newest first, fetched `limit` per request."""
        return self._pages("/v1/teachers", {"limit": limit})

    def list_datasets(self, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every dataset, newest first, fetched `limit` per request."""
        return self._pages("/v1/datasets", {"limit": limit})

    def delete_teacher(self, teacher_id: str) -> None:
        """Delete a teacher; 409 `teacher_in_use` while a queued or running job uses it."""
        self._request("DELETE", f"/v1/teachers/{teacher_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; 409 `dataset_in_use` while a queued or running job uses it."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # -- jobs ------------------------------------------------------------------------------------------
    def create_job(self, teacher_id: str, dataset_id: str, student_arch: str, *,
                   hyperparameters: dict[str, Any] | None = None, export_formats: Sequence[str] | None = None,
                   baseline: bool = False, idempotency_key: str | None = None, callback_url: str | None = None,
                   callback_epochs: bool = False, **extra: Any) -> dict[str, Any]:
        """Create a job (202). `callback_url` receives the job, signed, on its final status (and after each epoch
        with `callback_epochs`). `extra` goes into the body as is (`data`, `queue`, `max_run_seconds`, ...);
        `student={...}` adds student options (`input_size`, `mean`, `std`) to the arch."""
        if callback_url is not None:
            extra["callback_url"] = callback_url
        if callback_epochs:
            extra["callback_epochs"] = True
        body = _job_body(teacher_id, dataset_id, student_arch, hyperparameters, export_formats, baseline, extra)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every job (of one `status` if given), newest first, fetched `limit` per request."""
        return self._pages("/v1/jobs", {"status": status, "limit": limit})

    def events(self, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """The job's timeline, oldest first (after event id `after` if given)."""
        return list(self._pages(f"/v1/jobs/{job_id}/events", {"after": after, "limit": 1000}))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job and its artifacts; 409 `job_not_finished` while it is queued or running."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def stream(self, job_id: str, *, after: int | None = None) -> Generator[JobUpdate, None, None]:
        """The job's live stream (GET /v1/jobs/{id}/stream) until its `end` message: the job, its progress and
        its events after event id `after`. A dropped connection is resumed after the last event seen (up to
        STREAM_RETRIES times in a row); an error answer raises KdistillError (404/405: an older server)."""
        return self._stream(job_id, _Seen(after=after), None)

    def follow(self, job_id: str, *, after: int | None = None, timeout: float | None = None,
               poll: float = 1.0) -> Generator[JobUpdate, None, None]:
        """The job's updates, as `stream` gives them, until it ends; from a server without the stream (or
        whose stream keeps failing), and for the last STREAM_SILENCE s of a `timeout`, by polling every `poll`
        s. Raises TimeoutError after `timeout` s."""
        return self._follow(job_id, _Seen(after=after), timeout, poll, events=True)

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the job until it is succeeded, failed or cancelled and return it; `on_progress(job)` on the
        first look and then whenever its status, phase or progress changed. The changes come over the job's
        stream (as often as the server looks, its KDISTILL_STREAM_INTERVAL); a server without one is polled
        every `poll` s. Raises TimeoutError after `timeout` seconds (None: no limit)."""
        last: tuple[Any, ...] | None = None

        def report(job: dict[str, Any]) -> None:
            nonlocal last
            seen = _changes(job)
            if on_progress is not None and seen != last:
                on_progress(job)
            last = seen

        job: dict[str, Any] | None = None
        with closing(self._follow(job_id, _Seen(), timeout, poll, events=False)) as updates:
            for update in updates:
                if update.kind == "job":
                    job = update.data
                elif update.kind == "progress" and job is not None:
                    job = {**job, "progress": update.data}
                elif update.kind == "end":
                    break
                else:
                    continue
                report(job)
        job = self.get_job(job_id)  # the final job exactly as GET /v1/jobs/{id} shows it
        report(job)
        return job

    def _follow(self, job_id: str, seen: _Seen, timeout: float | None, poll: float,
                events: bool) -> Generator[JobUpdate, None, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            yield from self._stream(job_id, seen, deadline)
            return
        except _PollNow:
            pass
        except KdistillError:
            pass  # an older server (404/405) or a stream that keeps failing: polling tells what is wrong, if anything
        yield from self._poll(job_id, seen, deadline, timeout, poll, events)

    def _stream(self, job_id: str, seen: _Seen, deadline: float | None) -> Generator[JobUpdate, None, None]:
        failures = 0
        while True:
            _check_clock(deadline)
            received = seen.messages
            try:
                yield from self._connection(job_id, seen, deadline)
                if seen.ended:
                    return
                error = KdistillError(0, "stream_interrupted",
                                      f"the server closed the stream of job {job_id} before the job ended")
            except httpx.TransportError as e:  # read timeouts included: not even a keep-alive came
                error = self._unreachable(e)
            except KdistillError as e:
                if e.status < 500:
                    raise
                error = e
            # Retry only a stream that worked: a server that never streamed is for the caller to judge.
            if seen.messages == 0:
                raise error
            failures = 1 if seen.messages > received else failures + 1
            if failures > STREAM_RETRIES:
                raise error
            pause = min(STREAM_BACKOFF * 2 ** (failures - 1), STREAM_MAX_BACKOFF)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))

    def _connection(self, job_id: str, seen: _Seen, deadline: float | None) -> Iterator[JobUpdate]:
        """One connection to the stream: its new messages until it closes."""
        t = self._http.timeout
        timeout = httpx.Timeout(connect=t.connect, read=STREAM_SILENCE, write=t.write, pool=t.pool)
        params = {"after": seen.after} if seen.after is not None else None
        with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/stream", params=params, timeout=timeout) as source:
            response = source.response
            if response.is_error:
                response.read()
                _raise_for(response)
            if deadline is not None:
                response.stream = _Clocked(response.stream, deadline)
            try:
                for sse in source.iter_sse():
                    update = _update(sse)
                    if seen.fresh(update):
                        yield update
                    if update.kind == "end":
                        return
            except SSEError as e:
                raise KdistillError(response.status_code, "not_a_stream", f"GET /v1/jobs/{job_id}/stream: {e}") \
                    from e

    def _poll(self, job_id: str, seen: _Seen, deadline: float | None, timeout: float | None, poll: float,
              events: bool) -> Iterator[JobUpdate]:
        """The updates of the stream, from GET /v1/jobs/{id} (and its events) every `poll` s."""
        while True:
            job = self.get_job(job_id)
            for update in _job_updates(job, self.events(job_id, after=seen.after) if events else []):
                if seen.fresh(update):
                    yield update
            if seen.ended:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # -- sweeps ----------------------------------------------------------------------------------------
    def create_sweep(self, teacher_id: str, dataset_id: str, student_arch: str, space: dict[str, Any], *,
                     max_trials: int = 10, max_parallel: int = 2, hyperparameters: dict[str, Any] | None = None,
                     export_formats: Sequence[str] | None = None, baseline: bool = False,
                     idempotency_key: str | None = None, **extra: Any) -> dict[str, Any]:
        """Start a sweep (202): the job request of `create_job` plus the search `space`, e.g.
        `{"temperature": {"low": 1, "high": 8, "log": True}, "distillation": ["soft", "dkd"]}`. `extra` goes
        into the body as is (`pruning`, `sampler_seed`, `data`, ...)."""
        body = _job_body(teacher_id, dataset_id, student_arch, hyperparameters, export_formats, baseline, extra)
        body.update(space=space, max_trials=max_trials, max_parallel=max_parallel)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/sweeps", json=body, headers=headers)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sweeps/{sweep_id}")

    def list_sweeps(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every sweep (of one `status` if given), newest first, without their trials."""
        return self._pages("/v1/sweeps", {"status": status, "limit": limit})

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/sweeps/{sweep_id}/cancel")

    def wait_sweep(self, sweep_id: str, *, timeout: float | None = None, poll: float = 2.0,
                   on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the sweep is succeeded, failed or cancelled and return it; `on_progress(sweep)` on the
        first poll and whenever its status, trials or best changed. Raises TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: str | None = None
        while True:
            sweep = self.get_sweep(sweep_id)
            seen = json.dumps([sweep.get("status"), sweep.get("trials"), sweep.get("best_job_id")], sort_keys=True)
            if on_progress is not None and seen != last:
                on_progress(sweep)
            last = seen
            if sweep["status"] in TERMINAL:
                return sweep
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"sweep {sweep_id} is still {sweep['status']} after {timeout} s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def download(self, job_id: str, name: str, dest: str | os.PathLike[str] = ".") -> Path:
        """Stream artifact `name` to `dest` and check its sha256 against the ETag; a mismatch deletes the
        partial file and raises KdistillError(code="checksum_mismatch"). `dest` is a folder (created if
        missing: an existing folder, a path ending in "/", or one without a file suffix), else the file. The
        file is written as `<name>.part` first; a `.part` left by a dropped connection is resumed with a `Range`
        request (and fetched whole again if the resumed file fails its checksum)."""
        raw = os.fspath(dest)
        dest = Path(raw)
        as_folder = dest.is_dir() or raw.endswith(("/", os.sep)) or (not dest.exists() and not dest.suffix)
        target = dest / name if as_folder else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        offset = part.stat().st_size if part.is_file() else 0
        try:
            return self._download(job_id, name, target, part, offset)
        except _Restart:
            part.unlink(missing_ok=True)
            return self._download(job_id, name, target, part, 0)

    def _download(self, job_id: str, name: str, target: Path, part: Path, offset: int) -> Path:
        """One GET of the artifact into `part` (from byte `offset` when the server honours the range)."""
        digest = hashlib.sha256()
        headers = {"Range": f"bytes={offset}-"} if offset else None
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers) as response:
                if offset and response.status_code == 416:  # the .part is not a prefix of this file
                    raise _Restart
                if response.is_error:
                    response.read()
                    _raise_for(response)
                expected = (response.headers.get("x-checksum-sha256") or response.headers.get("etag", "")) \
                    .strip().removeprefix("W/").strip('"')
                resumed = offset > 0 and response.status_code == 206
                if resumed:
                    if _range_start(response.headers.get("content-range")) != offset:
                        raise _Restart
                    with part.open("rb") as f:
                        for chunk in iter(lambda: f.read(CHUNK), b""):
                            digest.update(chunk)
                with part.open("ab" if resumed else "wb") as f:
                    for chunk in response.iter_bytes():  # as received: a dropped connection loses none of it
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as e:
            # the bytes received so far stay in the .part: the next download of this file resumes them
            raise self._unreachable(e) from e
        except (_Restart, KeyboardInterrupt):
            raise
        except KdistillError as e:
            if e.status < 500:  # the server will not give this file; a 5xx may pass, and the .part with it
                part.unlink(missing_ok=True)
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if expected and digest.hexdigest() != expected:
            if resumed:
                raise _Restart  # the kept bytes were from another file, or damaged: fetch it whole once
            part.unlink(missing_ok=True)
            raise KdistillError(response.status_code, "checksum_mismatch", f"{name} arrived with sha256 "
                                f"{digest.hexdigest()}, the server announced {expected}; download it again")
        os.replace(part, target)
        return target


class _Restart(Exception):
    """A resumed download that cannot go on from its .part: start the file over."""


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes START-END/SIZE` header, None when there is none."""
    unit, _, rest = (content_range or "").partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _job_body(teacher_id: str, dataset_id: str, student_arch: str, hyperparameters: dict[str, Any] | None,
              export_formats: Sequence[str] | None, baseline: bool, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"teacher_id": teacher_id, "dataset_id": dataset_id,
                            "student": {**extra.pop("student", {}), "arch": student_arch}, "baseline": baseline}
    if hyperparameters is not None:
        body["hyperparameters"] = hyperparameters
    if export_formats is not None:
        body["export_formats"] = list(export_formats)
    body.update(extra)
    return body


def _raise_for(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        raise KdistillError(response.status_code, str(body["code"]), str(body.get("message", "")),
                            body.get("field"), body)
    text = response.text[:300] if response.text else response.reason_phrase
    raise KdistillError(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")
