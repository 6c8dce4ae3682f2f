"""Tracing decorators around any broker and any store.

`TracedBroker` makes a PRODUCER span `publish {queue}` for every publish
and puts that span's W3C `traceparent` both in the message headers and
on each `TaskMessage` (`trace`). The poll that hands a task out never
sees a delivery's headers, only its messages, so `TracedStore` opens the
claim as a CLIENT span `receive {queue}` linked to the `trace` of every
message claimed: a task's trace is the span tree of the request that
scheduled it, and the poll that took it points back there.

Baton's own queues (timers, reconciliation tokens) are consumed by a
callback that starts the work: for those, each delivery gets a CONSUMER
span `process {queue}`, linked to its publish, that is current while the
callback runs, so the work it spawns is traced under it.

`TracedStore` wraps every data call in a CLIENT span
`{operation} {collection}` with the `db.*` attributes of the semantic
conventions and Baton's ids (`baton.task_id`, `baton.workflow_id`,
`baton.task_type`, `baton.domain`). No payload (input, output, logs)
ever becomes an attribute.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind

from shared.interfaces import (
    Broker,
    Delivery,
    DeliveryCallback,
    QueueStats,
    RateWindow,
    Store,
    Subscription,
    TaskMessage,
    VersionedTask,
)
from shared.models import (
    PollData,
    Task,
    TaskDef,
    TaskExecLog,
    TaskResult,
    Workflow,
    WorkflowDef,
    WorkflowStatus,
)
from shared.queues import queue_name, split_queue_name
from shared.telemetry import PROPAGATOR, get_tracer

Attributes = dict[str, str | int]

_SQL_OPERATIONS = {
    "find": "SELECT",
    "insert": "INSERT",
    "update": "UPDATE",
    "findAndModify": "UPDATE",
    "delete": "DELETE",
    "bulkWrite": "INSERT",
    "aggregate": "SELECT",
}


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` of a span, or "" if it has no valid context."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def span_context_of(traceparent: str) -> SpanContext | None:
    """The remote span context a `traceparent` names, or None if invalid."""
    if not traceparent:
        return None
    extracted = PROPAGATOR.extract({"traceparent": traceparent})
    context = trace.get_current_span(extracted).get_span_context()
    return context if context.is_valid else None


def _links(traceparents: Sequence[str]) -> list[Link]:
    links: list[Link] = []
    seen: set[str] = set()
    for traceparent in traceparents:
        if traceparent in seen:
            continue
        seen.add(traceparent)
        context = span_context_of(traceparent)
        if context is not None:
            links.append(Link(context))
    return links


def _queue_attributes(queue: str) -> Attributes:
    attributes: Attributes = {"messaging.destination.name": queue}
    if not queue.startswith("@"):
        task_type, domain = split_queue_name(queue)
        attributes["baton.task_type"] = task_type
        if domain:
            attributes["baton.domain"] = domain
    return attributes


def _message_attributes(messages: Sequence[TaskMessage]) -> Attributes:
    attributes: Attributes = {"messaging.batch.message_count": len(messages)}
    if len(messages) == 1:
        message = messages[0]
        if message.task_id:
            attributes["baton.task_id"] = message.task_id
        attributes["messaging.message.id"] = message.message_id
        if message.kind:
            attributes["baton.timer.kind"] = message.kind
    return attributes


def task_attributes(task: Task) -> Attributes:
    """Baton's ids for a task: id, workflow, type and domain, if known."""
    attributes: Attributes = {"baton.task_id": task.taskId}
    if task.workflowInstanceId:
        attributes["baton.workflow_id"] = task.workflowInstanceId
    if task.taskType:
        attributes["baton.task_type"] = task.taskType
    if task.domain:
        attributes["baton.domain"] = task.domain
    return attributes


def _tasks_attributes(tasks: Sequence[Task]) -> Attributes:
    if len(tasks) == 1:
        return task_attributes(tasks[0])
    attributes: Attributes = {"baton.task_count": len(tasks)}
    workflows = {task.workflowInstanceId for task in tasks}
    if len(workflows) == 1:
        workflow_id = workflows.pop()
        if workflow_id:
            attributes["baton.workflow_id"] = workflow_id
    return attributes


class TracedBroker(Broker):
    """Any broker, with publish spans and trace context on every message."""

    def __init__(
        self,
        inner: Broker,
        provider: trace.TracerProvider | None = None,
        *,
        messaging_system: str = "rabbitmq",
    ) -> None:
        self.inner = inner
        self._tracer = get_tracer(provider)
        self._system = messaging_system

    async def start(self) -> None:
        """Start the wrapped broker."""
        await self.inner.start()

    async def close(self) -> None:
        """Close the wrapped broker."""
        await self.inner.close()

    async def ping(self) -> None:
        """Ping the wrapped broker."""
        await self.inner.ping()

    async def declare(self, queue: str) -> None:
        """Declare a queue on the wrapped broker."""
        await self.inner.declare(queue)

    async def publish(
        self,
        queue: str,
        messages: Sequence[TaskMessage],
        delay_seconds: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish inside a PRODUCER span carrying its context along."""
        attributes: Attributes = {
            "messaging.system": self._system,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            **_queue_attributes(queue),
            **_message_attributes(messages),
        }
        if delay_seconds:
            attributes["baton.delay_seconds"] = delay_seconds
        parent: otel_context.Context | None = None
        links: list[Link] = []
        if any(message.batch for message in messages):
            # A batch of timers serves many tasks: it starts its own trace
            # rather than joining whichever request happened to arm first.
            parent = otel_context.Context()
            current = trace.get_current_span().get_span_context()
            if current.is_valid:
                links.append(Link(current))
        with self._tracer.start_as_current_span(
            f"publish {queue}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
        ) as span:
            traceparent = traceparent_of(span)
            if traceparent:
                carried = dict(headers or {})
                carried["traceparent"] = traceparent
                headers = carried
                messages = [
                    msgspec.structs.replace(message, trace=traceparent)
                    for message in messages
                ]
            await self.inner.publish(queue, messages, delay_seconds, headers)

    async def subscribe(
        self, queue: str, prefetch: int, on_delivery: DeliveryCallback
    ) -> Subscription:
        """Subscribe; Baton's own queues get a `process` span per delivery."""
        if not queue.startswith("@"):
            return await self.inner.subscribe(queue, prefetch, on_delivery)
        tracer = self._tracer
        base: Attributes = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            **_queue_attributes(queue),
        }

        def traced(delivery: Delivery) -> None:
            traceparent = delivery.headers.get("traceparent") or delivery.message.trace
            attributes = {**base, **_message_attributes([delivery.message])}
            if delivery.redelivered:
                attributes["baton.redelivered"] = 1
            span = tracer.start_span(
                f"process {queue}",
                context=otel_context.Context(),
                kind=SpanKind.CONSUMER,
                links=_links([traceparent]),
                attributes=attributes,
            )
            with trace.use_span(span, end_on_exit=True):
                on_delivery(delivery)

        return await self.inner.subscribe(queue, prefetch, traced)

    async def stats(self, queue: str) -> QueueStats:
        """Queue statistics from the wrapped broker."""
        return await self.inner.stats(queue)


class TracedStore(Store):
    """Any store, with a CLIENT span around every data call."""

    def __init__(
        self,
        inner: Store,
        provider: trace.TracerProvider | None = None,
        *,
        db_system: str = "mongodb",
        messaging_system: str = "rabbitmq",
    ) -> None:
        self.inner = inner
        self._tracer = get_tracer(provider)
        self._db_system = db_system
        self._messaging_system = messaging_system

    @contextmanager
    def _span(
        self,
        operation: str,
        collection: str,
        function: str,
        attributes: Attributes | None = None,
    ) -> Iterator[Span]:
        if self._db_system != "mongodb":
            operation = _SQL_OPERATIONS.get(operation, operation)
        every: Attributes = {
            "db.system.name": self._db_system,
            "db.collection.name": collection,
            "db.operation.name": operation,
            "code.function.name": function,
        }
        if attributes:
            every.update(attributes)
        with self._tracer.start_as_current_span(
            f"{operation} {collection}", kind=SpanKind.CLIENT, attributes=every
        ) as span:
            yield span

    async def start(self) -> None:
        """Start the wrapped store."""
        await self.inner.start()

    async def close(self) -> None:
        """Close the wrapped store."""
        await self.inner.close()

    async def ping(self) -> None:
        """Ping the wrapped store (not traced: health probes are frequent)."""
        await self.inner.ping()

    # Definitions.

    async def upsert_task_defs(self, defs: Sequence[TaskDef]) -> None:
        """Traced `Store.upsert_task_defs`."""
        with self._span("bulkWrite", "task_defs", "upsert_task_defs"):
            await self.inner.upsert_task_defs(defs)

    async def get_task_def(self, name: str) -> TaskDef | None:
        """Traced `Store.get_task_def`."""
        with self._span("find", "task_defs", "get_task_def", {"baton.task_type": name}):
            return await self.inner.get_task_def(name)

    async def list_task_defs(self) -> list[TaskDef]:
        """Traced `Store.list_task_defs`."""
        with self._span("find", "task_defs", "list_task_defs"):
            return await self.inner.list_task_defs()

    async def delete_task_def(self, name: str) -> bool:
        """Traced `Store.delete_task_def`."""
        attributes: Attributes = {"baton.task_type": name}
        with self._span("delete", "task_defs", "delete_task_def", attributes):
            return await self.inner.delete_task_def(name)

    async def put_workflow_def(self, definition: WorkflowDef, overwrite: bool) -> bool:
        """Traced `Store.put_workflow_def`."""
        attributes: Attributes = {"baton.workflow_name": definition.name}
        with self._span("update", "workflow_defs", "put_workflow_def", attributes):
            return await self.inner.put_workflow_def(definition, overwrite)

    async def get_workflow_def(
        self, name: str, version: int | None = None
    ) -> WorkflowDef | None:
        """Traced `Store.get_workflow_def`."""
        attributes: Attributes = {"baton.workflow_name": name}
        with self._span("find", "workflow_defs", "get_workflow_def", attributes):
            return await self.inner.get_workflow_def(name, version)

    async def list_workflow_defs(self) -> list[WorkflowDef]:
        """Traced `Store.list_workflow_defs`."""
        with self._span("find", "workflow_defs", "list_workflow_defs"):
            return await self.inner.list_workflow_defs()

    # Workflows.

    async def insert_workflow(
        self, workflow: Workflow, tasks: Sequence[Task] = ()
    ) -> None:
        """Traced `Store.insert_workflow`."""
        attributes: Attributes = {}
        if tasks:
            attributes.update(_tasks_attributes(tasks))
        attributes["baton.workflow_id"] = workflow.workflowId
        attributes["baton.workflow_name"] = workflow.workflowName
        with self._span("insert", "workflows", "insert_workflow", attributes):
            await self.inner.insert_workflow(workflow, tasks)

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        """Traced `Store.get_workflow`."""
        attributes: Attributes = {"baton.workflow_id": workflow_id}
        with self._span("find", "workflows", "get_workflow", attributes):
            return await self.inner.get_workflow(workflow_id)

    async def finish_workflow(
        self, workflow_id: str, status: WorkflowStatus, patch: Mapping[str, Any]
    ) -> Workflow | None:
        """Traced `Store.finish_workflow`."""
        attributes: Attributes = {
            "baton.workflow_id": workflow_id,
            "baton.workflow_status": status,
        }
        with self._span("findAndModify", "workflows", "finish_workflow", attributes):
            return await self.inner.finish_workflow(workflow_id, status, patch)

    # Tasks.

    async def insert_tasks(self, tasks: Sequence[Task]) -> None:
        """Traced `Store.insert_tasks`."""
        attributes = _tasks_attributes(tasks)
        with self._span("insert", "tasks", "insert_tasks", attributes):
            await self.inner.insert_tasks(tasks)

    async def get_task(self, task_id: str) -> VersionedTask | None:
        """Traced `Store.get_task`."""
        with self._span("find", "tasks", "get_task", {"baton.task_id": task_id}):
            return await self.inner.get_task(task_id)

    async def get_tasks(self, task_ids: Sequence[str]) -> list[VersionedTask]:
        """Traced `Store.get_tasks`."""
        with self._span("find", "tasks", "get_tasks", {"baton.tasks": len(task_ids)}):
            return await self.inner.get_tasks(task_ids)

    async def workflow_tasks(self, workflow_id: str) -> list[Task]:
        """Traced `Store.workflow_tasks`."""
        attributes: Attributes = {"baton.workflow_id": workflow_id}
        with self._span("find", "tasks", "workflow_tasks", attributes):
            return await self.inner.workflow_tasks(workflow_id)

    async def claim_tasks(
        self, messages: Sequence[TaskMessage], worker_id: str | None, now: int
    ) -> list[Task]:
        """A `receive` span linked to each message's publish, around the
        traced claim; named after the queue of the tasks it won."""
        attributes: Attributes = {
            "messaging.system": self._messaging_system,
            "messaging.operation.type": "receive",
            "messaging.operation.name": "receive",
            **_message_attributes(messages),
        }
        if worker_id:
            attributes["baton.worker_id"] = worker_id
        with self._tracer.start_as_current_span(
            "receive",
            kind=SpanKind.CLIENT,
            links=_links([message.trace for message in messages]),
            attributes=attributes,
        ) as receive:
            with self._span("update", "tasks", "claim_tasks") as claim:
                tasks = await self.inner.claim_tasks(messages, worker_id, now)
                claimed: Attributes = {"baton.claimed_count": len(tasks)}
                if tasks:
                    claimed.update(_tasks_attributes(tasks))
                claim.set_attributes(claimed)
            receive.set_attributes(claimed)
            queues = {queue_name(task.taskType, task.domain or None) for task in tasks}
            if len(queues) == 1:
                queue = queues.pop()
                receive.update_name(f"receive {queue}")
                receive.set_attributes(_queue_attributes(queue))
            return tasks

    async def transition_task(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        expected_version: int | None = None,
    ) -> VersionedTask | None:
        """Traced `Store.transition_task`."""
        attributes: Attributes = {"baton.task_id": task_id}
        status = patch.get("status")
        if isinstance(status, str):
            attributes["baton.task_status"] = status
        with self._span("findAndModify", "tasks", "transition_task", attributes) as sp:
            moved = await self.inner.transition_task(
                task_id, from_statuses, patch, expected_version
            )
            if moved is not None:
                sp.set_attributes(task_attributes(moved.task))
            return moved

    async def record_result(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        result: TaskResult,
        received_at: int,
    ) -> tuple[VersionedTask, Workflow | None] | None:
        """Traced `Store.record_result`."""
        attributes: Attributes = {"baton.task_id": task_id}
        if result.workflowInstanceId:
            attributes["baton.workflow_id"] = result.workflowInstanceId
        if result.status:
            attributes["baton.task_status"] = result.status
        with self._span("findAndModify", "tasks", "record_result", attributes) as sp:
            recorded = await self.inner.record_result(
                task_id, from_statuses, patch, result, received_at
            )
            if recorded is not None:
                sp.set_attributes(task_attributes(recorded[0].task))
            return recorded

    async def scheduled_tasks(
        self, task_type: str | None = None
    ) -> list[VersionedTask]:
        """Traced `Store.scheduled_tasks`."""
        attributes: Attributes = {"baton.task_type": task_type} if task_type else {}
        with self._span("find", "tasks", "scheduled_tasks", attributes):
            return await self.inner.scheduled_tasks(task_type)

    async def in_progress_tasks(self) -> list[VersionedTask]:
        """Traced `Store.in_progress_tasks`."""
        with self._span("find", "tasks", "in_progress_tasks"):
            return await self.inner.in_progress_tasks()

    async def running_workflow_ids(self) -> list[str]:
        """Traced `Store.running_workflow_ids`."""
        with self._span("find", "workflows", "running_workflow_ids"):
            return await self.inner.running_workflow_ids()

    async def count_in_progress(self, task_type: str) -> int:
        """Traced `Store.count_in_progress`."""
        attributes: Attributes = {"baton.task_type": task_type}
        with self._span("aggregate", "tasks", "count_in_progress", attributes):
            return await self.inner.count_in_progress(task_type)

    async def take_rate_slots(
        self, task_type: str, window: RateWindow, limit: int, wanted: int
    ) -> int:
        """Traced `Store.take_rate_slots`."""
        attributes: Attributes = {"baton.task_type": task_type}
        with self._span("update", "rate_windows", "take_rate_slots", attributes):
            return await self.inner.take_rate_slots(task_type, window, limit, wanted)

    async def release_rate_slots(
        self, task_type: str, window: RateWindow, count: int
    ) -> None:
        """Traced `Store.release_rate_slots`."""
        attributes: Attributes = {"baton.task_type": task_type}
        with self._span("update", "rate_windows", "release_rate_slots", attributes):
            await self.inner.release_rate_slots(task_type, window, count)

    # History.

    async def add_task_result(self, result: TaskResult, received_at: int) -> None:
        """Traced `Store.add_task_result`."""
        attributes: Attributes = {}
        if result.taskId:
            attributes["baton.task_id"] = result.taskId
        if result.workflowInstanceId:
            attributes["baton.workflow_id"] = result.workflowInstanceId
        with self._span("insert", "task_results", "add_task_result", attributes):
            await self.inner.add_task_result(result, received_at)

    async def task_results(self, task_id: str) -> list[TaskResult]:
        """Traced `Store.task_results`."""
        attributes: Attributes = {"baton.task_id": task_id}
        with self._span("find", "task_results", "task_results", attributes):
            return await self.inner.task_results(task_id)

    async def add_logs(
        self, task_id: str, logs: Sequence[TaskExecLog], keep: int | None = None
    ) -> None:
        """Traced `Store.add_logs`."""
        attributes: Attributes = {"baton.task_id": task_id}
        with self._span("insert", "task_logs", "add_logs", attributes):
            await self.inner.add_logs(task_id, logs, keep)

    async def get_logs(self, task_id: str) -> list[TaskExecLog]:
        """Traced `Store.get_logs`."""
        with self._span("find", "task_logs", "get_logs", {"baton.task_id": task_id}):
            return await self.inner.get_logs(task_id)

    # Poll data and queues.

    async def save_poll_data(self, entries: Sequence[PollData]) -> None:
        """Traced `Store.save_poll_data`."""
        with self._span("bulkWrite", "poll_data", "save_poll_data"):
            await self.inner.save_poll_data(entries)

    async def get_poll_data(self, task_type: str | None = None) -> list[PollData]:
        """Traced `Store.get_poll_data`."""
        attributes: Attributes = {"baton.task_type": task_type} if task_type else {}
        with self._span("find", "poll_data", "get_poll_data", attributes):
            return await self.inner.get_poll_data(task_type)

    async def register_queues(self, queues: Sequence[str]) -> None:
        """Traced `Store.register_queues`."""
        with self._span("bulkWrite", "queues", "register_queues"):
            await self.inner.register_queues(queues)

    async def list_queues(self) -> list[str]:
        """Traced `Store.list_queues`."""
        with self._span("find", "queues", "list_queues"):
            return await self.inner.list_queues()
