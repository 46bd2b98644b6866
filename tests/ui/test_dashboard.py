"""The dashboard in a real browser (Debian's chromium through Playwright) against a real `kdistill serve`.

Everything goes through the DOM contract of the dashboard (data-testid attributes, hash routes); the API is
asked, over HTTP, for the truth each page is compared with. Training runs for real on the example teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from playwright.sync_api import Locator, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from service_support import Server

pytestmark = pytest.mark.slow  # trains real students, like the other end-to-end modules

REPO = Path(__file__).resolve().parents[2]
FINAL = {"succeeded", "failed", "cancelled"}
TEACHER_FIELDS = {"arch": "resnet20", "input_channels": "1", "input_size": "8", "mean": "0.3", "std": "0.37"}
# Generous ceilings for a 2-core CI machine that may be busy with other work; each wait returns as soon as it can.
UI_TIMEOUT = 15_000
JOB_TIMEOUT = 120.0


# -- helpers ---------------------------------------------------------------------------------------------
def upload_inputs(client: httpx.Client, example: Path) -> tuple[str, str]:
    """The example teacher and dataset through the API: (teacher id, dataset id)."""
    with (example / "teacher.safetensors").open("rb") as f:
        teacher = client.post("/v1/teachers", files={"file": ("teacher.safetensors", f)}, data=TEACHER_FIELDS,
                              params={"dedupe": "false"})
    assert teacher.status_code == 201, teacher.text
    with (example / "digits.npz").open("rb") as f:
        dataset = client.post("/v1/datasets", files={"file": ("digits.npz", f)}, params={"dedupe": "false"})
    assert dataset.status_code == 201, dataset.text
    return teacher.json()["id"], dataset.json()["id"]


def job_body(teacher_id: str, dataset_id: str, epochs: int, baseline: bool = False,
             batch_size: int = 64) -> dict[str, Any]:
    return {"teacher_id": teacher_id, "dataset_id": dataset_id, "student": {"arch": "resnet8"},
            "hyperparameters": {"epochs": epochs, "batch_size": batch_size}, "export_formats": ["onnx"],
            "baseline": baseline}


def create_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_job(client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool],
             timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never reached the expected state; last: {job}"
        time.sleep(0.2)


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).raise_for_status().json()
        items += page["items"]
        if not (after := page["next_cursor"]):
            return items


def epochs_of(events: list[dict[str, Any]], run: str) -> int:
    """Distinct epochs of `run` among epoch events (a resumed run may repeat one)."""
    return len({e["data"]["epoch"] for e in events if e["kind"] == "epoch" and e["data"]["run"] == run})


def count_jobs(client: httpx.Client) -> int:
    total, after = 0, None
    while True:
        page = client.get("/v1/jobs", params={"limit": 100, **({"after": after} if after else {})})
        body = page.raise_for_status().json()
        total += len(body["items"])
        if not (after := body["next_cursor"]):
            return total


def set_value(field: Locator, value: str) -> None:
    """Fill an input or pick an option, whichever element the form uses."""
    if field.evaluate("el => el.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)


def wait_full(progress: Locator, timeout: float = UI_TIMEOUT) -> None:
    """A <progress> (or role=progressbar) at 100 %."""
    progress.page.wait_for_function(
        """el => {
            if (el.tagName === 'PROGRESS') return el.max > 0 && el.value >= el.max;
            const max = Number(el.getAttribute('aria-valuemax') || 100);
            return Number(el.getAttribute('aria-valuenow')) >= max;
        }""", arg=progress.element_handle(timeout=timeout), timeout=timeout)


def percent(progress: Locator) -> float:
    """The job progress bar as a percentage (the contract: value / aria-valuenow is 0..100)."""
    return float(progress.evaluate(
        "el => el.tagName === 'PROGRESS' ? el.value : Number(el.getAttribute('aria-valuenow'))"))


def numbers_in(text: str) -> list[float]:
    """Every number in a text, with thousands separators dropped and k/M suffixes applied."""
    text = re.sub(r"(?<=\d)[,\u202f\u00a0 ](?=\d{3}\b)", "", text)
    found = []
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([kKMG]?)", text):
        found.append(float(number) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[suffix])
    return found


def shows_fraction(text: str, value: float) -> bool:
    """`value` (0..1) appears as a fraction or a percentage, rounded to at least two significant places."""
    return any(abs(n - value) <= 0.006 or abs(n / 100 - value) <= 0.006 for n in numbers_in(text))


def shows_count(text: str, value: float, rel: float = 0.06) -> bool:
    """A count such as a parameter number, possibly abbreviated (272,474 / 272.5 K / 0.27 M)."""
    return any(abs(n - value) <= rel * value for n in numbers_in(text))


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """A viewport screenshot in the test's tmp dir; copied into docs/ only on KDISTILL_UPDATE_SCREENSHOTS=1."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 5000, "an empty screenshot"
    if os.environ.get("KDISTILL_UPDATE_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, REPO / "docs" / name)
    return path


def artifact_link(page: Page, name: str) -> Locator:
    return page.locator(f'[data-testid="artifact-link"][data-name="{name}"]')


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(api: httpx.Client, example: Path) -> tuple[str, str]:
    """A teacher and a dataset uploaded through the API, for the tests that do not test the upload form."""
    return upload_inputs(api, example)


@pytest.fixture()
def cancel_later(api: httpx.Client) -> Iterator[list[str]]:
    """Jobs to cancel after the test: one worker trains one job at a time, the next test must not queue."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        api.post(f"/v1/jobs/{job_id}/cancel")  # 409 when already final: fine
        wait_job(api, job_id, lambda j: j["status"] in FINAL, timeout=60)


@pytest.fixture(scope="module")
def finished_job(api: httpx.Client, inputs: tuple[str, str]) -> dict[str, Any]:
    """A succeeded job with a baseline run and an ONNX student."""
    job = create_job(api, job_body(*inputs, epochs=6, baseline=True))
    job = wait_job(api, job["id"], lambda j: j["status"] in FINAL, timeout=180)
    assert job["status"] == "succeeded", job
    return job


# -- the page loads, offline -----------------------------------------------------------------------------
def test_root_redirects_to_the_dashboard_and_it_loads(page: Page, api: httpx.Client, recorder: Any):
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui/(#.*)?$"), timeout=UI_TIMEOUT)
    for testid in ("nav-jobs", "nav-submit", "nav-teachers", "nav-datasets"):
        expect(page.get_by_test_id(testid)).to_be_visible(timeout=UI_TIMEOUT)
    me = api.get("/v1/me").raise_for_status().json()
    assert me["auth"] == "disabled"
    expect(page.get_by_test_id("tenant")).to_contain_text(me["tenant"]["name"], timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("api-key-input")).to_have_count(0)  # no key prompt when keys are off


def test_docs_redoc_and_dashboard_make_no_request_off_the_machine(page: Page, recorder: Any):
    page.goto("/docs")
    expect(page.locator(".swagger-ui")).to_be_visible(timeout=UI_TIMEOUT)
    # Rendered operations prove the bundle ran and fetched /openapi.json, not only that a div exists.
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.locator(".swagger-ui")).to_contain_text("Create a distillation job")
    page.wait_for_load_state("networkidle")  # images and fonts the rendered page asks for come late

    page.goto("/redoc")
    expect(page.locator(".redoc-wrap")).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.locator(".redoc-wrap")).to_contain_text("Create a distillation job", timeout=UI_TIMEOUT)
    page.wait_for_load_state("networkidle")
    assert recorder.requests, "no request was recorded at all"
    assert recorder.non_local() == [], f"the docs reached off the machine: {recorder.non_local()}"
    # ReDoc's bundle asks for Redocly's logo on their CDN; the page's policy stops it in the browser
    assert all(urlsplit(u).hostname == "cdn.redoc.ly" for u in recorder.blocked_by_csp), recorder.blocked_by_csp

    recorder.requests.clear()
    recorder.console_errors.clear()
    page.goto("/ui/")
    expect(page.get_by_test_id("tenant")).not_to_be_empty(timeout=UI_TIMEOUT)
    page.get_by_test_id("nav-submit").click()
    # the form is built from /openapi.json and lists the uploads: its requests have been made
    expect(page.get_by_test_id("field-hyperparameters.epochs")).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("teacher-select")).to_be_enabled()
    assert any("/v1/" in u for u in recorder.requests), recorder.requests
    assert recorder.non_local() == [], f"the dashboard reached off the machine: {recorder.non_local()}"
    assert recorder.console_errors == []


# -- 1. the submit form ----------------------------------------------------------------------------------
def test_submit_a_job_from_the_form(page: Page, api: httpx.Client, example: Path, tmp_path: Path,
                                    cancel_later: list[str], recorder: Any):
    page.goto("/ui/#/submit")
    expect(page.get_by_test_id("submit-job")).to_be_visible(timeout=UI_TIMEOUT)

    page.get_by_test_id("teacher-file").set_input_files(example / "teacher.safetensors")
    for name, value in TEACHER_FIELDS.items():
        set_value(page.locator(f'[name="{name}"]'), value)
    with page.expect_response(lambda r: r.url.endswith("/v1/teachers") and r.request.method == "POST",
                              timeout=60_000) as uploaded:
        page.get_by_test_id("teacher-upload").click()
    # 200: the same file with the same fields was uploaded before (upload_inputs), and the form adopts that teacher
    assert uploaded.value.status in (200, 201), uploaded.value.text()
    teacher = uploaded.value.json()
    assert (teacher["arch"], teacher["input_channels"], teacher["input_size"], teacher["mean"], teacher["std"]) == (
        "resnet20", 1, [8, 8], [0.3], [0.37])
    wait_full(page.get_by_test_id("teacher-upload-progress"))
    expect(page.get_by_test_id("teacher-select")).to_have_value(teacher["id"], timeout=UI_TIMEOUT)

    page.get_by_test_id("dataset-file").set_input_files(example / "digits.npz")
    with page.expect_response(lambda r: r.url.endswith("/v1/datasets") and r.request.method == "POST",
                              timeout=60_000) as uploaded:
        page.get_by_test_id("dataset-upload").click()
    assert uploaded.value.status in (200, 201), uploaded.value.text()
    dataset = uploaded.value.json()
    wait_full(page.get_by_test_id("dataset-upload-progress"))
    expect(page.get_by_test_id("dataset-select")).to_have_value(dataset["id"], timeout=UI_TIMEOUT)

    arch = page.get_by_test_id("student-arch")
    if arch.evaluate("el => el.tagName") == "SELECT":
        # The search filters the list: only names that match are offered. (Not waiting for the whole
        # catalogue first: a fresh server takes tens of seconds to count every architecture's parameters.)
        offered = "el => [...el.options].filter(o => !o.hidden && !o.disabled && o.value).map(o => o.value)"
        page.get_by_test_id("student-search").fill("resnet8")
        try:
            page.wait_for_function(f"el => {{ const o = ({offered})(el); "
                                   "return o.includes('resnet8') && o.every(v => v.includes('resnet8')); }",
                                   arg=arch.element_handle(), timeout=UI_TIMEOUT)
        except PlaywrightTimeout:
            raise AssertionError(f"the search did not filter the students: {arch.evaluate(offered)}") from None
        arch.select_option("resnet8")
    else:
        page.get_by_test_id("student-search").fill("resnet8")
        if arch.input_value() != "resnet8":
            page.get_by_text("resnet8", exact=True).first.click()
    expect(arch).to_have_value("resnet8", timeout=UI_TIMEOUT)

    epochs = page.get_by_test_id("field-hyperparameters.epochs")
    expect(epochs).to_have_attribute("name", "hyperparameters.epochs")
    epochs.fill("6")
    page.get_by_test_id("field-baseline").check()
    page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(page, tmp_path, "dashboard-submit.png")

    with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST",
                              timeout=30_000) as created:
        page.get_by_test_id("submit-job").click()
    assert created.value.status == 202, created.value.text()
    job_id = created.value.json()["id"]
    cancel_later.append(job_id)  # its settings are what is tested here, not its training
    expect(page).to_have_url(re.compile(rf"#/jobs/{job_id}$"), timeout=UI_TIMEOUT)

    job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    request = job["request"]
    assert (job["teacher_id"], job["dataset_id"]) == (teacher["id"], dataset["id"])
    assert request["student"]["arch"] == "resnet8"
    assert request["hyperparameters"]["epochs"] == 6
    assert request["baseline"] is True
    expect(page.get_by_test_id("job-status")).to_have_text(re.compile(r"^(queued|running)$"), timeout=UI_TIMEOUT)
    assert recorder.console_errors == []


# -- 2. live progress ------------------------------------------------------------------------------------
def test_progress_and_accuracy_chart_follow_the_training_live(page: Page, api: httpx.Client,
                                                              inputs: tuple[str, str], cancel_later: list[str]):
    # Batches of 16 make an epoch ~0.5 s on one thread here (0.12 s at 64): slow enough for the page, which
    # follows the stream every 0.25 s, to be caught agreeing with the API several times (every epoch, here).
    epochs = 12
    job = create_job(api, job_body(*inputs, epochs=epochs, batch_size=16))
    cancel_later.append(job["id"])
    page.goto(f"/ui/#/jobs/{job['id']}")
    chart = page.get_by_test_id("chart-accuracy")
    bar = page.get_by_test_id("job-progress")
    expect(chart).to_have_attribute("data-student-epochs", re.compile(r"^\d+$"), timeout=UI_TIMEOUT)

    agreed: list[int] = []  # student epoch counts on which page and API agreed while the job ran
    progress: list[float] = []
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        before = int(chart.get_attribute("data-student-epochs") or -1)
        shown = percent(bar)
        job = api.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
        reported = epochs_of(all_events(api, job["id"]), "student")
        after = int(chart.get_attribute("data-student-epochs") or -1)
        # the page can only plot epochs that exist: read before the API, it can never be ahead of it
        assert before <= reported, f"the chart shows {before} student epochs, the API reports {reported}"
        if job["status"] in FINAL:
            break
        if job["status"] == "running":
            progress.append(shown)
            if before == reported == after and (not agreed or reported != agreed[-1]):
                agreed.append(reported)
        assert time.monotonic() < deadline, f"job still {job['status']} after {JOB_TIMEOUT} s"
        time.sleep(0.1)

    assert job["status"] == "succeeded", job
    # seen growing at least twice while it trained, not only the empty chart of a job just started
    assert len([a for a in agreed if a > 0]) >= 2 and agreed == sorted(agreed), f"agreements while running: {agreed}"
    assert progress == sorted(progress), f"the progress bar went backwards: {progress}"
    assert len(set(progress)) >= 2 and all(0 <= p <= 100 for p in progress), progress
    expect(chart).to_have_attribute("data-student-epochs", str(epochs), timeout=UI_TIMEOUT)
    expect(chart).to_have_attribute("data-baseline-epochs", "0")
    expect(page.get_by_test_id("job-status")).to_have_text("succeeded", timeout=UI_TIMEOUT)
    wait_full(bar)


# -- 3. a refused hyperparameter -------------------------------------------------------------------------
def test_a_bad_hyperparameter_shows_the_apis_message_next_to_its_field(page: Page, api: httpx.Client,
                                                                       inputs: tuple[str, str]):
    teacher_id, dataset_id = inputs
    bad = job_body(teacher_id, dataset_id, epochs=2)
    bad["hyperparameters"]["temperature"] = -1
    refused = api.post("/v1/jobs", json=bad)
    assert refused.status_code == 422 and refused.json()["field"] == "hyperparameters.temperature", refused.text
    message = next(e["message"] for e in refused.json()["errors"] if e["field"] == "hyperparameters.temperature")
    jobs_before = count_jobs(api)

    page.goto("/ui/#/submit")
    expect(page.get_by_test_id("submit-job")).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("teacher-select").locator(f'option[value="{teacher_id}"]')).to_have_count(
        1, timeout=UI_TIMEOUT)
    page.get_by_test_id("teacher-select").select_option(teacher_id)
    expect(page.get_by_test_id("dataset-select").locator(f'option[value="{dataset_id}"]')).to_have_count(
        1, timeout=UI_TIMEOUT)
    page.get_by_test_id("dataset-select").select_option(dataset_id)
    set_value(page.get_by_test_id("student-arch"), "resnet8")
    page.get_by_test_id("field-hyperparameters.epochs").fill("2")
    temperature = page.get_by_test_id("field-hyperparameters.temperature")
    temperature.fill("-1")
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST",
                              timeout=30_000) as posted:
        page.get_by_test_id("submit-job").click()
    assert posted.value.status == 422, posted.value.text()

    error = page.locator('[data-testid="field-error"][data-field="hyperparameters.temperature"]')
    expect(error).to_be_visible(timeout=UI_TIMEOUT)
    expect(error).to_contain_text(message)
    # Next to its input: the smallest ancestor of the input that holds the error holds no other field.
    placement = temperature.evaluate(
        """(input, error) => {
            let box = input.parentElement;
            while (box && !box.contains(error)) box = box.parentElement;
            if (!box) return 'no common ancestor';
            const others = [...box.querySelectorAll('[name^="hyperparameters."]')].filter(el => el !== input);
            return others.length ? 'shared with ' + others.map(el => el.name).join(', ') : 'ok';
        }""", error.element_handle())
    assert placement == "ok", f"the error is not beside hyperparameters.temperature: {placement}"
    expect(page).to_have_url(re.compile(r"#/submit$"))
    assert count_jobs(api) == jobs_before, "a refused job was created"


# -- 4. cancel -------------------------------------------------------------------------------------------
def test_cancel_a_running_job(page: Page, api: httpx.Client, inputs: tuple[str, str], cancel_later: list[str]):
    job = create_job(api, job_body(*inputs, epochs=500))
    cancel_later.append(job["id"])
    page.on("dialog", lambda dialog: dialog.accept())  # a confirm() before cancelling is fine
    page.goto(f"/ui/#/jobs/{job['id']}")
    status = page.get_by_test_id("job-status")
    expect(status).to_have_text("running", timeout=60_000)
    button = page.get_by_test_id("cancel-job")
    expect(button).to_be_visible()
    button.click()
    expect(status).to_have_text("cancelled", timeout=60_000)
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    expect(button).to_be_hidden(timeout=UI_TIMEOUT)


# -- 5. download the student -----------------------------------------------------------------------------
def test_download_the_onnx_student(page: Page, api: httpx.Client, finished_job: dict[str, Any], tmp_path: Path):
    import onnxruntime as ort

    job_id = finished_job["id"]
    page.goto(f"/ui/#/jobs/{job_id}")
    link = artifact_link(page, "student.onnx")
    expect(link).to_be_visible(timeout=UI_TIMEOUT)
    shown_sha = link.get_attribute("data-sha256") or ""
    # The digest is readable beside the link: the smallest box around the link that shows it (possibly
    # shortened) holds no other artifact.
    placement = link.evaluate(
        """(link, sha) => {
            let box = link.parentElement;
            while (box && !box.textContent.includes(sha)) box = box.parentElement;
            if (!box) return 'not shown';
            const others = box.querySelectorAll('[data-testid="artifact-link"]').length - 1;
            return others ? `shown only in a box with ${others} other artifact(s)` : 'ok';
        }""", shown_sha[:12])
    assert placement == "ok", f"sha256 {shown_sha} of student.onnx: {placement}"
    with page.expect_download(timeout=30_000) as download_info:
        link.click()
    saved = tmp_path / "student.onnx"
    download_info.value.save_as(saved)
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()

    listed = next(a for a in finished_job["artifacts"] if a["name"] == "student.onnx")
    served = api.get(f"/v1/jobs/{job_id}/artifacts/student.onnx")
    assert digest == shown_sha == listed["sha256"] == served.headers["X-Checksum-Sha256"]

    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    assert [d if isinstance(d, int) else 1 for d in spec.shape][1:] == [1, 8, 8], spec.shape
    (logits,) = session.run(None, {spec.name: np.zeros((1, 1, 8, 8), np.float32)})
    assert logits.shape == (1, 10) and np.isfinite(logits).all()


# -- 6. a finished job's page ----------------------------------------------------------------------------
def test_a_finished_job_shows_its_results(page: Page, api: httpx.Client, finished_job: dict[str, Any],
                                          tmp_path: Path, recorder: Any):
    job_id = finished_job["id"]
    metrics = finished_job["metrics"]
    test = metrics["test"]
    page.goto(f"/ui/#/jobs/{job_id}")
    expect(page.get_by_test_id("job-status")).to_have_text("succeeded", timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("cancel-job")).to_be_hidden()
    expect(page.get_by_test_id("job-error")).to_be_hidden()

    table = page.get_by_test_id("test-metrics")
    expect(table).to_be_visible(timeout=UI_TIMEOUT)
    text = table.inner_text()
    for name in ("student_accuracy", "teacher_accuracy", "baseline_accuracy"):
        lo, hi = test[f"{name}_ci"]
        assert shows_fraction(text, test[name]), f"{name} {test[name]} not in test-metrics: {text!r}"
        assert shows_fraction(text, lo) and shows_fraction(text, hi), f"{name}_ci {lo}-{hi} not in: {text!r}"

    per_class = page.get_by_test_id("per-class")
    expect(per_class).to_be_visible()
    classes = metrics["confusion"]["classes"]
    assert per_class.locator("tr").count() >= len(classes), per_class.inner_html()[:2000]
    recall = metrics["per_class"][0]["recall"]
    assert shows_fraction(per_class.inner_text(), recall), f"recall {recall} of class {classes[0]} not shown"

    confusion = page.get_by_test_id("confusion")
    expect(confusion).to_be_visible()
    box = confusion.bounding_box()
    assert box and box["width"] > 50 and box["height"] > 50, box

    efficiency = page.get_by_test_id("efficiency")
    expect(efficiency).to_be_visible()
    eff = metrics["efficiency"]
    eff_text = efficiency.inner_text()
    assert re.search("teacher", eff_text, re.I) and re.search("student", eff_text, re.I), eff_text
    for side in ("teacher", "student"):
        parameters = eff[side]["parameters"]
        assert shows_count(eff_text, parameters), f"{side} parameters {parameters} not in efficiency: {eff_text!r}"

    events = page.get_by_test_id("events")
    expect(events).to_be_visible()
    for event in all_events(api, job_id):
        if event["kind"] in ("dataset", "score"):
            expect(events).to_contain_text(event["message"])

    accuracy = page.get_by_test_id("chart-accuracy")
    epochs = finished_job["request"]["hyperparameters"]["epochs"]
    expect(accuracy).to_have_attribute("data-student-epochs", str(epochs), timeout=UI_TIMEOUT)
    expect(accuracy).to_have_attribute("data-baseline-epochs", str(epochs))
    for chart in ("chart-loss", "chart-accuracy", "chart-lr"):
        expect(page.get_by_test_id(chart)).to_be_visible()
    page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(page, tmp_path, "dashboard-job.png")
    assert recorder.console_errors == []


# -- 7. API keys -----------------------------------------------------------------------------------------
def test_with_keys_required_the_page_asks_for_one_and_shows_only_that_tenant(
        auth_server: tuple[Server, dict[str, str]], new_page: Callable[[str], Page], example: Path):
    server, keys = auth_server
    jobs: dict[str, str] = {}
    for tenant, key in keys.items():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            job = create_job(client, job_body(*upload_inputs(client, example), epochs=1))
            client.post(f"/v1/jobs/{job['id']}/cancel")  # only its row matters; the worker need not train it
            jobs[tenant] = job["id"]

    page = new_page(server.url)
    page.goto("/ui/")
    key_input = page.get_by_test_id("api-key-input")
    expect(key_input).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("job-row")).to_have_count(0)
    key_input.fill(keys["acme"])
    page.get_by_test_id("api-key-save").click()

    expect(page.get_by_test_id("tenant")).to_contain_text("acme", timeout=UI_TIMEOUT)
    rows = page.get_by_test_id("job-row")
    expect(rows).to_have_count(1, timeout=UI_TIMEOUT)
    expect(rows).to_have_attribute("data-job-id", jobs["acme"])
    expect(page.locator(f'[data-job-id="{jobs["globex"]}"]')).to_have_count(0)

    session = json.loads(page.evaluate("JSON.stringify(Object.assign({}, sessionStorage))"))
    local = json.loads(page.evaluate("JSON.stringify(Object.assign({}, localStorage))"))
    assert keys["acme"] in session.values(), f"the key is not in sessionStorage: {list(session)}"
    assert not any(keys["acme"] in v for v in local.values()), "the key leaked into localStorage"

    page.reload()  # the same tab keeps the key: no second prompt
    expect(page.get_by_test_id("tenant")).to_contain_text("acme", timeout=UI_TIMEOUT)
    expect(page.get_by_test_id("api-key-input")).to_be_hidden()
