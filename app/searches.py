"""Hyperparameter sweeps (/v1/sweeps): an Optuna study whose trials are ordinary jobs.

Called "searches" in code so that nobody mistakes them for app.lifecycle's recovery sweep.

The database decides, Optuna remembers. What a trial came to is a function of its job (its status, its
metrics, a `pruned` event), and every pass of `advance` brings Optuna in line with it, so any step may be
repeated after a crash:

  1. lock the sweep's row (an UPDATE: a row lock on PostgreSQL, the write lock on SQLite): one pass at a
     time per sweep, across API processes and replicas;
  2. tell Optuna the trials whose job ended: COMPLETE with the validation accuracy of the chosen epoch, FAIL,
     or PRUNED; a told trial is skipped, so telling twice is harmless;
  3. report each running trial's new per-epoch validation accuracies; when the median pruner says so, record
     the decision in this transaction (lifecycle.request_cancel and a `pruned` event) and tell Optuna after
     the commit (a pass that stops in between leaves the event, and step 2 of the next pass tells);
  4. fail the Optuna trials that have no job: asked by a pass that stopped before its commit;
  5. ask for trials while fewer than max_parallel run and fewer than max_trials started; each trial's job is
     added in this transaction, (sweep_id, trial number) unique, and sent to the broker after the commit (a
     job never sent is sent by the recovery sweep's rule R1);
  6. keep the best trial on the sweep, and end the sweep once every trial's job ended.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.distill.spec import Hyperparameters

from . import lifecycle, studies
from .api.errors import ApiError
from .api.schemas import FloatRange, JobCreate, SearchSpace, SweepCreate
from .db import session_scope
from .jobs import add_event
from .models import Job, JobEvent, SweepRecord, new_id, utcnow
from .settings import Settings
from .submission import check_request, new_job

log = logging.getLogger("kdistill.searches")

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
ACTIVE_JOB = (lifecycle.QUEUED, lifecycle.RUNNING)
TRIAL_STATE = {lifecycle.QUEUED: "queued", lifecycle.RUNNING: "running", lifecycle.SUCCEEDED: "complete",
               lifecycle.FAILED: "failed", lifecycle.CANCELLED: "cancelled"}
SUGGEST_ORDER = ("distillation", "temperature", "alpha", "learning_rate", "standardize")


# -- the request -----------------------------------------------------------------------------------------
def check_space(body: SweepCreate) -> None:
    """Every value the space can give must make valid hyperparameters with the rest of the request; raises
    ApiError 422 `invalid_search_space` naming the value (e.g. `space.temperature.low`)."""
    base = body.hyperparameters.model_dump()
    dims = body.space.dimensions()
    for name, dim in dims.items():
        points = [("low", dim.low), ("high", dim.high)] if isinstance(dim, FloatRange) else list(enumerate(dim))
        for where, value in points:
            path = f"space.{name}.{where}"
            hp = {**base, name: value}
            if name == "distillation" and value == "hard" and "standardize" in dims:
                hp["standardize"] = False  # searched only where it applies
            if name == "standardize" and value and "distillation" in dims:
                logit = [d for d in dims["distillation"] if d != "hard"]
                if not logit:
                    raise ApiError(422, "invalid_search_space", f"{path}: standardize applies to soft and dkd "
                                   "distillation, and the space's distillation is only hard; drop standardize "
                                   "from the space", path)
                hp["distillation"] = logit[0]
            try:
                Hyperparameters.model_validate(hp)
            except ValidationError as e:
                err = e.errors()[0]
                other = ".".join(str(p) for p in err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                why = f"{msg} (got {value!r})" if other == name else \
                    f"{value!r} does not go with hyperparameters.{other}: {msg}"
                raise ApiError(422, "invalid_search_space", f"{path}: {why}", path) from None


def create(session: Session, settings: Settings, tenant_id: str, body: SweepCreate, *,
           idempotency_key: str | None, digest: str) -> SweepRecord:
    """Check the sweep (its space, and its base request as POST /v1/jobs would) and add it, running; the
    caller commits, then calls `advance` to start the first trials."""
    check_space(body)
    check_request(session, tenant_id, body.job_request(), settings)
    sweep = SweepRecord(id=new_id("swp"), tenant_id=tenant_id, status=RUNNING, request=body.model_dump(mode="json"),
                        max_trials=body.max_trials, max_parallel=body.max_parallel, metric=body.metric,
                        trials_started=0, idempotency_key=idempotency_key, request_hash=digest)
    session.add(sweep)
    return sweep


def trial_request(body: SweepCreate, params: dict[str, Any]) -> JobCreate:
    """The job request of one trial: the base request with the trial's hyperparameters."""
    base = body.job_request()
    hp = {**base.hyperparameters.model_dump(), **params}
    if hp["distillation"] == "hard" and "standardize" in body.space.dimensions():
        hp["standardize"] = False
    return JobCreate.model_validate({**base.model_dump(), "hyperparameters": hp})


def suggest(trial: optuna.Trial, space: SearchSpace, base_distillation: str) -> dict[str, Any]:
    """Draw one trial's values; standardize is drawn only where the trial's distillation is not hard."""
    dims = space.dimensions()
    params: dict[str, Any] = {}
    for name in SUGGEST_ORDER:
        dim = dims.get(name)
        if dim is None or (name == "standardize" and params.get("distillation", base_distillation) == "hard"):
            continue
        params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log) if isinstance(dim, FloatRange) \
            else trial.suggest_categorical(name, dim)
    return params


def validation_value(metrics: dict[str, Any] | None) -> float | None:
    """The sweep's metric of a finished job: the student's validation accuracy at its chosen epoch. The top-level
    `student_accuracy` is the test figure when there is a test split, which selection must never see."""
    metrics = metrics or {}
    value = (metrics.get("validation") or {}).get("student_accuracy")
    if value is None and metrics.get("accuracy_split") == "validation":
        value = metrics.get("student_accuracy")
    return float(value) if isinstance(value, int | float) else None


# -- the driver ------------------------------------------------------------------------------------------
@dataclass
class Advanced:
    """What one pass did."""

    status: str | None = None  # the sweep's status after the pass; None: no such sweep
    started: list[str] = field(default_factory=list)  # job ids of the trials it started
    told: dict[int, str] = field(default_factory=dict)  # trial number -> the state Optuna was told
    pruned: list[int] = field(default_factory=list)


def _lock(session: Session, sweep_id: str) -> SweepRecord | None:
    """The running sweep, locked until the transaction ends (None when it is not running). An UPDATE rather
    than SELECT ... FOR UPDATE: it takes the row lock on PostgreSQL and, as the transaction's first
    statement, SQLite's write lock, so two passes never interleave on either."""
    locked = session.execute(update(SweepRecord).where(SweepRecord.id == sweep_id, SweepRecord.status == RUNNING)
                             .values(advanced_at=utcnow()).execution_options(synchronize_session=False)).rowcount
    if not locked:
        return None
    return session.scalars(select(SweepRecord).where(SweepRecord.id == sweep_id)
                           .execution_options(populate_existing=True)).one()


def _study(settings: Settings, sweep: SweepRecord, body: SweepCreate) -> optuna.Study:
    p = body.pruning
    return studies.open_study(settings.resolved_database_url, sweep.id, body.sampler_seed,
                              studies.pruner(p.enabled, p.startup_trials, p.warmup_epochs))


def _tell(study: optuna.Study, number: int, state: TrialState, value: float | None = None) -> bool:
    """Tell Optuna once; False when the trial was told already (by this pass's twin in another process)."""
    try:
        frozen = study.tell(number, value, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:
        return False
    return frozen.state == state


def _events(session: Session, job_ids: list[str], kinds: tuple[str, ...]) -> list[tuple[str, str, dict[str, Any]]]:
    if not job_ids:
        return []
    rows = session.execute(select(JobEvent.job_id, JobEvent.kind, JobEvent.data)
                           .where(JobEvent.job_id.in_(job_ids), JobEvent.kind.in_(kinds)).order_by(JobEvent.id))
    return [(r.job_id, r.kind, r.data or {}) for r in rows]


def _epoch_values(events: list[tuple[str, str, dict[str, Any]]]) -> dict[str, dict[int, float]]:
    """Per job, the student's validation accuracy of each epoch (the supervisor's `epoch` events)."""
    out: dict[str, dict[int, float]] = {}
    for job_id, kind, data in events:
        if kind == "epoch" and data.get("run") == "student" and isinstance(data.get("student_accuracy"), int | float):
            out.setdefault(job_id, {})[int(data["epoch"])] = float(data["student_accuracy"])
    return out


def _pruned(events: list[tuple[str, str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {job_id: data for job_id, kind, data in events if kind == "pruned"}


def _outcome(job: Job, pruned: dict[str, Any] | None) -> tuple[TrialState, float | None] | None:
    """What Optuna is to be told of this trial now; None while it runs."""
    if pruned is not None:
        return TrialState.PRUNED, None
    if job.status == lifecycle.SUCCEEDED:
        value = validation_value(job.metrics)
        return (TrialState.COMPLETE, value) if value is not None else (TrialState.FAIL, None)
    if job.status in (lifecycle.FAILED, lifecycle.CANCELLED):
        return TrialState.FAIL, None
    return None


def advance(settings: Settings, sweep_id: str) -> Advanced:
    """One pass over a running sweep (steps 1 to 6 of the module's docstring); safe to run at any time,
    from any number of processes."""
    out = Advanced()
    prune_later: list[int] = []
    created: list[Job] = []
    with session_scope(settings.resolved_database_url) as s:
        sweep = _lock(s, sweep_id)
        if sweep is None:
            out.status = s.scalar(select(SweepRecord.status).where(SweepRecord.id == sweep_id))
            return out
        body = SweepCreate.model_validate(sweep.request)
        study = _study(settings, sweep, body)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        jobs = list(s.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.sweep_trial)))
        # the trials Optuna still sees running: a job that ended since the last pass reports its last epochs
        # too, before it is told, so that the pruner can compare later trials with every epoch of this one
        untold = [(j, trials[j.sweep_trial]) for j in jobs
                  if j.sweep_trial in trials and trials[j.sweep_trial].state == TrialState.RUNNING]
        events = _events(s, [j.id for j in jobs], ("pruned",)) + _events(s, [j.id for j, _ in untold], ("epoch",))
        pruned, epochs = _pruned(events), _epoch_values(events)

        for job, trial in untold:  # 2 and 3
            live = _report(study, trial, epochs.get(job.id, {}))
            outcome = _outcome(job, pruned.get(job.id))
            if outcome is not None:
                if _tell(study, trial.number, *outcome):
                    out.told[trial.number] = outcome[0].name.lower()
            elif live is not None and body.pruning.enabled and job.status == lifecycle.RUNNING and \
                    not job.cancel_requested and live.should_prune() and \
                    _prune(s, sweep, job, trial.number, epochs[job.id]):
                prune_later.append(trial.number)

        known = {j.sweep_trial for j in jobs}
        for trial in trials.values():  # 4: asked, never recorded
            if trial.state == TrialState.RUNNING and trial.number not in known and _tell(study, trial.number,
                                                                                         TrialState.FAIL):
                log.warning("sweep %s: trial %d had no job (a pass stopped after asking); told FAIL", sweep.id,
                            trial.number)
                out.told[trial.number] = "fail"

        active = sum(1 for j in jobs if j.status in ACTIVE_JOB and not j.cancel_requested)
        while active < sweep.max_parallel and sweep.trials_started < sweep.max_trials and sweep.error_code is None:
            job = _start_trial(s, settings, sweep, body, study)  # 5
            if job is None:
                break
            created.append(job)
            active += 1

        final = study.get_trials(deepcopy=False)
        _keep_best(sweep, final, {j.sweep_trial: j.id for j in [*jobs, *created]})
        still = bool(created) or any(j.status in ACTIVE_JOB for j in jobs)
        if not still and (sweep.trials_started >= sweep.max_trials or sweep.error_code is not None):
            _finish(sweep, Counter("pruned" if j.id in pruned else TRIAL_STATE.get(j.status, j.status) for j in jobs))
        out.status = sweep.status
        out.started = [j.id for j in created]
    for number in prune_later:  # after the commit: the decision is on record first
        if _tell(study, number, TrialState.PRUNED):
            out.told[number] = "pruned"
        out.pruned.append(number)
    _send(settings, created)
    return out


def _report(study: optuna.Study, trial: FrozenTrial, values: dict[int, float]) -> optuna.Trial | None:
    """Report the epochs Optuna has not seen; the trial, to ask whether to prune, when there was one."""
    new = sorted(e for e in values if e not in trial.intermediate_values)
    if not new:
        return None
    live = optuna.trial.Trial(study, trial._trial_id)  # a stored trial by its id, as Optuna's own tell finds it
    for epoch in new:
        live.report(values[epoch], epoch)
    return live


def _prune(session: Session, sweep: SweepRecord, job: Job, number: int, values: dict[int, float]) -> bool:
    """Record the decision to prune: cancel the job and say why in its timeline (Optuna hears after the
    commit); False when the job ended meanwhile."""
    epoch = max(values)
    if lifecycle.request_cancel(session, job) == "final":
        return False
    add_event(session, job.id, "pruned", f"pruned by sweep {sweep.id} after epoch {epoch}: validation accuracy "
              f"{values[epoch]:.4f} is below the median of the completed trials at that epoch",
              sweep_id=sweep.id, trial=number, epoch=epoch, value=values[epoch])
    log.info("sweep %s: trial %d (job %s) pruned after epoch %d", sweep.id, number, job.id, epoch)
    return True


def _start_trial(session: Session, settings: Settings, sweep: SweepRecord, body: SweepCreate,
                 study: optuna.Study) -> Job | None:
    """Ask Optuna for a trial and add its job; None (and the sweep's error set) when the job cannot be made."""
    study.sampler = studies.sampler(body.sampler_seed, len(study.get_trials(deepcopy=False)))
    trial = study.ask()
    try:
        params = suggest(trial, body.space, body.hyperparameters.distillation)
        job = new_job(session, settings, sweep.tenant_id, trial_request(body, params), sweep_id=sweep.id,
                      sweep_trial=trial.number)
    except (ApiError, ValidationError) as e:
        # e.g. the teacher was deleted since the sweep began: no further trial could start either
        _tell(study, trial.number, TrialState.FAIL)
        code, message = (e.code, e.message) if isinstance(e, ApiError) else ("invalid_trial", str(e))
        sweep.error_code = code
        sweep.error_message = f"trial {trial.number} could not start ({message}); the sweep starts no more trials"
        log.warning("sweep %s: %s", sweep.id, sweep.error_message)
        return None
    sweep.trials_started += 1
    log.info("sweep %s: trial %d is job %s %s", sweep.id, trial.number, job.id, params)
    return job


def _keep_best(sweep: SweepRecord, trials: list[FrozenTrial], job_of: dict[int | None, str]) -> None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and t.number in job_of]
    if not complete:
        return
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
    sweep.best_job_id, sweep.best_params, sweep.best_value = job_of[best.number], dict(best.params), best.value


def _finish(sweep: SweepRecord, states: Counter[str]) -> None:
    if sweep.error_code is not None:
        sweep.status = FAILED
    elif sweep.best_job_id is not None:
        sweep.status = SUCCEEDED
    else:
        sweep.status = FAILED
        sweep.error_code = "no_trial_completed"
        sweep.error_message = (f"none of the {sweep.trials_started} trials completed ("
                               + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
                               + "); the failed trials' jobs say why (GET /v1/jobs?sweep_id=" + sweep.id + ")")
    sweep.finished_at = utcnow()
    log.info("sweep %s %s: best job %s (%s)", sweep.id, sweep.status, sweep.best_job_id, sweep.best_value)


def _send(settings: Settings, jobs: list[Job]) -> None:
    """Hand the new trials to the broker, after their commit (as POST /v1/jobs does)."""
    if not jobs:
        return
    with session_scope(settings.resolved_database_url) as s:
        for job in jobs:
            fresh = s.get(Job, job.id)
            if fresh is not None and lifecycle.send(s, settings, fresh):
                s.commit()


def advance_running(settings: Settings) -> int:
    """One pass over every running sweep (the API's periodic loop); how many there were."""
    with session_scope(settings.resolved_database_url) as s:
        ids = list(s.scalars(select(SweepRecord.id).where(SweepRecord.status == RUNNING)
                             .order_by(SweepRecord.created_at)))
    for sweep_id in ids:
        try:
            advance(settings, sweep_id)
        except Exception:  # one sweep that cannot advance must not stop the others
            log.warning("sweep %s: the pass failed; it runs again at the next interval", sweep_id, exc_info=True)
    return len(ids)


def cancel(session: Session, sweep: SweepRecord) -> str:
    """`cancelled` (the sweep and its queued and running trials), or `final` when the sweep had ended. The
    caller's session commits; Optuna hears of it afterwards in `settle`."""
    locked = _lock(session, sweep.id)
    if locked is None:
        session.refresh(sweep)
        return "final"
    jobs = session.scalars(select(Job).where(Job.sweep_id == sweep.id, Job.status.in_(ACTIVE_JOB))).all()
    for job in jobs:
        lifecycle.request_cancel(session, job)
    locked.status, locked.finished_at = CANCELLED, utcnow()
    log.info("sweep %s cancelled with %d trial(s) queued or running", sweep.id, len(jobs))
    return "cancelled"


def settle(settings: Settings, sweep_id: str) -> None:
    """Bring Optuna in line with a sweep that ended by cancellation (best effort): the trials that completed
    keep their value, the others FAIL, and the sweep keeps its best."""
    with session_scope(settings.resolved_database_url) as s:
        sweep = s.get(SweepRecord, sweep_id)
        if sweep is None:
            return
        body = SweepCreate.model_validate(sweep.request)
        study = _study(settings, sweep, body)
        jobs = list(s.scalars(select(Job).where(Job.sweep_id == sweep.id)))
        pruned = _pruned(_events(s, [j.id for j in jobs], ("pruned",)))
        for job in jobs:
            outcome = _outcome(job, pruned.get(job.id)) or (TrialState.FAIL, None)
            if job.sweep_trial is not None:
                _tell(study, job.sweep_trial, *outcome)
        _keep_best(sweep, study.get_trials(deepcopy=False), {j.sweep_trial: j.id for j in jobs})


# -- the API's view --------------------------------------------------------------------------------------
def sweep_view(session: Session, sweep: SweepRecord, with_trials: bool = True) -> dict[str, Any]:
    """The sweep as the API shows it: its trials (from their jobs), counts and best."""
    jobs = list(session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.sweep_trial)))
    events = _events(session, [j.id for j in jobs], ("pruned", "epoch") if with_trials else ("pruned",))
    pruned, epochs = _pruned(events), _epoch_values(events)
    names = list(SweepCreate.model_validate(sweep.request).space.dimensions())
    trials = []
    for job in jobs:
        mark = pruned.get(job.id)
        state = "pruned" if mark is not None else TRIAL_STATE.get(job.status, job.status)
        value = mark.get("value") if mark is not None else \
            validation_value(job.metrics) if job.status == lifecycle.SUCCEEDED else None
        hp = (job.request or {}).get("hyperparameters") or {}
        trials.append({"number": job.sweep_trial, "job_id": job.id, "state": state, "value": value,
                       "params": {k: hp.get(k) for k in names if k in hp}, "epochs": len(epochs.get(job.id, {}))})
    counts = Counter(t["state"] for t in trials)
    return {
        "id": sweep.id, "status": sweep.status, "request": sweep.request, "metric": sweep.metric,
        "max_trials": sweep.max_trials, "max_parallel": sweep.max_parallel, "trials_started": sweep.trials_started,
        "counts": {**{k: counts.get(k, 0) for k in TRIAL_STATE.values()}, "pruned": counts.get("pruned", 0),
                   "total": len(trials)},
        "trials": trials if with_trials else [], "best_job_id": sweep.best_job_id, "best_params": sweep.best_params,
        "best_value": sweep.best_value,
        "error": {"code": sweep.error_code, "message": sweep.error_message or ""} if sweep.error_code else None,
        "created_at": sweep.created_at, "finished_at": sweep.finished_at,
    }
