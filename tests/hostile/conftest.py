"""Fixtures of the hostile-input suite.

The uploads go to the real app through the API suite's own backends: its `env` fixture (SQLite with the
filesystem broker, and PostgreSQL with Redis, each built by Alembic) is loaded from tests/api/conftest.py
rather than copied, so both suites test the same thing (its own instances: other data folders and databases,
Redis database 10). The fuzzing module starts a real `kdistill serve`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from fuzz_report import FUZZ_SUMMARY

API_DIR = Path(__file__).resolve().parents[1] / "api"
if str(API_DIR) not in sys.path:  # api_support, which the API suite's conftest imports
    sys.path.insert(0, str(API_DIR))

_spec = importlib.util.spec_from_file_location("kdistill_api_suite_fixtures", API_DIR / "conftest.py")
assert _spec is not None and _spec.loader is not None
_api_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_api_fixtures)

_api_fixtures.REDIS_DB = 10  # this copy's PostgreSQL backend flushes a Redis database no other suite uses
env = _api_fixtures.env  # re-exported: pytest registers fixtures it finds in a conftest's namespace


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    lines = config.stash.get(FUZZ_SUMMARY, None)
    if lines:
        terminalreporter.section("schemathesis fuzzing of kdistill serve")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis (under schemathesis) caches what it learns in ./.hypothesis, from collection on and whatever its
    # example database; point it at a folder of this run instead of the checkout.
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # the dev extra is not installed: test_schema_fuzz.py skips itself
        return
    home = tempfile.mkdtemp(prefix="kdistill-hypothesis-")
    set_hypothesis_home_dir(home)
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
