"""Webhooks for real: a `kdistill serve` (API + its Celery worker, whose webhook thread sends) trains a short job
with a callback_url on an HTTP receiver in this process; the calls' signatures are checked with the tenant's
secret, and the receiver fails the final call twice before it accepts. A queued job cancelled is announced
too. A second API process on the same database, without KDISTILL_WEBHOOK_ALLOW_PRIVATE, refuses a loopback
callback_url."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import Server, _env, upload_example
from test_webhooks import Call, Receiver, receiving

from app import webhooks
from app.client import Client
from app.db import session_scope
from app.keys import LOCAL_TENANT, webhook_secret
from app.main import create_app
from app.settings import Settings

HYPER: dict[str, Any] = {"epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-webhooks")
    srv = Server.start(tmp, env=_env(KDISTILL_WEBHOOK_ALLOW_PRIVATE="true", KDISTILL_WEBHOOK_RETRY_FIRST="0.3",
                                     KDISTILL_WEBHOOK_POLL_INTERVAL="0.2", KDISTILL_STREAM_INTERVAL="0.2",
                                     OMP_NUM_THREADS="1"))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def database_url(server: Server) -> str:
    return f"sqlite:///{server.data_dir.resolve() / 'kdistill.db'}"


@pytest.fixture(scope="module")
def secret(database_url: str) -> str:
    """The local tenant's signing secret, read (made on first use) as `kdistill keys webhook-secret` does."""
    with session_scope(database_url) as s:
        return webhook_secret(s, LOCAL_TENANT)


@pytest.fixture(scope="module")
def uploaded(server: Server, example_dir: Path) -> tuple[str, str]:
    return upload_example(server.url, example_dir)


@dataclass
class Finished:
    job: dict[str, Any]
    calls: list[Call]
    events: list[dict[str, Any]]  # the job's "webhook" events


@pytest.fixture(scope="module")
def finished(server: Server, uploaded: tuple[str, str]) -> Finished:
    """One short job with callback_epochs, whose receiver answers job.succeeded with 500, then 502, then 200
    (epochs at once): one job serves every check of a trained job, as training is what takes time here."""
    with receiving(by_event={"job.succeeded": (500, 502)}) as receiver, Client(server.url) as kd:
        job = kd.create_job(*uploaded, "resnet8", export_formats=["onnx"], hyperparameters=HYPER,
                            callback_url=receiver.url, callback_epochs=True)
        job = kd.wait(job["id"], timeout=120)
        assert job["status"] == "succeeded", job
        calls = receiver.wait_for(lambda calls: sum(c.event == "job.succeeded" for c in calls) >= 3)
        deadline = time.monotonic() + 20
        # the last attempt's event is written just after the receiver answered
        while len(events := [e for e in kd.events(job["id"]) if e["kind"] == "webhook"]) < len(calls):
            assert time.monotonic() < deadline, events
            time.sleep(0.1)
    return Finished(job, calls, events)


def signed(call: Call, secret: str) -> bool:
    return webhooks.verify(secret, call.headers["kdistill-signature"], call.body)


def test_every_call_is_signed_with_the_tenant_secret(finished, secret):
    assert all(signed(c, secret) for c in finished.calls), [c.headers for c in finished.calls]
    assert not any(signed(c, secret + "x") for c in finished.calls)


def test_the_final_call_carries_the_job_object_with_its_artifacts(server, finished):
    final = [c for c in finished.calls if c.event == "job.succeeded"]
    body = final[-1].json()
    with Client(server.url) as kd:  # the job object as GET /v1/jobs/{id} returns it
        assert body == kd.get_job(finished.job["id"])
    assert body["status"] == "succeeded" and body["artifacts"] == finished.job["artifacts"]
    assert any(a["name"].endswith(".onnx") for a in body["artifacts"]), body["artifacts"]


def test_each_epoch_is_posted_when_asked(finished):
    epochs = [c for c in finished.calls if c.event == "job.epoch"]
    assert len(epochs) == HYPER["epochs"], [c.event for c in finished.calls]
    assert all(c.json()["id"] == finished.job["id"] and c.json()["status"] == "running" for c in epochs)
    assert epochs[0].at < next(c for c in finished.calls if c.event == "job.succeeded").at
    assert len({c.headers["kdistill-delivery"] for c in epochs}) == len(epochs)  # one delivery per epoch


def test_a_receiver_that_fails_twice_gets_the_call_a_third_time_and_every_attempt_is_an_event(server, finished):
    calls = [c for c in finished.calls if c.event == "job.succeeded"]
    assert len(calls) == 3 and len({c.headers["kdistill-delivery"] for c in calls}) == 1  # one delivery, retried
    assert calls[1].at - calls[0].at >= 0.3 and calls[2].at - calls[1].at >= 0.6  # backoff 0.3 s, then 0.6 s
    assert calls[0].body == calls[2].body
    events = [e for e in finished.events if e["data"]["event"] == "job.succeeded"]
    assert [e["data"]["attempt"] for e in events] == [1, 2, 3]
    assert [e["data"]["status_code"] for e in events] == [500, 502, 200]
    assert "webhook job.succeeded to http://127.0.0.1:" in events[0]["message"]
    assert "HTTP 500 (attempt 1); retrying in 0.3 s" in events[0]["message"]
    assert "HTTP 502 (attempt 2); retrying in 0.6 s" in events[1]["message"]
    assert "delivered (attempt 3" in events[2]["message"]
    assert {e["data"]["delivery_id"] for e in events} == {calls[0].headers["kdistill-delivery"]}
    assert "token=abc" not in server.output()  # the query of a callback URL may hold a secret: never logged
    epoch_events = [e for e in finished.events if e["data"]["event"] == "job.epoch"]
    assert [e["data"]["attempt"] for e in epoch_events] == [1] * HYPER["epochs"]


def test_a_queued_job_cancelled_before_it_runs_posts_job_cancelled(server, uploaded, secret):
    with receiving() as receiver, Client(server.url) as kd:
        job = kd.create_job(*uploaded, "resnet8", export_formats=["onnx"], hyperparameters=HYPER,
                            queue="nobody-serves-this", callback_url=receiver.url)
        assert job["status"] == "queued"
        assert kd.cancel(job["id"])["status"] == "cancelled"
        [call] = receiver.wait_for(lambda calls: len(calls) == 1)
    assert call.event == "job.cancelled" and signed(call, secret)
    assert call.json()["id"] == job["id"] and call.json()["status"] == "cancelled"


def test_an_api_without_the_setting_refuses_a_loopback_callback_url(server, uploaded, database_url, tmp_path):
    """Another API process on the same database (as in a deployment with several), KDISTILL_WEBHOOK_ALLOW_PRIVATE
    left off: the request is refused with the address and the setting named, and no job is made."""
    receiver = Receiver()
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url, auth="disabled", allowed_hosts="*"))
    client = TestClient(app, raise_server_exceptions=False)
    body = {"teacher_id": uploaded[0], "dataset_id": uploaded[1], "student": {"arch": "resnet8"},
            "hyperparameters": HYPER, "export_formats": ["onnx"], "queue": "nobody-serves-this"}
    with Client(server.url) as kd:
        before = len(list(kd.list_jobs()))
    for url, address in ((receiver.url, "127.0.0.1"), ("http://localhost/hook", "localhost"),
                         ("http://[::ffff:10.0.0.1]/", "::ffff:10.0.0.1")):
        resp = client.post("/v1/jobs", json={**body, "callback_url": url})
        assert resp.status_code == 422, resp.text
        error = resp.json()
        assert (error["code"], error["field"]) == ("callback_url_not_allowed", "callback_url"), error
        assert address in error["message"] and "KDISTILL_WEBHOOK_ALLOW_PRIVATE" in error["message"], error
    resp = client.post("/v1/jobs", json={**body, "callback_url": "ftp://example.com/"})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_callback_url", resp.text
    with Client(server.url) as kd:
        assert len(list(kd.list_jobs())) == before
    # the server that allows private addresses takes the same request
    try:
        with Client(server.url) as kd:
            job = kd.create_job(*uploaded, "resnet8", export_formats=["onnx"], hyperparameters=HYPER,
                                queue="nobody-serves-this", callback_url=receiver.url)
            assert job["request"]["callback_url"] == receiver.url
            kd.cancel(job["id"])
        receiver.wait_for(lambda calls: len(calls) == 1)
    finally:
        receiver.close()
