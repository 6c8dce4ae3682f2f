"""Operability: liveness, readiness, metrics, shutdown and backend outages.

In-process tests run a gateway on a real socket over each backend pair
(the `baton` fixture); process tests run `python -m services.gateway` and
`python -m services.scheduler` and talk to them over HTTP only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pymongo.uri_parser import parse_uri

from services.gateway.app import build_app
from services.health import OPERATIONS
from tests.fixtures.processes import PROJECT_ROOT, GatewayProcesses, free_port
from tests.services.conftest import Baton, unique

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

POLL_ROUTE = "/api/tasks/poll/batch/{taskType}"
TIMEOUT = aiohttp.ClientTimeout(total=15)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, Any]:
    """GET `url`; return the status, the text and the JSON body if any."""
    async with session.get(url) as response:
        text = await response.text()
        body: Any = None
        if response.content_type == "application/json":
            body = await response.json()
        return response.status, text, body


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[set[str], Samples]:
    """Read `/metrics`; return the family names and every sample's value."""
    status, text, _ = await get(session, f"{url}/metrics")
    assert status == 200, text
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample; 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0
) -> None:
    """Poll `check` until it returns True; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def assert_unavailable(status: int, body: dict[str, Any] | None) -> None:
    """A 503 Conductor ErrorResponse, marked retryable."""
    assert status == 503, body
    assert body is not None
    assert body["status"] == 503
    assert body["code"] == "UNAVAILABLE"
    assert body["retryable"] is True
    assert body["message"]


# In process, on both backend pairs.


async def test_health_and_ready_answer_when_up(baton: Baton) -> None:
    status, _, body = await get(baton.session, f"{baton.url}/health")
    assert (status, body) == (200, {"healthy": True})
    status, _, body = await get(baton.session, f"{baton.url}/ready")
    assert (status, body) == (200, {"ready": True})


async def test_metrics_count_a_workflow(baton: Baton) -> None:
    task_type = unique("ops")
    workflow = unique("ops_wf")
    await baton.register_workflow(workflow, [task_type])
    _, before = await scrape(baton.session, baton.url)

    assert await baton.poll(task_type, timeout=0) == []
    await baton.start(workflow, {"x": 1})
    task = await baton.poll_until(task_type)
    status, body = await baton.complete(task, {"value": 2})
    assert status == 200, body
    families, after = await scrape(baton.session, baton.url)

    assert {
        "baton_queue_depth",
        "baton_polls",
        "baton_poll_wait_seconds",
        "baton_tasks_handed_out",
        "baton_task_updates",
        "baton_task_retries",
        "baton_task_timeouts",
        "baton_redeliveries",
        "baton_reconciled_tasks",
        "baton_long_polls_waiting",
        "baton_http_request_duration_seconds",
    } <= families

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("baton_polls_total", task_type=task_type, result="empty") == 1
    assert grew("baton_polls_total", task_type=task_type, result="tasks") == 1
    assert grew("baton_tasks_handed_out_total", task_type=task_type) == 1
    assert grew("baton_task_updates_total", status="COMPLETED") >= 1
    assert grew("baton_poll_wait_seconds_count") >= 2
    assert value(after, "baton_long_polls_waiting") == 0
    # The HTTP histogram is labelled with route templates, never raw paths.
    poll_count = grew(
        "baton_http_request_duration_seconds_count",
        method="GET",
        route=POLL_ROUTE,
        status="200",
    )
    assert poll_count >= 2
    routes = {
        dict(labels).get("route", "")
        for name, labels in after
        if name.startswith("baton_http_request_duration_seconds")
    }
    assert not any(task_type in route for route in routes), routes
    assert "/api/tasks" in routes


async def test_http_histogram_labels_a_poll_with_its_template(baton: Baton) -> None:
    _, before = await scrape(baton.session, baton.url)
    assert await baton.poll("xyz", timeout=0) == []
    status, _ = await baton.request("GET", "/no/such/route")
    assert status == 404
    _, after = await scrape(baton.session, baton.url)
    labels = {"method": "GET", "route": POLL_ROUTE, "status": "200"}
    name = "baton_http_request_duration_seconds_count"
    assert value(after, name, **labels) - value(before, name, **labels) == 1
    raw = {"method": "GET", "route": "/api/tasks/poll/batch/xyz", "status": "200"}
    assert value(after, name, **raw) == 0
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, name, **unmatched) > value(before, name, **unmatched)


async def test_queue_depth_gauge_matches_queue_size(baton: Baton) -> None:
    task_type = unique("depth")
    workflow = unique("depth_wf")
    await baton.register_workflow(workflow, [task_type])
    for x in range(2):
        await baton.start(workflow, {"x": x})

    async def gauge_matches() -> bool:
        status, size = await baton.request(
            "GET", "/tasks/queue/size", params={"taskType": task_type}
        )
        assert status == 200, size
        _, samples = await scrape(baton.session, baton.url)
        depth = value(samples, "baton_queue_depth", task_type=task_type, domain="")
        return bool(size == 2 and depth == size)

    await eventually(gauge_matches, "baton_queue_depth equals /queue/size (2)")


async def test_a_retry_is_counted(baton: Baton) -> None:
    task_type = unique("retry")
    workflow = unique("retry_wf")
    await baton.register_workflow(workflow, [task_type])
    _, before = await scrape(baton.session, baton.url)
    await baton.start(workflow, {"x": 1})
    task = await baton.poll_until(task_type)
    status, body = await baton.complete(task, status="FAILED")
    assert status == 200, body
    _, after = await scrape(baton.session, baton.url)
    name = "baton_task_retries_total"
    assert (
        value(after, name, task_type=task_type)
        - value(before, name, task_type=task_type)
        == 1
    )
    failed = value(after, "baton_task_updates_total", status="FAILED")
    assert failed - value(before, "baton_task_updates_total", status="FAILED") >= 1


async def test_polls_get_503_once_the_gateway_shuts_down(baton: Baton) -> None:
    app = build_app(baton.runtime)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    task_type = unique("drain")
    try:
        waiting = asyncio.create_task(
            get(baton.session, f"{url}/api/tasks/poll/batch/{task_type}?timeout=5000")
        )
        await eventually(lambda: _one_poll_waits(app), "the long poll waits", 5)
        started = time.monotonic()
        await app.shutdown()
        status, _, body = await waiting
        assert (status, body) == (200, [])
        assert time.monotonic() - started < 2
        status, _, body = await get(
            baton.session, f"{url}/api/tasks/poll/batch/{task_type}"
        )
        assert_unavailable(status, body)
        status, _, body = await get(baton.session, f"{url}/ready")
        assert_unavailable(status, body)
        status, _, body = await get(baton.session, f"{url}/health")
        assert (status, body) == (200, {"healthy": True})
    finally:
        await server.close()


async def _one_poll_waits(app: Any) -> bool:
    return bool(app[OPERATIONS].waiting_polls() == 1)


# Processes.


class TcpProxy:
    """Forwards a local port to a server; `cut` refuses and drops every
    connection until `restore`, as an outage of the server would."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        """Listen and forward again."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        """Stop listening and abort every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        self._writers.clear()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
async def mongo_proxy(mongodb_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the suite's MongoDB, and a URL that goes through it."""
    host, port = parse_uri(mongodb_url)["nodelist"][0]
    proxy = TcpProxy(host, port)
    await proxy.restore()
    url = mongodb_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}", 1)
    try:
        yield proxy, url
    finally:
        await proxy.cut()


async def test_a_store_outage_shows_on_ready_not_on_health(
    gateway_processes: GatewayProcesses,
    mongo_proxy: tuple[TcpProxy, str],
    mongo_database: str,
) -> None:
    proxy, url = mongo_proxy
    gateway = await gateway_processes.start(
        "store-outage",
        {"MONGODB_URL": url, "BATON_MONGODB_DATABASE": mongo_database},
    )
    base = gateway.url
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, _, body = await get(session, f"{base}/ready")
        assert (status, body) == (200, {"ready": True})

        await proxy.cut()
        (ready, _, ready_body), (route, _, route_body) = await asyncio.gather(
            get(session, f"{base}/ready"),
            get(session, f"{base}/api/metadata/taskdefs"),
        )
        assert_unavailable(ready, ready_body)
        assert_unavailable(route, route_body)
        status, _, body = await get(session, f"{base}/health")
        assert (status, body) == (200, {"healthy": True})
        status, text, _ = await get(session, f"{base}/metrics")
        assert status == 200
        assert "baton_polls" in text

        await proxy.restore()

        async def ready_again() -> bool:
            status, _, _ = await get(session, f"{base}/ready")
            return status == 200

        await eventually(ready_again, "/ready is 200 once MongoDB is back")

    gateway.signal(signal.SIGTERM)
    assert await gateway.wait_exit(10.0) == 0


def spawn_scheduler(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """Start `python -m services.scheduler` on embedded backends; its log
    goes to `<directory>/scheduler.log`."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BATON_") and key not in ("AMQP_URL", "MONGODB_URL")
    }
    environment.update(
        BATON_HOST="127.0.0.1",
        BATON_SCHEDULER_PORT=str(port),
        BATON_SQLITE_PATH=str(directory / "baton.db"),
        PYTHONUNBUFFERED="1",
    )
    with (directory / "scheduler.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.scheduler"],
            cwd=PROJECT_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_the_scheduler_serves_ready_and_metrics_and_exits_0(
    tmp_path: Path,
) -> None:
    port = free_port()
    process = spawn_scheduler(port, tmp_path)
    log_path = tmp_path / "scheduler.log"
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

            async def answers() -> bool:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    status, _, _ = await get(session, f"{base}/health")
                    return status == 200
                return False

            await eventually(answers, "the scheduler answers /health", 15)
            status, _, body = await get(session, f"{base}/ready")
            assert (status, body) == (200, {"ready": True})
            families, _ = await scrape(session, base)
            assert {"baton_reconciled_tasks", "baton_task_timeouts"} <= families
        process.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return process.poll() is not None

        await eventually(exited, "the scheduler exits after SIGTERM", 10)
        assert process.returncode == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_log_lines_are_json_with_trace_and_task_ids() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from shared.service import JsonFormatter

    record = logging.LogRecord(
        "baton.test", logging.INFO, __file__, 1, "task %s timed out", ("t-1",), None
    )
    record.task_id = "t-1"
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "baton.test"
    assert entry["message"] == "task t-1 timed out"
    assert entry["task_id"] == "t-1"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
