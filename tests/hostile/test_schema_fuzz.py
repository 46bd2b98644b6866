"""Property-based fuzzing of the whole API with schemathesis, against the /openapi.json of a real `kdistill serve`.

One `kdistill serve` (loopback, so without API keys; a temporary data folder; its own local worker) is started
as tests/test_cli_service.py starts it. schemathesis loads the schema the server publishes and runs, for every
operation, its examples, coverage (boundary values, missing and wrong-typed parameters, unexpected methods) and
fuzzing phases, at most MAX_EXAMPLES fuzzed cases each, from a fixed seed so that a CI failure replays.

Nothing is excluded. The two multipart upload operations are fuzzed too: schemathesis' generated files are small
random byte strings, and each one that passes the form's validation is really inspected in a child process (about
2 s each), which is most of this module's run time.

Two properties:
- no request gets a status >= 500 (test_no_request_gets_a_server_error, checked case by case, so that
  hypothesis shrinks a failure to the smallest request);
- every response conforms to the documented schema: its status is documented for the operation, its content type
  and body match what is documented (test_every_response_conforms_to_the_documented_schema, over all the cases).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fuzz_report import FUZZ_SUMMARY, FuzzLog, Nonconforming
from service_support import Server  # tests/ is on sys.path through tests/conftest.py

schemathesis = pytest.importorskip("schemathesis")  # the dev extra; the rest of the suite runs without it

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 25  # fuzzed cases per operation; the coverage phase adds its own bounded set
SEED = 20240509
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]
CONFIG = {
    "seed": SEED,
    # database "none": no example database (conftest.py also moves hypothesis' other caches out of the checkout)
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
    "request-timeout": 120,
}


def _env() -> dict[str, str]:
    """This environment without any KDISTILL_* setting of the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}
    env.update(PYTHONUNBUFFERED="1", KDISTILL_INSPECT_TIMEOUT="60")
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz-serve")
    server = Server.start(tmp, env=_env())
    assert "auth:       OFF" in server.output(), server.output()
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def fuzz_log(request: pytest.FixtureRequest) -> Iterator[FuzzLog]:
    log = FuzzLog()
    yield log
    if log.cases:
        request.config.stash[FUZZ_SUMMARY] = log.summary()


@pytest.fixture(scope="module")
def served_schema(served: Server):  # type: ignore[no-untyped-def]
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json", config=config)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's from_fixture() reads and rewrites `Node._nodeid`, which pytest 9.2 no longer has
    # (its node id moved to `_id`); the attribute it reads back is all it needs.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("served_schema")


@schema.parametrize()
def test_no_request_gets_a_server_error(case, fuzz_log: FuzzLog) -> None:  # type: ignore[no-untyped-def]
    response = case.call()
    operation = f"{case.operation.method.upper()} {case.operation.path}"
    phase = case.meta.phase.name.value if case.meta else "explicit"
    fuzz_log.cases.append((operation, case.method, phase, response.status_code))
    case.validate_response(response, checks=[not_a_server_error])
    try:
        case.validate_response(response, checks=CONFORMANCE)
    except FailureGroup as group:
        checks = tuple(sorted({f.title for f in group.exceptions}))
        fuzz_log.nonconforming.append(Nonconforming(f"{case.method.upper()} {case.operation.path}",
                                                    response.status_code, checks, case.as_curl_command(),
                                                    response.text[:300]))


def test_every_response_conforms_to_the_documented_schema(fuzz_log: FuzzLog) -> None:
    if not fuzz_log.cases:
        pytest.skip("the fuzzing test did not run")
    problems = fuzz_log.distinct_nonconforming()
    assert not problems, "responses off the documented schema:\n" + "\n".join(
        f"{n.operation} -> {n.status} ({'; '.join(n.checks)}): {n.curl}\n    {n.body}" for n in problems)
