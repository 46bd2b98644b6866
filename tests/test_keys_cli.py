"""`kdistill keys create | list | revoke` against a data folder, as an operator would use them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

KDISTILL = str(Path(sys.executable).with_name("kdistill"))


def kd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KDISTILL, "keys", *args], capture_output=True, text=True, timeout=120)


def test_create_list_revoke(tmp_path, monkeypatch):
    monkeypatch.setattr("app.api.deps.AUTH_CACHE_SECONDS", 0.0)  # see a revocation at once
    created = kd("create", "--tenant", "vision", "--name", "ci", "--data-dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("kd_") and "\n" not in key  # only the key on stdout

    listed = kd("list", "--data-dir", str(tmp_path))
    assert listed.returncode == 0 and "vision" in listed.stdout and key[:10] in listed.stdout
    assert key not in listed.stdout  # never the whole key
    key_id = next(w for w in listed.stdout.split() if w.startswith("key_"))

    client = TestClient(create_app(Settings(data_dir=tmp_path)))
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200

    assert kd("revoke", key_id, "--data-dir", str(tmp_path)).returncode == 0
    refused = client.get("/v1/jobs", headers=headers)
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_api_key"
    assert kd("revoke", "key_nope", "--data-dir", str(tmp_path)).returncode == 1
