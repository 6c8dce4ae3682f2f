"""Reconciliation: find tasks the queues lost, and put them back.

A SCHEDULED task whose message is missing (a broker crash, a dead letter
dropped between delay tiers, a publish that failed after the store
write) would wait forever. A sweep counts, per queue, the SCHEDULED tasks
that have been due for longer than a grace period; when the queue holds
fewer ready messages than that, it re-publishes them. Tasks whose message
is still there get a second one, which the guarded claim absorbs; after
the sweep the queue holds at least as many messages as overdue tasks, so
the next sweep adds nothing.

IN_PROGRESS tasks whose response timer was lost are caught the same way:
one overdue by more than the grace period gets its timer handled at once.

The sweep reads only SCHEDULED and IN_PROGRESS tasks through the status
index: its cost follows the tasks in flight, never the finished ones.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import NamedTuple

from shared.clock import now_ms
from shared.engine import due_time, task_queue
from shared.interfaces import TaskMessage, VersionedTask
from shared.metrics import METRICS
from shared.runtime import Runtime
from shared.timers import RESPONSE

log = logging.getLogger(__name__)


class SweepResult(NamedTuple):
    """What one sweep found and did."""

    republished: int
    timed_out_checks: int


class Reconciler:
    """Brings the queues and timers back in line with the store."""

    def __init__(self, runtime: Runtime) -> None:
        self._store = runtime.store
        self._broker = runtime.broker
        self._engine = runtime.engine
        self._grace_ms = runtime.settings.reconcile_grace_seconds * 1000

    async def sweep(self, grace_ms: int | None = None) -> SweepResult:
        """Re-publish lost messages and fire lost response timers.

        Only tasks overdue by more than `grace_ms` (default: the configured
        grace period) count as lost.
        """
        cutoff = now_ms() - (self._grace_ms if grace_ms is None else grace_ms)
        republished = await self._lost_messages(cutoff)
        checked = await self._lost_timers(cutoff)
        if republished or checked:
            log.info(
                "reconciled: %d tasks re-published, %d response timeouts checked",
                republished,
                checked,
            )
        return SweepResult(republished, checked)

    async def _lost_messages(self, cutoff: int) -> int:
        overdue: dict[str, list[VersionedTask]] = defaultdict(list)
        for entry in await self._store.scheduled_tasks():
            if due_time(entry.task) <= cutoff:
                overdue[task_queue(entry.task)].append(entry)
        republished = 0
        for queue, entries in overdue.items():
            stats = await self._broker.stats(queue)
            if stats.ready + stats.unacked < len(entries):
                await self._engine.republish(entries)
                republished += len(entries)
                METRICS.reconciled.inc(len(entries))
        return republished

    async def _lost_timers(self, cutoff: int) -> int:
        checked = 0
        for task, _ in await self._store.in_progress_tasks():
            allowed = task.responseTimeoutSeconds + task.callbackAfterSeconds
            if task.updateTime + allowed * 1000 <= cutoff:
                timer = TaskMessage.for_task(task.taskId, task.pollCount, RESPONSE)
                await self._engine.timers.fire(timer)
                checked += 1
        return checked
