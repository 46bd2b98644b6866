"""The database is the truth: a queued job whose message never reached the broker is sent again."""

from __future__ import annotations

import json
from datetime import timedelta

import redis
from services import fresh_postgres, fresh_redis

from app.db import session_scope
from app.keys import get_or_create_tenant
from app.migrate import upgrade
from app.models import Dataset, Job, Teacher, WorkerRecord, utcnow
from app.queue import default_queue, requeue_pending
from app.settings import Settings


def queue_now(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as s:
        return default_queue(s, settings)


def test_requeue_sends_lost_jobs_once_and_routes_by_live_workers(tmp_path):
    with fresh_postgres() as db, fresh_redis(db=8) as broker:
        upgrade(db)
        settings = Settings(database_url=db, broker_url=broker, data_dir=tmp_path, default_queue="fallback")
        with session_scope(db) as s:
            tenant = get_or_create_tenant(s, "t")
            s.add(Teacher(id="tch_1", tenant_id=tenant.id, filename="t", format="onnx", arch=None, num_classes=2,
                          input_channels=1, input_size=[8, 8], mean=[0.5], std=[0.5], sha256="0" * 64,
                          size_bytes=1, storage_key="k"))
            s.add(Dataset(id="ds_1", tenant_id=tenant.id, filename="d", format="npz", classes=["a", "b"],
                          num_classes=2, num_train=4, num_val=2, num_unlabeled=0, channels=1, image_size=[8, 8],
                          val_source="split", sha256="0" * 64, size_bytes=1, storage_key="k"))
            s.flush()
            old = utcnow() - timedelta(minutes=5)
            long_ago = utcnow() - timedelta(hours=7)
            s.add(Job(id="job_forgotten", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="lost",
                      request={}, request_hash="x", created_at=long_ago, enqueued_at=long_ago))
            for i, enqueued in enumerate((None, old)):
                s.add(Job(id=f"job_{i}", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="lost",
                          request={}, request_hash="x", created_at=old, enqueued_at=enqueued))
            # running, but its worker went silent after the last message: to be sent again, once
            s.add(Job(id="job_silent", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="lost",
                      request={}, request_hash="x", created_at=old, enqueued_at=old - timedelta(minutes=1),
                      status="running", heartbeat_at=old))
            # running and beating: left alone
            s.add(Job(id="job_alive", tenant_id=tenant.id, teacher_id="tch_1", dataset_id="ds_1", queue="lost",
                      request={}, request_hash="x", created_at=old, enqueued_at=old, status="running",
                      heartbeat_at=utcnow()))
        with session_scope(db) as s:
            assert requeue_pending(s, settings) == 3
        with session_scope(db) as s:
            assert requeue_pending(s, settings) == 0  # sent once, not every sweep
            assert s.get(Job, "job_0").enqueued_at is not None
        r = redis.Redis.from_url(broker)
        sent = sorted(json.loads(m)["headers"]["argsrepr"] for m in r.lrange("lost", 0, -1))
        assert sent == ["['job_0']", "['job_forgotten']", "['job_silent']"]

        assert queue_now(settings) == "fallback"
        with session_scope(db) as s:
            s.add(WorkerRecord(name="cpu@a", queues=["cpu"]))
        assert queue_now(settings) == "cpu"
        with session_scope(db) as s:
            s.add(WorkerRecord(name="gpu0@b", queues=["gpu"]))
            s.add(WorkerRecord(name="gpu1@c", queues=["gpu"], heartbeat_at=utcnow() - timedelta(hours=1)))
        assert queue_now(settings) == "gpu"
        with session_scope(db) as s:
            s.get(WorkerRecord, "gpu0@b").heartbeat_at = utcnow() - timedelta(hours=1)
        assert queue_now(settings) == "cpu"  # a GPU worker that stopped beating does not count
