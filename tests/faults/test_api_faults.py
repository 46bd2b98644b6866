"""The API under concurrency and a hard kill: uvicorn with 2 processes over PostgreSQL and a private Redis."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    TEACHER_FORM,
    Figures,
    Stack,
    digits_npz_bytes,
    multipart_stream,
    percentile,
    random_npz_bytes,
    teacher_bytes,
    tiny_job_body,
    wait_for,
)

pytestmark = pytest.mark.faults


def _list_all(client: httpx.Client, path: str, limit: int = 200) -> list[dict[str, Any]]:
    """Every item of a paginated list, following next_cursor."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        body = client.get(path, params={"limit": limit, **({"after": after} if after else {})}
                          ).raise_for_status().json()
        items.extend(body["items"])
        after = body["next_cursor"]
        if after is None:
            return items


@dataclass
class Posted:
    status: int  # -1: no answer even after the retries
    answer: Any  # the JSON answer, or the text of the answer or of the last error
    seconds: float  # of the answered attempt
    retries: int = 0  # attempts that got no answer (the same Idempotency-Key was sent again)


async def _post_jobs(stack: Stack, bodies: list[tuple[dict[str, Any], str]], clients: int,
                     retries: int = 2) -> list[Posted]:
    """POST each (body, Idempotency-Key) from `clients` concurrent keep-alive connections, in the order of
    `bodies`. A request that gets no answer is sent again with its key, as a careful client does: uvicorn
    drops keep-alive connections idle for 5 s, and a request can cross that close on the wire."""
    results: list[Posted] = [Posted(-1, None, 0.0)] * len(bodies)
    todo = iter(range(len(bodies)))
    async with stack.async_client(connections=clients) as client:
        async def one_client() -> None:
            for i in todo:
                body, key = bodies[i]
                for attempt in range(retries + 1):
                    t0 = time.perf_counter()
                    try:
                        r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                    except httpx.TransportError as e:
                        results[i] = Posted(-1, repr(e), time.perf_counter() - t0, attempt + 1)
                        continue
                    json_answer = r.headers.get("content-type", "").startswith("application/json")
                    results[i] = Posted(r.status_code, r.json() if json_answer else r.text,
                                        time.perf_counter() - t0, attempt)
                    break

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return results


async def _cancel_all(stack: Stack, job_ids: list[str], clients: int, retries: int = 2) -> list[int]:
    """Cancel each job from `clients` keep-alive connections; a cancel that gets no answer (the keep-alive
    close race of _post_jobs) is sent again, which is safe: cancelling a cancelled job answers 200."""
    statuses: list[int] = []
    todo = iter(job_ids)
    async with stack.async_client(connections=clients) as client:
        async def one_client() -> None:
            for job_id in todo:
                for attempt in range(retries + 1):
                    try:
                        statuses.append((await client.post(f"/v1/jobs/{job_id}/cancel")).status_code)
                        break
                    except httpx.TransportError:
                        if attempt == retries:
                            statuses.append(-1)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return statuses


def _latency_note(results: list[Posted]) -> str:
    ms = [r.seconds * 1000 for r in results]
    retried = sum(r.retries > 0 for r in results)
    return f"p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms, {retried} resent after no answer"


def test_one_idempotency_key_from_50_concurrent_posts_makes_one_job(stack: Stack, figures: Figures) -> None:
    stack.start_api(workers=2)
    with stack.client() as c:
        teacher_id, dataset_id = stack.upload_inputs(c)
    key = f"once-{secrets.token_hex(4)}"
    body = tiny_job_body(teacher_id, dataset_id)

    results = asyncio.run(_post_jobs(stack, [(body, key)] * 50, clients=50))

    ok = [r for r in results if 200 <= r.status < 300]
    ids = {r.answer["id"] for r in ok}
    with stack.client() as c:
        listed = _list_all(c, "/v1/jobs")
    rows = stack.sql("SELECT id FROM jobs WHERE idempotency_key = %s", key)
    figures.record("50 concurrent POST /v1/jobs, one Idempotency-Key", recovery_s=None, jobs=len(rows),
                   lost=int(not rows), duplicate_runs=max(0, len(rows) - 1),
                   note=f"{len(ok)}/50 2xx, {len(ids)} distinct id(s), {stack.redis.queue_depth()} broker "
                        f"message(s); {_latency_note(results)}")

    assert not [r for r in results if r.status >= 500 or r.status < 0], f"5xx or no answer: {results}\n{stack.logs()}"
    assert ok and len(ids) == 1, f"2xx answers name {len(ids)} jobs: {ids}; all answers: {results}"
    (job_id,) = ids
    assert [j["id"] for j in listed] == [job_id]
    assert [r[0] for r in rows] == [job_id]
    with stack.client() as c:
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


def test_1000_submissions_from_50_clients_none_lost_none_duplicated(stack: Stack, figures: Figures) -> None:
    total, clients = 1000, 50
    stack.start_api(workers=2)
    with stack.client() as c:
        teacher_id, dataset_id = stack.upload_inputs(c)
    run = secrets.token_hex(4)
    requests = [(tiny_job_body(teacher_id, dataset_id), f"load-{run}-{i}") for i in range(total)]

    t0 = time.monotonic()
    results = asyncio.run(_post_jobs(stack, requests, clients))
    seconds = time.monotonic() - t0

    answered = {requests[i][1]: r.answer["id"] for i, r in enumerate(results) if 200 <= r.status < 300}
    failed = [(requests[i][1], r.status, r.answer) for i, r in enumerate(results) if not 200 <= r.status < 300]
    with stack.client() as c:
        listed = [j["id"] for j in _list_all(c, "/v1/jobs")]
    db_rows = stack.sql("SELECT id, idempotency_key FROM jobs")
    db_ids = {row[0] for row in db_rows}
    lost = len(set(answered.values()) - db_ids) + len(failed)
    duplicated = len(db_rows) - len({row[1] for row in db_rows})  # more than one job for one key
    figures.record(f"{total} POST /v1/jobs from {clients} clients", recovery_s=None, jobs=len(db_rows), lost=lost,
                   duplicate_runs=duplicated,
                   note=f"{total / seconds:.0f} req/s, {_latency_note(results)}, {len(failed)} non-2xx")

    assert not failed, f"{len(failed)} submissions failed, e.g. {failed[:5]}\n{stack.logs()}"
    assert len(answered) == total and len(set(answered.values())) == total, "an id was answered twice"
    assert len(db_rows) == total and db_ids == set(answered.values()), "the database holds other jobs than answered"
    assert duplicated == 0
    assert len(listed) == total and set(listed) == db_ids, "the paginated list differs from the database"

    statuses = asyncio.run(_cancel_all(stack, listed, clients))
    assert statuses.count(200) == total, f"cancel answers: {sorted(set(statuses))}"
    assert stack.sql("SELECT status, count(*) FROM jobs GROUP BY status") == [("cancelled", total)]


# ---------------------------------------------------------------------------------------------- kill mid-upload

def _trickle(stack: Stack, path: str, fields: dict[str, str], filename: str, content: bytes, chunk: int,
             pause: float, sent: list[int], outcome: dict[str, Any]) -> None:
    """One slow upload in this thread; `outcome` gets its answer or the error that ended it."""
    ctype, body = multipart_stream(fields, filename, content, chunk, pause, sent)
    try:
        with stack.client(timeout=120) as c:
            r = c.post(path, content=body, headers={"Content-Type": ctype})
            outcome["status"], outcome["body"] = r.status_code, r.text
    except httpx.HTTPError as e:
        outcome["error"] = repr(e)


def _upload_folders(tmp: Path) -> set[str]:
    return {p.name for p in tmp.glob("upload-*")} if tmp.is_dir() else set()


def test_api_killed_during_uploads_leaves_no_partial_object_or_temp_file(stack: Stack, figures: Figures) -> None:
    stack.start_api(workers=2)
    tmp, store = stack.data_dir / "tmp", stack.data_dir / "store"
    # Bodies that trickle for about 20 s (the kill comes after a few), and one sent at once that is being
    # inspected (12.8 MB of images to check) when the kill comes.
    big = random_npz_bytes(60_000, seed=1)  # about 3.8 MB: 60 chunks of 64 KiB
    teacher = teacher_bytes(seed=1)  # about 0.3 MB: 19 chunks of 16 KiB
    inspected = random_npz_bytes(200_000, seed=2)
    uploads: list[tuple[str, dict[str, str], str, bytes, int, float]] = [
        ("/v1/datasets", {}, f"slow{i}.npz", big, 64 << 10, 0.33) for i in range(3)]
    uploads.append(("/v1/teachers", TEACHER_FORM, "slow.safetensors", teacher, 16 << 10, 1.0))
    sent = [[0] for _ in uploads]
    outcomes: list[dict[str, Any]] = [{} for _ in uploads]
    threads = [threading.Thread(target=_trickle, args=(stack, *u, sent[i], outcomes[i]), daemon=True)
               for i, u in enumerate(uploads)]
    for t in threads:
        t.start()
    wait_for(lambda: all(s[0] >= 2 * u[4] for s, u in zip(sent, uploads, strict=True)), 60,
             "every slow upload to be under way", interval=0.02, context=stack.logs)
    whole: dict[str, Any] = {}
    whole_thread = threading.Thread(target=_trickle, args=(stack, "/v1/datasets", {}, "inspected.npz", inspected,
                                                           len(inspected), 0.0, [0], whole), daemon=True)
    whole_thread.start()
    # the whole body is in once its upload folder holds the inspector's work folder
    wait_for(lambda: list(tmp.glob("upload-*/inspect-*")) or whole, 60, "the complete upload's inspection",
             interval=0.01, context=stack.logs)
    assert not whole, f"the complete upload was answered before the kill: {whole}"
    killed_at = time.monotonic()
    stack.kill_api(signal.SIGKILL)
    left_by_killed = _upload_folders(tmp)
    for t in [*threads, whole_thread]:
        t.join(timeout=60)
    fractions = [round(s[0] / len(u[3]), 2) for s, u in zip(sent, uploads, strict=True)]
    assert all(f < 1 for f in fractions), f"an upload finished its body before the kill: {fractions}"
    assert all("error" in o or o.get("status", 0) >= 500 for o in [*outcomes, whole]), [*outcomes, whole]

    startup = stack.start_api(workers=2)
    recovery = time.monotonic() - killed_at
    sent_digests = {hashlib.sha256(b).hexdigest() for b in (big, teacher, inspected)}
    with stack.client() as c:
        datasets = c.get("/v1/datasets").raise_for_status().json()["items"]
        teachers = c.get("/v1/teachers").raise_for_status().json()["items"]
        # still serving uploads after the restart
        fresh = stack.upload_dataset(c, digits_npz_bytes(), "after.npz")
    listed = [*datasets, *teachers]
    partial = [o for o, kind in [*((d, "datasets") for d in datasets), *((t, "teachers") for t in teachers)]
               if o["sha256"] not in sent_digests or not _stored_intact(store, kind, o)]
    parts = sorted(str(p.relative_to(store)) for p in store.rglob("*.part")) if store.is_dir() else []
    remaining = left_by_killed & _upload_folders(tmp)
    figures.record("API SIGKILL during 5 uploads", recovery_s=recovery, jobs=0, lost=0, duplicate_runs=0,
                   note=f"restart {startup:.1f} s; {len(listed)} listed, {len(partial)} partial; "
                        f"upload folders of the killed API {len(left_by_killed)} -> {len(remaining)} after restart; "
                        f"{len(parts)} .part file(s)")

    assert fresh["sha256"] == hashlib.sha256(digits_npz_bytes()).hexdigest()
    assert not partial, f"listed objects that are not complete uploads: {partial}"
    assert not parts, f"half-written files in the store: {parts}"
    assert left_by_killed, "the kill left no upload folder: the cleanup below was not exercised"
    # Start-up removes upload folders whose owner process is gone (may take a moment after /healthz).
    try:
        wait_for(lambda: not (left_by_killed & _upload_folders(tmp)), 10, "the upload folders to be removed")
    except AssertionError:
        raise AssertionError(f"upload folders of the killed API are still in {tmp}: "
                             f"{sorted(left_by_killed & _upload_folders(tmp))}") from None


def _stored_intact(store: Path, kind: str, obj: dict[str, Any]) -> bool:
    """The object's file in the local store exists with its listed size and sha256."""
    path = store / kind / obj["id"] / obj["filename"]
    if not path.is_file() or path.stat().st_size != obj["size_bytes"]:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == obj["sha256"]
