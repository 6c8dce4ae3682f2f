"""The task and workflow state machine.

The store decides every state change with one guarded single-document
update; the broker only carries pointers to SCHEDULED task versions.
Every step is ordered so that a crash between two writes leaves a state
that a repeat of the step, or reconciliation, finishes:

- a task is written before its message is published;
- the next task of a workflow has an id derived from the workflow, its
  reference name and its attempt, so scheduling it twice stores it once;
- a terminal update wins once: later updates for the same task change
  nothing, so a workflow never advances twice for one task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec
from msgspec import UNSET

from shared.clock import now_ms
from shared.config import Settings
from shared.definitions import DefinitionCache, validate_workflow_def
from shared.errors import (
    BadRequest,
    BrokerError,
    Conflict,
    NotFound,
    PayloadTooLarge,
)
from shared.expressions import referenced_tasks, resolve
from shared.ids import random_uuid
from shared.interfaces import Broker, Store, TaskMessage, VersionedTask
from shared.metrics import METRICS
from shared.models import (
    PENDING_TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    ResultStatus,
    StartWorkflowRequest,
    Task,
    TaskDef,
    TaskExecLog,
    TaskResult,
    Workflow,
    WorkflowDef,
    WorkflowStatus,
    WorkflowTask,
)
from shared.polldata import PollRecorder
from shared.queues import check_domains, queue_name
from shared.timers import Timers

log = logging.getLogger(__name__)

MAX_DELAY_SECONDS = 2**22 - 1
MAX_REASON_LENGTH = 500
_encode = msgspec.json.Encoder().encode
_TASK_ID_NAMESPACE = uuid.UUID("5f0c6f1e-9a1b-4d5e-8c2f-ba70e1d2c3b4")
_NOT_RETRIABLE = frozenset({"FAILED_WITH_TERMINAL_ERROR", "CANCELED"})


def task_queue(task: Task) -> str:
    """Return the logical queue a task is published to."""
    return queue_name(task.taskType, task.domain or None)


def due_time(task: Task) -> int:
    """When a SCHEDULED task becomes pollable, in epoch milliseconds."""
    return task.updateTime + task.callbackAfterSeconds * 1000


def retry_delay(definition: TaskDef, retry_count: int) -> int:
    """Return the delay in seconds before retrying the attempt `retry_count`."""
    base = definition.retryDelaySeconds
    if definition.retryLogic == "LINEAR_BACKOFF":
        delay = base * definition.backoffScaleFactor * (retry_count + 1)
    elif definition.retryLogic == "EXPONENTIAL_BACKOFF":
        delay = base * 2 ** min(retry_count, 40)
    else:
        delay = base
    delay = min(delay, 2**31 - 1)
    if definition.maxRetryDelaySeconds > 0:
        delay = min(delay, definition.maxRetryDelaySeconds)
    if definition.backoffJitterMs > 0:
        delay += round(random.uniform(0, definition.backoffJitterMs) / 1000)
    return min(delay, MAX_DELAY_SECONDS)


class Update(NamedTuple):
    """A worker's result as `Engine.record_update` applied it.

    `result` is None when the update changed nothing that needs following
    (a task that had already ended, an `extendLease`).
    """

    task: Task
    version: int = 0
    workflow: Workflow | None = None
    result: TaskResult | None = None
    now: int = 0


class Engine:
    """Runs workflows of SIMPLE tasks over a store and a broker."""

    def __init__(
        self, store: Store, broker: Broker, polls: PollRecorder, settings: Settings
    ) -> None:
        self.store = store
        self.broker = broker
        self.polls = polls
        self.settings = settings
        self.definitions = DefinitionCache(store, settings.definition_cache_ms)
        self.timers = Timers(
            self, settings.ack_timeout_seconds, settings.timer_flush_ms
        )
        self._declared: set[str] = set()

    # Workflows.

    async def start_workflow(self, request: StartWorkflowRequest) -> str:
        """Start a workflow and schedule its first task; return its id.

        Raises NotFound for an unknown definition, BadRequest for bad input,
        PayloadTooLarge for an input over the configured size.
        """
        self._check_payload(request.input, "input")
        definition = request.workflowDef
        if definition is not None:
            validate_workflow_def(definition)
        else:
            definition = await self.definitions.workflow_def(
                request.name, request.version
            )
        task_to_domain = request.taskToDomain or {}
        for task_type, domains in task_to_domain.items():
            check_domains(domains, f"taskToDomain.{task_type}")

        now = now_ms()
        workflow = Workflow(
            workflowId=random_uuid(),
            workflowName=definition.name,
            workflowVersion=definition.version,
            status="RUNNING",
            input=request.input or {},
            correlationId=request.correlationId or UNSET,
            priority=request.priority or 0,
            taskToDomain=task_to_domain,
            createTime=now,
            startTime=now,
            updateTime=now,
            workflowDefinition=definition,
            createdBy=request.createdBy or UNSET,
        )
        first = await self._prepare(workflow, definition, 0, seq=1, context_task=None)
        await self.store.insert_workflow(workflow, [first])
        await self._enqueue(first)
        return workflow.workflowId

    async def get_workflow(self, workflow_id: str, include_tasks: bool) -> Workflow:
        """Return a workflow, with its tasks if asked. Raises NotFound."""
        workflow = await self.store.get_workflow(workflow_id)
        if workflow is None:
            raise NotFound(f"No such workflow found by id: {workflow_id}")
        if include_tasks:
            tasks = await self.store.workflow_tasks(workflow_id)
            workflow = msgspec.structs.replace(workflow, tasks=tasks)
        return workflow

    async def terminate_workflow(self, workflow_id: str, reason: str | None) -> None:
        """Terminate a running workflow and cancel its pending tasks.

        Raises NotFound, or Conflict if the workflow has already ended.
        """
        now = now_ms()
        patch: dict[str, Any] = {"endTime": now, "updateTime": now}
        if reason:
            patch["reasonForIncompletion"] = reason
        finished = await self.store.finish_workflow(workflow_id, "TERMINATED", patch)
        if finished is None:
            if await self.store.get_workflow(workflow_id) is None:
                raise NotFound(f"No such workflow found by id: {workflow_id}")
            raise Conflict(f"Workflow {workflow_id} has already ended")
        await self._cancel_pending(workflow_id, now)

    # Tasks.

    async def get_task(self, task_id: str) -> Task:
        """Return a task. Raises NotFound."""
        found = await self.store.get_task(task_id)
        if found is None:
            raise NotFound(f"No such task found by id: {task_id}")
        return found.task

    async def claim(
        self, messages: Sequence[TaskMessage], worker_id: str | None
    ) -> list[Task]:
        """Hand out the tasks that `messages` still point to."""
        if not messages:
            return []
        tasks = await self.store.claim_tasks(messages, worker_id, now_ms())
        if tasks:
            versions = {m.task_id: m.version + 1 for m in messages}
            self.timers.arm_handed_out(tasks, versions)
        return tasks

    async def ack(self, task_id: str, worker_id: str | None) -> bool:
        """Acknowledge that `worker_id` holds `task_id` in progress.

        Returns False when it does not. An ack counts as an update: it
        stops the ack deadline and restarts the response timeout.
        """
        found = await self.store.get_task(task_id)
        if found is None or found.task.status != "IN_PROGRESS":
            return False
        if worker_id is not None and found.task.workerId != worker_id:
            return False
        acked = await self.store.transition_task(
            task_id,
            ("IN_PROGRESS",),
            {"updateTime": now_ms()},
            expected_version=found.version,
        )
        return acked is not None

    async def update_task(self, result: TaskResult) -> Task:
        """Apply a worker's result and what follows from it (its logs, the
        next task, a retry, the end of the workflow); return the task as
        it now stands.

        An update to a task that has already ended changes nothing.
        Raises BadRequest for an invalid result, PayloadTooLarge for an
        output or a log line over its limit, NotFound for an unknown task;
        a rejected result changes nothing.
        """
        update = await self.record_update(result)
        await self.follow_up(update)
        return update.task

    async def record_update(self, result: TaskResult) -> Update:
        """The first half of `update_task`: the guarded write of the result.

        The caller must then `follow_up` the returned update, and may do
        other work meanwhile (update-v2 polls for the next task). Raises
        as `update_task` does.
        """
        task_id = self._check_result(result)
        now = now_ms()
        if result.extendLease:
            updated = await self.store.transition_task(
                task_id, ("IN_PROGRESS",), {"updateTime": now}
            )
            if updated is None:
                return Update(await self.get_task(task_id))
            await self.store.add_task_result(result, now)
            return Update(updated.task)

        recorded = await self.store.record_result(
            task_id,
            PENDING_TASK_STATUSES,
            self._result_patch(result, now),
            result,
            now,
        )
        if recorded is None:
            log.debug("update for ended task %s ignored", task_id)
            return Update(await self.get_task(task_id))
        (task, version), workflow = recorded
        return Update(task, version, workflow, result, now)

    async def follow_up(self, update: Update) -> None:
        """The second half of `update_task`: logs, then the next step."""
        if update.result is None:
            return
        task, result = update.task, update.result
        if task.status == "SCHEDULED":
            next_step = self.publish([task], update.version, task.callbackAfterSeconds)
        else:
            next_step = self.decide(task, update.workflow)
        if result.logs:
            # Independent writes: issued together, they share a store trip.
            await asyncio.gather(self._record_logs(result, update.now), next_step)
        else:
            await next_step

    async def update_task_by_ref(
        self,
        workflow_id: str,
        reference: str,
        status: ResultStatus,
        output: dict[str, Any],
        worker_id: str | None,
    ) -> str | None:
        """Complete the pending task `reference` of a workflow by name.

        Returns its task id, or None when no such task is pending.
        Raises PayloadTooLarge for an output over the configured size,
        NotFound for an unknown workflow.
        """
        self._check_payload(output, "outputData")
        if await self.store.get_workflow(workflow_id) is None:
            raise NotFound(f"No such workflow found by id: {workflow_id}")
        pending = [
            task
            for task in await self.store.workflow_tasks(workflow_id)
            if task.status in PENDING_TASK_STATUSES
            and _base_reference(task.referenceTaskName or "") == reference
        ]
        if not pending:
            return None
        task = pending[-1]
        await self.update_task(
            TaskResult(
                workflowInstanceId=workflow_id,
                taskId=task.taskId,
                status=status,
                outputData=output,
                workerId=worker_id,
            )
        )
        return task.taskId

    async def add_log(self, task_id: str, line: str) -> None:
        """Append a log line to a task, dropping its oldest lines beyond
        the configured count. Raises PayloadTooLarge for a line over the
        configured size, NotFound for an unknown task."""
        self._check_log(line, "log")
        await self.get_task(task_id)
        entry = TaskExecLog(log=line, taskId=task_id, createdTime=now_ms())
        await self.store.add_logs(
            task_id, [entry], keep=self.settings.max_logs_per_task
        )

    async def requeue(self, task_type: str) -> int:
        """Re-publish every SCHEDULED task of a type with its remaining delay.

        A task whose message is still queued gets a second one; the guarded
        claim hands the task out once whichever arrives first.
        """
        scheduled = await self.store.scheduled_tasks(task_type)
        await self.republish(scheduled)
        return len(scheduled)

    async def republish(self, scheduled: Iterable[VersionedTask]) -> None:
        """Publish messages for stored SCHEDULED tasks, keeping their delays."""
        now = now_ms()
        groups: dict[tuple[str, int, int], list[TaskMessage]] = defaultdict(list)
        for task, version in scheduled:
            remaining = max(0, -(-(due_time(task) - now) // 1000))
            key = (task_queue(task), version, remaining)
            groups[key].append(TaskMessage.for_task(task.taskId, version))
        for (queue, _, delay), messages in groups.items():
            await self.send(queue, messages, delay)

    async def schedule_first(self, workflow: Workflow) -> None:
        """Schedule the first task of a RUNNING workflow stored without one.

        A start whose task write failed (or whose process died) after the
        workflow write leaves such a workflow. The task's id is derived
        from the workflow, so scheduling it twice stores it once.
        """
        definition = workflow.workflowDefinition
        if workflow.terminal or not definition:
            return
        await self._schedule(workflow, definition, 0, seq=1, context_task=None)

    # Scheduling.

    async def _schedule(
        self,
        workflow: Workflow,
        definition: WorkflowDef,
        index: int,
        *,
        seq: int,
        context_task: Task | None,
        retry_of: Task | None = None,
        delay: int = 0,
    ) -> None:
        task = await self._prepare(
            workflow,
            definition,
            index,
            seq=seq,
            context_task=context_task,
            retry_of=retry_of,
            delay=delay,
        )
        await self.store.insert_tasks([task])
        await self._enqueue(task)

    async def _prepare(
        self,
        workflow: Workflow,
        definition: WorkflowDef,
        index: int,
        *,
        seq: int,
        context_task: Task | None,
        retry_of: Task | None = None,
        delay: int = 0,
    ) -> Task:
        step = definition.tasks[index]
        task_def = await self.definitions.task_def(step.name, step.taskDefinition)
        context = await self._context(workflow, step.inputParameters, context_task)
        domain = await self._domain_for(step.name, workflow.taskToDomain)
        task = self._new_task(
            workflow,
            step,
            task_def,
            seq=seq,
            domain=domain,
            delay=delay,
            input_data=resolve(step.inputParameters, context),
            retry_of=retry_of,
        )
        return task

    async def _enqueue(self, task: Task) -> None:
        await self.publish([task], 0, task.startDelayInSeconds)
        self.timers.arm_scheduled([task])

    def _new_task(
        self,
        workflow: Workflow,
        step: WorkflowTask,
        task_def: TaskDef,
        *,
        seq: int,
        domain: str | None,
        delay: int,
        input_data: dict[str, Any],
        retry_of: Task | None,
    ) -> Task:
        attempt = retry_of.retryCount + 1 if retry_of else 0
        now = now_ms()
        identity = f"{workflow.workflowId}/{step.taskReferenceName}/{attempt}"
        return Task(
            taskId=str(uuid.uuid5(_TASK_ID_NAMESPACE, identity)),
            taskType=step.name,
            taskDefName=step.name,
            status="SCHEDULED",
            referenceTaskName=step.taskReferenceName,
            inputData=input_data,
            retryCount=attempt,
            retriedTaskId=retry_of.taskId if retry_of else UNSET,
            seq=seq,
            correlationId=workflow.correlationId,
            scheduledTime=now,
            updateTime=now,
            startDelayInSeconds=delay,
            callbackAfterSeconds=delay,
            responseTimeoutSeconds=task_def.responseTimeoutSeconds,
            workflowInstanceId=workflow.workflowId,
            workflowType=workflow.workflowName,
            workflowPriority=workflow.priority,
            workflowTask=msgspec.structs.replace(step, taskDefinition=task_def),
            domain=domain if domain is not None else UNSET,
            rateLimitPerFrequency=task_def.rateLimitPerFrequency or 0,
            rateLimitFrequencyInSeconds=task_def.rateLimitFrequencyInSeconds or 0,
        )

    async def publish(self, tasks: Sequence[Task], version: int, delay: int) -> None:
        """Publish messages for tasks stored at `version`."""
        by_queue: dict[str, list[TaskMessage]] = defaultdict(list)
        for task in tasks:
            by_queue[task_queue(task)].append(
                TaskMessage.for_task(task.taskId, version)
            )
        for queue, messages in by_queue.items():
            await self.send(queue, messages, delay)

    async def send(
        self, queue: str, messages: Sequence[TaskMessage], delay: int
    ) -> None:
        """Publish to a queue; a broker failure is logged, not raised."""
        # The task is already stored: a failed publish leaves it SCHEDULED
        # with no message, which reconciliation re-publishes. The caller's
        # request has been accepted and must not be failed for it.
        try:
            await self.ensure_queue(queue)
            await self.broker.publish(queue, messages, delay)
        except BrokerError as exc:
            log.warning("publish to %s failed, left to reconciliation: %s", queue, exc)

    async def ensure_queue(self, queue: str) -> None:
        """Declare a queue and remember its name, once per process."""
        if queue in self._declared:
            return
        await self.broker.declare(queue)
        await self.store.register_queues([queue])
        self._declared.add(queue)

    async def _domain_for(
        self, task_type: str, task_to_domain: dict[str, str]
    ) -> str | None:
        spec = task_to_domain.get(task_type) or task_to_domain.get("*")
        if not spec:
            return None
        domains = [d.strip() for d in spec.split(",") if d.strip()]
        if not domains:
            return None
        cutoff = now_ms() - self.settings.active_domain_seconds * 1000
        polled = await self.polls.last_poll_times(task_type)
        for domain in domains:
            if domain.upper() != "NO_DOMAIN" and polled.get(domain, 0) >= cutoff:
                return domain
        last = domains[-1]
        return None if last.upper() == "NO_DOMAIN" else last

    async def _context(
        self, workflow: Workflow, params: Any, known: Task | None
    ) -> dict[str, Any]:
        context: dict[str, Any] = {
            "workflow": {
                "input": workflow.input,
                "workflowId": workflow.workflowId,
                "workflowType": workflow.workflowName,
                "version": workflow.workflowVersion,
                "correlationId": workflow.correlationId or None,
                "variables": workflow.variables,
            }
        }
        needed = referenced_tasks(params)
        tasks: list[Task] = [known] if known else []
        if needed - {known.referenceTaskName if known else None}:
            tasks = await self.store.workflow_tasks(workflow.workflowId)
        for task in tasks:
            if task.referenceTaskName in needed:
                context[task.referenceTaskName] = {
                    "input": task.inputData,
                    "output": task.outputData,
                    "status": task.status,
                    "taskId": task.taskId,
                }
        return context

    # Deciding what follows a task that ended.

    async def decide(self, task: Task, workflow: Workflow | None = None) -> None:
        """Advance, retry or fail the workflow of a task that just ended.

        `workflow` saves a read when the caller has it at hand.
        """
        if workflow is None:
            workflow = await self.store.get_workflow(task.workflowInstanceId or "")
        if workflow is None or workflow.terminal:
            return
        definition = workflow.workflowDefinition
        if not definition:
            return
        index = _step_index(definition, task.referenceTaskName or "")
        if index is None:
            return
        step = definition.tasks[index]

        if task.status in ("COMPLETED", "COMPLETED_WITH_ERRORS", "SKIPPED"):
            await self._advance(workflow, definition, index, task)
            return

        task_def = await self.definitions.task_def(step.name, step.taskDefinition)
        allowed = (
            step.retryCount if step.retryCount is not None else task_def.retryCount
        )
        if task.status not in _NOT_RETRIABLE and task.retryCount < allowed:
            await self._retry(workflow, definition, index, task, task_def)
        elif step.optional:
            await self.store.transition_task(
                task.taskId, (task.status,), {"status": "COMPLETED_WITH_ERRORS"}
            )
            await self._advance(workflow, definition, index, task)
        else:
            await self._fail_workflow(workflow, task)

    async def _advance(
        self, workflow: Workflow, definition: WorkflowDef, index: int, task: Task
    ) -> None:
        if index + 1 < len(definition.tasks):
            await self._schedule(
                workflow, definition, index + 1, seq=task.seq + 1, context_task=task
            )
            return
        if definition.outputParameters:
            context = await self._context(workflow, definition.outputParameters, task)
            output = resolve(definition.outputParameters, context)
        else:
            output = task.outputData
        now = now_ms()
        await self.store.finish_workflow(
            workflow.workflowId,
            "COMPLETED",
            {"output": output, "endTime": now, "updateTime": now},
        )

    async def _retry(
        self,
        workflow: Workflow,
        definition: WorkflowDef,
        index: int,
        task: Task,
        task_def: TaskDef,
    ) -> None:
        delay = retry_delay(task_def, task.retryCount)
        METRICS.retries.labels(task_type=task.taskType).inc()
        # Marked first: a crash before the retry is stored leaves an ended
        # task with no successor, which reconciliation decides again; the
        # other order would leave a retried task unmarked for good.
        await self.store.transition_task(
            task.taskId, TERMINAL_TASK_STATUSES, {"retried": True}
        )
        await self._schedule(
            workflow,
            definition,
            index,
            seq=task.seq + 1,
            context_task=task,
            retry_of=task,
            delay=delay,
        )

    async def fail_workflow_of(self, task: Task) -> None:
        """Fail (or time out) the running workflow of a task that ended."""
        workflow = await self.store.get_workflow(task.workflowInstanceId or "")
        if workflow is not None and not workflow.terminal:
            await self._fail_workflow(workflow, task)

    async def _fail_workflow(self, workflow: Workflow, task: Task) -> None:
        reason = (
            f"Task {task.taskId} failed with status: {task.status} and reason: "
            f"'{task.reasonForIncompletion or ''}'"
        )
        now = now_ms()
        status: WorkflowStatus = "TIMED_OUT" if task.status == "TIMED_OUT" else "FAILED"
        await self.store.finish_workflow(
            workflow.workflowId,
            status,
            {
                "reasonForIncompletion": reason,
                "failedReferenceTaskNames": [task.referenceTaskName],
                "endTime": now,
                "updateTime": now,
            },
        )
        await self._cancel_pending(workflow.workflowId, now)

    async def _cancel_pending(self, workflow_id: str, now: int) -> None:
        for task in await self.store.workflow_tasks(workflow_id):
            if task.status in PENDING_TASK_STATUSES:
                await self.store.transition_task(
                    task.taskId,
                    PENDING_TASK_STATUSES,
                    {"status": "CANCELED", "endTime": now, "updateTime": now},
                )

    # Results.

    def _check_result(self, result: TaskResult) -> str:
        if not result.taskId:
            raise BadRequest("taskId cannot be empty", path="taskId")
        if not result.workflowInstanceId:
            raise BadRequest(
                "workflowInstanceId cannot be empty", path="workflowInstanceId"
            )
        if result.status is None and not result.extendLease:
            raise BadRequest("status cannot be empty", path="status")
        if result.callbackAfterSeconds > MAX_DELAY_SECONDS:
            raise BadRequest(
                f"callbackAfterSeconds must be at most {MAX_DELAY_SECONDS}",
                path="callbackAfterSeconds",
                invalid_value=result.callbackAfterSeconds,
            )
        self._check_payload(result.outputData, "outputData")
        for position, entry in enumerate(result.logs or ()):
            self._check_log(entry.log or "", f"logs[{position}].log")
        return result.taskId

    def _check_payload(self, value: dict[str, Any] | None, field: str) -> None:
        if not value:
            return
        size = len(_encode(value))
        limit = self.settings.max_payload_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"{field} is {size} bytes as JSON, more than the limit of "
                f"{limit} bytes",
                path=field,
                invalid_value=size,
            )

    def _check_log(self, line: str, field: str) -> None:
        size = len(line.encode())
        limit = self.settings.max_log_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"{field} is {size} bytes, more than the limit of {limit} bytes "
                "for one log line",
                path=field,
                invalid_value=size,
            )

    @staticmethod
    def _result_patch(result: TaskResult, now: int) -> dict[str, Any]:
        patch: dict[str, Any] = {
            "outputData": result.outputData or {},
            "updateTime": now,
        }
        if result.workerId:
            patch["workerId"] = result.workerId
        if result.reasonForIncompletion:
            patch["reasonForIncompletion"] = result.reasonForIncompletion[
                :MAX_REASON_LENGTH
            ]
        if result.status == "IN_PROGRESS":
            patch["status"] = "SCHEDULED"
            patch["callbackAfterSeconds"] = result.callbackAfterSeconds
        else:
            patch["status"] = result.status
            patch["endTime"] = now
        return patch

    async def _record_logs(self, result: TaskResult, now: int) -> None:
        # Over the per-task count the oldest lines go, not the update: a
        # worker's last lines (a traceback, say) matter most, and refusing
        # the result would leave the task running until it timed out.
        if result.logs:
            task_id = result.taskId or ""
            keep = self.settings.max_logs_per_task
            logs = [
                TaskExecLog(
                    log=entry.log,
                    taskId=task_id,
                    createdTime=entry.createdTime or now,
                )
                for entry in result.logs[-keep:]
            ]
            await self.store.add_logs(task_id, logs, keep=keep)


def _step_index(definition: WorkflowDef, reference: str) -> int | None:
    for index, step in enumerate(definition.tasks):
        if step.taskReferenceName == reference:
            return index
    return None


def _base_reference(reference: str) -> str:
    base, sep, iteration = reference.rpartition("__")
    return base if sep and iteration.isdigit() else reference
