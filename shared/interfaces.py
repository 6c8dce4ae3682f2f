"""The broker and store contracts every adapter implements.

The store is the single source of truth for tasks and workflows; the
broker only carries pointers to tasks (`TaskMessage`). A message names the
task version it was published for, so a stale or duplicated message loses
the guarded claim in the store and is dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import msgspec

from shared.ids import random_hex
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

TIMER_QUEUE = "@timers"
"""Baton's own queue of timers; `@` cannot appear in a task type."""

SWEEP_QUEUE = "@sweep"
"""Baton's own queue of reconciliation tokens. Brokers deliver it to one
consumer at a time (RabbitMQ's single active consumer), so replicas of
the scheduler never reconcile at the same time."""


class TaskMessage(msgspec.Struct, array_like=True, frozen=True):
    """What travels through a queue: a task, the version it was published
    for, and an id unique to this publish.

    A timer is a TaskMessage with a `kind`; its `version` is the
    generation of the task state it guards (see `shared.timers`). Timers
    armed together travel as one message whose `batch` lists
    `(task_id, generation)` pairs.

    `trace` is the W3C `traceparent` of the span that published the
    message, empty when tracing is off; it lets the poll that hands the
    task out link back to that span (see `shared.adapters.traced`).
    """

    task_id: str
    version: int
    message_id: str
    kind: str = ""
    batch: tuple[tuple[str, int], ...] = ()
    trace: str = ""

    @classmethod
    def for_task(cls, task_id: str, version: int, kind: str = "") -> TaskMessage:
        return cls(task_id, version, random_hex(8), kind)

    def anew(self) -> TaskMessage:
        """The same message, batch included, as a publish of its own: a new
        id, and no trace of the span that published this one."""
        return msgspec.structs.replace(self, message_id=random_hex(8), trace="")


class VersionedTask(NamedTuple):
    """A task with its store version (incremented on every change)."""

    task: Task
    version: int


class QueueStats(NamedTuple):
    """Messages ready in a queue, and deliveries taken but not settled."""

    ready: int
    unacked: int


NO_HEADERS: Mapping[str, str] = MappingProxyType({})
"""The headers of a message published without any."""


class Delivery(ABC):
    """A message handed to a consumer, to be settled exactly once.

    Settling twice, or after the channel it came on is gone, does nothing:
    the broker has already returned or will return the message itself.
    `headers` are those the message was published with (string values
    only; broker-added headers such as `x-death` are not included).
    """

    message: TaskMessage
    redelivered: bool
    headers: Mapping[str, str] = NO_HEADERS

    @property
    def returned(self) -> bool:
        """True once the broker has taken the message back unsettled (the
        channel it came on closed): it will be delivered again. Brokers
        whose deliveries cannot outlive their consumer keep this False."""
        return False

    @abstractmethod
    async def ack(self) -> None:
        """Remove the message from the queue for good."""

    @abstractmethod
    async def requeue(self) -> None:
        """Return the message to its queue for another consumer."""


class Subscription(ABC):
    """A live consumer on one queue."""

    @abstractmethod
    async def cancel(self) -> None:
        """Stop new deliveries.

        Deliveries already passed to the callback stay valid and must still
        be settled; the adapter releases its channel once they are.
        """


DeliveryCallback = Callable[[Delivery], None]


class Broker(ABC):
    """Durable task queues with manual acks and delayed publishing.

    Queue names given to a broker are Baton's logical names
    (`taskType` or `domain:taskType`); adapters map them to their own
    namespace so that no user input can reach another queue or exchange.
    """

    @abstractmethod
    async def start(self) -> None:
        """Connect and declare the shared topology. Raises BrokerError."""

    @abstractmethod
    async def close(self) -> None:
        """Close every channel and the connection."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise BrokerError unless the broker answers."""

    @abstractmethod
    async def declare(self, queue: str) -> None:
        """Declare a task queue; idempotent and cached per process."""

    @abstractmethod
    async def publish(
        self,
        queue: str,
        messages: Sequence[TaskMessage],
        delay_seconds: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish messages durably; return once the broker confirmed all.

        With `delay_seconds` > 0 the messages reach the queue that many
        seconds later (1-second resolution). `headers` travel with every
        message, through delays and redeliveries, and come back as
        `Delivery.headers`. Raises BrokerError.
        """

    @abstractmethod
    async def subscribe(
        self, queue: str, prefetch: int, on_delivery: DeliveryCallback
    ) -> Subscription:
        """Start consuming with at most `prefetch` unsettled deliveries.

        `on_delivery` is called on the event loop for each delivery.
        """

    @abstractmethod
    async def stats(self, queue: str) -> QueueStats:
        """Ready messages (delayed ones excluded), and the deliveries this
        process holds unsettled (brokers do not report other consumers')."""


class RateWindow(NamedTuple):
    """A fixed window of a task type's rate limit, in epoch milliseconds."""

    start_ms: int
    length_ms: int

    @classmethod
    def at(cls, now_ms: int, length_ms: int) -> RateWindow:
        """The window of `length_ms` that holds `now_ms`."""
        return cls(now_ms - now_ms % length_ms, length_ms)


class Store(ABC):
    """Tasks, workflows, definitions, results, logs and poll data.

    Every state change is a single-document atomic update guarded by the
    expected state, so concurrent gateways and duplicate messages cannot
    move a task twice.
    """

    @abstractmethod
    async def start(self) -> None:
        """Connect and create indexes or tables. Raises StoreError."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    # Definitions.

    @abstractmethod
    async def upsert_task_defs(self, defs: Sequence[TaskDef]) -> None:
        """Create or replace task definitions by name."""

    @abstractmethod
    async def get_task_def(self, name: str) -> TaskDef | None:
        """Return the named task definition, or None."""

    @abstractmethod
    async def list_task_defs(self) -> list[TaskDef]:
        """Return every task definition, by name."""

    @abstractmethod
    async def delete_task_def(self, name: str) -> bool:
        """Delete a task definition; False if there was none."""

    @abstractmethod
    async def put_workflow_def(self, definition: WorkflowDef, overwrite: bool) -> bool:
        """Store a workflow definition under (name, version).

        Returns False, changing nothing, when that version exists and
        `overwrite` is false.
        """

    @abstractmethod
    async def get_workflow_def(
        self, name: str, version: int | None = None
    ) -> WorkflowDef | None:
        """Return a version of a workflow definition, the highest if None."""

    @abstractmethod
    async def list_workflow_defs(self) -> list[WorkflowDef]:
        """Return every version of every workflow definition."""

    # Workflows.

    @abstractmethod
    async def insert_workflow(
        self, workflow: Workflow, tasks: Sequence[Task] = ()
    ) -> None:
        """Store a new workflow (its `tasks` list is not stored), then
        `tasks` as `insert_tasks` does. Raises DuplicateKey for a known id."""

    @abstractmethod
    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        """Return a workflow without its tasks, or None."""

    @abstractmethod
    async def finish_workflow(
        self, workflow_id: str, status: WorkflowStatus, patch: Mapping[str, Any]
    ) -> Workflow | None:
        """Move a RUNNING workflow to `status`, setting the fields in `patch`.

        Returns the updated workflow, or None if it was not RUNNING.
        """

    # Tasks.

    @abstractmethod
    async def insert_tasks(self, tasks: Sequence[Task]) -> None:
        """Store new tasks at version 0; a task id already stored is skipped."""

    @abstractmethod
    async def get_task(self, task_id: str) -> VersionedTask | None:
        """Return a task with its version, or None."""

    @abstractmethod
    async def get_tasks(self, task_ids: Sequence[str]) -> list[VersionedTask]:
        """Return the tasks of `task_ids` that exist, in no set order, with
        one store round trip per thousand ids at most."""

    @abstractmethod
    async def workflow_tasks(self, workflow_id: str) -> list[Task]:
        """Return a workflow's tasks ordered by `seq`."""

    @abstractmethod
    async def claim_tasks(
        self, messages: Sequence[TaskMessage], worker_id: str | None, now: int
    ) -> list[Task]:
        """Hand out the tasks these messages point to; return the winners.

        A message wins when its task is SCHEDULED at the message's version,
        or when its task was claimed by this same message (same
        `message_id`) and has not changed since: a redelivery after the
        previous holder died before answering. A winner becomes IN_PROGRESS
        at version `message.version + 1` with `pollCount` incremented,
        `workerId` set, `callbackAfterSeconds` 0, `updateTime` now and
        `startTime` now if it was 0. Losers are left untouched.
        """

    @abstractmethod
    async def transition_task(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        expected_version: int | None = None,
    ) -> VersionedTask | None:
        """Atomically set `patch` (Task field names) if the task's status is
        one of `from_statuses` (and its version is `expected_version`, when
        given), incrementing its version.

        Returns the task after the change, or None if it is missing, in
        another status or at another version.
        """

    @abstractmethod
    async def record_result(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        result: TaskResult,
        received_at: int,
    ) -> tuple[VersionedTask, Workflow | None] | None:
        """`transition_task`, and only if it happened, `add_task_result`.

        Returns the task after the change and its workflow (None if the
        workflow is missing), or None when the transition did not happen.
        """

    @abstractmethod
    async def scheduled_tasks(
        self, task_type: str | None = None
    ) -> list[VersionedTask]:
        """Return SCHEDULED tasks, of one type or all; served by an index."""

    @abstractmethod
    async def in_progress_tasks(self) -> list[VersionedTask]:
        """Return IN_PROGRESS tasks; served by an index."""

    @abstractmethod
    async def running_workflow_ids(self) -> list[str]:
        """Return the ids of RUNNING workflows; served by an index."""

    @abstractmethod
    async def count_in_progress(self, task_type: str) -> int:
        """Count the IN_PROGRESS tasks of a type, every domain included;
        served by an index."""

    @abstractmethod
    async def take_rate_slots(
        self, task_type: str, window: RateWindow, limit: int, wanted: int
    ) -> int:
        """Reserve up to `wanted` hand-outs of `task_type` in `window`, at
        most `limit` in it across every caller; return how many were
        granted (0 to `wanted`). Records of ended windows may be dropped."""

    @abstractmethod
    async def release_rate_slots(
        self, task_type: str, window: RateWindow, count: int
    ) -> None:
        """Give back `count` slots of `window` that `take_rate_slots`
        granted and no hand-out used."""

    # History.

    @abstractmethod
    async def add_task_result(self, result: TaskResult, received_at: int) -> None:
        """Store an accepted TaskResult as its own document."""

    @abstractmethod
    async def task_results(self, task_id: str) -> list[TaskResult]:
        """Return a task's accepted results in the order they arrived."""

    @abstractmethod
    async def add_logs(
        self, task_id: str, logs: Sequence[TaskExecLog], keep: int | None = None
    ) -> None:
        """Append log lines to a task; with `keep`, then drop its oldest
        lines so that at most the newest `keep` remain."""

    @abstractmethod
    async def get_logs(self, task_id: str) -> list[TaskExecLog]:
        """Return a task's log lines in the order they were appended."""

    # Poll data and queues.

    @abstractmethod
    async def save_poll_data(self, entries: Sequence[PollData]) -> None:
        """Upsert the last poll per (queueName, domain)."""

    @abstractmethod
    async def get_poll_data(self, task_type: str | None = None) -> list[PollData]:
        """Return poll data for one task type (every domain), or all."""

    @abstractmethod
    async def register_queues(self, queues: Sequence[str]) -> None:
        """Remember logical queue names that have been used."""

    @abstractmethod
    async def list_queues(self) -> list[str]:
        """Return every logical queue name remembered, sorted."""
