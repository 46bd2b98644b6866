"""Webhooks without a server: signatures, which callback URLs may be called, the retry schedule, and
app.webhooks + worker.webhook_pump on a real database (SQLite and PostgreSQL) calling a real HTTP receiver on
127.0.0.1 (a server in a thread of this process; `Receiver` is reused by tests/test_webhooks_service.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from services import fresh_postgres
from sqlalchemy import select

from app import lifecycle, webhooks
from app.api.errors import ApiError
from app.db import session_scope
from app.keys import get_or_create_tenant, webhook_secret
from app.migrate import upgrade
from app.models import Artifact, Dataset, Job, JobEvent, Teacher, WebhookDelivery, utcnow
from app.settings import Settings
from worker.webhook_pump import Outcome, WebhookPump, backoff, claim, deliver_due, record


# -- a real receiver ----------------------------------------------------------------------------------
@dataclass
class Call:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float

    @property
    def event(self) -> str:
        return self.headers["kdistill-event"]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 (a thread of this process) that records every POST and answers with the
    next status of `statuses`, then 200; or, for an event named in `by_event`, the next status of its own."""

    def __init__(self, statuses: tuple[int, ...] = (), by_event: dict[str, tuple[int, ...]] | None = None) -> None:
        self.calls: list[Call] = []
        self.statuses = list(statuses)
        self.by_event = {event: list(codes) for event, codes in (by_event or {}).items()}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.calls.append(Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                               time.time()))
                    script = receiver.by_event.get(self.headers.get("Kdistill-Event", ""), receiver.statuses)
                    status = script.pop(0) if script else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"

    def wait_for(self, done: Callable[[list[Call]], bool], timeout: float = 30) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                calls = list(self.calls)
            if done(calls):
                return calls
            time.sleep(0.05)
        raise AssertionError(f"the receiver got {[(c.event, c.json().get('status')) for c in self.calls]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiving(statuses: tuple[int, ...] = (), by_event: dict[str, tuple[int, ...]] | None = None,
              ) -> Iterator[Receiver]:
    r = Receiver(statuses, by_event)
    try:
        yield r
    finally:
        r.close()


# -- signatures -----------------------------------------------------------------------------------------
def test_a_signature_verifies_and_a_changed_body_an_old_call_or_another_secret_do_not():
    body = b'{"id":"job_1","status":"succeeded"}'
    now = 1_800_000_000
    header = webhooks.sign("whsec_a", body, now)
    assert header.startswith(f"t={now},v1=") and len(header.partition("v1=")[2]) == 64
    assert webhooks.verify("whsec_a", header, body, now=now + 10)
    assert not webhooks.verify("whsec_a", header, body.replace(b"succeeded", b"failed"), now=now)
    assert not webhooks.verify("whsec_b", header, body, now=now)
    assert not webhooks.verify("whsec_a", header, body, now=now + 301)  # replayed later
    assert not webhooks.verify("whsec_a", header, body, now=now - 301)
    assert webhooks.verify("whsec_a", header, body, tolerance=1000, now=now + 900)
    forged = header.replace(f"t={now}", f"t={now + 5}")  # a new timestamp with the old mac
    assert not webhooks.verify("whsec_a", forged, body, now=now)
    for bad in ("", "v1=abc", f"t={now}", "t=x,v1=" + "0" * 64, "garbage"):
        assert not webhooks.verify("whsec_a", bad, body, now=now)
    # several v1 (a receiver may be handed two during a rotation): any one that matches
    assert webhooks.verify("whsec_a", f"t={now},v1={'0' * 64},{header.split(',')[1]}", body, now=now)


def test_the_readmes_verification_snippet_accepts_our_signatures_only() -> None:
    """The standalone verify() the README gives receivers agrees with what the pump sends."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", readme, re.S)
    assert found, "the README's webhook verification snippet is missing"
    scope: dict[str, Any] = {}
    exec(found.group(1), scope)
    body = webhooks.body_bytes({"id": "job_x", "status": "succeeded"})
    header = webhooks.sign("whsec_readme", body, int(time.time()))
    assert scope["verify"]("whsec_readme", header, body)
    assert not scope["verify"]("whsec_readme", header, body + b" ")
    assert not scope["verify"]("whsec_other", header, body)
    assert not scope["verify"]("whsec_readme", webhooks.sign("whsec_readme", body, int(time.time()) - 3600), body)


# -- which URLs may be called ---------------------------------------------------------------------------
def refused(url: str, allow_private: bool = False) -> ApiError:
    with pytest.raises(ApiError) as e:
        webhooks.check_callback_url(url, Settings(webhook_allow_private=allow_private))
    assert e.value.status == 422 and e.value.field == "callback_url", vars(e.value)
    return e.value


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "javascript:alert(1)", "example.com/x",
                                 "https://user:pw@93.184.215.14/x", "https://token@93.184.215.14/", "http:///x",
                                 "https://93.184.215.14:99999/", "https://exa mple.com/", "",
                                 "https://no-such-host.invalid/x"])
def test_malformed_callback_urls_are_invalid(url):
    error = refused(url, allow_private=True)  # the shape is checked whatever the setting
    assert error.code == "invalid_callback_url", error.message


@pytest.mark.parametrize(("url", "address"), [
    ("http://127.0.0.1:8080/hook", "127.0.0.1"), ("http://[::1]/hook", "::1"), ("https://10.1.2.3/", "10.1.2.3"),
    ("http://192.168.0.7/", "192.168.0.7"), ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"), ("http://0.0.0.0:80/", "0.0.0.0"),
    ("http://[fe80::1]/", "fe80::1"), ("http://224.0.0.1/", "224.0.0.1"), ("http://100.64.1.1/", "100.64.1.1"),
    ("http://localhost:9000/hook", "localhost"), ("HTTP://LOCALHOST/", "localhost"),
])
def test_loopback_private_and_link_local_addresses_are_refused_unless_allowed(url, address):
    error = refused(url)
    assert error.code == "callback_url_not_allowed"
    assert address in error.message and "KDISTILL_WEBHOOK_ALLOW_PRIVATE" in error.message, error.message
    webhooks.check_callback_url(url, Settings(webhook_allow_private=True))


def test_a_public_address_is_accepted():
    # no DNS for an IP literal (this machine has no outside DNS: a name would not resolve)
    for url in ("https://93.184.215.14/hooks/kdistill?x=1", "http://93.184.215.14:8080", "https://[2606:4700::1]/"):
        webhooks.check_callback_url(url, Settings())
    assert webhooks.refused_reason("::ffff:93.184.215.14") is None
    assert webhooks.refused_reason("::ffff:10.0.0.1") == "private"


def test_the_retry_schedule_doubles_up_to_the_cap():
    s = Settings(webhook_retry_first=5, webhook_retry_max_delay=600)
    assert [backoff(s, n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff(s, 10_000) == 600


def test_shown_urls_leave_the_query_out():
    assert webhooks.shown_url("https://h.example/x/y?token=secret#f") == "https://h.example/x/y?…"
    assert webhooks.shown_url("http://h:8/x") == "http://h:8/x"


# -- announce and deliver on a real database --------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('webhooks') / 'kdistill.db'}"
        upgrade(url)
        yield url
        return
    with fresh_postgres() as url:
        upgrade(url)
        yield url


@pytest.fixture()
def settings(database: str, tmp_path: Path) -> Iterator[Settings]:
    with session_scope(database) as s:
        tenant = get_or_create_tenant(s, "t")
        if s.get(Teacher, "tch_w") is None:
            s.add(Teacher(id="tch_w", tenant_id=tenant.id, filename="t", format="onnx", arch=None, num_classes=2,
                          input_channels=1, input_size=[8, 8], mean=[0.5], std=[0.5], sha256="0" * 64,
                          size_bytes=1, storage_key="k"))
            s.add(Dataset(id="ds_w", tenant_id=tenant.id, filename="d", format="npz", classes=["a", "b"],
                          num_classes=2, num_train=4, num_val=2, num_unlabeled=0, channels=1, image_size=[8, 8],
                          val_source="split", sha256="0" * 64, size_bytes=1, storage_key="k"))
    yield Settings(data_dir=tmp_path, database_url=database, webhook_allow_private=True, webhook_retry_first=0.05,
                   webhook_poll_interval=0.05, webhook_timeout=5)
    with session_scope(database) as s:
        for model in (WebhookDelivery, JobEvent, Artifact, Job):
            s.query(model).delete()


def add_job(settings: Settings, job_id: str, **request: Any) -> None:
    with session_scope(settings.resolved_database_url) as s:
        tenant = get_or_create_tenant(s, "t")
        s.add(Job(id=job_id, tenant_id=tenant.id, teacher_id="tch_w", dataset_id="ds_w", queue="q", status="queued",
                  request={"hyperparameters": {"epochs": 1}, **request}, request_hash="x"))


def succeed(settings: Settings, job_id: str) -> None:
    """Run the job's lifecycle to succeeded with two artifacts, as a supervisor does."""
    with session_scope(settings.resolved_database_url) as s:
        lease = lifecycle.claim(s, settings, job_id, "w@host")
    assert lease is not None
    with session_scope(settings.resolved_database_url) as s:
        arts = [Artifact(job_id=job_id, name=n, format=f, size_bytes=3, sha256="a" * 64, storage_key=f"k/{n}")
                for n, f in (("student.onnx", "onnx"), ("metadata.json", "metadata"))]
        assert lifecycle.conclude(s, lease, "succeeded", artifacts=arts, metrics={"student_accuracy": 0.9})


def deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.resolved_database_url) as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                              .order_by(WebhookDelivery.created_at)))


def webhook_events(settings: Settings, job_id: str) -> list[JobEvent]:
    with session_scope(settings.resolved_database_url) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "webhook")
                              .order_by(JobEvent.id)))


def pump_until(settings: Settings, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the deliveries did not end in time"
        deliver_due(settings)
        time.sleep(0.02)


def secret(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as s:
        return webhook_secret(s, "t")


def test_only_jobs_with_a_callback_url_announce_and_epochs_only_when_asked(settings):
    add_job(settings, "job_none")
    add_job(settings, "job_final", callback_url="https://93.184.215.14/h")
    add_job(settings, "job_epochs", callback_url="https://93.184.215.14/h", callback_epochs=True)
    with session_scope(settings.resolved_database_url) as s:
        for job_id in ("job_none", "job_final", "job_epochs"):
            webhooks.announce(s, s.get(Job, job_id), webhooks.EPOCH)
            webhooks.announce(s, s.get(Job, job_id), webhooks.final_event("failed"))
    assert deliveries(settings, "job_none") == []
    assert [d.event for d in deliveries(settings, "job_final")] == ["job.failed"]
    assert sorted(d.event for d in deliveries(settings, "job_epochs")) == ["job.epoch", "job.failed"]


def test_a_delivery_that_fails_twice_is_retried_then_delivered_signed_and_each_attempt_is_an_event(settings):
    with receiving((500, 503)) as receiver:
        add_job(settings, "job_ok", callback_url=receiver.url)
        succeed(settings, "job_ok")
        [delivery] = deliveries(settings, "job_ok")
        # the payload is the job as GET /v1/jobs/{id} shows it, with the artifacts added in the same transaction
        assert delivery.event == "job.succeeded" and delivery.payload["status"] == "succeeded"
        assert sorted(a["name"] for a in delivery.payload["artifacts"]) == ["metadata.json", "student.onnx"]
        assert delivery.payload["metrics"] == {"student_accuracy": 0.9}
        pump_until(settings, lambda: deliveries(settings, "job_ok")[0].status != "pending")
        calls = receiver.calls
    key = secret(settings)
    assert [c.event for c in calls] == ["job.succeeded"] * 3
    for c in calls:
        assert c.path == "/hook?token=abc" and c.headers["kdistill-delivery"] == delivery.id
        assert c.headers["content-type"] == "application/json"
        assert c.headers["user-agent"] == "kdistill-webhooks/1"
        assert webhooks.verify(key, c.headers["kdistill-signature"], c.body), c.headers
        assert not webhooks.verify(key + "x", c.headers["kdistill-signature"], c.body)
        assert c.json() == delivery.payload
    assert calls[1].at - calls[0].at >= 0.05 and calls[2].at - calls[1].at >= 0.1  # backoff: 0.05 s, then 0.1 s
    [done] = deliveries(settings, "job_ok")
    assert (done.status, done.attempts, done.last_status_code, done.finished_at is not None) == (
        "delivered", 3, 200, True)
    events = webhook_events(settings, "job_ok")
    assert [e.data["attempt"] for e in events] == [1, 2, 3]
    assert [e.data["status_code"] for e in events] == [500, 503, 200]
    assert "HTTP 500 (attempt 1); retrying in 0.05 s" in events[0].message
    assert "HTTP 503 (attempt 2); retrying in 0.1 s" in events[1].message
    assert "delivered (attempt 3" in events[2].message
    assert all("token=abc" not in e.message and "/hook?…" in e.message for e in events)  # the query may be secret
    assert events[0].data["next_attempt_at"] and events[2].data["next_attempt_at"] is None
    assert {e.data["delivery_id"] for e in events} == {delivery.id}


def test_a_delivery_is_given_up_after_its_retry_window(settings):
    settings = settings.model_copy(update={"webhook_retry_for": 0.5})
    with receiving((500,) * 100) as receiver:
        add_job(settings, "job_down", callback_url=receiver.url)
        with session_scope(settings.resolved_database_url) as s:
            assert lifecycle.request_cancel(s, s.get(Job, "job_down")) == "cancelled"
        pump_until(settings, lambda: deliveries(settings, "job_down")[0].status != "pending")
        attempts = len(receiver.calls)
    [d] = deliveries(settings, "job_down")
    assert d.event == "job.cancelled" and d.payload["status"] == "cancelled"
    assert d.status == "failed" and d.attempts == attempts and 2 <= attempts < 10
    events = webhook_events(settings, "job_down")
    assert len(events) == attempts
    assert events[-1].message.endswith(f"giving up after {attempts} attempts"), events[-1].message
    assert all("retrying" in e.message for e in events[:-1])


def test_an_address_refused_when_sending_is_not_called(settings):
    """The rule holds at send time too (a name may resolve elsewhere by now), here with the setting off."""
    with receiving() as receiver:
        add_job(settings, "job_refused", callback_url=receiver.url)
        with session_scope(settings.resolved_database_url) as s:
            webhooks.announce(s, s.get(Job, "job_refused"), "job.failed")
        strict = settings.model_copy(update={"webhook_allow_private": False})
        assert deliver_due(strict) == 1
        assert receiver.calls == []
    [d] = deliveries(settings, "job_refused")
    assert d.status == "failed" and d.attempts == 1
    [event] = webhook_events(settings, "job_refused")
    assert "127.0.0.1" in event.message and "giving up after 1 attempts" in event.message


def test_two_workers_never_make_the_same_attempt_and_a_deleted_job_is_no_error(settings):
    add_job(settings, "job_race", callback_url="http://127.0.0.1:9/never")
    with session_scope(settings.resolved_database_url) as s:
        webhooks.announce(s, s.get(Job, "job_race"), "job.failed")
    [d] = deliveries(settings, "job_race")
    first = claim(settings, d.id, d.attempts, d.next_attempt_at)
    second = claim(settings, d.id, d.attempts, d.next_attempt_at)  # saw the same row as due
    assert first is not None and first.attempt == 1 and second is None
    [leased] = deliveries(settings, "job_race")
    assert leased.next_attempt_at > utcnow()  # not due while the first worker calls
    assert deliver_due(settings) == 0
    with session_scope(settings.resolved_database_url) as s:  # the job is deleted meanwhile: rows cascade
        s.delete(s.get(Job, "job_race"))
    record(settings, first, Outcome(200, None))
    assert deliveries(settings, "job_race") == [] and webhook_events(settings, "job_race") == []


def test_the_pump_thread_survives_a_database_outage_and_delivers(settings, tmp_path):
    down = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'missing' / 'no.db'}"})
    pump = WebhookPump(down)
    pump.start()
    time.sleep(0.3)  # several ticks, each failing to open the database
    assert pump.is_alive()
    pump.stop(5)
    assert not pump.is_alive()
    with receiving() as receiver:
        add_job(settings, "job_thread", callback_url=receiver.url, callback_epochs=True)
        pump = WebhookPump(settings)
        pump.start()
        try:
            with session_scope(settings.resolved_database_url) as s:
                webhooks.announce(s, s.get(Job, "job_thread"), webhooks.EPOCH)
            receiver.wait_for(lambda calls: len(calls) == 1, timeout=10)
        finally:
            pump.stop(5)
    assert receiver.calls[0].event == "job.epoch"
