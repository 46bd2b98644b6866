"""The supervisor: claims a job, runs the engine in a child process, and mirrors it into the database.

The child (`python -m worker.run`) gets file paths only, never database or store credentials; it runs in
its own process group so cancel and timeout can stop everything it started, and it dies with us
(PR_SET_PDEATHSIG) so a killed worker leaves no orphan training on the GPU.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

from billiard.exceptions import Terminated
from celery.exceptions import WorkerShutdown, WorkerTerminate
from sqlalchemy import or_, select, update
from sqlalchemy.exc import OperationalError

from app.db import session_scope
from app.jobs import add_event, add_warning
from app.models import Artifact, Dataset, Job, JobEvent, Teacher, utcnow
from app.settings import Settings
from app.storage import InputCorrupted, get_store, sha256_of, verified_local_path
from worker.distill.export import FILE_NAMES
from worker.distill.spec import Checks, DataSpec, InputSpec, JobSpec, StudentSpec, TeacherSpec
from worker.sandbox import Config, child_env, job_policy, log_protections_once

log = logging.getLogger("kdistill.worker")
# What Celery raises inside a task when the worker is shut down or terminated (the solo pool answers a
# forced stop with NotImplementedError from kill_job).
WORKER_STOPPING = (WorkerShutdown, WorkerTerminate, Terminated, SystemExit, KeyboardInterrupt, NotImplementedError)
EXIT_CANCELLED = 3
ARTIFACT_NAMES = frozenset({*FILE_NAMES.values(), "student.safetensors", "metadata.json"})
KILL_WAIT = 10.0


class Supervisor:
    """Runs one job to a final status; every step of the way is written to the job's record."""

    def __init__(self, settings: Settings, job_id: str, worker: str) -> None:
        self.settings, self.job_id, self.worker = settings, job_id, worker
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = settings.resolved_database_url
        self.job_dir = settings.jobs_dir.resolve() / job_id
        self.log = logging.LoggerAdapter(log, {"job_id": job_id, "worker": worker})

    # -- claiming -------------------------------------------------------------------------------------
    def claim(self) -> bool:
        """Atomically move the job to running; False when it is not ours to run."""
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.stale_after)
        with session_scope(self.url) as s:
            claimed = s.execute(
                update(Job).where(
                    Job.id == self.job_id, Job.attempts < self.settings.job_max_attempts,
                    Job.cancel_requested.is_(False),
                    or_(Job.status == "queued", (Job.status == "running") & (Job.heartbeat_at < stale)),
                ).values(status="running", attempts=Job.attempts + 1, worker=self.worker, heartbeat_at=now,
                         phase="loading", started_at=now).execution_options(synchronize_session=False)
            ).rowcount
            job = s.get(Job, self.job_id)
            if job is None:
                self.log.warning("job %s does not exist; message dropped", self.job_id)
                return False
            if claimed:
                resumed = job.attempts > 1
                add_event(s, job.id, "status", f"running on {self.worker} (attempt {job.attempts})"
                          + ("; the previous worker was lost, resuming from its last checkpoint" if resumed else ""),
                          status="running", worker=self.worker, attempt=job.attempts)
                return True
            if job.status in ("queued", "running") and job.attempts >= self.settings.job_max_attempts and (
                    job.status == "queued" or job.heartbeat_at is None or job.heartbeat_at < stale):
                self._finish(s, job, "failed", "too_many_attempts",
                             f"the job was started {job.attempts} times and its worker was lost each time; "
                             "check the workers' logs (out of memory?) before submitting it again")
            elif job.status == "running" and job.cancel_requested and (job.heartbeat_at or now) < stale:
                self._finish(s, job, "cancelled", None, None)
            else:
                self.log.info("job %s is %s (worker %s); redelivered message ignored", job.id, job.status, job.worker)
            return False

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> None:
        if not self.claim():
            return
        self.beat = _Heartbeat(self)
        self.beat.start()
        try:
            self._supervise()
        except WORKER_STOPPING:
            # The worker itself is going away: the job stays running, its heartbeat goes stale, and
            # another delivery resumes it from its last checkpoint.
            self.log.warning("job %s: the worker is stopping; the job will resume elsewhere", self.job_id)
            raise
        except InputCorrupted as e:  # a teacher or dataset that is not what was uploaded: never train on it
            self.log.error("job %s: %s", self.job_id, e)
            with session_scope(self.url) as s:
                job = s.get(Job, self.job_id)
                if job is not None and job.status == "running":
                    self._finish(s, job, "failed", e.code, str(e))
        except Exception as e:  # the job must end in a final state whatever breaks here
            self.log.exception("supervising job %s failed", self.job_id)
            with session_scope(self.url) as s:
                job = s.get(Job, self.job_id)
                if job is not None and job.status == "running":
                    add_event(s, job.id, "error", "the worker failed while supervising the job",
                              traceback=traceback.format_exc())
                    self._finish(s, job, "failed", "worker_error",
                                 f"the worker failed while supervising the job ({type(e).__name__}); see its log")
        finally:
            self.beat.stop()
            if self.proc is not None and self.proc.poll() is None:
                # never leave training running on a GPU the next job will want
                _stop_group(self.proc)

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
            checks=Checks.model_validate(req.get("checks") or {}),
            output_dir=str(self.job_dir / "out"),
            checkpoint_dir=str(self.job_dir / "checkpoints"),
            progress_interval=min(self.settings.progress_interval, 1.0),
            allow_torchscript_teacher=self.settings.allow_torchscript,
        )

    def _supervise(self) -> None:
        with session_scope(self.url) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            spec = self._spec(job, s.get(Teacher, job.teacher_id), s.get(Dataset, job.dataset_id))
            # a request may ask for less time than the deployment allows, never for more
            max_seconds = min(job.request.get("max_run_seconds") or self.settings.job_max_seconds,
                              self.settings.job_max_seconds)
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
                self._write_progress(state)
                last_progress_write = now
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

    def _handle_line(self, line: str, state: _ChildState) -> None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            self.log.warning("job %s: non-JSON line from the training process: %s", self.job_id, line[:200])
            return
        if msg.get("type") in ("result", "error"):
            state.result, state.error = (msg, None) if msg["type"] == "result" else (None, msg)
            return
        try:
            self._record(msg, state)
        except OperationalError:  # a database hiccup must not end a training run; the next write catches up
            self.log.exception("job %s: could not record a %s line", self.job_id, msg.get("type"))

    def _ours(self) -> Any:
        return (Job.id == self.job_id) & (Job.status == "running") & (Job.worker == self.worker)

    def _record(self, msg: dict[str, Any], state: _ChildState) -> None:
        kind = msg.get("type")
        if kind == "progress":
            state.progress, state.progress_dirty = msg, True
        elif kind == "phase":
            with session_scope(self.url) as s:
                s.execute(update(Job).where(self._ours()).values(phase=msg["phase"]))
        elif kind == "epoch":
            state.progress_dirty = state.progress is not None
            with session_scope(self.url) as s:
                job = s.get(Job, self.job_id)
                if job is None or job.worker != self.worker:
                    return
                data = {k: v for k, v in msg.items() if k not in ("type", "time")}
                if data.pop("replayed", False):
                    # an epoch of a checkpoint this job resumed from: record it only if the worker that ran
                    # it died before it could (the child saves the checkpoint before we see the epoch line)
                    if not self._has_epoch_event(s, data["run"], data["epoch"]):
                        add_event(s, job.id, "epoch", f"{data['run']} epoch {data['epoch']}/{data['epochs']} "
                                  f"(from the checkpoint): val accuracy {data['student_accuracy']:.4f}", **data)
                    return
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
                          f"val accuracy {data['student_accuracy']:.4f}, loss {data['train_loss']:.4f}", **data)
            self._upload_checkpoint(data["run"])
        elif kind == "event":
            with session_scope(self.url) as s:
                add_event(s, self.job_id, msg.get("kind", "info"), msg.get("message", ""), **(msg.get("data") or {}))
                if msg.get("kind") == "warning":  # on the job at once: a job that fails later keeps it
                    job = s.get(Job, self.job_id)
                    if job is not None and job.worker == self.worker:
                        add_warning(job, (msg.get("data") or {}).get("code") or "warning", msg.get("message", ""))
                if msg.get("kind") == "device":
                    s.execute(update(Job).where(self._ours()).values(
                        device=msg.get("message", "").removeprefix("training on ")))

    def _has_epoch_event(self, s: Any, run: str, epoch: int) -> bool:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == self.job_id, JobEvent.kind == "epoch"))
        return any(e.data.get("run") == run and e.data.get("epoch") == epoch for e in events)

    # Workers on other machines share no disk: with an object store, each epoch's checkpoint goes there
    # too, so whichever worker gets a lost job resumes it.
    def _shares_disk(self) -> bool:
        return self.settings.artifact_store == "local"

    def _restore_checkpoints(self) -> None:
        if self._shares_disk():
            return
        store = get_store(self.settings)
        for run in ("student", "baseline"):
            local = self.job_dir / "checkpoints" / f"{run}.ckpt"
            key = f"checkpoints/{self.job_id}/{run}.ckpt"
            if store.exists(key):  # the store's copy is the newest: it is pushed after every epoch
                store.fetch(key, local)
                self.log.info("job %s: fetched the %s checkpoint from the store", self.job_id, run)

    def _upload_checkpoint(self, run: str) -> None:
        local = self.job_dir / "checkpoints" / f"{run}.ckpt"
        if self._shares_disk() or not local.exists():
            return
        # The child replaces the file at the next epoch; upload a hard-linked snapshot so the upload never
        # mixes two versions.
        snapshot = local.with_suffix(".upload")
        snapshot.unlink(missing_ok=True)
        os.link(local, snapshot)
        try:
            get_store(self.settings).put_file(f"checkpoints/{self.job_id}/{run}.ckpt", snapshot)
        finally:
            snapshot.unlink(missing_ok=True)

    def _write_progress(self, state: _ChildState) -> None:
        p = state.progress or {}
        keep = ("run", "epoch", "epochs", "step", "total_steps", "fraction", "eta_seconds", "loss", "samples_per_s")
        try:
            with session_scope(self.url) as s:
                s.execute(update(Job).where(self._ours()).values(
                    progress={k: p.get(k) for k in keep}, samples_per_s=p.get("samples_per_s")))
            state.progress_dirty = False
        except OperationalError:
            self.log.exception("job %s: could not write progress; trying again later", self.job_id)

    def heartbeat(self) -> tuple[bool, bool]:
        """Mark the job alive while this worker holds it; return (still ours, cancel requested)."""
        with session_scope(self.url) as s:
            ours = s.execute(update(Job).where(self._ours()).values(heartbeat_at=utcnow())).rowcount > 0
            job = s.get(Job, self.job_id)
            return ours, bool(job and job.cancel_requested)

    # -- ending ---------------------------------------------------------------------------------------
    def _conclude(self, returncode: int, state: _ChildState, max_seconds: float) -> None:
        with session_scope(self.url) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            if job.status != "running" or job.worker != self.worker or state.lost:
                self.log.warning("job %s was taken over (%s on %s); leaving it", job.id, job.status, job.worker)
                return
            if state.timed_out:
                self._finish(s, job, "failed", "job_timeout", f"the job ran longer than its limit of "
                             f"{max_seconds:.0f} s and was stopped; raise max_run_seconds or train fewer epochs")
            elif returncode == 0 and state.result is not None:
                self._store_artifacts(s, job, state.result)
            elif state.cancel_at is not None or returncode == EXIT_CANCELLED:
                self._finish(s, job, "cancelled", None, None)
            elif state.error is not None:
                if state.error.get("traceback"):
                    add_event(s, job.id, "error", state.error.get("message", ""), code=state.error.get("code"),
                              traceback=state.error["traceback"])
                self._finish(s, job, "failed", state.error.get("code", "job_failed"),
                             state.error.get("message", "the job failed"))
            else:
                how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
                hint = " (SIGKILL: often the machine ran out of memory)" if returncode == -signal.SIGKILL else ""
                add_event(s, job.id, "error", f"training process {how}", stderr=_tail(self.job_dir / "child.log"))
                self._finish(s, job, "failed", "training_process_died",
                             f"the training process {how}{hint}; its log tail is in the job's events")

    def _store_artifacts(self, s: Any, job: Job, result: dict[str, Any]) -> None:
        store = get_store(self.settings)
        out_dir = self.job_dir / "out"
        for a in result["artifacts"]:
            if a["name"] not in ARTIFACT_NAMES:  # names come from the child: never let one pick a store key
                self._finish(s, job, "failed", "artifact_rejected", f"unexpected artifact name {a['name']!r}")
                return
            path = out_dir / a["name"]
            digest = sha256_of(path)
            if digest != a["sha256"]:
                self._finish(s, job, "failed", "artifact_corrupted", f"{a['name']} changed on disk after export")
                return
            key = f"jobs/{job.id}/{a['name']}"
            store.put_file(key, path)
            s.add(Artifact(job_id=job.id, name=a["name"], format=a["format"], size_bytes=path.stat().st_size,
                           sha256=digest, storage_key=key))
        metrics = dict(result["metrics"])
        job.metrics = metrics
        for w in result.get("warnings") or []:  # the run's final word; those seen on the way are kept
            if isinstance(w, dict):
                add_warning(job, w.get("code") or "warning", w.get("message", ""))
        job.device = result.get("device") or job.device
        job.progress = dict(job.progress or {}, fraction=1.0, eta_seconds=0.0)
        self._finish(s, job, "succeeded", None, None)
        shutil.rmtree(self.job_dir / "checkpoints", ignore_errors=True)
        if not self._shares_disk():
            store.delete_prefix(f"checkpoints/{job.id}")

    def _finish(self, s: Any, job: Job, status: str, code: str | None, message: str | None) -> None:
        job.status, job.phase, job.finished_at = status, None, utcnow()
        job.error_code, job.error_message = code, message
        add_event(s, job.id, "status", status if not message else f"{status}: {message}", status=status, code=code)
        self.log.info("job %s %s%s", job.id, status, f" ({code})" if code else "")


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
        while not self._stop_event.is_set():
            try:
                ours, cancel = self.sup.heartbeat()
                if not ours:
                    self.lost.set()
                if cancel:
                    self.cancel.set()
            except Exception:  # a database hiccup: beat again next time; staleness takes a while
                self.sup.log.exception("job %s: heartbeat failed", self.sup.job_id)
            self._stop_event.wait(self.sup.settings.heartbeat_interval)

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
