"""The Python client and the CLI follow jobs over GET /v1/jobs/{id}/stream, against a real `kdistill serve`
(uvicorn and a Celery worker training real students on the example digits): `Client.stream()` yields each
epoch as it comes and ends with `end`, `wait()` follows the stream and returns the final job, and still works
against a server without the stream route. Only that missing route, and a dropped connection, are simulated
(in an httpx transport in front of the real server); everything else is the real service."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from service_support import Server, _env, kdistill, upload_example

import app.cli as cli
import app.cli.common as cli_common
import app.client as client_module
from app.client import Client, JobUpdate

HYPER = {"batch_size": 64, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kdistill serve` whose streams look at their jobs every 0.2 s."""
    tmp = tmp_path_factory.mktemp("serve-stream")
    srv = Server.start(tmp, env=_env(KDISTILL_STREAM_INTERVAL="0.2", KDISTILL_PROGRESS_INTERVAL="0.2",
                                     OMP_NUM_THREADS="1"))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def uploaded(server: Server, example_dir: Path) -> tuple[str, str]:
    return upload_example(server.url, example_dir)


def submit(server: Server, uploaded: tuple[str, str], epochs: int, **extra: Any) -> str:
    with Client(server.url) as kd:
        return kd.create_job(*uploaded, "resnet8", export_formats=["onnx"],
                             hyperparameters={**HYPER, "epochs": epochs}, **extra)["id"]


@pytest.fixture(scope="module")
def streamed(server: Server, uploaded: tuple[str, str]) -> tuple[str, list[JobUpdate]]:
    """A job followed with `Client.stream()` from its submission to its end."""
    job_id = submit(server, uploaded, epochs=3)
    with Client(server.url) as kd:
        return job_id, list(kd.stream(job_id))


class Counting(httpx.BaseTransport):
    """The real server over HTTP; counts the requests by path. `refuse`: answer the stream route with that
    status, as a server without it does. `cut_after`: drop the first stream's connection after that many
    messages, as a network does."""

    def __init__(self, refuse: int | None = None, cut_after: int | None = None) -> None:
        self.real = httpx.HTTPTransport()
        self.refuse, self.cut_after = refuse, cut_after
        self.requests: list[httpx.URL] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url)
        stream = request.url.path.endswith("/stream")
        if stream and self.refuse is not None:
            body = {"code": "not_found" if self.refuse == 404 else "method_not_allowed", "message": "no such route"}
            return httpx.Response(self.refuse, json=body)
        response = self.real.handle_request(request)
        if stream and self.cut_after is not None:
            response.stream = _Cut(response.stream, self.cut_after)
            self.cut_after = None
        return response

    def count(self, suffix: str) -> int:
        return sum(1 for url in self.requests if url.path.endswith(suffix))

    def close(self) -> None:
        self.real.close()


class _Cut(httpx.SyncByteStream):
    def __init__(self, inner: Any, messages: int) -> None:
        self.inner, self.left = inner, messages

    def __iter__(self) -> Iterator[bytes]:
        buffer = b""
        for chunk in self.inner:
            buffer += chunk
            while b"\n\n" in buffer:  # pass on whole messages only, then fail as a dropped connection does
                message, buffer = buffer.split(b"\n\n", 1)
                if not message.startswith(b":"):
                    if self.left == 0:
                        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")
                    self.left -= 1
                yield message + b"\n\n"

    def close(self) -> None:
        self.inner.close()


def counting_get_job(kd: Client) -> list[str]:
    calls: list[str] = []
    get_job = kd.get_job

    def counted(job_id: str) -> dict[str, Any]:
        calls.append(job_id)
        return get_job(job_id)

    kd.get_job = counted  # type: ignore[method-assign]
    return calls


# -- the stream ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stream_yields_each_epoch_in_order_then_end(server: Server, streamed: tuple[str, list[JobUpdate]]):
    job_id, updates = streamed
    kinds = [u.kind for u in updates]
    assert kinds[0] == "job" and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    assert updates[-1].data == {"status": "succeeded"}, server.output()[-3000:]
    assert set(kinds) <= {"job", "progress", "epoch", "event", "end"}
    epochs = [u for u in updates if u.kind == "epoch"]
    assert [(u.data["data"]["run"], u.data["data"]["epoch"]) for u in epochs] == [("student", e) for e in (1, 2, 3)]
    numbered = [u for u in updates if u.kind in ("epoch", "event")]
    assert all(u.id == u.data["id"] for u in numbered) and all(u.id is None for u in updates if u not in numbered)
    with Client(server.url) as kd:
        assert [u.data for u in numbered] == kd.events(job_id), "every event once, in order, as /events has them"
        final = kd.get_job(job_id)
    statuses = [u.data["status"] for u in updates if u.kind == "job"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index), statuses
    # live: the epochs came while the job ran, each with the progress it had made
    running = [i for i, u in enumerate(updates) if u.kind == "job" and u.data["status"] == "running"]
    assert all(running[0] < updates.index(u) for u in epochs)
    fractions = [u.data["fraction"] for u in updates if u.kind == "progress" and "fraction" in u.data]
    assert any(0 < f < 1 for f in fractions) and fractions == sorted(fractions), fractions
    assert {k: v for k, v in final.items() if k != "progress"} == \
        {k: v for k, v in [u for u in updates if u.kind == "job"][-1].data.items() if k != "progress"}


@pytest.mark.slow
def test_a_dropped_stream_resumes_after_the_last_event_it_gave(server: Server,
                                                               streamed: tuple[str, list[JobUpdate]]):
    job_id, whole = streamed
    transport = Counting(cut_after=4)
    with Client(server.url, transport=transport) as kd:
        resumed = list(kd.stream(job_id))
    assert transport.count("/stream") == 2, transport.requests
    numbered = [u for u in resumed if u.id is not None]
    assert [u.data for u in numbered] == [u.data for u in whole if u.id is not None], "each event once, in order"
    second = transport.requests[-1]
    assert second.params["after"] == str(numbered[2].id), "resumed after the last event received"
    assert resumed[-1] == JobUpdate("end", {"status": "succeeded"})
    assert [u.kind for u in resumed].count("job") == 1, "the job resent on reconnection is not repeated"


def test_stream_of_an_unknown_job_raises_the_servers_error(server: Server):
    with Client(server.url) as kd, pytest.raises(client_module.KdistillError) as e:
        list(kd.stream("job_does_not_exist"))
    assert (e.value.status, e.value.code) == (404, "job_not_found")


# -- wait() and the CLI's watch, on one live job each ------------------------------------------------------
def watch(monkeypatch: pytest.MonkeyPatch, kd: Client, job_id: str) -> tuple[dict[str, Any], str]:
    """`kdistill status --watch` as the commands run it, its console captured."""
    out = io.StringIO()
    monkeypatch.setattr(cli_common, "console", Console(file=out, width=200, force_terminal=False))
    return cli._watch(kd, job_id, 240), out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("refuse", [None, 404], ids=["stream", "no-stream-route"])
def test_wait_and_the_watch_follow_a_running_job(server: Server, uploaded: tuple[str, str],
                                                 monkeypatch: pytest.MonkeyPatch, refuse: int | None):
    """wait() (in a thread) and the CLI's watch follow the same job at once: over the stream, or, from a server
    without the stream route, by polling as before."""
    job_id = submit(server, uploaded, epochs=2)
    waited: dict[str, Any] = {"seen": []}
    wait_transport, watch_transport = Counting(refuse=refuse), Counting(refuse=refuse)

    def wait() -> None:
        with Client(server.url, transport=wait_transport) as kd:
            polls = counting_get_job(kd)
            try:
                waited["job"] = kd.wait(job_id, timeout=240, poll=0.2, on_progress=waited["seen"].append)
            except BaseException as e:  # to the test's thread
                waited["error"] = e
            waited["polls"] = list(polls)

    thread = threading.Thread(target=wait)
    thread.start()
    with Client(server.url, transport=watch_transport) as kd:
        watched, printed = watch(monkeypatch, kd, job_id)
        final, events = kd.get_job(job_id), kd.events(job_id)
    thread.join(240)
    assert not thread.is_alive() and "error" not in waited, waited.get("error")
    assert final["status"] == "succeeded", server.output()[-3000:]

    # wait(): the final job as GET shows it, a report per change, each epoch's progress in order
    job, seen = waited["job"], waited["seen"]
    assert job == final and seen[-1] == final and seen[0]["id"] == job_id
    assert any(j["status"] == "running" for j in seen)
    epochs = [j["progress"].get("epoch") for j in seen if j["status"] == "running" and j["progress"].get("epoch")]
    assert epochs and epochs == sorted(epochs) and epochs[-1] == 2, epochs
    changes = [client_module._changes(j) for j in seen]
    assert all(a != b for a, b in itertools.pairwise(changes)), "a report per change, none repeated"
    # the watch: the same final job, every event printed once, in order, as it came
    assert watched == final
    lines = [line for line in printed.splitlines() if line.startswith(("status ", "epoch "))]
    assert [line for line in lines if line.startswith("epoch")] == \
        [f"epoch {e['message']}" for e in events if e["kind"] == "epoch"], printed
    assert lines[0] == "status queued" and lines[-1] == "status succeeded", printed

    if refuse is None:
        assert waited["polls"] == [job_id], "one GET, for the final job: every change came over the stream"
        assert wait_transport.count("/stream") == 1 and wait_transport.count("/events") == 0
        # one stream, or two: the watch reconnects once the job runs, to drop the clock of the still-queued hint
        assert 1 <= watch_transport.count("/stream") <= 2, watch_transport.requests
        assert watch_transport.count(f"/jobs/{job_id}") == 2 and watch_transport.count("/events") == 1  # the test's
    else:
        assert wait_transport.count("/stream") == 1, "a missing route is not retried"
        assert len(waited["polls"]) >= 3 and len(seen) >= 2
        assert 1 <= watch_transport.count("/stream") <= 2 and watch_transport.count(f"/jobs/{job_id}") > 2
        for status in (404, 405):  # and a job that has ended comes back at once, as it did
            transport = Counting(refuse=status)
            with Client(server.url, transport=transport) as kd:
                assert kd.wait(job_id) == final
            assert transport.count("/stream") == 1 and transport.count(f"/jobs/{job_id}") == 2  # a poll, the end


@pytest.mark.parametrize("busy", [pytest.param(False, id="quiet"),
                                  pytest.param(True, id="busy", marks=pytest.mark.slow)])
def test_wait_keeps_its_timeout_while_following_the_stream(server: Server, uploaded: tuple[str, str],
                                                           monkeypatch: pytest.MonkeyPatch, busy: bool):
    """Quiet: a job nobody runs, whose stream sends nothing but keep-alives. Busy: a long job whose progress
    streams all the time, so no read ever times out. wait() gives up on time either way. A 3 s read window
    stands for the 20 s one, so that the test needs seconds."""
    monkeypatch.setattr(client_module, "STREAM_SILENCE", 3.0)
    extra = {} if busy else {"queue": "nobody_serves_this"}
    job_id = submit(server, uploaded, epochs=2000 if busy else 1, **extra)
    transport = Counting()
    try:
        with Client(server.url, transport=transport) as kd:
            deadline = time.monotonic() + 120
            while busy and kd.get_job(job_id)["progress"].get("epoch", 0) < 1:
                assert time.monotonic() < deadline, server.output()[-3000:]
                time.sleep(0.2)
            outcome: dict[str, Any] = {}

            def wait() -> None:  # in a thread, so that an overrun fails here rather than hangs
                started = time.monotonic()
                try:
                    kd.wait(job_id, timeout=5, poll=0.2)
                except BaseException as e:
                    outcome["error"] = e
                outcome["took"] = time.monotonic() - started

            thread = threading.Thread(target=wait, daemon=True)
            thread.start()
            thread.join(15)
            assert not thread.is_alive(), "wait(timeout=5) still following the job after 15 s"
        assert isinstance(outcome.get("error"), TimeoutError), outcome
        assert f"is still {'running' if busy else 'queued'} after 5 s" in str(outcome["error"])
        assert 5 <= outcome["took"] < 6.5, outcome
        assert transport.count("/stream") == 1, "it followed the stream, then polled the last seconds"
    finally:
        with Client(server.url) as kd:
            kd.cancel(job_id)
            assert kd.wait(job_id, timeout=60, poll=0.2)["status"] == "cancelled"


def test_the_watch_keeps_its_timeout_and_exit_code(server: Server, uploaded: tuple[str, str]):
    job_id = submit(server, uploaded, epochs=1, queue="nobody_serves_this")
    try:
        started = time.monotonic()
        watched = kdistill("status", job_id, "--watch", "--timeout", "2", "--url", server.url, cwd=server.data_dir,
                           check=False)
        assert time.monotonic() - started < 15
        assert watched.returncode == 5 and f"job {job_id} is still queued after 2.0 s" in watched.stderr, \
            watched.stderr
    finally:
        with Client(server.url) as kd:
            kd.cancel(job_id)
    cancelled = kdistill("status", job_id, "--watch", "--url", server.url, cwd=server.data_dir, check=False)
    assert cancelled.returncode == 4 and "cancelled" in cancelled.stdout, (cancelled.stdout, cancelled.stderr)


# -- the server's stream, on a real socket ---------------------------------------------------------------
def test_a_last_event_id_the_server_never_sent_is_ignored(server: Server, uploaded: tuple[str, str]):
    job_id = submit(server, uploaded, epochs=1, queue="nobody_serves_this")
    with Client(server.url) as kd:
        kd.cancel(job_id)
        count = len(kd.events(job_id))
    for value in (b"abc", b"\xb2"):  # latin-1 superscript two: a byte any client or proxy may send
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": value},
                          timeout=10) as resp:
            body = resp.read().decode("utf-8", "replace")
        assert resp.status_code == 200, (value, body)
        ids = [line for line in body.splitlines() if line.startswith("id:")]
        assert len(ids) == count and "event: end" in body, (value, body)
