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

A workflow can also stall after its task ended: the terminal update is
one guarded write, and what follows it (the TaskResult, the next task or
the retry, the end of the workflow) comes after. A process that dies, or
a store that fails, in between leaves a RUNNING workflow with no pending
task, and a worker's retried update cannot help: it finds the task ended
and changes nothing. A sweep decides such a workflow's last task again
once it has been ended for longer than the grace period; the next task's
id is derived from the workflow, so deciding twice schedules it once. A
RUNNING workflow with no task at all (a start cut short between its two
writes) gets its first task the same way.

The sweep reads only SCHEDULED and IN_PROGRESS tasks and RUNNING
workflows through status indexes, and the tasks of a workflow only when
none of them is pending: its cost follows the work in flight, never the
finished work.
"""

from __future__ import annotations

import asyncio
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

_RESUME_CONCURRENCY = 16


class SweepResult(NamedTuple):
    """What one sweep found and did."""

    republished: int
    timed_out_checks: int
    resumed_workflows: int = 0


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
        # Listed before the pending tasks: a workflow that gets a task in
        # between is seen as busy, so only idle ones are read one by one.
        running = await self._store.running_workflow_ids()
        scheduled = await self._store.scheduled_tasks()
        in_progress = await self._store.in_progress_tasks()
        republished = await self._lost_messages(scheduled, cutoff)
        checked = await self._lost_timers(in_progress, cutoff)
        busy = {entry.task.workflowInstanceId for entry in (*scheduled, *in_progress)}
        idle = [workflow_id for workflow_id in running if workflow_id not in busy]
        resumed = await self._stalled_workflows(idle, cutoff)
        if republished or checked or resumed:
            log.info(
                "reconciled: %d tasks re-published, %d response timeouts "
                "checked, %d stalled workflows resumed",
                republished,
                checked,
                resumed,
            )
        return SweepResult(republished, checked, resumed)

    async def _lost_messages(self, scheduled: list[VersionedTask], cutoff: int) -> int:
        overdue: dict[str, list[VersionedTask]] = defaultdict(list)
        for entry in scheduled:
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

    async def _lost_timers(self, in_progress: list[VersionedTask], cutoff: int) -> int:
        checked = 0
        for task, _ in in_progress:
            allowed = task.responseTimeoutSeconds + task.callbackAfterSeconds
            if task.updateTime + allowed * 1000 <= cutoff:
                timer = TaskMessage.for_task(task.taskId, task.pollCount, RESPONSE)
                await self._engine.timers.fire(timer)
                checked += 1
        return checked

    async def _stalled_workflows(self, idle: list[str], cutoff: int) -> int:
        resumed = 0
        for start in range(0, len(idle), _RESUME_CONCURRENCY):
            chunk = idle[start : start + _RESUME_CONCURRENCY]
            done = await asyncio.gather(*(self._resume(w, cutoff) for w in chunk))
            resumed += sum(done)
        return resumed

    async def _resume(self, workflow_id: str, cutoff: int) -> bool:
        tasks = await self._store.workflow_tasks(workflow_id)
        if not tasks:
            return await self._unstarted(workflow_id, cutoff)
        last = tasks[-1]
        if not last.terminal or not 0 < last.endTime <= cutoff:
            return False
        log.warning(
            "workflow %s stalled after task %s ended %s; deciding it again",
            workflow_id,
            last.taskId,
            last.status,
            extra={"task_id": last.taskId},
        )
        await self._engine.decide(last)
        return True

    async def _unstarted(self, workflow_id: str, cutoff: int) -> bool:
        # A start cut short between its two writes (MongoDB writes the
        # workflow, then its first task).
        workflow = await self._store.get_workflow(workflow_id)
        if workflow is None or workflow.createTime > cutoff:
            return False
        log.warning("workflow %s has no task; scheduling its first", workflow_id)
        await self._engine.schedule_first(workflow)
        return True
