"""GET /v1/jobs/{id}/stream on the real app, on SQLite and PostgreSQL: the order of its messages for a finished
job, resuming after an event id (`after`, `Last-Event-ID`), tenants and unknown jobs (JSON errors before any
stream), and a running job whose rows are written while the stream is open (what a worker writes, through
app.lifecycle), shown as they come and closed by `end`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from api_support import Env, assert_error
from fastapi.testclient import TestClient
from httpx_sse import connect_sse
from sqlalchemy import delete, select

from app import lifecycle
from app.db import session_scope
from app.jobs import add_event
from app.lifecycle import Lease
from app.models import Job, JobEvent

WORKER = "stream-test-worker"
WAIT = 30.0  # seconds a live message may take before the test calls the stream stuck


@dataclass(frozen=True)
class Message:
    event: str
    data: Any
    id: str  # the SSE last event id: kept from the last message that set one, as EventSource keeps it


@pytest.fixture(scope="module")
def fast(env: Env) -> TestClient:
    """The app on the same database and broker, looking at its jobs every 50 ms instead of every second."""
    return env.client_with(stream_interval=0.05)


def messages(source: Any) -> Iterator[Message]:
    assert source.response.status_code == 200, source.response.read()
    assert source.response.headers["content-type"].startswith("text/event-stream")
    for sse in source.iter_sse():
        yield Message(sse.event, sse.json(), sse.id)


def read_stream(client: TestClient, job_id: str, headers: dict[str, str], **params: Any) -> list[Message]:
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", headers=dict(headers), params=params) as source:
        return list(messages(source))


def claim(env: Env, job_id: str) -> Lease:
    with session_scope(env.db_url) as s:
        lease = lifecycle.claim(s, env.settings, job_id, WORKER)
    assert lease is not None
    return lease


def epoch(env: Env, lease: Lease, n: int, epochs: int) -> None:
    """What the worker's supervisor writes for an epoch: its event, the metrics, then the progress."""
    with session_scope(env.db_url) as s:
        job = lifecycle.held(s, lease)
        assert job is not None
        job.metrics = {**(job.metrics or {}), "epoch": n, "student_accuracy": 0.5 + n / 100}
        add_event(s, lease.job_id, "epoch", f"student epoch {n}/{epochs}", run="student", epoch=n, epochs=epochs)
    with session_scope(env.db_url) as s:
        assert lifecycle.update_held(s, lease, progress={"run": "student", "epoch": n, "epochs": epochs, "step": n,
                                                         "total_steps": epochs, "fraction": n / epochs})


def conclude(env: Env, lease: Lease, status: str = "succeeded") -> None:
    with session_scope(env.db_url) as s:
        assert lifecycle.conclude(s, lease, status)


def finished_job(env: Env, job_id: str, epochs: int = 3) -> None:
    lease = claim(env, job_id)
    with session_scope(env.db_url) as s:
        assert lifecycle.update_held(s, lease, phase="training")
    for n in range(1, epochs + 1):
        epoch(env, lease, n, epochs)
    conclude(env, lease)


def timeline(env: Env, job_id: str) -> list[dict[str, Any]]:
    resp = env.client.get(f"/v1/jobs/{job_id}/events", headers=env.auth("a"), params={"limit": 1000})
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


def event_messages(received: list[Message]) -> list[Message]:
    return [m for m in received if m.event in ("epoch", "event")]


# ---------------------------------------------------------------------------------------------- a finished job

def test_a_finished_job_streams_job_events_progress_then_end(env: Env, fast: TestClient, job_a: dict) -> None:
    finished_job(env, job_a["id"])
    received = read_stream(fast, job_a["id"], env.auth("a"))
    job = env.client.get(f"/v1/jobs/{job_a['id']}", headers=env.auth("a")).json()
    events = timeline(env, job_a["id"])

    assert [m.event for m in received] == ["job"] + ["epoch" if e["kind"] == "epoch" else "event" for e in events] \
        + ["progress", "end"]
    assert received[0].data == job, "the first message is the whole job, as GET shows it"
    assert [m.data for m in event_messages(received)] == events, "every event, oldest first, as /events shows it"
    assert [m.id for m in event_messages(received)] == [str(e["id"]) for e in events], "SSE id = the event id"
    assert [e["data"].get("epoch") for e in events if e["kind"] == "epoch"] == [1, 2, 3]
    assert [e["data"].get("status") for e in events if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    assert received[-2].data == job["progress"] and job["progress"]["fraction"] == 1.0
    assert received[-1].data == {"status": "succeeded"}


def test_resume_after_an_event_id_by_query_or_last_event_id(env: Env, fast: TestClient, job_a: dict) -> None:
    finished_job(env, job_a["id"], epochs=4)
    ids = [e["id"] for e in timeline(env, job_a["id"])]
    assert len(ids) == 7  # queued, running, 4 epochs, succeeded

    def resumed(headers: dict[str, str] | None = None, **params: Any) -> list[int]:
        received = read_stream(fast, job_a["id"], {**env.auth("a"), **(headers or {})}, **params)
        assert received[0].event == "job" and [m.event for m in received[-2:]] == ["progress", "end"]
        return [m.data["id"] for m in event_messages(received)]

    assert resumed(after=ids[2]) == ids[3:]
    assert resumed({"Last-Event-ID": str(ids[2])}) == ids[3:]
    assert resumed({"Last-Event-ID": str(ids[4])}, after=ids[1]) == ids[5:], "the later of the two wins"
    assert resumed({"Last-Event-ID": str(ids[1])}, after=ids[4]) == ids[5:]
    assert resumed(after=ids[-1]) == [], "nothing left: still the job, its progress and end"
    assert resumed({"Last-Event-ID": "not-a-number"}) == ids, "an id the server never sent is no id"


# ---------------------------------------------------------------------------------------------- errors

def test_another_tenants_job_unknown_jobs_and_no_key_are_json_errors(env: Env, fast: TestClient,
                                                                    job_a: dict) -> None:
    for client in (env.client, fast):
        assert_error(client.get(f"/v1/jobs/{job_a['id']}/stream", headers=env.auth("b")), 404, "job_not_found")
        assert_error(client.get("/v1/jobs/job_does_not_exist/stream", headers=env.auth("a")), 404, "job_not_found")
        assert client.get(f"/v1/jobs/{job_a['id']}/stream").status_code == 401
        assert_error(client.get(f"/v1/jobs/{job_a['id']}/stream"), 401)
        assert_error(client.get(f"/v1/jobs/{job_a['id']}/stream", headers=env.auth("revoked")), 401)
        assert_error(client.get(f"/v1/jobs/{job_a['id']}/stream", headers=env.auth("a"), params={"after": -1}),
                     422, field="after")


# ---------------------------------------------------------------------------------------------- live

class Reader:
    """Reads one stream in a thread and lets the test wait for what it has received so far."""

    def __init__(self, client: TestClient, job_id: str, headers: dict[str, str]) -> None:
        self.received: list[Message] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(client, job_id, headers), daemon=True)
        self._thread.start()

    def _read(self, client: TestClient, job_id: str, headers: dict[str, str]) -> None:
        try:
            with connect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", headers=dict(headers)) as source:
                for message in messages(source):
                    with self._changed:
                        self.received.append(message)
                        self._changed.notify_all()
        except BaseException as e:  # handed to the test's thread
            self.error = e
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, what: str, seen: Callable[[list[Message]], bool]) -> None:
        deadline = time.monotonic() + WAIT
        with self._changed:
            while not seen(self.received):
                assert self.error is None, f"the stream failed while waiting for {what}: {self.error!r}"
                assert self._thread.is_alive(), f"the stream ended before {what}: {self.received}"
                left = deadline - time.monotonic()
                assert left > 0, f"no {what} after {WAIT} s while the stream was open: {self.received}"
                self._changed.wait(left)

    def join(self) -> list[Message]:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"the stream stayed open after the job ended: {self.received}"
        assert self.error is None, repr(self.error)
        return self.received


def test_a_running_job_streams_what_is_written_while_it_is_open_then_end(env: Env, fast: TestClient,
                                                                         job_a: dict) -> None:
    reader = Reader(fast, job_a["id"], env.auth("a"))
    reader.wait_for("the queued job", lambda r: r and r[0].event == "job" and r[0].data["status"] == "queued")
    lease = claim(env, job_a["id"])
    reader.wait_for("the running job", lambda r: any(m.event == "job" and m.data["status"] == "running" for m in r))

    epochs = 3
    for n in range(1, epochs + 1):
        # each epoch is written only once the stream has shown the one before: what arrives, arrives live
        epoch(env, lease, n, epochs)
        reader.wait_for(f"epoch {n}", lambda r, n=n: any(m.event == "epoch" and m.data["data"]["epoch"] == n
                                                         for m in r))
        reader.wait_for(f"the progress of epoch {n}",
                        lambda r, n=n: any(m.event == "progress" and m.data.get("epoch") == n for m in r))
        assert all(m.event != "end" for m in reader.received)
    conclude(env, lease)
    received = reader.join()

    assert (received[-1].event, received[-1].data) == ("end", {"status": "succeeded"})
    assert [m.event for m in received].count("end") == 1
    statuses = [m.data["status"] for m in received if m.event == "job"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    events = timeline(env, job_a["id"])
    assert [m.data for m in event_messages(received)] == events, "each event once, in id order, none missed"
    assert [m.data["data"]["epoch"] for m in received if m.event == "epoch"] == [1, 2, 3]
    progress = [m.data for m in received if m.event == "progress"]
    assert [p.get("epoch", 0) for p in progress] == sorted(p.get("epoch", 0) for p in progress)
    assert progress[-1]["fraction"] == 1.0
    jobs = [m.data for m in received if m.event == "job"]
    assert [j["metrics"].get("epoch") for j in jobs if j["status"] == "running" and j["metrics"]] == [1, 2, 3], \
        "a `job` message for every change of the job (here its metrics)"


def test_a_job_cancelled_while_queued_ends_its_stream(env: Env, fast: TestClient, job_a: dict) -> None:
    reader = Reader(fast, job_a["id"], env.auth("a"))
    reader.wait_for("the queued job", lambda r: bool(r))
    assert env.client.post(f"/v1/jobs/{job_a['id']}/cancel", headers=env.auth("a")).status_code == 200
    received = reader.join()
    assert (received[-1].event, received[-1].data) == ("end", {"status": "cancelled"})
    assert [m.data["status"] for m in received if m.event == "job"] == ["queued", "cancelled"]
    assert event_messages(received)[-1].data["data"]["status"] == "cancelled"


def test_an_event_committed_after_a_later_one_is_not_lost(env: Env, fast: TestClient, job_a: dict) -> None:
    lease = claim(env, job_a["id"])
    reader = Reader(fast, job_a["id"], env.auth("a"))
    reader.wait_for("the running job", lambda r: any(m.event == "job" and m.data["status"] == "running" for m in r))
    if env.kind == "postgres":  # two real writers: the API writing cancel_requested while the worker writes
        with session_scope(env.db_url) as slow:
            add_event(slow, job_a["id"], "info", "first id, committed last")
            slow.flush()  # its id is taken now
            with session_scope(env.db_url) as quick:
                add_event(quick, job_a["id"], "info", "second id, committed first")
            reader.wait_for("the second event", lambda r: any(m.data.get("message") == "second id, committed first"
                                                              for m in event_messages(r)))
    else:  # SQLite serialises writers; what the stream then sees is made by hand: a lower id that shows up late
        with session_scope(env.db_url) as s:
            add_event(s, job_a["id"], "info", "placeholder")
            add_event(s, job_a["id"], "info", "second id, committed first")
            s.flush()
            gap = s.scalars(select(JobEvent.id).where(JobEvent.message == "placeholder")).one()
            s.execute(delete(JobEvent).where(JobEvent.id == gap))
        reader.wait_for("the second event", lambda r: any(m.data.get("message") == "second id, committed first"
                                                          for m in event_messages(r)))
        with session_scope(env.db_url) as s:
            s.add(JobEvent(id=gap, job_id=job_a["id"], kind="info", message="first id, committed last", data={}))
    conclude(env, lease)
    events = event_messages(reader.join())
    messages_ = [m.data["message"] for m in events]
    assert "first id, committed last" in messages_, messages_
    assert len({m.id for m in events}) == len(events), "an event was sent twice"


def test_a_job_deleted_under_its_stream_ends_it(env: Env, fast: TestClient, job_a: dict) -> None:
    reader = Reader(fast, job_a["id"], env.auth("a"))
    reader.wait_for("the queued job", lambda r: bool(r))
    with session_scope(env.db_url) as s:
        s.delete(s.get(Job, job_a["id"]))
    last = reader.join()[-1]
    assert (last.event, last.data) == ("end", {"status": None})
