"""The supervisor: claims a job, runs the engine in a child process, and mirrors it into the database.

The child (`python -m worker.run`) gets file paths only, never database or store credentials; it runs in
its own process group (start_new_session, no code between fork and exec) so cancel and timeout can stop
everything it started, and it asks the kernel to kill it when we die (PR_SET_PDEATHSIG, in worker.sandbox),
so a killed worker leaves no orphan training on the GPU.

How the job moves is app.lifecycle's: the supervisor takes a lease with `claim`, renews it from a heartbeat
thread, and every write it makes is fenced by that lease. Writes wait out a database outage in an outbox
(worker.outbox) while training goes on; checkpoints go to the store before their epoch is recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from billiard.exceptions import Terminated
from celery.exceptions import WorkerShutdown, WorkerTerminate
from celery.worker import state as worker_state
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import lifecycle, webhooks
from app.db import database_unreachable, session_scope
from app.jobs import add_event, add_warning
from app.lifecycle import Lease
from app.models import Artifact, Dataset, Job, JobEvent, Teacher
from app.settings import Settings
from app.storage import InputCorrupted, get_store, sha256_of, verified_local_path
from worker import registry, tracking_mlflow
from worker.distill.export import FILE_NAMES
from worker.distill.spec import Checks, DataSpec, InputSpec, JobSpec, StudentSpec, TeacherSpec
from worker.outbox import RETRY_MAX, RETRY_MIN, LeaseLost, Outbox
from worker.sandbox import Config, child_env, job_policy, log_protections_once

log = logging.getLogger("kdistill.worker")
# What Celery raises inside a task when the worker is shut down or terminated.
WORKER_STOPPING = (WorkerShutdown, WorkerTerminate, Terminated, SystemExit, KeyboardInterrupt)
EXIT_CANCELLED = 3
ARTIFACT_NAMES = frozenset({*FILE_NAMES.values(), "student.safetensors", "metadata.json",
                            "tensorboard.tar.gz"})
KILL_WAIT = 10.0
T = TypeVar("T")


class ClaimDeferred(Exception):
    """The database stayed unreachable while we tried to claim: the message goes back to the broker."""


def worker_stopping() -> bool:
    """True once Celery began to shut this worker down (what it raises then into a task varies by pool)."""
    return bool(worker_state.should_stop or worker_state.should_terminate)


class Supervisor:
    """Runs one attempt of a job to a final status; every step of the way is written to the job's record."""

    def __init__(self, settings: Settings, job_id: str, worker: str) -> None:
        self.settings, self.job_id, self.worker = settings, job_id, worker
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = settings.resolved_database_url
        self.job_dir = settings.jobs_dir.resolve() / job_id
        self.log = logging.LoggerAdapter(log, {"job_id": job_id, "worker": worker})
        self.lease: Lease | None = None
        self.outbox = Outbox(self.url, job_id)

    # -- the database, outages included --------------------------------------------------------------
    def _retrying(self, what: str, work: Callable[[Session], T], seconds: float = lifecycle.DB_RETRY_SECONDS) -> T:
        """Run `work` in a transaction, retrying while the database is unreachable, for up to `seconds`."""
        deadline, delay, said = time.monotonic() + seconds, RETRY_MIN, False
        while True:
            try:
                with session_scope(self.url) as s:
                    return work(s)
            except Exception as e:
                if not database_unreachable(e) or time.monotonic() + delay > deadline:
                    raise
                if not said:
                    self.log.warning("job %s: the database is unreachable (%s); retrying", self.job_id, what)
                    said = True
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def claim(self) -> bool:
        """Take the job's lease (app.lifecycle.claim); False when it is not ours to run. Raises ClaimDeferred
        when the database stayed unreachable."""
        try:
            self.lease = self._retrying("claim", lambda s: lifecycle.claim(s, self.settings, self.job_id,
                                                                         self.worker))
        except Exception as e:
            if database_unreachable(e):
                raise ClaimDeferred(str(e)) from e
            raise
        return self.lease is not None

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> None:
        if not self.claim():
            return
        registry.running(self.job_id)
        self.beat = _Heartbeat(self)
        self.beat.start()
        try:
            self._supervise()
        except LeaseLost:
            self.log.warning("job %s: another worker holds the job now; this copy stopped", self.job_id)
        except WORKER_STOPPING:
            # The worker itself is going away: the job stays running, its lease goes stale, and the sweep
            # sends it again to resume from its last checkpoint.
            self.log.warning("job %s: the worker is stopping; the job will resume elsewhere", self.job_id)
            raise
        except InputCorrupted as e:  # a teacher or dataset that is not what was uploaded: never train on it
            self.log.error("job %s: %s", self.job_id, e)
            self._end(lifecycle.FAILED, e.code, str(e))
        except Exception as e:  # the job must end in a final state whatever breaks here
            if worker_stopping():
                self.log.warning("job %s: the worker is stopping; the job will resume elsewhere", self.job_id)
                raise
            self.log.exception("supervising job %s failed", self.job_id)
            self._end(lifecycle.FAILED, "worker_error", f"the worker failed while supervising the job "
                      f"({type(e).__name__}); see its log", event=("the worker failed while supervising the job",
                                                                   {"traceback": traceback.format_exc()}))
        finally:
            self.beat.stop()
            if self.proc is not None and self.proc.poll() is None:
                # never leave training running on a GPU the next job will want
                _stop_group(self.proc)
            registry.finished()

    def _spec(self, job: Job, teacher: Teacher, dataset: Dataset) -> JobSpec:
        req = job.request
        store = get_store(self.settings)
        t_input = InputSpec(channels=teacher.input_channels, size=tuple(teacher.input_size), mean=teacher.mean,
                            std=teacher.std)
        student = req["student"]
        s_input = None
        if student.get("input_size") or student.get("mean") or student.get("std"):
            size = student.get("input_size") or teacher.input_size[0]
            s_input = InputSpec(channels=teacher.input_channels, size=size, mean=student.get("mean"),
                                std=student.get("std"))
        data = req.get("data") or {}
        # The child gets only copies whose sha256 is the one recorded at upload (InputCorrupted otherwise).
        teacher_path = verified_local_path(store, teacher.storage_key, teacher.sha256, f"teacher {teacher.id}")
        dataset_path = verified_local_path(store, dataset.storage_key, dataset.sha256, f"dataset {dataset.id}")
        return JobSpec(
            teacher=TeacherSpec(path=str(teacher_path), format=teacher.format,
                                arch=teacher.arch, num_classes=teacher.num_classes, input=t_input,
                                classes=teacher.classes or None),
            student=StudentSpec(arch=student["arch"], input=s_input),
            data=DataSpec(path=str(dataset_path), val_fraction=data.get("val_fraction", 0.2),
                          test_fraction=data.get("test_fraction") or 0.0,
                          augment=data.get("augment", False), max_files=self.settings.max_dataset_files,
                          max_unpacked_bytes=self.settings.max_unpacked_bytes,
                          max_decoded_bytes=self.settings.max_decoded_bytes),
            hyperparameters=req["hyperparameters"],
            export_formats=req["export_formats"],
            baseline=req.get("baseline", False),
            max_export_accuracy_drop=req.get("max_export_accuracy_drop", 0.01),
            checks=Checks.model_validate(req.get("checks") or {}),
            output_dir=str(self.job_dir / "out"),
            checkpoint_dir=str(self.job_dir / "checkpoints"),
            progress_interval=min(self.settings.progress_interval, 1.0),
            allow_torchscript_teacher=self.settings.allow_torchscript,
        )

    def _load(self) -> tuple[JobSpec, float]:
        def read(s: Session) -> tuple[JobSpec, float]:
            job = s.get(Job, self.job_id)
            assert job is not None
            spec = self._spec(job, s.get(Teacher, job.teacher_id), s.get(Dataset, job.dataset_id))
            # a request may ask for less time than the deployment allows, never for more
            return spec, min(job.request.get("max_run_seconds") or self.settings.job_max_seconds,
                             self.settings.job_max_seconds)
        return self._retrying("reading the job", read)

    def _supervise(self) -> None:
        spec, max_seconds = self._load()
        out_dir = self.job_dir / "out"
        shutil.rmtree(out_dir, ignore_errors=True)  # a retried job starts its exports afresh
        self.job_dir.mkdir(parents=True, exist_ok=True)
        cancel_file = self.job_dir / "cancel"
        cancel_file.unlink(missing_ok=True)
        (self.job_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
        self._restore_checkpoints()
        # The child confines itself with this policy before it opens the teacher: it reads the teacher and
        # the dataset, writes this job's folder only (handed to the sandbox's uid when we are root).
        log_protections_once(self.settings)
        policy = job_policy(Config.from_settings(self.settings), self.job_dir,
                            [Path(spec.teacher.path), Path(spec.data.path)], spec.hyperparameters.device)
        child_log = (self.job_dir / "child.log").open("ab")
        self.proc = proc = subprocess.Popen(
            # -P: the job folder, which the child writes, is never on its import path
            [sys.executable, "-P", "-m", "worker.run", str(self.job_dir / "spec.json"), "--cancel-file",
             str(cancel_file), "--sandbox", policy.to_json()],
            stdout=subprocess.PIPE, stderr=child_log, stdin=subprocess.DEVNULL, start_new_session=True,
            env=child_env(), cwd=str(self.job_dir))
        child_log.close()
        self.log.info("job %s: training process %d started (sandbox uid %s%s)", self.job_id, proc.pid,
                      policy.uid if policy.uid is not None else os.geteuid(),
                      f"; {policy.uid_note}" if policy.uid_note else "")
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()

        state = _ChildState(started=time.monotonic())
        last_progress_write = 0.0
        eof = False
        while True:
            try:
                line = lines.get(timeout=0.5)
                if line is None:
                    eof = True
                else:
                    self._handle_line(line, state)
            except queue.Empty:
                pass
            now = time.monotonic()
            if state.progress is not None and (state.progress_dirty and now - last_progress_write >=
                                               self.settings.progress_interval):
                self._put_progress(state)
                last_progress_write = now
            self._flush(state)
            if self.beat.lost.is_set() and not state.lost:
                self.log.warning("job %s: another worker holds the job now; stopping this copy", self.job_id)
                state.lost = True
            if self.beat.cancel.is_set() and state.cancel_at is None:
                state.cancel_at = now
                cancel_file.touch()
                self.log.info("job %s: cancellation requested", self.job_id)
            grace_over = state.cancel_at is not None and now - state.cancel_at > self.settings.cancel_grace
            if now - state.started > max_seconds and not state.timed_out:
                state.timed_out = True
                self.log.warning("job %s: past its maximum run time of %.0f s; stopping it", self.job_id, max_seconds)
            if (grace_over or state.timed_out or state.lost) and proc.poll() is None:
                _kill_group(proc, state)  # SIGTERM, then SIGKILL if the process lingers
            if eof and proc.poll() is not None:
                break
            if eof:
                try:
                    proc.wait(timeout=KILL_WAIT)
                except subprocess.TimeoutExpired:
                    _kill_group(proc, state)
        self._conclude(proc.returncode, state, max_seconds)

    def _flush(self, state: _ChildState) -> None:
        try:
            self.outbox.flush()
        except LeaseLost:
            state.lost = True

    def _handle_line(self, line: str, state: _ChildState) -> None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            self.log.warning("job %s: non-JSON line from the training process: %s", self.job_id, line[:200])
            return
        if msg.get("type") in ("result", "error"):
            state.result, state.error = (msg, None) if msg["type"] == "result" else (None, msg)
            return
        self._record(msg, state)
        self._flush(state)

    def _record(self, msg: dict[str, Any], state: _ChildState) -> None:
        kind, lease = msg.get("type"), self.lease
        assert lease is not None
        if kind == "progress":
            state.progress, state.progress_dirty = msg, True
        elif kind == "phase":
            self.outbox.put("phase", lambda s: lifecycle.update_held(s, lease, phase=msg["phase"]))
        elif kind == "epoch":
            state.progress_dirty = state.progress is not None
            data = {k: v for k, v in msg.items() if k not in ("type", "time")}
            # The store gets the checkpoint before the database hears of its epoch: an epoch on record always
            # has a checkpoint to resume from, whatever the database did meanwhile.
            self._upload_checkpoint(data["run"])
            self.outbox.put(f"epoch {data['run']} {data['epoch']}", lambda s: self._write_epoch(s, data))
        elif kind == "event":
            self.outbox.put(f"event {msg.get('kind')}", lambda s: self._write_event(s, msg))

    def _write_epoch(self, s: Session, data: dict[str, Any]) -> bool:
        job = lifecycle.held(s, self.lease)
        if job is None:
            return False
        replayed = data.get("replayed", False)
        data = {k: v for k, v in data.items() if k != "replayed"}  # a retried write sees the line unchanged
        # Written once per (run, epoch): a replayed epoch (from a checkpoint) only if the attempt that ran it
        # died before it could, and a retried write whose first try did commit is not written again.
        if self._has_epoch_event(s, data["run"], data["epoch"]):
            return True
        if replayed:
            add_event(s, job.id, "epoch", f"{data['run']} epoch {data['epoch']}/{data['epochs']} "
                      f"(from the checkpoint): val accuracy {data['student_accuracy']:.4f}", **data)
            return True
        metrics = dict(job.metrics or {})
        if data["run"] == "student":
            # until the run ends, the figures are the latest epoch's on validation; the final ones
            # come from the test split when there is one, and `accuracy_split` always says which
            metrics.update(student_accuracy=data["student_accuracy"], teacher_accuracy=data["teacher_accuracy"],
                           agreement=data["agreement"], train_loss=data["train_loss"], epoch=data["epoch"],
                           accuracy_split="validation")
        else:
            metrics.update(baseline_accuracy=data["student_accuracy"])
        job.metrics = metrics
        add_event(s, job.id, "epoch", f"{data['run']} epoch {data['epoch']}/{data['epochs']}: "
                  f"val accuracy {data['student_accuracy']:.4f}, loss {data['train_loss']:.4f}",
                  attempt=self.lease.attempt, **data)
        webhooks.announce(s, job, webhooks.EPOCH)
        return True

    def _write_event(self, s: Session, msg: dict[str, Any]) -> bool:
        job = lifecycle.held(s, self.lease)
        if job is None:
            return False
        data = msg.get("data") or {}
        add_event(s, self.job_id, msg.get("kind", "info"), msg.get("message", ""), **data)
        if msg.get("kind") == "warning":  # on the job at once: a job that fails later keeps it
            add_warning(job, data.get("code") or "warning", msg.get("message", ""))
        if msg.get("kind") == "device":
            job.device = msg.get("message", "").removeprefix("training on ")
        return True

    def _put_progress(self, state: _ChildState) -> None:
        p, lease = state.progress or {}, self.lease
        keep = ("run", "epoch", "epochs", "step", "total_steps", "fraction", "eta_seconds", "loss", "samples_per_s")
        values = {"progress": {k: p.get(k) for k in keep}, "samples_per_s": p.get("samples_per_s")}
        self.outbox.put("progress", lambda s: lifecycle.update_held(s, lease, **values), coalesce=True)
        state.progress_dirty = False

    def _has_epoch_event(self, s: Session, run: str, epoch: int) -> bool:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == self.job_id, JobEvent.kind == "epoch"))
        return any(e.data.get("run") == run and e.data.get("epoch") == epoch for e in events)

    # Workers on other machines share no disk: with an object store, each epoch's checkpoint goes there
    # too, under this attempt's own key, so whichever worker gets a lost job resumes it and a copy that
    # lost its lease never overwrites the checkpoint of the attempt that took over.
    def _shares_disk(self) -> bool:
        return self.settings.artifact_store == "local"

    def _checkpoint_key(self, attempt: int, run: str) -> str:
        return f"checkpoints/{self.job_id}/{attempt}/{run}.ckpt"

    def _restore_checkpoints(self) -> None:
        if self._shares_disk() or self.lease is None:
            return
        store = get_store(self.settings)
        for run in ("student", "baseline"):
            for attempt in range(self.lease.attempt - 1, 0, -1):  # the latest attempt's is the newest
                key = self._checkpoint_key(attempt, run)
                if store.exists(key):
                    store.fetch(key, self.job_dir / "checkpoints" / f"{run}.ckpt")
                    self.log.info("job %s: fetched the %s checkpoint of attempt %d from the store", self.job_id,
                                  run, attempt)
                    break

    def _upload_checkpoint(self, run: str) -> None:
        local = self.job_dir / "checkpoints" / f"{run}.ckpt"
        if self._shares_disk() or not local.exists() or self.lease is None:
            return
        # The child replaces the file at the next epoch; upload a hard-linked snapshot so the upload never
        # mixes two versions.
        snapshot = local.with_suffix(".upload")
        snapshot.unlink(missing_ok=True)
        os.link(local, snapshot)
        try:
            get_store(self.settings).put_file(self._checkpoint_key(self.lease.attempt, run), snapshot)
        finally:
            snapshot.unlink(missing_ok=True)

    # -- ending ---------------------------------------------------------------------------------------
    def _conclude(self, returncode: int, state: _ChildState, max_seconds: float) -> None:
        # What the child said comes first (late, if the database was down), then the final word.
        try:
            self.outbox.drain(time.monotonic() + lifecycle.DB_RETRY_SECONDS)
        except LeaseLost:
            state.lost = True
        if state.lost:
            self.log.warning("job %s was taken over by another worker; leaving it", self.job_id)
            return
        if state.timed_out:
            self._end(lifecycle.FAILED, "job_timeout", f"the job ran longer than its limit of {max_seconds:.0f} s "
                      "and was stopped; raise max_run_seconds or train fewer epochs")
        elif returncode == 0 and state.result is not None:
            self._succeed(state.result)
        elif state.cancel_at is not None or returncode == EXIT_CANCELLED:
            self._end(lifecycle.CANCELLED)
        elif state.error is not None:
            err = state.error
            event = (err.get("message", ""), {"code": err.get("code"), "traceback": err["traceback"]}) \
                if err.get("traceback") else None
            self._end(lifecycle.FAILED, err.get("code", "job_failed"), err.get("message", "the job failed"), event)
        else:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
            hint = " (SIGKILL: often the machine ran out of memory)" if returncode == -signal.SIGKILL else ""
            self._end(lifecycle.FAILED, "training_process_died",
                      f"the training process {how}{hint}; its log tail is in the job's events",
                      (f"training process {how}", {"stderr": _tail(self.job_dir / "child.log")}))

    def _end(self, status: str, code: str | None = None, message: str | None = None,
             event: tuple[str, dict[str, Any]] | None = None) -> bool:
        """Conclude with `status` (an `error` event first when given); False when the lease was lost."""
        lease = self.lease
        assert lease is not None

        def write(s: Session) -> bool:
            if event is not None and lifecycle.held(s, lease) is not None:
                add_event(s, lease.job_id, "error", event[0], **event[1])
            return lifecycle.conclude(s, lease, status, code, message)

        if not self._retrying(f"ending the job {status}", write):
            self.log.warning("job %s was taken over by another worker; its %s is not recorded", self.job_id, status)
            return False
        return True

    def _succeed(self, result: dict[str, Any]) -> None:
        lease = self.lease
        assert lease is not None
        store = get_store(self.settings)
        out_dir = self.job_dir / "out"
        prefix = f"jobs/{self.job_id}/{lease.attempt}"  # this attempt's own keys: see _checkpoint_key
        rows: list[Artifact] = []
        for a in result["artifacts"]:
            if a["name"] not in ARTIFACT_NAMES:  # names come from the child: never let one pick a store key
                self._end(lifecycle.FAILED, "artifact_rejected", f"unexpected artifact name {a['name']!r}")
                return
            path = out_dir / a["name"]
            digest = sha256_of(path)
            if digest != a["sha256"]:
                self._end(lifecycle.FAILED, "artifact_corrupted", f"{a['name']} changed on disk after export")
                return
            key = f"{prefix}/{a['name']}"
            store.put_file(key, path)
            rows.append(dict(name=a["name"], format=a["format"], size_bytes=path.stat().st_size, sha256=digest,
                             storage_key=key))
        tracking: dict[str, str] | None = None
        tracking_warning: tuple[str, str] | None = None
        if self.settings.mlflow_tracking_uri:  # the child has no network: the run is logged from here
            request = self._retrying("reading the job", lambda s: dict(s.get(Job, self.job_id).request or {}))
            tracking, tracking_warning = tracking_mlflow.track(self.settings, self.job_id, request, result, out_dir)

        def write(s: Session) -> bool:
            job = lifecycle.held(s, lease)
            if job is None:
                return False
            job.metrics = dict(result["metrics"], **({"tracking": tracking} if tracking else {}))
            if tracking_warning is not None:
                add_warning(job, *tracking_warning)
            for w in result.get("warnings") or []:  # the run's final word; those seen on the way are kept
                if isinstance(w, dict):
                    add_warning(job, w.get("code") or "warning", w.get("message", ""))
            job.device = result.get("device") or job.device
            job.progress = dict(job.progress or {}, fraction=1.0, eta_seconds=0.0)
            return lifecycle.conclude(s, lease, lifecycle.SUCCEEDED,
                                      artifacts=[Artifact(job_id=self.job_id, **r) for r in rows])

        if not self._retrying("publishing the artifacts", write):
            self.log.warning("job %s was taken over by another worker; its artifacts are not published", self.job_id)
            store.delete_prefix(prefix)
            return
        shutil.rmtree(self.job_dir / "checkpoints", ignore_errors=True)
        if not self._shares_disk():
            store.delete_prefix(f"checkpoints/{self.job_id}")


class _ChildState:
    def __init__(self, started: float) -> None:
        self.started = started
        self.progress: dict[str, Any] | None = None
        self.progress_dirty = False
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.cancel_at: float | None = None
        self.timed_out = False
        self.lost = False  # another worker took the job over
        self.killed_at: float | None = None


class _Heartbeat(threading.Thread):
    """Beats for the job from claim to end, also while files download or upload, and tells the main loop
    when someone asks to cancel or another worker has taken the job over."""

    def __init__(self, sup: Supervisor) -> None:
        super().__init__(name=f"heartbeat-{sup.job_id}", daemon=True)
        self.sup = sup
        self.cancel, self.lost, self._stop_event = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        lease, failing = self.sup.lease, False
        assert lease is not None
        while not self._stop_event.is_set():
            try:
                with session_scope(self.sup.url) as s:
                    ours, cancel = lifecycle.beat(s, lease)
                if not ours:
                    self.lost.set()
                if cancel:
                    self.cancel.set()
                failing = False
            except Exception:  # the database is down: beat again soon, before the lease goes stale
                if not failing:
                    self.sup.log.warning("job %s: heartbeat failed; retrying every second", self.sup.job_id,
                                         exc_info=True)
                failing = True
            self._stop_event.wait(1.0 if failing else self.sup.settings.heartbeat_interval)

    def stop(self) -> None:
        self._stop_event.set()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_WAIT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace").strip())
    lines.put(None)


def _kill_group(proc: subprocess.Popen[bytes], state: _ChildState) -> None:
    """SIGTERM the child's process group, then SIGKILL if it lingers."""
    now = time.monotonic()
    sig = signal.SIGTERM if state.killed_at is None else signal.SIGKILL
    if state.killed_at is not None and now - state.killed_at < KILL_WAIT:
        return
    state.killed_at = now
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
