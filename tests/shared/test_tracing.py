"""Tracing: a task's life as spans, trace context through the brokers, and
OTLP export over HTTP.

Every test builds its own `TracerProvider` and hands it to what it
traces, so no global provider is ever installed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from services.gateway.app import build_app
from shared.adapters.memory_broker import MemoryBroker
from shared.adapters.rabbitmq import RabbitMQBroker
from shared.adapters.sqlite_store import SQLiteStore
from shared.adapters.traced import TracedBroker, TracedStore
from shared.config import Settings
from shared.interfaces import TIMER_QUEUE, Broker, Delivery, TaskMessage
from shared.runtime import Runtime
from shared.telemetry import setup_tracing, tracing_configured, tracing_middleware
from tests.fixtures.rabbitmq import AmqpNames

SECRET = "input-value-that-must-not-leak-7f3a"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Spans finished by `provider`, kept in memory."""
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A private provider exporting synchronously to `exporter`."""
    made = TracerProvider(shutdown_on_exit=False)
    made.add_span_processor(SimpleSpanProcessor(exporter))
    yield made
    made.shutdown()


class Gateway:
    """A traced gateway on a real socket and a client for it."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.api = f"{url}/api"

    async def call(
        self, method: str, path: str, *, json: Any = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """Send a request; return the status and decoded body."""
        async with self.session.request(
            method, f"{self.api}{path}", json=json, **kwargs
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


@pytest.fixture
async def gateway(
    tmp_path: Path, provider: TracerProvider
) -> AsyncIterator[tuple[Gateway, Runtime]]:
    """The gateway on the embedded backends, traced into `provider`."""
    settings = Settings(
        sqlite_path=str(tmp_path / "baton.db"),
        consumer_linger_ms=200,
        poll_data_flush_ms=50,
        definition_cache_ms=0,
        timer_flush_ms=50,
    )
    runtime = Runtime(settings, tracer_provider=provider)
    await runtime.start()
    app = build_app(runtime)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        yield Gateway(session, url), runtime
    await server.close()
    await runtime.stop()


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        span
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


async def test_a_task_life_is_one_span_tree_linked_to_its_poll(
    gateway: tuple[Gateway, Runtime], exporter: InMemorySpanExporter
) -> None:
    client, runtime = gateway
    assert runtime.tracing
    assert isinstance(runtime.store, TracedStore)
    assert isinstance(runtime.broker, TracedBroker)
    task_type = f"traced_{uuid.uuid4().hex[:8]}"
    definition = {
        "name": f"wf_{task_type}",
        "version": 1,
        "tasks": [
            {
                "name": task_type,
                "taskReferenceName": "t0",
                "type": "SIMPLE",
                "inputParameters": {"value": "${workflow.input.secret}"},
            }
        ],
    }
    status, body = await client.call("POST", "/metadata/workflow", json=definition)
    assert status == 200, body
    status, workflow_id = await client.call(
        "POST",
        "/workflow",
        json={"name": definition["name"], "input": {"secret": SECRET}},
    )
    assert status == 200, workflow_id
    status, tasks = await client.call(
        "GET",
        f"/tasks/poll/batch/{task_type}",
        params={"count": 1, "timeout": 5000, "workerid": "w-1"},
    )
    assert status == 200 and len(tasks) == 1, tasks
    [task] = tasks
    assert task["inputData"] == {"value": SECRET}
    status, _ = await client.call(
        "POST",
        "/tasks",
        json={
            "taskId": task["taskId"],
            "workflowInstanceId": workflow_id,
            "status": "COMPLETED",
            "outputData": {"echo": SECRET},
        },
    )
    assert status == 200
    status, _ = await client.call("GET", f"/tasks/{uuid.uuid4()}")
    assert status == 404

    spans = list(exporter.get_finished_spans())
    task_id = task["taskId"]

    start = _one(spans, "POST /api/workflow")
    assert start.kind is SpanKind.SERVER
    assert start.attributes is not None
    assert start.attributes["http.route"] == "/api/workflow"
    assert start.attributes["http.response.status_code"] == 200
    under_start = _children(spans, start)
    names = {span.name for span in under_start}
    assert {"INSERT workflows", f"publish {task_type}"} <= names, names

    publish = next(s for s in under_start if s.name == f"publish {task_type}")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == task_type
    assert publish.attributes["messaging.operation.type"] == "send"
    assert publish.attributes["baton.task_id"] == task_id
    assert publish.attributes["baton.task_type"] == task_type
    assert publish.context is not None

    insert = next(s for s in under_start if s.name == "INSERT workflows")
    assert insert.kind is SpanKind.CLIENT
    assert insert.attributes is not None
    assert insert.attributes["db.system.name"] == "sqlite"
    assert insert.attributes["db.collection.name"] == "workflows"
    assert insert.attributes["db.operation.name"] == "INSERT"
    assert insert.attributes["baton.workflow_id"] == workflow_id
    assert insert.attributes["baton.task_id"] == task_id

    poll = _one(spans, "GET /api/tasks/poll/batch/{taskType}")
    assert poll.attributes is not None
    assert poll.attributes["url.path"] == f"/api/tasks/poll/batch/{task_type}"
    receive = _one(spans, f"receive {task_type}")
    assert receive.kind is SpanKind.CLIENT
    assert receive.parent is not None and poll.context is not None
    assert receive.parent.span_id == poll.context.span_id
    assert receive.attributes is not None
    assert receive.attributes["baton.task_id"] == task_id
    assert receive.attributes["baton.workflow_id"] == workflow_id
    assert receive.attributes["messaging.operation.type"] == "receive"
    linked = [link.context.span_id for link in receive.links]
    assert linked == [publish.context.span_id]
    claim = _children(spans, receive)
    assert [span.name for span in claim] == ["UPDATE tasks"]
    assert claim[0].attributes is not None
    assert claim[0].attributes["baton.task_id"] == task_id

    update = _one(spans, "POST /api/tasks")
    recorded = [s for s in _children(spans, update) if s.name == "UPDATE tasks"]
    assert recorded and recorded[0].attributes is not None
    assert recorded[0].attributes["code.function.name"] == "record_result"
    assert recorded[0].attributes["baton.task_status"] == "COMPLETED"

    missing = _one(spans, "GET /api/tasks/{taskId}")
    assert missing.attributes is not None
    assert missing.attributes["http.response.status_code"] == 404
    assert missing.status.status_code is StatusCode.UNSET

    for span in spans:
        for value in (span.attributes or {}).values():
            assert SECRET not in str(value), span.name


async def test_untraced_runtime_wraps_nothing(tmp_path: Path) -> None:
    assert not tracing_configured({"OTEL_SERVICE_NAME": "x"})
    assert not tracing_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}
    )
    assert setup_tracing("baton", {}, install=False) is None
    if not tracing_configured():
        assert tracing_middleware(None) is None
    runtime = Runtime(
        Settings(sqlite_path=str(tmp_path / "baton.db")),
        tracer_provider=None,
    )
    if not tracing_configured():
        assert not runtime.tracing
        assert isinstance(runtime.store, SQLiteStore)
        assert isinstance(runtime.broker, MemoryBroker)


async def test_server_error_sets_error_status(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    middleware = tracing_middleware(provider)
    assert middleware is not None
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/broken/{name}", broken)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                server.make_url("/broken/x"), headers={"traceparent": parent}
            ) as response,
        ):
            assert response.status == 503
    finally:
        await server.close()
    span = _one(list(exporter.get_finished_spans()), "GET /broken/{name}")
    assert span.status.status_code is StatusCode.ERROR
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == parent.split("-")[1]


async def _traced_round_trip(
    inner: Broker, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Publish with a delay through the ladder; check what arrives."""
    broker = TracedBroker(inner, provider)
    await broker.start()
    try:
        queue = f"q-{uuid.uuid4().hex[:12]}"
        await broker.declare(queue)
        message = TaskMessage.for_task(uuid.uuid4().hex, 3)
        await broker.publish(queue, [message], 1, {"x-custom": "a", "tenant": "b"})
        arrived: asyncio.Queue[Delivery] = asyncio.Queue()
        await broker.subscribe(queue, 5, arrived.put_nowait)
        delivery = await asyncio.wait_for(arrived.get(), 10)
        await delivery.ack()
    finally:
        await broker.close()
    publish = _one(list(exporter.get_finished_spans()), f"publish {queue}")
    assert publish.context is not None
    traceparent = delivery.headers["traceparent"]
    assert traceparent.split("-")[2] == format(publish.context.span_id, "016x")
    assert delivery.headers["tenant"] == "b"
    assert delivery.message.trace == traceparent
    assert delivery.message.task_id == message.task_id
    assert delivery.message.message_id == message.message_id


async def test_headers_survive_the_memory_broker_delay(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    await _traced_round_trip(MemoryBroker(), provider, exporter)


async def test_headers_survive_the_rabbitmq_delay_ladder(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    amqp_url: str,
    broker_prefix: str,
    amqp_names: AmqpNames,
) -> None:
    inner = RabbitMQBroker(amqp_url, prefix=broker_prefix)
    try:
        await _traced_round_trip(inner, provider, exporter)
    finally:
        amqp_names.add(*inner.topology_names())


async def test_internal_queue_deliveries_are_processed_under_a_linked_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    broker = TracedBroker(MemoryBroker(), provider)
    await broker.start()
    tracer = provider.get_tracer("test")
    seen: list[str] = []
    done = asyncio.Event()

    def on_timer(delivery: Delivery) -> None:
        with tracer.start_as_current_span("fire"):
            seen.append(delivery.message.kind)
        done.set()

    try:
        await broker.subscribe(TIMER_QUEUE, 5, on_timer)
        with tracer.start_as_current_span("request"):
            await broker.publish(TIMER_QUEUE, [TaskMessage.for_task("t", 1, "ack")])
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await broker.close()
    spans = list(exporter.get_finished_spans())
    publish = _one(spans, f"publish {TIMER_QUEUE}")
    process = _one(spans, f"process {TIMER_QUEUE}")
    fire = _one(spans, "fire")
    assert seen == ["ack"]
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is None
    assert publish.context is not None and process.context is not None
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert fire.parent is not None
    assert fire.parent.span_id == process.context.span_id


async def test_spans_are_exported_over_otlp_http() -> None:
    bodies: list[bytes] = []
    received = asyncio.Event()

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        received.set()
        return web.Response(body=b"", content_type="application/x-protobuf", status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    receiver = TestServer(app, host="127.0.0.1")
    await receiver.start_server()
    endpoint = str(receiver.make_url("")).rstrip("/")
    made = setup_tracing(
        "baton-default",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "baton-test"},
        install=False,
    )
    assert made is not None
    try:
        with made.get_tracer("test").start_as_current_span("exported-span"):
            pass
        flushed = await asyncio.to_thread(made.force_flush, 10_000)
        assert flushed
        await asyncio.wait_for(received.wait(), 10)
    finally:
        await asyncio.to_thread(made.shutdown)
        await receiver.close()

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    export = ExportTraceServiceRequest()
    export.ParseFromString(b"".join(bodies))
    [resource_spans] = export.resource_spans
    service = {
        kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
    }
    assert service["service.name"] == "baton-test"
    names = [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert names == ["exported-span"]
