"""/v1/sweeps on SQLite and PostgreSQL: validation, tenancy, and the driver's decisions (app.searches) on trials
whose jobs move through the supervisor's own database writes (claim, epoch lines, success, failure, cancel).

No worker runs here: a test plays the worker with worker.supervisor.Supervisor on the real database, and calls
`searches.advance` to make the driver's pass happen now. The API's own periodic pass may run meanwhile; each
pass is idempotent, so the tests assert what the database holds, whoever made it so.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from alembic.script import ScriptDirectory
from api_support import Env, Uploaded, all_pages, assert_error, job_body
from services import fresh_postgres
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from app import lifecycle, searches, studies
from app.db import engine_for, session_scope
from app.migrate import alembic_config, downgrade, upgrade
from app.models import Job, JobEvent, SweepRecord
from worker.supervisor import Supervisor, _ChildState

OPTUNA_TABLES = {"studies", "trials", "trial_params", "trial_values", "trial_intermediate_values", "version_info"}


# ---------------------------------------------------------------------------------------------- helpers

def sweep_body(teacher_id: str, dataset_id: str, **over: Any) -> dict[str, Any]:
    body = job_body(teacher_id, dataset_id, hyperparameters={"epochs": 3, "batch_size": 16})
    body.update({"space": {"temperature": {"low": 1.0, "high": 8.0, "log": True}, "alpha": [0.5, 0.9],
                           "distillation": ["soft", "dkd"]},
                 "max_trials": 4, "max_parallel": 2, "pruning": {"startup_trials": 2, "warmup_epochs": 0}})
    body.update(over)
    return body


@pytest.fixture
def post_sweep(env: Env) -> Iterator[Any]:
    """POST /v1/sweeps as tenant a; every sweep the test made is cancelled afterwards, so that none keeps
    starting trials (and publishing messages) during the tests that follow."""
    made: list[str] = []

    def post(body: dict[str, Any], who: str = "a", status: int = 202, **headers: str) -> dict[str, Any]:
        resp = env.client.post("/v1/sweeps", headers={**env.auth(who), **headers}, json=body)
        assert resp.status_code == status, resp.text
        made.append(resp.json()["id"])
        return resp.json()

    yield post
    with session_scope(env.db_url) as s:
        for sweep_id in made:
            sweep = s.get(SweepRecord, sweep_id)
            if sweep is not None and sweep.status == "running":
                searches.cancel(s, sweep)
        for job in s.scalars(select(Job).where(Job.sweep_id.in_(made), Job.status == "running")):
            lifecycle.request_cancel(s, job)


def get_sweep(env: Env, sweep_id: str, who: str = "a") -> dict[str, Any]:
    resp = env.client.get(f"/v1/sweeps/{sweep_id}", headers=env.auth(who))
    assert resp.status_code == 200, resp.text
    return resp.json()


def trial_jobs(env: Env, sweep_id: str) -> list[dict[str, Any]]:
    resp = env.client.get("/v1/jobs", headers=env.auth("a"), params={"sweep_id": sweep_id, "limit": 200})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json()["items"], key=lambda j: j["sweep_trial"])


def advance(env: Env, sweep_id: str) -> searches.Advanced:
    return searches.advance(env.settings, sweep_id)


def study(env: Env, sweep_id: str) -> optuna.Study:
    return optuna.load_study(study_name=sweep_id, storage=studies.storage_for(env.db_url))


def optuna_states(env: Env, sweep_id: str) -> dict[int, str]:
    return {t.number: t.state.name for t in study(env, sweep_id).get_trials(deepcopy=False)}


class Worker:
    """Plays the worker for one trial's job through the supervisor's own writes."""

    def __init__(self, env: Env, job_id: str) -> None:
        self.sup = Supervisor(env.settings, job_id, f"test-worker-{secrets.token_hex(3)}")
        assert self.sup.claim(), f"job {job_id} could not be claimed"
        self.state = _ChildState(started=time.monotonic())

    def epochs(self, accuracies: list[float], first: int = 1) -> Worker:
        for epoch, acc in enumerate(accuracies, first):
            self.sup._handle_line(json.dumps({
                "type": "epoch", "run": "student", "epoch": epoch, "epochs": 3, "student_accuracy": acc,
                "teacher_accuracy": 0.9, "agreement": acc, "train_loss": 1.0 - acc}), self.state)
        return self

    def succeed(self, validation: float, test: float) -> None:
        """Success with a test split: the top-level student_accuracy is the test figure."""
        (self.sup.job_dir / "out").mkdir(parents=True, exist_ok=True)
        self.sup._succeed({"artifacts": [], "metrics": {
            "student_accuracy": test, "accuracy_split": "test", "best_epoch": 3,
            "validation": {"student_accuracy": validation, "n": 20}, "test": {"student_accuracy": test, "n": 20}}})

    def fail(self) -> None:
        self.sup._handle_line(json.dumps({"type": "error", "code": "teacher_nonfinite_output",
                                          "message": "the teacher emitted NaN"}), self.state)
        self.sup._conclude(2, self.state, 100.0)

    def stop_cancelled(self) -> None:
        self.sup._end(lifecycle.CANCELLED)


def job_row(env: Env, job_id: str) -> Job:
    with session_scope(env.db_url) as s:
        return s.get(Job, job_id)


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize(("space", "field"), [
    ({"temperature": {"low": 0, "high": 8}}, "space.temperature.low"),  # temperature is in (0, 100]
    ({"temperature": {"low": 1, "high": 101}}, "space.temperature.high"),
    ({"alpha": [0.5, 1.5]}, "space.alpha.1"),
    ({"learning_rate": [0.1, 20]}, "space.learning_rate.1"),
    ({"distillation": ["soft", "hard"], "standardize": [True]}, None),  # fine: standardize only where it applies
    ({"standardize": [True], "distillation": ["hard"]}, "space.standardize.0"),
])
def test_the_space_is_checked_against_the_hyperparameters(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                          post_sweep: Any, space: dict, field: str | None) -> None:
    body = sweep_body(teacher_a.id, dataset_a.id, space=space, max_parallel=1, max_trials=1)
    if field is None:
        post_sweep(body)
        return
    before = len(env.client.get("/v1/sweeps", headers=env.auth("a"), params={"limit": 200}).json()["items"])
    resp = env.client.post("/v1/sweeps", headers=env.auth("a"), json=body)
    err = assert_error(resp, 422, "invalid_search_space", field)
    assert field in err["message"]
    assert len(env.client.get("/v1/sweeps", headers=env.auth("a"), params={"limit": 200}).json()["items"]) == before


def test_a_method_the_base_request_cannot_take_is_422(env: Env, teacher_a: Uploaded, dataset_a: Uploaded) -> None:
    body = sweep_body(teacher_a.id, dataset_a.id, space={"distillation": ["soft", "hard"]})
    body["hyperparameters"]["standardize"] = True
    err = assert_error(env.client.post("/v1/sweeps", headers=env.auth("a"), json=body), 422,
                       "invalid_search_space", "space.distillation.1")
    assert "standardize" in err["message"]


@pytest.mark.parametrize(("over", "field"), [
    ({"metric": "test_accuracy"}, "metric"),
    ({"space": {}}, "space"),
    ({"space": {"temperature": {"low": 8, "high": 2}}}, "space.temperature"),
    ({"space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}}, "space.learning_rate"),
    ({"space": {"temperature": {"low": 1}}}, "space.temperature.high"),
    ({"space": {"epochs": [1, 2]}}, "space.epochs"),
    ({"max_trials": 0}, "max_trials"),
    ({"max_parallel": 0}, "max_parallel"),
])
def test_bad_sweep_bodies_are_422_with_the_field(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                 over: dict, field: str) -> None:
    resp = env.client.post("/v1/sweeps", headers=env.auth("a"), json=sweep_body(teacher_a.id, dataset_a.id, **over))
    assert_error(resp, 422, field=field)


def test_the_base_request_is_checked_as_a_job_would_be(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                        dataset_a4: Uploaded) -> None:
    assert_error(env.client.post("/v1/sweeps", headers=env.auth("a"), json=sweep_body("tch_nope", dataset_a.id)),
                 404, "teacher_not_found", "teacher_id")
    assert_error(env.client.post("/v1/sweeps", headers=env.auth("a"),
                                 json=sweep_body(teacher_a.id, dataset_a4.id)), 422, "class_count_mismatch")
    assert_error(env.client.post("/v1/sweeps", headers=env.auth("a"),
                                 json=sweep_body(teacher_a.id, dataset_a.id, student={"arch": "resnet_nope"})),
                 422, "unknown_architecture", "student.arch")


# ---------------------------------------------------------------------------------------------- create, tenancy

def test_a_sweep_starts_max_parallel_ordinary_jobs_at_once(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                          post_sweep: Any) -> None:
    depth = env.queue_depth()
    key = f"sweep-{secrets.token_hex(4)}"
    body = sweep_body(teacher_a.id, dataset_a.id, max_trials=5, max_parallel=2)
    sweep = post_sweep(body, **{"Idempotency-Key": key})
    assert sweep["status"] == "running" and sweep["trials_started"] == 2
    assert [t["state"] for t in sweep["trials"]] == ["queued", "queued"]
    assert sweep["counts"]["queued"] == 2 and sweep["counts"]["total"] == 2
    assert sweep["request"]["space"]["alpha"] == [0.5, 0.9] and sweep["best_job_id"] is None
    assert env.queue_depth() == depth + 2, "each trial is published like any job"

    jobs = trial_jobs(env, sweep["id"])
    assert [j["sweep_trial"] for j in jobs] == [0, 1] and {j["sweep_id"] for j in jobs} == {sweep["id"]}
    for job, trial in zip(jobs, sweep["trials"], strict=True):
        hp = job["request"]["hyperparameters"]
        assert trial["job_id"] == job["id"] and trial["params"] == {k: hp[k] for k in trial["params"]}
        assert set(trial["params"]) == {"temperature", "alpha", "distillation"}
        assert 1.0 <= hp["temperature"] <= 8.0 and hp["alpha"] in (0.5, 0.9) and hp["distillation"] in ("soft", "dkd")
        assert hp["epochs"] == 3 and job["request"]["student"] == {"arch": "resnet8", "input_size": None,
                                                                   "mean": None, "std": None}
        assert job["status"] == "queued" and job["queue"] == env.settings.default_queue
    listed = env.client.get("/v1/jobs", headers=env.auth("a"), params={"limit": 200}).json()["items"]
    all_jobs = {j["id"] for j in listed}
    assert {j["id"] for j in jobs} <= all_jobs, "trials are listed with every other job"

    again = env.client.post("/v1/sweeps", headers={**env.auth("a"), "Idempotency-Key": key}, json=body)
    assert again.status_code == 202 and again.json()["id"] == sweep["id"] and again.json()["trials_started"] == 2
    assert env.queue_depth() == depth + 2, "a replay starts nothing"
    other = sweep_body(teacher_a.id, dataset_a.id, max_trials=6)
    assert_error(env.client.post("/v1/sweeps", headers={**env.auth("a"), "Idempotency-Key": key}, json=other),
                 409, "idempotency_conflict")


def test_max_parallel_above_max_trials_starts_max_trials(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                        post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=2, max_parallel=5))
    assert sweep["trials_started"] == 2 and len(sweep["trials"]) == 2
    for trial, acc in zip(sweep["trials"], (0.6, 0.7), strict=True):
        Worker(env, trial["job_id"]).epochs([acc]).succeed(validation=acc, test=acc)
    assert advance(env, sweep["id"]).status == "succeeded"
    done = get_sweep(env, sweep["id"])
    assert done["trials_started"] == 2 and len(trial_jobs(env, sweep["id"])) == 2
    assert done["best_value"] == pytest.approx(0.7) and done["best_job_id"] == sweep["trials"][1]["job_id"]


def test_another_tenants_sweep_is_404(env: Env, teacher_a: Uploaded, dataset_a: Uploaded, post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))
    assert_error(env.client.get(f"/v1/sweeps/{sweep['id']}", headers=env.auth("b")), 404, "sweep_not_found")
    assert_error(env.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=env.auth("b")), 404, "sweep_not_found")
    listed = env.client.get("/v1/sweeps", headers=env.auth("b"), params={"limit": 200}).json()["items"]
    assert sweep["id"] not in {s["id"] for s in listed}
    job_id = sweep["trials"][0]["job_id"]
    assert_error(env.client.get(f"/v1/jobs/{job_id}", headers=env.auth("b")), 404, "job_not_found")
    # tenant b cannot start trials on tenant a's teacher either
    assert_error(env.client.post("/v1/sweeps", headers=env.auth("b"), json=sweep_body(teacher_a.id, dataset_a.id)),
                 404, "teacher_not_found", "teacher_id")
    assert_error(env.client.get("/v1/sweeps/swp_nope", headers=env.auth("a")), 404, "sweep_not_found")
    assert_error(env.client.get(f"/v1/sweeps/{sweep['id']}"), 401, "missing_api_key")


def test_list_sweeps_newest_first_with_cursor_and_status_filter(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                               post_sweep: Any) -> None:
    made = [post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))["id"] for _ in range(3)]
    pages = all_pages(env.client, "/v1/sweeps", env.auth("a"), limit=2)
    ids = [s["id"] for p in pages for s in p]
    assert [i for i in ids if i in made] == made[::-1]
    first = pages[0][0]
    assert first["trials"] == [] and first["counts"]["total"] >= 1, "listings carry counts, not trials"
    running = {s["id"] for p in all_pages(env.client, "/v1/sweeps", env.auth("a"), limit=50, status="running")
               for s in p}
    assert set(made) <= running
    assert_error(env.client.get("/v1/sweeps", headers=env.auth("a"), params={"status": "sleeping"}), 422)


# ---------------------------------------------------------------------------------------------- the driver

def test_the_driver_tells_prunes_asks_and_picks_the_best_on_validation(env: Env, teacher_a: Uploaded,
                                                                      dataset_a: Uploaded, post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=4, max_parallel=2))
    sid = sweep["id"]
    first, second = (t["job_id"] for t in sweep["trials"])
    # trial 0: the better test figure, trial 1: the better validation figure; selection must use validation
    Worker(env, first).epochs([0.5, 0.6, 0.7]).succeed(validation=0.7, test=0.99)
    Worker(env, second).epochs([0.6, 0.7, 0.8]).succeed(validation=0.8, test=0.10)
    advance(env, sid)
    assert optuna_states(env, sid) == {0: "COMPLETE", 1: "COMPLETE", 2: "RUNNING", 3: "RUNNING"}
    now = get_sweep(env, sid)
    assert now["trials_started"] == 4 and [t["state"] for t in now["trials"]] == ["complete", "complete",
                                                                                   "queued", "queued"]
    assert now["best_job_id"] == second and now["best_value"] == pytest.approx(0.8)
    assert now["best_params"] == now["trials"][1]["params"]
    assert now["trials"][0]["value"] == pytest.approx(0.7) and now["trials"][0]["epochs"] == 3
    told = {t.number: t for t in study(env, sid).get_trials(deepcopy=False)}
    assert told[1].intermediate_values == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8}), "every epoch reached Optuna"

    third, fourth = now["trials"][2]["job_id"], now["trials"][3]["job_id"]
    weak = Worker(env, third).epochs([0.1])  # far below the median (0.55) of the completed trials at epoch 1
    strong = Worker(env, fourth).epochs([0.65])  # above it: goes on
    advance(env, sid)
    pruned = job_row(env, third)
    assert pruned.status == "running" and pruned.cancel_requested, "a pruned trial's job is asked to stop"
    assert not job_row(env, fourth).cancel_requested
    assert optuna_states(env, sid)[2] == "PRUNED" and optuna_states(env, sid)[3] == "RUNNING"
    with session_scope(env.db_url) as s:
        marks = s.scalars(select(JobEvent).where(JobEvent.job_id == third, JobEvent.kind == "pruned")).all()
        assert len(marks) == 1 and marks[0].data["epoch"] == 1 and marks[0].data["value"] == pytest.approx(0.1)
    assert get_sweep(env, sid)["trials"][2]["state"] == "pruned"
    assert advance(env, sid).started == [], "max_trials reached: nothing more starts"

    weak.stop_cancelled()  # the worker sees the cancel request
    strong.fail()
    assert advance(env, sid).status == "succeeded"
    done = get_sweep(env, sid)
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    assert [t["state"] for t in done["trials"]] == ["complete", "complete", "pruned", "failed"]
    assert {k: done["counts"][k] for k in ("complete", "pruned", "failed", "total")} == \
        {"complete": 2, "pruned": 1, "failed": 1, "total": 4}
    assert done["trials"][2]["value"] == pytest.approx(0.1) and done["trials"][3]["value"] is None
    assert done["best_job_id"] == second and done["error"] is None
    assert optuna_states(env, sid) == {0: "COMPLETE", 1: "COMPLETE", 2: "PRUNED", 3: "FAIL"}
    assert len(trial_jobs(env, sid)) == 4


def test_a_sweep_whose_every_trial_fails_fails(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                              post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))
    Worker(env, sweep["trials"][0]["job_id"]).fail()
    assert advance(env, sweep["id"]).status == "failed"
    done = get_sweep(env, sweep["id"])
    assert done["error"]["code"] == "no_trial_completed" and "1 failed" in done["error"]["message"]
    assert done["best_job_id"] is None


def test_without_pruning_a_weak_trial_runs_on(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                             post_sweep: Any) -> None:
    body = sweep_body(teacher_a.id, dataset_a.id, max_trials=2, max_parallel=1,
                      pruning={"enabled": False, "startup_trials": 0, "warmup_epochs": 0})
    sweep = post_sweep(body)
    Worker(env, sweep["trials"][0]["job_id"]).epochs([0.9]).succeed(validation=0.9, test=0.9)
    advance(env, sweep["id"])
    second = get_sweep(env, sweep["id"])["trials"][1]["job_id"]
    Worker(env, second).epochs([0.01])
    advance(env, sweep["id"])
    assert not job_row(env, second).cancel_requested
    assert optuna_states(env, sweep["id"])[1] == "RUNNING"


def test_cancel_cascades_to_queued_and_running_trials(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                     post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=6, max_parallel=3))
    running, queued, done_id = (t["job_id"] for t in sweep["trials"])
    Worker(env, done_id).epochs([0.4]).succeed(validation=0.4, test=0.5)
    worker = Worker(env, running).epochs([0.3])
    resp = env.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=env.auth("a"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "cancelled" and body["finished_at"] is not None
    assert job_row(env, queued).status == "cancelled"
    assert job_row(env, running).status == "running" and job_row(env, running).cancel_requested
    assert job_row(env, done_id).status == "succeeded"
    assert body["best_job_id"] == done_id, "a cancelled sweep keeps its best so far"
    states = optuna_states(env, sweep["id"])
    assert states[2] == "COMPLETE" and {states[0], states[1]} == {"FAIL"}
    assert advance(env, sweep["id"]).started == [], "a cancelled sweep starts nothing more"
    again = env.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=env.auth("a"))
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    worker.stop_cancelled()
    assert {t["state"] for t in get_sweep(env, sweep["id"])["trials"]} == {"cancelled", "complete"}


def test_cancelling_a_finished_sweep_is_409(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                           post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))
    Worker(env, sweep["trials"][0]["job_id"]).succeed(validation=0.5, test=0.5)
    advance(env, sweep["id"])
    assert_error(env.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=env.auth("a")), 409, "sweep_finished")


def test_a_trial_asked_but_never_recorded_is_failed_and_replaced(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                                post_sweep: Any) -> None:
    """A pass that stopped between Optuna's ask and its own commit leaves a trial without a job: the next pass
    fails it in Optuna and starts a trial in its place; no trial number ever has two jobs."""
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=3, max_parallel=1))
    sid = sweep["id"]
    study(env, sid).ask()  # trial 1, as a crashed pass would leave it
    Worker(env, sweep["trials"][0]["job_id"]).succeed(validation=0.5, test=0.5)
    advance(env, sid)
    assert optuna_states(env, sid)[1] == "FAIL"
    numbers = [j["sweep_trial"] for j in trial_jobs(env, sid)]
    assert numbers == [0, 2] and get_sweep(env, sid)["trials_started"] == 2
    with pytest.raises(IntegrityError), session_scope(env.db_url) as s:  # the database refuses a second job
        original = s.get(Job, trial_jobs(env, sid)[1]["id"])
        s.add(Job(tenant_id=original.tenant_id, teacher_id=original.teacher_id, dataset_id=original.dataset_id,
                  queue="q", request={}, request_hash="x", sweep_id=sid, sweep_trial=2))


def test_a_prune_on_record_but_not_told_is_told_by_the_next_pass(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                                 post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))
    job_id = sweep["trials"][0]["job_id"]
    Worker(env, job_id).epochs([0.2, 0.3])
    with session_scope(env.db_url) as s:  # what a pass commits before it tells Optuna
        job = s.get(Job, job_id)
        lifecycle.request_cancel(s, job)
        s.add(JobEvent(job_id=job_id, kind="pruned", message="pruned", data={"epoch": 2, "value": 0.3}))
    advance(env, sweep["id"])
    trial = study(env, sweep["id"]).get_trials(deepcopy=False)[0]
    assert trial.state.name == "PRUNED" and trial.value == pytest.approx(0.3)


def test_concurrent_passes_never_exceed_the_limits(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                  post_sweep: Any) -> None:
    sweep = post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=5, max_parallel=2))
    sid = sweep["id"]
    for trial in sweep["trials"]:
        Worker(env, trial["job_id"]).succeed(validation=0.5, test=0.5)
    errors: list[BaseException] = []

    def passes() -> None:
        try:
            for _ in range(3):
                advance(env, sid)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=passes) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    jobs = trial_jobs(env, sid)
    assert [j["sweep_trial"] for j in jobs] == [0, 1, 2, 3], "two more trials, once each"
    assert sum(j["status"] in ("queued", "running") for j in jobs) == 2
    assert get_sweep(env, sid)["trials_started"] == 4
    assert sorted(optuna_states(env, sid).values()) == ["COMPLETE", "COMPLETE", "RUNNING", "RUNNING"]


# ---------------------------------------------------------------------------------------------- Optuna's tables

def _our_tables_and_revision(url: str) -> tuple[set[str], str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()), conn.execute(text("SELECT version_num FROM alembic_version")) \
                .scalar_one()
    finally:
        engine.dispose()


def test_optunas_tables_live_apart_from_ours(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                            post_sweep: Any) -> None:
    post_sweep(sweep_body(teacher_a.id, dataset_a.id, max_trials=1, max_parallel=1))
    head = ScriptDirectory.from_config(alembic_config(env.db_url)).get_current_head()
    ours, revision = _our_tables_and_revision(env.db_url)
    assert revision == head, "a sweep leaves our alembic_version alone"
    assert not ours & OPTUNA_TABLES and "sweeps" in ours
    theirs, their_revision = _our_tables_and_revision(studies.storage_url(env.db_url))
    assert theirs >= OPTUNA_TABLES | {"alembic_version"} and "jobs" not in theirs
    assert their_revision != head and their_revision.startswith("v"), their_revision
    if env.kind == "sqlite":
        assert Path(env.db_url.removeprefix("sqlite:///")).with_name("kdistill.optuna.db").exists()
    else:
        engine = create_engine(env.db_url)
        try:
            assert set(inspect(engine).get_table_names(schema=studies.OPTUNA_SCHEMA)) >= OPTUNA_TABLES
        finally:
            engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrations_go_down_and_up_with_studies_in_the_database(kind: str, tmp_path: Path) -> None:
    def database() -> Any:
        if kind == "sqlite":
            from contextlib import nullcontext
            return nullcontext(f"sqlite:///{tmp_path / 'kdistill.db'}")
        return fresh_postgres()

    with database() as url:
        upgrade(url)
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        optuna.create_study(study_name="before", storage=studies.storage_for(url)).ask()
        assert _our_tables_and_revision(url)[1] == head
        studies.storage_for(url).engine.dispose()
        studies.storage_for.cache_clear()
        downgrade(url, "0004")
        tables, revision = _our_tables_and_revision(url)
        assert revision == "0004" and "sweeps" not in tables
        upgrade(url)
        assert _our_tables_and_revision(url)[1] == head
        storage = studies.storage_for(url)
        names = set(optuna.get_all_study_names(storage=storage))
        # PostgreSQL drops Optuna's schema with the sweeps; SQLite's sibling file stays as it was
        assert names == (set() if kind == "postgres" else {"before"})
        optuna.create_study(study_name="after", storage=storage)
        storage.engine.dispose()
        studies.storage_for.cache_clear()
        engine_for(url).dispose()
