"""Property-based fuzzing of the gateway, driven by its own `/api-docs`.

schemathesis generates requests for every documented operation, valid and
invalid, and sends them to a gateway on a real socket (embedded backends).
Every answer must be free of 5xx, have a documented status, content type,
headers and body, and invalid data must be refused; an answer in the 4xx
range must leave the store exactly as it was.

`BATON_FUZZ_EXAMPLES` sets the examples per operation: unset, the run is
small and derandomized so that `make test` is reproducible; set, the run
is random, e.g. `BATON_FUZZ_EXAMPLES=500 make test`.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.gateway.api_docs import document
from shared.config import Settings
from tests.fixtures.threaded import ThreadedGateway

EXAMPLES_VARIABLE = "BATON_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 10
EXAMPLES = int(os.environ.get(EXAMPLES_VARIABLE) or DEFAULT_EXAMPLES)
REPRODUCIBLE = not os.environ.get(EXAMPLES_VARIABLE)

# Fuzzed long polls wait at most this long on empty queues.
POLL_TIMEOUT_MS = 20
REQUEST_TIMEOUT_S = 10

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

# Everything a request can change, table by table; the columns that a
# change must move (a task's version moves on every transition).
_STATE_QUERIES = {
    "task_defs": "SELECT name, doc FROM task_defs ORDER BY name",
    "workflow_defs": "SELECT name, version, doc FROM workflow_defs ORDER BY 1, 2",
    "workflows": "SELECT id, status, doc FROM workflows ORDER BY id",
    "tasks": "SELECT id, version, status FROM tasks ORDER BY id",
    "task_results": "SELECT COUNT(*), MAX(id) FROM task_results",
    "task_logs": "SELECT COUNT(*), MAX(id) FROM task_logs",
    "poll_data": "SELECT * FROM poll_data ORDER BY 1, 2",
    "queues": "SELECT name FROM queues ORDER BY name",
}


class StoreState:
    """Digests of every table of the fuzzed gateway's SQLite store."""

    def __init__(self, gateway: ThreadedGateway) -> None:
        self._gateway = gateway
        self._path = Path(gateway.settings.sqlite_path)

    def read(self) -> dict[str, str]:
        """The state now, with this gateway's poll data flushed first."""
        self._gateway.run(self._gateway.runtime.polls.flush())
        uri = f"{self._path.as_uri()}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            return {
                table: hashlib.sha256(
                    repr(conn.execute(query).fetchall()).encode()
                ).hexdigest()
                for table, query in _STATE_QUERIES.items()
            }


def fuzz_settings(sqlite_path: str) -> Settings:
    """A gateway on embedded backends whose long polls are short."""
    return Settings(
        sqlite_path=sqlite_path,
        max_poll_timeout_ms=POLL_TIMEOUT_MS,
        consumer_linger_ms=0,
        poll_data_flush_ms=50,
        definition_cache_ms=0,
    )


# The operations to fuzz are known before the gateway runs: the document
# depends only on the settings. The test then loads the served document.
OPERATION_IDS = sorted(
    operation["operationId"]
    for item in document(fuzz_settings(""))["paths"].values()
    for operation in item.values()
)


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    """The fuzzed gateway, shared by every operation's test."""
    directory = tmp_path_factory.mktemp("fuzz")
    gateway = ThreadedGateway(fuzz_settings(str(directory / "baton.db")))
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def store_state(fuzz_gateway: ThreadedGateway) -> StoreState:
    """Reads the fuzzed gateway's store between requests."""
    return StoreState(fuzz_gateway)


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway: ThreadedGateway) -> schemathesis.BaseSchema:
    """The gateway's own OpenAPI document, loaded from `/api-docs`."""
    return schemathesis.openapi.from_url(f"{fuzz_gateway.url}/api-docs")


@pytest.mark.parametrize("operation_id", OPERATION_IDS)
def test_gateway_answers_every_request_as_documented(
    api_schema: schemathesis.BaseSchema, store_state: StoreState, operation_id: str
) -> None:
    operation = api_schema.find_operation_by_id(operation_id)
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        derandomize=REPRODUCIBLE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        before = store_state.read()
        response = case.call(timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS)
        if 400 <= response.status_code < 500:
            after = store_state.read()
            changed = sorted(t for t in before if before[t] != after[t])
            assert not changed, (
                f"{case.method} {case.formatted_path} answered "
                f"{response.status_code} but changed {changed}: "
                f"{response.text[:500]}"
            )

    answers_as_documented()
