"""Deferred actions as messages: timeouts that come back through the broker.

Every timer is a `TaskMessage` on `TIMER_QUEUE`, published with the delay
it waits, so it survives the restart of the process that armed it. A
timer names the task state it guards; when it fires for a task that has
moved on, it does nothing:

- `response`: armed at each hand-out, guards `pollCount`. An update since
  (`extendLease` included) moved `updateTime`, so the timer re-arms itself
  for the time left; with no update for `responseTimeoutSeconds` the task
  is TIMED_OUT and retried per its definition.
- `timeout`: armed at the first hand-out when `timeoutSeconds` > 0, guards
  `startTime`; applies the definition's `timeoutPolicy`.
- `poll`: armed at scheduling when `pollTimeoutSeconds` is set; fires
  while the task is still SCHEDULED and applies `timeoutPolicy`.
- `ack`: armed at each hand-out when an ack deadline applies, guards the
  store version: an ack or any update moves it. Otherwise the task goes
  back to its queue with the same id.

Arming is off the request path: timers are collected for up to
`flush_ms` and published as one batch message per kind and delay, so a
thousand hand-outs a second cost about one broker message a second. A
process that dies holding unpublished timers loses them; reconciliation
finds the IN_PROGRESS tasks they guarded once those are overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from shared.clock import now_ms
from shared.interfaces import TIMER_QUEUE, TaskMessage, VersionedTask
from shared.metrics import METRICS
from shared.models import PENDING_TASK_STATUSES, Task, TaskDef

if TYPE_CHECKING:
    from shared.engine import Engine

log = logging.getLogger(__name__)

_Key = tuple[str, int]
_MAX_BATCH = 1000
_FIRE_CONCURRENCY = 32

RESPONSE = "response"
TIMEOUT = "timeout"
POLL = "poll"
ACK = "ack"


def _seconds_until(due_ms: int, now: int) -> int:
    return max(1, -(-(due_ms - now) // 1000))


def task_def_of(task: Task) -> TaskDef:
    """The definition a task was scheduled with (embedded in the task)."""
    step = task.workflowTask
    if step and step.taskDefinition is not None:
        return step.taskDefinition
    return TaskDef(name=task.taskType)


class Timers:
    """Arms and fires the timers of an engine's tasks."""

    def __init__(
        self, engine: Engine, ack_timeout_seconds: int = 0, flush_ms: int = 1000
    ) -> None:
        self._engine = engine
        self._ack_timeout = ack_timeout_seconds
        self._flush_seconds = flush_ms / 1000
        self._pending: dict[_Key, list[tuple[str, int]]] = defaultdict(list)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    # Arming.

    def arm_handed_out(self, tasks: Sequence[Task], versions: dict[str, int]) -> None:
        """Arm the timers of tasks just handed out; `versions` are their
        store versions after the claim."""
        for task in tasks:
            definition = task_def_of(task)
            self._add(
                RESPONSE, task.responseTimeoutSeconds, task.taskId, task.pollCount
            )
            if definition.timeoutSeconds > 0 and task.pollCount == 1:
                self._add(
                    TIMEOUT, definition.timeoutSeconds, task.taskId, task.startTime
                )
            ack_after = self._ack_deadline(definition)
            if ack_after > 0:
                self._add(ACK, ack_after, task.taskId, versions[task.taskId])

    def arm_scheduled(self, tasks: Iterable[Task]) -> None:
        """Arm the poll timeout of tasks just scheduled, where one applies."""
        for task in tasks:
            poll_timeout = task_def_of(task).pollTimeoutSeconds
            if poll_timeout:
                delay = poll_timeout + task.startDelayInSeconds
                self._add(POLL, delay, task.taskId, 0)

    def _ack_deadline(self, definition: TaskDef) -> int:
        if definition.ackTimeoutSeconds is not None:
            return definition.ackTimeoutSeconds
        return self._ack_timeout

    def _add(self, kind: str, delay: int, task_id: str, generation: int) -> None:
        entries = self._pending[(kind, max(1, delay))]
        entries.append((task_id, generation))
        if len(entries) >= _MAX_BATCH:
            self._spawn_flush()
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self._flush_seconds, self._spawn_flush)

    def _spawn_flush(self) -> None:
        task = asyncio.ensure_future(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Publish every timer armed so far."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, defaultdict(list)
        for (kind, delay), entries in pending.items():
            message = TaskMessage.for_task("", 0, kind)
            batch = msgspec.structs.replace(message, batch=tuple(entries))
            await self._engine.send(TIMER_QUEUE, [batch], delay)

    async def close(self) -> None:
        """Publish what is armed and wait for flushes under way."""
        await self.flush()
        if self._flushing:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(self._flushing)

    async def _rearm(self, message: TaskMessage, seconds: int) -> None:
        await self._engine.send(TIMER_QUEUE, [message.anew()], seconds)

    # Firing.

    async def fire(self, message: TaskMessage) -> None:
        """Handle a timer (or a batch) that came back; stale ones do nothing.

        A batch reads its tasks with one store call per thousand timers.
        """
        store = self._engine.store
        if not message.batch:
            await self._handle(message, await store.get_task(message.task_id))
            return
        for start in range(0, len(message.batch), _MAX_BATCH):
            entries = message.batch[start : start + _MAX_BATCH]
            found = {
                entry.task.taskId: entry
                for entry in await store.get_tasks([task_id for task_id, _ in entries])
            }
            singles = [
                TaskMessage(task_id, generation, message.message_id, message.kind)
                for task_id, generation in entries
            ]
            for first in range(0, len(singles), _FIRE_CONCURRENCY):
                chunk = singles[first : first + _FIRE_CONCURRENCY]
                await asyncio.gather(
                    *(self._handle(one, found.get(one.task_id)) for one in chunk)
                )

    async def _handle(self, message: TaskMessage, found: VersionedTask | None) -> None:
        if found is None:
            return
        task, version = found
        now = now_ms()
        if message.kind == RESPONSE:
            await self._response(message, task, version, now)
        elif message.kind == TIMEOUT:
            await self._timeout(message, task, version, now)
        elif message.kind == POLL:
            await self._poll(message, task, version, now)
        elif message.kind == ACK:
            await self._ack(message, task, version, now)
        else:
            log.warning("unknown timer kind %r dropped", message.kind)

    async def _response(
        self, message: TaskMessage, task: Task, version: int, now: int
    ) -> None:
        if task.status != "IN_PROGRESS" or task.pollCount != message.version:
            return
        due = (
            task.updateTime
            + (task.responseTimeoutSeconds + task.callbackAfterSeconds) * 1000
        )
        if now < due:
            await self._rearm(message, _seconds_until(due, now))
            return
        reason = (
            f"responseTimeoutSeconds: {task.responseTimeoutSeconds} exceeded "
            "without an update from the worker"
        )
        METRICS.timeouts.labels(kind="response").inc()
        await self._time_out(task, version, reason, now, retry=True)

    async def _timeout(
        self, message: TaskMessage, task: Task, version: int, now: int
    ) -> None:
        if task.terminal or task.startTime != message.version:
            return
        limit = task_def_of(task).timeoutSeconds
        due = task.startTime + limit * 1000
        if now < due:
            await self._rearm(message, _seconds_until(due, now))
            return
        reason = f"Task timed out after {limit} seconds (timeoutSeconds: {limit})"
        METRICS.timeouts.labels(kind="timeout").inc()
        await self._apply_policy(task, version, reason, now)

    async def _poll(
        self, message: TaskMessage, task: Task, version: int, now: int
    ) -> None:
        if task.status != "SCHEDULED":
            return
        limit = task_def_of(task).pollTimeoutSeconds or 0
        due = (
            task.scheduledTime
            + (task.startDelayInSeconds + limit + task.callbackAfterSeconds) * 1000
        )
        if now < due:
            await self._rearm(message, _seconds_until(due, now))
            return
        reason = f"Task was not polled within pollTimeoutSeconds: {limit}"
        METRICS.timeouts.labels(kind="poll").inc()
        await self._apply_policy(task, version, reason, now)

    async def _ack(
        self, message: TaskMessage, task: Task, version: int, now: int
    ) -> None:
        if task.status != "IN_PROGRESS" or version != message.version:
            return
        back = await self._engine.store.transition_task(
            task.taskId,
            ("IN_PROGRESS",),
            {"status": "SCHEDULED", "updateTime": now},
            expected_version=version,
        )
        if back is not None:
            METRICS.timeouts.labels(kind="ack").inc()
            log.info(
                "task %s not acked in time, returned to its queue",
                task.taskId,
                extra={"task_id": task.taskId},
            )
            await self._engine.publish([back.task], back.version, 0)

    # Outcomes.

    async def _apply_policy(
        self, task: Task, version: int, reason: str, now: int
    ) -> None:
        policy = task_def_of(task).timeoutPolicy
        if policy == "ALERT_ONLY":
            log.warning("task %s: %s (ALERT_ONLY)", task.taskId, reason)
            return
        await self._time_out(task, version, reason, now, retry=policy == "RETRY")

    async def _time_out(
        self, task: Task, version: int, reason: str, now: int, *, retry: bool
    ) -> None:
        patch: dict[str, Any] = {
            "status": "TIMED_OUT",
            "reasonForIncompletion": reason,
            "endTime": now,
            "updateTime": now,
        }
        timed_out = await self._engine.store.transition_task(
            task.taskId, PENDING_TASK_STATUSES, patch, expected_version=version
        )
        if timed_out is None:
            return
        log.info(
            "task %s timed out: %s", task.taskId, reason, extra={"task_id": task.taskId}
        )
        if retry:
            await self._engine.decide(timed_out.task)
        else:
            await self._engine.fail_workflow_of(timed_out.task)
