"""The Python client's side of issue 11 against a real `kdistill serve`: delete_teacher/dataset/job, upload
de-duplication (`dedupe=False`), `callback_url` on create_job, and downloads that resume their `.part` file with
a `Range` request. Only a dropped connection is simulated, in an httpx transport in front of the real server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import Server, _env

from app.client import Client, KdistillError

HYPER = {"batch_size": 64, "seed": 0, "device": "cpu", "epochs": 1}
TEACHER = {"arch": "resnet20", "num_classes": 10, "input_channels": 1, "input_size": 8, "mean": [0.3], "std": [0.37]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-client")
    # callbacks to this machine are allowed here: the job below names one (nothing listens on it)
    srv = Server.start(tmp, env=_env(KDISTILL_STREAM_INTERVAL="0.2", KDISTILL_WEBHOOK_ALLOW_PRIVATE="true",
                                     OMP_NUM_THREADS="1"))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def uploaded(server: Server, example_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    with Client(server.url) as kd:
        return kd.upload_teacher(example_dir / "teacher.safetensors", **TEACHER), \
            kd.upload_dataset(example_dir / "digits.npz")


@pytest.fixture(scope="module")
def finished(server: Server, uploaded: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """A succeeded 1-epoch job that named a callback_url."""
    teacher, dataset = uploaded
    with Client(server.url) as kd:
        job = kd.create_job(teacher["id"], dataset["id"], "resnet8", export_formats=["onnx"], hyperparameters=HYPER,
                            callback_url="http://127.0.0.1:9/kdistill-hook", callback_epochs=True)
        job = kd.wait(job["id"], timeout=240, poll=0.5)
    assert job["status"] == "succeeded", (job.get("error"), server.output()[-3000:])
    return job


class Recording(httpx.BaseTransport):
    """The real server over HTTP, recording each artifact request's Range header and answer status.
    `cut_after`: the first artifact body stops after that many bytes, as a dropped connection does."""

    def __init__(self, cut_after: int | None = None) -> None:
        self.real = httpx.HTTPTransport()
        self.cut_after = cut_after
        self.seen: list[tuple[str | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        if "/artifacts/" in request.url.path:
            self.seen.append((request.headers.get("range"), response.status_code))
            if self.cut_after is not None:
                response.stream = _Cut(response.stream, self.cut_after)
                self.cut_after = None
        return response

    def close(self) -> None:
        self.real.close()


class _Cut(httpx.SyncByteStream):
    def __init__(self, inner: Any, left: int) -> None:
        self.inner, self.left = inner, left

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            if len(chunk) >= self.left:
                yield chunk[:self.left]
                raise httpx.RemoteProtocolError("peer closed connection without sending complete body")
            self.left -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


def onnx_of(job: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in job["artifacts"] if a["name"] == "student.onnx")


@pytest.mark.slow
def test_create_job_sends_the_callback(finished: dict[str, Any]):
    assert finished["request"]["callback_url"] == "http://127.0.0.1:9/kdistill-hook"
    assert finished["request"]["callback_epochs"] is True


@pytest.mark.slow
def test_a_dropped_download_resumes_from_its_part_file(server: Server, finished: dict[str, Any], tmp_path: Path):
    artifact = onnx_of(finished)
    size = artifact["size_bytes"]
    cut = Recording(cut_after=size // 3)
    with Client(server.url, transport=cut) as kd, pytest.raises(KdistillError) as e:
        kd.download(finished["id"], "student.onnx", tmp_path)
    assert e.value.code == "unreachable" and cut.seen == [(None, 200)]
    part = tmp_path / "student.onnx.part"
    assert part.stat().st_size == size // 3 and not (tmp_path / "student.onnx").exists(), "the bytes are kept"

    resumed = Recording()
    with Client(server.url, transport=resumed) as kd:
        path = kd.download(finished["id"], "student.onnx", tmp_path)
    assert resumed.seen == [(f"bytes={size // 3}-", 206)], "only the missing bytes were asked for"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"] and not part.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["foreign", "too_long"])
def test_a_part_file_that_cannot_be_resumed_is_fetched_whole(server: Server, finished: dict[str, Any],
                                                             tmp_path: Path, kept: str):
    """foreign: bytes of another file (the checksum fails, so the file is fetched whole again); too_long: more
    bytes than the file has (416)."""
    artifact = onnx_of(finished)
    size = artifact["size_bytes"]
    part = tmp_path / "student.onnx.part"
    part.write_bytes(b"\0" * (size // 2 if kept == "foreign" else size + 10))
    transport = Recording()
    with Client(server.url, transport=transport) as kd:
        path = kd.download(finished["id"], "student.onnx", tmp_path)
    first = (f"bytes={size // 2}-", 206) if kept == "foreign" else (f"bytes={size + 10}-", 416)
    assert transport.seen == [first, (None, 200)]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"] and not part.exists()


@pytest.mark.slow
def test_uploads_are_deduplicated_unless_asked_not_to(server: Server, example_dir: Path,
                                                      uploaded: tuple[dict[str, Any], dict[str, Any]]):
    teacher, dataset = uploaded
    with Client(server.url) as kd:
        assert kd.upload_teacher(example_dir / "teacher.safetensors", **TEACHER)["id"] == teacher["id"]
        assert kd.upload_dataset(example_dir / "digits.npz")["id"] == dataset["id"]
        fresh_teacher = kd.upload_teacher(example_dir / "teacher.safetensors", **TEACHER, dedupe=False)
        fresh_dataset = kd.upload_dataset(example_dir / "digits.npz", dedupe=False)
        assert fresh_teacher["id"] != teacher["id"] and fresh_teacher["sha256"] == teacher["sha256"]
        assert fresh_dataset["id"] != dataset["id"] and fresh_dataset["sha256"] == dataset["sha256"]
        assert kd.delete_teacher(fresh_teacher["id"]) is None and kd.delete_dataset(fresh_dataset["id"]) is None
        for get in (lambda: kd.get_teacher(fresh_teacher["id"]), lambda: kd.get_dataset(fresh_dataset["id"]),
                    lambda: kd.delete_teacher(fresh_teacher["id"])):
            with pytest.raises(KdistillError) as e:
                get()
            assert e.value.status == 404


@pytest.mark.slow
def test_delete_job_and_the_artifacts_of_an_unfinished_job(server: Server, tmp_path: Path,
                                                           uploaded: tuple[dict[str, Any], dict[str, Any]]):
    teacher, dataset = uploaded
    with Client(server.url) as kd:
        job = kd.create_job(teacher["id"], dataset["id"], "resnet8", export_formats=["onnx"], hyperparameters=HYPER,
                            queue="nobody_serves_this")
        for attempt in (lambda: kd.download(job["id"], "student.onnx", tmp_path), lambda: kd.delete_job(job["id"]),
                        lambda: kd.delete_teacher(teacher["id"])):
            with pytest.raises(KdistillError) as e:
                attempt()
            assert e.value.status == 409 and e.value.code in ("job_not_finished", "teacher_in_use"), e.value
        assert not list(tmp_path.iterdir()), "no .part is left by a refused download"
        kd.cancel(job["id"])
        assert kd.delete_job(job["id"]) is None
        with pytest.raises(KdistillError) as e:
            kd.get_job(job["id"])
        assert (e.value.status, e.value.code) == (404, "job_not_found")
