"""Helpers of the API suite: the JSON error check, request bodies, the backend handle and test files."""

from __future__ import annotations

import hashlib
import io
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from torch import nn

from app.db import session_scope
from app.main import create_app
from app.models import Artifact, Job, utcnow
from app.settings import Settings
from app.storage import get_store

TEACHER_ARCH = "resnet8"
TEACHER_FORM = {"arch": TEACHER_ARCH, "num_classes": "10", "input_channels": "1", "input_size": "8",
                "mean": "0.3", "std": "0.37"}
GREY8 = {"input_channels": "1", "input_size": "8", "mean": "0.5", "std": "0.25"}
ERROR_KEYS = {"code", "message", "field", "errors", "available", "status", "job_ids", "sweep_ids", "expired_at"}
MISSING = object()


# ---------------------------------------------------------------------------------------------- helpers

def assert_error(resp: httpx.Response, status: int, code: str | None = None, field: Any = MISSING) -> dict:
    """The response is `status` with the JSON error shape {"code", "message", "field"?}; return the body."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers["content-type"]
    body = resp.json()
    assert isinstance(body, dict), body
    assert set(body) <= ERROR_KEYS, f"unexpected keys in the error body: {sorted(set(body) - ERROR_KEYS)}"
    assert isinstance(body.get("code"), str) and body["code"], body
    assert body["code"].isidentifier() and body["code"] == body["code"].lower(), f"unstable code {body['code']!r}"
    assert isinstance(body.get("message"), str) and body["message"].strip(), body
    if "field" in body:
        assert isinstance(body["field"], str) and body["field"], body
    if code is not None:
        assert body["code"] == code, f"expected code {code!r}, got {body}"
    if field is not MISSING:
        assert body.get("field") == field, f"expected field {field!r}, got {body}"
    return body


def job_body(teacher_id: str, dataset_id: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"teacher_id": teacher_id, "dataset_id": dataset_id, "student": {"arch": "resnet8"},
                            "hyperparameters": {"epochs": 2, "batch_size": 16, "temperature": 4.0, "alpha": 0.9},
                            "export_formats": ["onnx"]}
    body.update(over)
    return body


def all_pages(client: TestClient, path: str, headers: dict[str, str], limit: int, **params: Any) -> list[list[dict]]:
    """Follow next_cursor from the first page to the last; return the pages."""
    pages: list[list[dict]] = []
    after = None
    for _ in range(1000):
        query = {"limit": limit, **params, **({"after": after} if after else {})}
        resp = client.get(path, headers=headers, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"items", "next_cursor"}, body
        pages.append(body["items"])
        after = body["next_cursor"]
        if after is None:
            return pages
        assert body["items"], "a page with a next_cursor must hold items"
    raise AssertionError("pagination never ended")


# ---------------------------------------------------------------------------------------------- backends

@dataclass
class Env:
    """One backend: settings, a client of the app, API keys of two tenants, and access to the broker."""

    kind: str
    settings: Settings
    client: TestClient
    keys: dict[str, str]
    stack: ExitStack = field(repr=False)

    @property
    def db_url(self) -> str:
        return self.settings.resolved_database_url

    def auth(self, who: str = "a") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def client_with(self, **overrides: Any) -> TestClient:
        """A client of another app on the same database and broker, with some settings changed."""
        settings = self.settings.model_copy(update=overrides)
        return self.stack.enter_context(TestClient(create_app(settings), raise_server_exceptions=False))

    def queue_depth(self) -> int:
        """Messages waiting on the job queue of the real broker."""
        queue = self.settings.default_queue
        if self.kind == "postgres":
            client = redis.Redis.from_url(self.settings.broker_url)
            try:
                assert client.type(queue) in (b"list", b"none")
                return int(client.llen(queue))
            finally:
                client.close()
        folder = self.settings.broker_dir / "queue"
        return sum(1 for p in folder.iterdir() if p.is_file() and queue in p.name) if folder.is_dir() else 0

    # Uploads here make a new object every time (?dedupe=false), as each test expects its own; tests of the
    # de-duplication itself are in test_api_dedupe.py.
    def upload_teacher(self, content: bytes, filename: str = "teacher.safetensors", who: str = "a",
                       client: TestClient | None = None, **form: str) -> httpx.Response:
        return (client or self.client).post("/v1/teachers", headers=self.auth(who), params={"dedupe": "false"},
                                            files={"file": (filename, content, "application/octet-stream")},
                                            data=form)

    def upload_dataset(self, content: bytes, filename: str, who: str = "a",
                       client: TestClient | None = None) -> httpx.Response:
        return (client or self.client).post("/v1/datasets", headers=self.auth(who), params={"dedupe": "false"},
                                            files={"file": (filename, content, "application/octet-stream")})


# ---------------------------------------------------------------------------------------------- files

def resnet8(seed: int = 0, num_classes: int = 10) -> nn.Module:
    from worker.distill.students import create_model

    torch.manual_seed(seed)
    return create_model(TEACHER_ARCH, num_classes=num_classes, in_channels=1)


class TinyNet(nn.Module):
    """A small custom classifier (no registry architecture): grey 8x8 images → 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def npz_bytes(num_classes: int, per_class: int, val_per_class: int, unlabeled: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
    y_val = np.repeat(np.arange(num_classes), val_per_class).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y=y,
             x_val=rng.integers(0, 256, (len(y_val), 8, 8), dtype=np.uint8), y_val=y_val,
             x_unlabeled=rng.integers(0, 256, (unlabeled, 8, 8), dtype=np.uint8))
    return buf.getvalue()


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


# What the good dataset files hold, for the count assertions.
NPZ10 = {"num_classes": 10, "per_class": 4, "val_per_class": 2, "unlabeled": 15}
NPZ4 = {"num_classes": 4, "per_class": 5, "val_per_class": 2, "unlabeled": 0}
FOLDER_TRAIN = {"cat": 4, "dog": 3, "fox": 2}
FOLDER_VAL = {"cat": 1, "dog": 2, "fox": 1}


# ---------------------------------------------------------------------------------------------- uploads

@dataclass(frozen=True)
class Uploaded:
    body: dict[str, Any]
    content: bytes

    @property
    def id(self) -> str:
        return self.body["id"]


def created(resp: httpx.Response, content: bytes) -> Uploaded:
    assert resp.status_code == 201, resp.text
    return Uploaded(resp.json(), content)


def store_artifact(settings: Settings, db_url: str, job_id: str, content: bytes, tmp_path: Path,
                   name: str = "student.onnx") -> str:
    """Put an artifact of `job_id` in the store and the database by hand, as a worker would; return its name."""
    path = tmp_path / name
    path.write_bytes(content)
    key = f"jobs/{job_id}/artifacts/{name}"
    get_store(settings).put_file(key, path)
    with session_scope(db_url) as s:
        s.add(Artifact(job_id=job_id, name=name, format="onnx", size_bytes=len(content),
                       sha256=hashlib.sha256(content).hexdigest(), storage_key=key))
    return name


def finish_job(db_url: str, job_id: str, status: str = "succeeded") -> None:
    """Mark a job final by hand, as its worker would when it ends (artifacts are served only then)."""
    with session_scope(db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status, finished_at=utcnow()))
