"""app.lifecycle on a real PostgreSQL and Redis: the lease fences every write, and each recovery rule
sends a lost job again, once per STALE_AFTER, and only when it is lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from services import fresh_postgres, fresh_redis
from sqlalchemy import select

from app import lifecycle
from app.db import session_scope
from app.keys import get_or_create_tenant
from app.lifecycle import Lease
from app.migrate import upgrade
from app.models import Artifact, Dataset, Job, JobEvent, Teacher, WorkerRecord, utcnow
from app.queue import default_queue
from app.settings import Settings


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with fresh_postgres() as db, fresh_redis(db=8) as broker:
        upgrade(db)
        settings = Settings(database_url=db, broker_url=broker, data_dir=tmp_path_factory.mktemp("lifecycle"),
                            default_queue="fallback", job_max_attempts=3)
        with session_scope(db) as s:
            tenant = get_or_create_tenant(s, "t")
            s.add(Teacher(id="tch_1", tenant_id=tenant.id, filename="t", format="onnx", arch=None, num_classes=2,
                          input_channels=1, input_size=[8, 8], mean=[0.5], std=[0.5], sha256="0" * 64,
                          size_bytes=1, storage_key="k"))
            s.add(Dataset(id="ds_1", tenant_id=tenant.id, filename="d", format="npz", classes=["a", "b"],
                          num_classes=2, num_train=4, num_val=2, num_unlabeled=0, channels=1, image_size=[8, 8],
                          val_source="split", sha256="0" * 64, size_bytes=1, storage_key="k"))
        yield settings


@pytest.fixture()
def db(deployment: Settings) -> Iterator[str]:
    url = deployment.resolved_database_url
    yield url
    with session_scope(url) as s:
        for model in (JobEvent, Artifact, Job, WorkerRecord):
            s.query(model).delete()
    redis.Redis.from_url(deployment.resolved_broker_url).flushdb()


def add_job(url: str, job_id: str, queue: str = "q", **fields) -> None:
    with session_scope(url) as s:
        tenant = get_or_create_tenant(s, "t")
        s.add(Job(id=job_id, tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue=queue, request={},
                  request_hash="x", **fields))


def get(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        return s.get(Job, job_id)


def sent(settings: Settings, queue: str = "q") -> list[str]:
    r = redis.Redis.from_url(settings.resolved_broker_url)
    return sorted(json.loads(json.loads(m)["headers"]["argsrepr"].replace("'", '"'))[0] for m in r.lrange(queue, 0, -1))


def ago(seconds: float):
    return utcnow() - timedelta(seconds=seconds)


def sweep(settings: Settings) -> lifecycle.Swept:
    with session_scope(settings.resolved_database_url) as s:
        return lifecycle.sweep(s, settings)


def test_every_move_is_an_edge_of_the_table():
    lifecycle.check_edge("queued", "running", "supervisor")
    lifecycle.check_edge("running", "failed", "sweep")
    for source, target, actor in (("queued", "succeeded", "supervisor"), ("running", "succeeded", "sweep"),
                                  ("running", "cancelled", "api"), ("succeeded", "running", "supervisor"),
                                  ("cancelled", "queued", "api")):
        with pytest.raises(lifecycle.IllegalTransition):
            lifecycle.check_edge(source, target, actor)


def test_a_lease_that_was_taken_over_can_write_nothing_not_even_with_the_same_worker_name(deployment, db):
    add_job(db, "job_a")
    with session_scope(db) as s:
        first = lifecycle.claim(s, deployment, "job_a", "w@host")
    with session_scope(db) as s:
        assert lifecycle.claim(s, deployment, "job_a", "other@host") is None  # its lease is fresh
    assert first == Lease("job_a", "w@host", 1)
    with session_scope(db) as s:  # the worker went silent; the same worker name comes back (a restart)
        s.get(Job, "job_a").heartbeat_at = ago(deployment.stale_after + 1)
    with session_scope(db) as s:
        second = lifecycle.claim(s, deployment, "job_a", "w@host")
    assert second == Lease("job_a", "w@host", 2)
    with session_scope(db) as s:
        assert lifecycle.beat(s, first) == (False, False)
        assert not lifecycle.update_held(s, first, phase="exporting", metrics={"student_accuracy": 0.1})
        assert lifecycle.held(s, first) is None
        art = Artifact(job_id="job_a", name="student.onnx", format="onnx", size_bytes=1, sha256="0" * 64,
                       storage_key="jobs/job_a/1/student.onnx")
        assert not lifecycle.conclude(s, first, "succeeded", artifacts=[art])
    job = get(db, "job_a")
    assert (job.status, job.worker, job.attempts, job.phase, job.metrics) == ("running", "w@host", 2, "loading", {})
    with session_scope(db) as s:
        assert s.scalars(select(Artifact)).all() == []
        assert lifecycle.beat(s, second) == (True, False)
        assert lifecycle.conclude(s, second, "succeeded", artifacts=[Artifact(
            job_id="job_a", name="student.onnx", format="onnx", size_bytes=1, sha256="0" * 64,
            storage_key="jobs/job_a/2/student.onnx")])
    job = get(db, "job_a")
    assert job.status == "succeeded" and job.finished_at is not None
    with session_scope(db) as s:
        assert [a.storage_key for a in s.scalars(select(Artifact))] == ["jobs/job_a/2/student.onnx"]
        assert not lifecycle.conclude(s, second, "failed", "x", "twice")  # a final status is final


def test_a_lost_job_that_must_not_run_again_is_ended_by_the_claim_or_the_sweep(deployment, db):
    stale = ago(deployment.stale_after + 5)
    add_job(db, "job_cancel", status="running", worker="w", attempts=1, heartbeat_at=stale, cancel_requested=True,
            enqueued_at=stale)
    add_job(db, "job_spent", status="running", worker="w", attempts=3, heartbeat_at=stale, enqueued_at=stale)
    add_job(db, "job_spent2", status="running", worker="w", attempts=3, heartbeat_at=stale, enqueued_at=stale)
    with session_scope(db) as s:
        assert lifecycle.claim(s, deployment, "job_spent2", "w2") is None
    assert (get(db, "job_spent2").status, get(db, "job_spent2").error_code) == ("failed", "too_many_attempts")
    swept = sweep(deployment)
    assert sorted(swept.ended) == ["job_cancel", "job_spent"] and swept.sent == []
    assert get(db, "job_cancel").status == "cancelled"
    assert (get(db, "job_spent").status, get(db, "job_spent").error_code) == ("failed", "too_many_attempts")
    assert sent(deployment) == []


def test_r1_never_sent_and_r3_lost_lease_are_sent_again_once_per_stale_after(deployment, db):
    add_job(db, "job_fresh", created_at=utcnow())  # the API is about to send it: left alone
    add_job(db, "job_unsent", created_at=ago(60))
    add_job(db, "job_lost", status="running", worker="w", attempts=1, created_at=ago(600), enqueued_at=ago(600),
            heartbeat_at=ago(deployment.stale_after + 5))
    add_job(db, "job_alive", status="running", worker="w", attempts=1, created_at=ago(600), enqueued_at=ago(600),
            heartbeat_at=utcnow())
    assert sorted(sweep(deployment).sent) == ["job_lost", "job_unsent"]
    assert not sweep(deployment), "a second sweep (another API process) sends nothing again"
    assert sent(deployment) == ["job_lost", "job_unsent"]
    # The message of the lost job got lost again: one STALE_AFTER later it is sent once more, and again.
    for round_ in (2, 3):
        with session_scope(db) as s:
            s.get(Job, "job_lost").enqueued_at = ago(deployment.stale_after + 1)
        assert sweep(deployment).sent == ["job_lost"]
        assert sent(deployment).count("job_lost") == round_


def test_r2_a_queued_message_is_sent_again_only_when_an_idle_worker_of_its_queue_never_took_it(deployment, db):
    long_ago = ago(deployment.stale_after + 30)
    add_job(db, "job_waiting", created_at=long_ago, enqueued_at=long_ago)
    add_job(db, "job_other_queue", queue="other", created_at=long_ago, enqueued_at=long_ago)
    with session_scope(db) as s:  # busy workers: the queue is long, the message is not lost
        s.add(WorkerRecord(name="a@h", queues=["q"], current_job_id="job_x", idle_since=None))
    assert not sweep(deployment)
    with session_scope(db) as s:  # idle, but only just: it may be about to take the message
        s.add(WorkerRecord(name="b@h", queues=["q"], idle_since=ago(5)))
    assert not sweep(deployment)
    with session_scope(db) as s:  # idle all along: the broker lost the message
        s.get(WorkerRecord, "b@h").idle_since = long_ago
    assert sweep(deployment).sent == ["job_waiting"]
    with session_scope(db) as s:  # a worker that stopped beating does not count
        s.add(WorkerRecord(name="c@h", queues=["other"], idle_since=long_ago, heartbeat_at=ago(3600)))
    assert not sweep(deployment)


def test_abandon_expires_the_leases_of_a_dead_worker_so_they_resume_at_once(deployment, db):
    add_job(db, "job_held", status="running", worker="dead@h", attempts=1, heartbeat_at=utcnow(),
            enqueued_at=utcnow())
    add_job(db, "job_elsewhere", status="running", worker="alive@h", attempts=1, heartbeat_at=utcnow())
    with session_scope(db) as s:
        assert lifecycle.abandon(s, deployment, "dead@h") == ["job_held"]
    assert sent(deployment) == ["job_held"]
    with session_scope(db) as s:
        assert lifecycle.claim(s, deployment, "job_held", "dead@h") == Lease("job_held", "dead@h", 2)
        assert lifecycle.claim(s, deployment, "job_elsewhere", "dead@h") is None


def test_cancel_ends_a_queued_job_flags_a_running_one_and_leaves_a_final_one(deployment, db):
    add_job(db, "job_q")
    add_job(db, "job_r", status="running", worker="w", attempts=1, heartbeat_at=utcnow())
    add_job(db, "job_s", status="succeeded")
    with session_scope(db) as s:
        assert lifecycle.request_cancel(s, s.get(Job, "job_q")) == "cancelled"
        assert lifecycle.request_cancel(s, s.get(Job, "job_r")) == "requested"
        assert lifecycle.request_cancel(s, s.get(Job, "job_s")) == "final"
    assert get(db, "job_q").status == "cancelled"
    with session_scope(db) as s:
        assert lifecycle.claim(s, deployment, "job_q", "w") is None
        assert lifecycle.beat(s, Lease("job_r", "w", 1)) == (True, True)


def test_jobs_are_routed_to_queues_that_live_workers_serve(deployment, db):
    def queue_now() -> str:
        with session_scope(db) as s:
            return default_queue(s, deployment)

    assert queue_now() == "fallback"
    with session_scope(db) as s:
        s.add(WorkerRecord(name="cpu@a", queues=["cpu"]))
    assert queue_now() == "cpu"
    with session_scope(db) as s:
        s.add(WorkerRecord(name="gpu0@b", queues=["gpu"]))
        s.add(WorkerRecord(name="gpu1@c", queues=["gpu"], heartbeat_at=ago(3600)))
    assert queue_now() == "gpu"
    with session_scope(db) as s:
        s.get(WorkerRecord, "gpu0@b").heartbeat_at = ago(3600)
    assert queue_now() == "cpu"  # a GPU worker that stopped beating does not count
