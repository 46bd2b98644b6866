"""Fixtures of the API suite: the real app on a real database (SQLite and PostgreSQL) and a real broker.

Every test that takes `env` runs twice: once on SQLite (a file under tmp) with Celery's filesystem transport,
once on a fresh PostgreSQL database with Redis. The schema comes from the Alembic migrations. Good uploads
are made once per backend (session-scoped fixtures) because each upload is inspected in a child process.
"""

from __future__ import annotations

import io
import secrets
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import (
    FOLDER_TRAIN,
    FOLDER_VAL,
    NPZ4,
    NPZ10,
    TEACHER_FORM,
    Env,
    TinyNet,
    Uploaded,
    created,
    job_body,
    npz_bytes,
    png_bytes,
    resnet8,
    zip_bytes,
)
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from services import fresh_postgres, fresh_redis

from app.db import session_scope
from app.keys import create_key
from app.main import create_app
from app.migrate import upgrade
from app.models import ApiKey, utcnow
from app.settings import Settings

BACKENDS = ["sqlite", "postgres"]
REDIS_DB = 11  # not the default of fresh_redis(), which other suites flush


@contextmanager
def _database(kind: str, data_dir: Path) -> Iterator[tuple[str, str | None]]:
    if kind == "sqlite":
        yield f"sqlite:///{(data_dir / 'kdistill.db').resolve()}", None
        return
    with fresh_postgres() as url, fresh_redis(REDIS_DB) as broker:
        yield url, broker


@pytest.fixture(scope="session", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    kind = request.param
    data_dir = tmp_path_factory.mktemp(f"kdistill-{kind}")
    with ExitStack() as stack:
        db_url, broker_url = stack.enter_context(_database(kind, data_dir))
        upgrade(db_url)
        with session_scope(db_url) as s:
            keys = {"a": create_key(s, "tenant-a", "api tests"), "b": create_key(s, "tenant-b", "api tests"),
                    "revoked": create_key(s, "tenant-a", "revoked")}
        with session_scope(db_url) as s:
            for key in s.query(ApiKey).filter(ApiKey.name == "revoked"):
                key.revoked_at = utcnow()
        settings = Settings(data_dir=data_dir, database_url=db_url, broker_url=broker_url, auth="required",
                            default_queue=f"apitest{secrets.token_hex(4)}", inspect_timeout=120)
        client = stack.enter_context(TestClient(create_app(settings), raise_server_exceptions=False))
        yield Env(kind=kind, settings=settings, client=client, keys=keys, stack=stack)


# ---------------------------------------------------------------------------------------------- files

@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A resnet8 (10 classes, 1 channel) state dict, saved with safetensors `save_file`."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in resnet8().state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.fixture(scope="session")
def pickled_module_file() -> bytes:
    buf = io.BytesIO()
    torch.save(resnet8(), buf)  # the whole module, pickled
    return buf.getvalue()


@pytest.fixture(scope="session")
def state_dict_pt_file() -> bytes:
    buf = io.BytesIO()
    torch.save(resnet8().state_dict(), buf)
    return buf.getvalue()


@pytest.fixture(scope="session")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyNet().eval(), (torch.randn(2, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}})
    return path.read_bytes()


@pytest.fixture(scope="session")
def torchscript_file() -> bytes:
    torch.manual_seed(2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyNet().eval()), buf)
    return buf.getvalue()


@pytest.fixture(scope="session")
def npz10_file() -> bytes:
    return npz_bytes(**NPZ10)


@pytest.fixture(scope="session")
def npz4_file() -> bytes:
    return npz_bytes(**NPZ4, seed=1)


@pytest.fixture(scope="session")
def folder_zip_file() -> bytes:
    entries: dict[str, bytes] = {}
    seed = 0
    for split, counts in (("train", FOLDER_TRAIN), ("val", FOLDER_VAL)):
        for cls, n in counts.items():
            for i in range(n):
                seed += 1
                entries[f"{split}/{cls}/{i}.png"] = png_bytes(seed)
    return zip_bytes(entries)


# ---------------------------------------------------------------------------------------------- uploads

@pytest.fixture(scope="session")
def teacher_a(env: Env, teacher_file: bytes) -> Uploaded:
    return created(env.upload_teacher(teacher_file, **TEACHER_FORM), teacher_file)


@pytest.fixture(scope="session")
def dataset_a(env: Env, npz10_file: bytes) -> Uploaded:
    return created(env.upload_dataset(npz10_file, "digits.npz"), npz10_file)


@pytest.fixture(scope="session")
def dataset_a4(env: Env, npz4_file: bytes) -> Uploaded:
    return created(env.upload_dataset(npz4_file, "four.npz"), npz4_file)


@pytest.fixture(scope="session")
def teachers_b(env: Env, teacher_file: bytes) -> list[Uploaded]:
    """Three teachers of tenant B, uploaded one after the other (oldest first)."""
    return [created(env.upload_teacher(teacher_file, f"b{i}.safetensors", who="b", **TEACHER_FORM), teacher_file)
            for i in range(3)]


@pytest.fixture(scope="session")
def dataset_b(env: Env, npz10_file: bytes) -> Uploaded:
    return created(env.upload_dataset(npz10_file, "b.npz", who="b"), npz10_file)


@pytest.fixture
def job_a(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> dict[str, Any]:
    """A fresh queued job of tenant A."""
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=job_body(teacher_a.id, dataset_a.id))
    assert resp.status_code == 202, resp.text
    return resp.json()
