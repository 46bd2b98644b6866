"""Security review (issue 8): keys checked before the body, Host and Origin checks with keys switched off,
/metrics and /readyz that tell an anonymous caller nothing private, uploads named as the user named them.

The body and Host/Origin tests run the API as a real uvicorn process (`app.main:app_factory`) on each
backend's database, and talk to it over TCP."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_support import Env, assert_error
from sqlalchemy import select as sql_select

from app.db import session_scope
from app.models import Job

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
BIG = 200 * MIB  # what the anonymous client offers to send
BOUNDARY = "kdistillboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveApi:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def upload_folders(self) -> list[Path]:
        """Whatever the API keeps of uploads while it handles them (nothing once a request has ended)."""
        tmp = self.data_dir / "tmp"
        return sorted(tmp.iterdir()) if tmp.is_dir() else []


@contextmanager
def live_api(env: Env, tmp: Path, **settings: str) -> Iterator[LiveApi]:
    """`uvicorn --factory app.main:app_factory` on a free port, on `env`'s database and broker."""
    port = free_port()
    data_dir = tmp / f"api-{port}"
    data_dir.mkdir(parents=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}
    environ.update({"KDISTILL_DATA_DIR": str(data_dir), "KDISTILL_DATABASE_URL": env.db_url,
                    "KDISTILL_DEFAULT_QUEUE": env.settings.default_queue, "KDISTILL_LOG_FORMAT": "text",
                    "PYTHONPATH": str(REPO), **{f"KDISTILL_{k.upper()}": v for k, v in settings.items()}})
    if env.settings.broker_url:
        environ["KDISTILL_BROKER_URL"] = env.settings.broker_url
    log = data_dir / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory", "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                cwd=data_dir, env=environ, stdout=out, stderr=subprocess.STDOUT)
    api = LiveApi(proc, port, data_dir, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"uvicorn exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"uvicorn did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def keyed_api(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(env, tmp_path_factory.mktemp("keyed"), auth="required") as api:
        yield api


@pytest.fixture(scope="module")
def local_api(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(env, tmp_path_factory.mktemp("local"), auth="disabled") as api:
        yield api


# ---------------------------------------------------------------------------------------------- helpers

def file_part_head(filename: str = "big.safetensors") -> bytes:
    return (f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "content-type: application/octet-stream\r\n\r\n").encode()


@dataclass
class Streamed:
    sent: int  # body bytes handed to the socket before the answer arrived
    status: int
    headers: dict[str, str]
    body: dict
    seconds: float


def stream_until_answered(port: int, path: str, headers: dict[str, str], total: int = BIG,
                          chunk: int = 64 << 10, wait: float = 0.05, give_up: int = 4 * MIB) -> Streamed:
    """POST a multipart body of `total` bytes (declared in Content-Length) over a raw socket, as an
    impatient client does: the head and a first chunk at once, then one chunk every `wait` seconds for as
    long as no answer has arrived. Returns how many body bytes were sent before the answer was readable
    (an upper bound of what the server can have read), and the answer."""
    head = file_part_head()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    request = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
               f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
               f"Content-Length: {len(head) + total + len(tail)}", *(f"{k}: {v}" for k, v in headers.items())]
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode() + head)
        sent, block = len(head), b"\0" * chunk
        try:
            sock.sendall(block)
            sent += chunk
            while sent < give_up:
                readable, _, _ = select.select([sock], [], [], wait)
                if readable:
                    break
                sock.sendall(block)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):  # the server hung up: its answer is waiting
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
        seconds = time.monotonic() - started
        # After its answer the server closes the connection rather than reading the rest of the body.
        closed = _closed_soon(sock)
    finally:
        sock.close()
    status_line, _, rest = answer.partition(b"\r\n")
    raw_headers, _, body = rest.partition(b"\r\n\r\n")
    parsed = dict(line.decode().lower().split(": ", 1) for line in raw_headers.split(b"\r\n") if b": " in line)
    assert closed, "the server kept the connection open to read the refused body"
    return Streamed(sent=sent, status=int(status_line.split()[1]), headers=parsed, body=json.loads(body),
                    seconds=seconds)


def _length(answer: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", answer.split(b"\r\n\r\n", 1)[0], re.IGNORECASE)
    return int(match.group(1)) if match else 0


def _closed_soon(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ---------------------------------------------------------------------------------------------- keys first

@pytest.mark.parametrize("path", ["/v1/teachers", "/v1/datasets"])
@pytest.mark.parametrize(("headers", "code"), [({}, "missing_api_key"),
                                               ({"Authorization": "Bearer kd_not_a_key"}, "invalid_api_key")])
def test_an_anonymous_200_mb_upload_is_refused_before_its_body_is_read(keyed_api: LiveApi, path: str,
                                                                       headers: dict[str, str], code: str) -> None:
    got = stream_until_answered(keyed_api.port, path, headers)
    print(f"{path} {code}: answered after {got.sent:,} body bytes were sent, in {got.seconds * 1000:.0f} ms")
    assert got.status == 401, got.body
    assert got.body["code"] == code
    assert got.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert got.headers.get("connection") == "close"
    assert got.sent < MIB, f"the client could send {got.sent:,} bytes before the 401"
    assert keyed_api.upload_folders() == []


def test_a_streamed_upload_without_a_key_gets_its_401_through_httpx(keyed_api: LiveApi) -> None:
    """The same with a chunked body from a generator, as `httpx` (and so the Python client) streams a file.
    httpx reads the answer once the server hangs up; what it sent until then sat in the two kernels' socket
    buffers (a few MiB on loopback), never in the server."""
    yielded = 0

    def body() -> Iterator[bytes]:
        nonlocal yielded
        head = file_part_head()
        yielded += len(head)
        yield head
        block = b"\0" * (64 << 10)
        while yielded < BIG:
            yielded += len(block)
            yield block
            time.sleep(0.001)

    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        resp = client.post(f"{keyed_api.url}/v1/teachers", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    seconds = time.monotonic() - started
    print(f"httpx: 401 after {yielded:,} bytes were yielded, in {seconds * 1000:.0f} ms")
    assert_error(resp, 401, "missing_api_key")
    assert yielded < 32 * MIB and seconds < 10
    assert keyed_api.upload_folders() == []


def test_a_valid_key_still_uploads_over_http(keyed_api: LiveApi, env: Env, npz10_file: bytes) -> None:
    resp = httpx.post(f"{keyed_api.url}/v1/datasets", headers=env.auth("a"), timeout=120,
                      params={"dedupe": "false"},  # the file was uploaded before: a new object, inspected again
                      files={"file": ("digits.npz", npz10_file, "application/octet-stream")})
    assert resp.status_code == 201, resp.text
    assert resp.json()["filename"] == "digits.npz"
    assert keyed_api.upload_folders() == []


def test_unknown_v1_paths_need_a_key_too(keyed_api: LiveApi) -> None:
    assert_error(httpx.get(f"{keyed_api.url}/v1/nothing"), 401, "missing_api_key")
    assert httpx.get(f"{keyed_api.url}/healthz").status_code == 200  # outside /v1: no key


# ---------------------------------------------------------------------------------------------- local mode

def test_local_mode_answers_to_loopback_names_only(local_api: LiveApi) -> None:
    port = local_api.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        resp = httpx.get(f"{local_api.url}/v1/jobs", headers={"Host": host})
        assert resp.status_code == 200, (host, resp.text)
    # DNS rebinding: evil.example now resolves to 127.0.0.1, and the browser sends its own name as Host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}",
                 f"localhost.:{port}", f"localhost:{port}@evil.example"):
        for method, path in (("GET", "/v1/jobs"), ("GET", "/docs"), ("POST", "/v1/jobs")):
            resp = httpx.request(method, f"{local_api.url}{path}", headers={"Host": host}, json={})
            assert_error(resp, 400, "host_not_allowed")


def test_local_mode_refuses_a_form_post_from_another_site(local_api: LiveApi, env: Env) -> None:
    url = local_api.url
    before = len(httpx.get(f"{url}/v1/teachers", params={"limit": 200}).json()["items"])
    # what <form method=post enctype=multipart/form-data action=http://127.0.0.1:8000/v1/teachers> sends
    resp = httpx.post(f"{url}/v1/teachers", headers={"Origin": "https://evil.example"},
                      files={"file": ("t.safetensors", b"x" * 1000, "application/octet-stream")},
                      data={"arch": "resnet8"})
    assert_error(resp, 403, "origin_not_allowed")
    # a plain form, and fetch() with a "simple" content type that needs no preflight
    resp = httpx.post(f"{url}/v1/jobs", headers={"Origin": "https://evil.example"}, data={"teacher_id": "x"})
    assert_error(resp, 403, "origin_not_allowed")
    resp = httpx.post(f"{url}/v1/jobs/job_000000000000000000000000/cancel",
                      headers={"Origin": "http://evil.example:80", "Content-Type": "text/plain"}, content="{}")
    assert_error(resp, 403, "origin_not_allowed")
    for origin in ("null", f"http://localhost:{local_api.port + 1}", f"https://127.0.0.1:{local_api.port}"):
        resp = httpx.post(f"{url}/v1/jobs", headers={"Origin": origin}, json={})
        assert_error(resp, 403, "origin_not_allowed")
    assert len(httpx.get(f"{url}/v1/teachers", params={"limit": 200}).json()["items"]) == before
    assert local_api.upload_folders() == []


def test_local_mode_takes_posts_without_origin_and_from_its_own_pages(local_api: LiveApi) -> None:
    url, port = local_api.url, local_api.port
    for headers in ({}, {"Origin": url}, {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}):
        resp = httpx.post(f"{url}/v1/jobs", headers=headers, json={})
        assert_error(resp, 422)  # past the guard: the body is checked
    # reading is not a change: a GET with a foreign Origin is answered (the browser keeps it from the page)
    assert httpx.get(f"{url}/v1/jobs", headers={"Origin": "https://evil.example"}).status_code == 200


def test_allowed_hosts_and_origins_can_be_set(env: Env) -> None:
    client = env.client_with(auth="disabled", allowed_hosts="kdistill.lan:8000, testserver",
                             allowed_origins="http://localhost:3000")
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/v1/jobs", headers={"Host": "kdistill.lan:8000"}).status_code == 200
    assert_error(client.get("/v1/jobs", headers={"Host": "kdistill.lan:9000"}), 400, "host_not_allowed")
    assert_error(client.get("/v1/jobs", headers={"Host": "localhost"}), 400, "host_not_allowed")
    assert_error(client.post("/v1/jobs", json={}, headers={"Origin": "http://localhost:3000"}), 422)
    assert_error(client.post("/v1/jobs", json={}, headers={"Origin": "http://localhost:3001"}), 403,
                 "origin_not_allowed")
    # with keys required, KDISTILL_ALLOWED_HOSTS applies too, and Origin is not checked (keys are no cookies)
    keyed = env.client_with(allowed_hosts="api.example.com")
    assert_error(keyed.get("/v1/jobs", headers=env.auth("a")), 400, "host_not_allowed")
    resp = keyed.get("/v1/jobs", headers={**env.auth("a"), "Host": "api.example.com"})
    assert resp.status_code == 200, resp.text
    resp = keyed.post("/v1/jobs", json={}, headers={**env.auth("a"), "Host": "api.example.com",
                                                   "Origin": "https://elsewhere.example"})
    assert_error(resp, 422)


# ---------------------------------------------------------------------------------------------- uploads

def test_an_error_about_an_upload_names_the_file_as_uploaded(env: Env) -> None:
    tmp = env.settings.tmp_dir
    before = set(tmp.iterdir())
    resp = env.upload_teacher(b"this is not a model" * 50, "my-model.safetensors", arch="resnet8",
                              num_classes="10", input_channels="1", input_size="8")
    body = assert_error(resp, 422)
    assert "my-model.safetensors" in body["message"], body
    assert "tmp" not in body["message"].lower(), body
    resp = env.upload_dataset(b"PK\x03\x04 not really a zip" * 20, "my data (v2).zip")
    body = assert_error(resp, 422)
    assert "my_data__v2_.zip" in body["message"], body
    assert "tmp" not in body["message"].lower(), body
    assert not {p for p in set(tmp.iterdir()) - before if p.name.startswith("upload-")}


# ---------------------------------------------------------------------------------------------- metrics, readyz

def test_metrics_show_no_job_ids_or_tenants(env: Env, job_a: dict) -> None:
    queue = job_a["queue"]
    with session_scope(env.db_url) as s:
        job = s.get(Job, job_a["id"])
        job.status, job.samples_per_s = "running", 123.0
        s.flush()
        running = s.scalars(sql_select(Job).where(Job.status == "running", Job.queue == queue)).all()
        expected = len(running), sum(j.samples_per_s or 0.0 for j in running)
    try:
        text = env.client.get("/metrics").text
    finally:
        with session_scope(env.db_url) as s:
            job = s.get(Job, job_a["id"])
            job.status, job.samples_per_s = "queued", None
    # other tests of this backend may have left jobs running on the same queue: totals per queue
    assert f'kdistill_running_jobs{{queue="{queue}"}} {float(expected[0])}' in text
    assert f'kdistill_job_samples_per_second{{queue="{queue}"}} {expected[1]}' in text
    assert job_a["id"] not in text
    assert not re.search(r"job_[0-9a-f]{12}", text)  # route templates say {job_id}, never an id
    assert not re.search(r"[{,](job_id|job|tenant|tenant_id)=", text) and "tenant-a" not in text


def test_readyz_tells_no_internal_error_text(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    client = env.client_with(database_url="postgresql+psycopg://secretuser@127.0.0.1:1/secretdb",
                             broker_url="redis://127.0.0.1:1/0")
    with caplog.at_level("WARNING", logger="kdistill.api"):
        resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["checks"] == {"database": "error: database unreachable", "broker": "error: broker unreachable"}
    assert {e["code"] for e in body["errors"]} == {"database_unreachable", "broker_unreachable"}
    for secret in ("secretuser", "secretdb", "127.0.0.1", "psycopg", "Error", "refused"):
        assert secret not in resp.text, resp.text
    assert "secretuser" in caplog.text or "127.0.0.1" in caplog.text  # the details are in the log
