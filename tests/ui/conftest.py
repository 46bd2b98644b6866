"""Real-browser fixtures for the dashboard: Debian's chromium driven by Playwright, one `kdistill serve` per module.

Playwright's own browser download cannot work offline, so the system chromium is launched with the flags that
keep it from reaching out (without them it floods the log with refused connections).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright
from service_support import KDISTILL, Server, _env, free_port, kdistill

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
# Schemes that never leave the browser.
LOCAL_SCHEMES = {"data", "blob", "about"}


def start_serve(tmp: Path, *args: str, data_dir: Path | None = None) -> Server:
    """`kdistill serve` on a free port in its own process group (so teardown can kill all of it), ready."""
    port = free_port()
    data_dir = data_dir or tmp / "data"
    log = tmp / "serve.log"
    # One thread: the 2-core CI machine trains while the browser and the test run beside it.
    # Short stream and progress intervals: the live test compares the page with the API epoch by epoch.
    env = _env(OMP_NUM_THREADS="1", KDISTILL_PROGRESS_INTERVAL="0.3", KDISTILL_STREAM_INTERVAL="0.25",
               KDISTILL_HEARTBEAT_INTERVAL="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([KDISTILL, "serve", "--port", str(port), "--data-dir", str(data_dir), *args],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", data_dir, log)
    try:
        server.wait_ready()
    except BaseException:
        stop_serve(server)
        raise
    return server


def stop_serve(server: Server) -> None:
    """SIGINT (serve's own clean stop), then SIGKILL to the whole group if anything is left."""
    if server.proc.poll() is None:
        # a slow stop is not what these tests are about (tests/test_cli_service.py is): kill what is left
        with contextlib.suppress(AssertionError):
            server.stop(signal.SIGINT, timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)


def log_tail(server: Server, chars: int = 6000) -> str:
    return server.output()[-chars:]


# Module-scoped, not session: Playwright's sync API keeps an asyncio loop running in this thread while it is
# open, and under pytest-xdist later modules of the same worker (the fault suite) call asyncio.run().
@pytest.fixture(scope="module")
def playwright_instance() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_instance: Playwright) -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    browser = playwright_instance.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kdistill example`: the resnet20 digits teacher, digits.npz and digits_test.npz."""
    tmp = tmp_path_factory.mktemp("ui-example")
    kdistill("example", str(tmp / "ex"), cwd=tmp, env=_env(OMP_NUM_THREADS="1"))
    return tmp / "ex"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `kdistill serve` on loopback (API keys off) for the module; its log is added to every failure."""
    server = start_serve(tmp_path_factory.mktemp("ui-serve"))
    yield server
    stop_serve(server)


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture()
def auth_server(tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """A second server that requires API keys, with a key for each of two tenants: (server, {tenant: key})."""
    data_dir = tmp_path / "data"
    keys = {tenant: kdistill("keys", "create", "--tenant", tenant, "--name", "ui", "--data-dir", str(data_dir),
                             cwd=tmp_path, env=_env()).stdout.strip() for tenant in ("acme", "globex")}
    server = start_serve(tmp_path, "--host", "127.0.0.1", "--auth", data_dir=data_dir)
    yield server, keys
    stop_serve(server)


@dataclass
class Recorder:
    """What a page did: every request URL, console errors and uncaught exceptions. A request that the page's
    Content-Security-Policy refused never went out (Chromium stops it before the network), but Playwright
    still reports it: those are kept apart."""

    requests: list[str] = field(default_factory=list)
    blocked_by_csp: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def non_local(self) -> list[str]:
        return [u for u in self.requests if not is_local(u) and u not in self.blocked_by_csp]

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def on_request_failed(self, request: Request) -> None:
        # Playwright names the failure "csp" (Chromium's net::ERR_BLOCKED_BY_CSP)
        if (request.failure or "").lower() in ("csp", "net::err_blocked_by_csp"):
            self.blocked_by_csp.append(request.url)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")

    def on_page_error(self, error: Exception) -> None:
        self.console_errors.append(f"uncaught: {error}")


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.scheme in ("http", "https", "ws", "wss")
                                             and parts.hostname in LOCAL_HOSTS)


@pytest.fixture()
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture()
def new_page(browser: Browser, recorder: Recorder) -> Iterator[Callable[[str], Page]]:
    """A factory of fresh pages (own context: own sessionStorage) at 1280x800 on a base URL, recorded."""
    contexts = []

    def make(base_url: str) -> Page:
        context = browser.new_context(base_url=base_url, viewport=VIEWPORT, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.on("request", recorder.on_request)
        page.on("requestfailed", recorder.on_request_failed)
        page.on("console", recorder.on_console)
        page.on("pageerror", recorder.on_page_error)
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture()
def page(new_page: Callable[[str], Page], server: Server) -> Page:
    return new_page(server.url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failing dashboard test shows the server's log tail and the browser's console errors beside it."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for name in ("server", "auth_server"):
        srv = funcargs.get(name)
        srv = srv[0] if isinstance(srv, tuple) else srv  # auth_server is (server, keys)
        if isinstance(srv, Server):
            report.sections.append((f"kdistill serve log ({name}, tail)", log_tail(srv)))
    rec = funcargs.get("recorder")
    if isinstance(rec, Recorder) and rec.console_errors:
        report.sections.append(("browser console errors", "\n".join(rec.console_errors)))
