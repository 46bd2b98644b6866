"""The fault suite: real processes at production default timings, one figure row per fault.

Rows are printed at the end of the run; with KDISTILL_FAULTS_REPORT=<file> they are also written there as
JSON (bench/faults.py reads them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from harness import Figures, Stack, open_stack, text_table

HERE = Path(__file__).resolve().parent
_FIGURES = Figures()  # session-wide: every test module appends here


def pytest_configure(config: pytest.Config) -> None:
    # registered here, not in pyproject.toml, so the suite is self-contained (--strict-markers is on)
    config.addinivalue_line("markers", "faults: injects a fault into real API, worker, Redis or PostgreSQL processes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the hook sees the whole session's items: mark only this folder's
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _FIGURES.rows:
        terminalreporter.write_sep("=", "fault figures")
        terminalreporter.write_line(text_table(_FIGURES.as_dicts()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report = os.environ.get("KDISTILL_FAULTS_REPORT")
    if report:
        Path(report).write_text(json.dumps(_FIGURES.as_dicts(), indent=2))


@pytest.fixture(scope="session")
def figures() -> Figures:
    """The session's figure rows: `figures.record(fault, recovery_s=, jobs=, lost=, duplicate_runs=, note=)`."""
    return _FIGURES


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """`make_stack(proxy_db=False, extra_env=None)`: a fresh Stack (database, Redis, env; no API or worker
    started); everything it started is stopped when the test ends."""
    with ExitStack() as stack:
        count = 0

        def make(*, proxy_db: bool = False, extra_env: dict[str, str] | None = None) -> Stack:
            nonlocal count
            count += 1
            return stack.enter_context(open_stack(tmp_path / f"stack{count}", proxy_db=proxy_db,
                                                  extra_env=extra_env))

        yield make


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """A fresh Stack with its database reached directly; start the API and workers in the test."""
    return make_stack()
