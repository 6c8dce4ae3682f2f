"""Callbacks, retry delays, timeouts and reconciliation, on both backends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest

from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.engine import retry_delay
from shared.interfaces import TIMER_QUEUE, Delivery, TaskMessage
from shared.models import TaskDef, Workflow
from shared.runtime import Runtime
from shared.timers import RESPONSE
from tests.services.conftest import Baton, unique


async def register_task(baton: Baton, task_type: str, **fields: Any) -> None:
    status, body = await baton.request(
        "POST", "/metadata/taskdefs", json=[{"name": task_type, **fields}]
    )
    assert status == 200, body


async def one_task_workflow(baton: Baton, task_type: str, **fields: Any) -> str:
    """Register `task_type` with `fields` and a workflow running it once."""
    await register_task(baton, task_type, **fields)
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    return await baton.start(name, {"x": 1})


async def test_callback_brings_the_same_task_back_no_sooner_than_asked(
    baton: Baton,
) -> None:
    task_type = unique("callback")
    workflow_id = await one_task_workflow(baton, task_type)
    task = await baton.poll_until(task_type)

    asked_at = time.monotonic()
    await baton.complete(
        task, {"half": True}, status="IN_PROGRESS", callbackAfterSeconds=2
    )
    assert await baton.poll(task_type, timeout=1000) == []
    again = await baton.poll_until(task_type, timeout=5000)
    waited = time.monotonic() - asked_at

    assert again["taskId"] == task["taskId"]
    assert again["pollCount"] == 2
    assert again["outputData"] == {"half": True}
    assert waited >= 2.0
    await baton.complete(again, {"done": True})
    assert (await baton.workflow(workflow_id))["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("logic", "fields", "expected"),
    [
        ("FIXED", {"retryDelaySeconds": 3}, [3, 3, 3]),
        (
            "LINEAR_BACKOFF",
            {"retryDelaySeconds": 2, "backoffScaleFactor": 3},
            [6, 12, 18],
        ),
        ("EXPONENTIAL_BACKOFF", {"retryDelaySeconds": 5}, [5, 10, 20]),
        (
            "EXPONENTIAL_BACKOFF",
            {"retryDelaySeconds": 5, "maxRetryDelaySeconds": 12},
            [5, 10, 12],
        ),
    ],
)
async def test_retry_policies_delay_each_new_attempt(
    baton: Baton, logic: str, fields: dict[str, Any], expected: list[int]
) -> None:
    task_type = unique("retrylogic")
    workflow_id = await one_task_workflow(
        baton, task_type, retryCount=3, retryLogic=logic, **fields
    )
    first = await baton.poll_until(task_type)
    await baton.complete(first, status="FAILED")
    # A retry waiting out its delay is SCHEDULED; a worker result for it is
    # accepted, so the test fails each attempt without waiting.
    for _ in range(2):
        pending = (await baton.workflow(workflow_id))["tasks"][-1]
        assert pending["status"] == "SCHEDULED"
        await baton.complete(pending, status="FAILED")

    tasks = (await baton.workflow(workflow_id))["tasks"]
    retries = tasks[1:]
    assert [t["startDelayInSeconds"] for t in retries] == expected
    assert [t["callbackAfterSeconds"] for t in retries] == expected
    assert [t["retryCount"] for t in retries] == [1, 2, 3]
    assert [t["retriedTaskId"] for t in retries] == [t["taskId"] for t in tasks[:-1]]
    for retry in retries:
        assert retry["scheduledTime"] >= first["updateTime"]


def test_retry_delay_formulas_match_conductor() -> None:
    fixed = TaskDef(name="t", retryDelaySeconds=4)
    linear = TaskDef(
        name="t", retryLogic="LINEAR_BACKOFF", retryDelaySeconds=4, backoffScaleFactor=2
    )
    exponential = TaskDef(
        name="t", retryLogic="EXPONENTIAL_BACKOFF", retryDelaySeconds=4
    )
    assert [retry_delay(fixed, n) for n in range(3)] == [4, 4, 4]
    assert [retry_delay(linear, n) for n in range(3)] == [8, 16, 24]
    assert [retry_delay(exponential, n) for n in range(3)] == [4, 8, 16]
    assert retry_delay(exponential, 60) == 2**22 - 1


async def test_silent_worker_times_out_and_another_completes_the_retry(
    baton: Baton,
) -> None:
    task_type = unique("silent")
    workflow_id = await one_task_workflow(
        baton, task_type, responseTimeoutSeconds=1, retryCount=1, retryDelaySeconds=0
    )
    lost = await baton.poll_until(task_type, worker="goes-silent")

    retry = await baton.poll_until(task_type, worker="healthy", timeout=5000)
    assert retry["retriedTaskId"] == lost["taskId"]
    await baton.complete(retry, {"ok": True})

    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    timed_out = workflow["tasks"][0]
    assert timed_out["status"] == "TIMED_OUT"
    assert "responseTimeoutSeconds" in timed_out["reasonForIncompletion"]
    assert (await baton.complete(lost, {"late": True}))[0] == 200
    assert (await baton.workflow(workflow_id))["tasks"][0]["status"] == "TIMED_OUT"


async def test_extend_lease_keeps_a_slow_worker_task(baton: Baton) -> None:
    task_type = unique("slow")
    workflow_id = await one_task_workflow(
        baton, task_type, responseTimeoutSeconds=2, retryCount=1, retryDelaySeconds=0
    )
    task = await baton.poll_until(task_type)
    for _ in range(4):
        await asyncio.sleep(1)
        status, _ = await baton.complete(task, status="IN_PROGRESS", extendLease=True)
        assert status == 200
    await baton.complete(task, {"slow": "but done"})

    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert [t["status"] for t in workflow["tasks"]] == ["COMPLETED"]


async def test_timeout_seconds_with_time_out_wf_ends_the_workflow(
    baton: Baton,
) -> None:
    task_type = unique("deadline")
    workflow_id = await one_task_workflow(
        baton,
        task_type,
        timeoutSeconds=1,
        responseTimeoutSeconds=1,
        timeoutPolicy="TIME_OUT_WF",
    )
    task = await baton.poll_until(task_type)
    await baton.complete(task, status="IN_PROGRESS", callbackAfterSeconds=5)

    workflow = await wait_until_ended(baton, workflow_id)
    assert workflow["status"] == "TIMED_OUT"
    assert [t["status"] for t in workflow["tasks"]] == ["TIMED_OUT"]
    assert "timeoutSeconds" in workflow["tasks"][0]["reasonForIncompletion"]


async def test_poll_timeout_retries_a_task_nobody_polls(baton: Baton) -> None:
    task_type = unique("unpolled")
    workflow_id = await one_task_workflow(
        baton,
        task_type,
        pollTimeoutSeconds=1,
        timeoutPolicy="RETRY",
        retryCount=1,
        retryDelaySeconds=0,
    )
    deadline = time.monotonic() + 10
    tasks: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(tasks) < 2:
        await asyncio.sleep(0.2)
        tasks = (await baton.workflow(workflow_id))["tasks"]
    assert [t["status"] for t in tasks] == ["TIMED_OUT", "SCHEDULED"]
    assert "pollTimeoutSeconds" in tasks[0]["reasonForIncompletion"]


async def test_unacked_task_returns_to_its_queue_after_the_ack_deadline(
    baton: Baton,
) -> None:
    task_type = unique("ackdeadline")
    await one_task_workflow(baton, task_type, ackTimeoutSeconds=1)
    task = await baton.poll_until(task_type, worker="never-acks")

    again = await baton.poll_until(task_type, worker="acks", timeout=5000)
    assert again["taskId"] == task["taskId"]
    assert again["pollCount"] == 2
    path = f"/tasks/{again['taskId']}/ack"
    assert await baton.request("POST", path, params={"workerid": "acks"}) == (
        200,
        "true",
    )
    assert await baton.poll(task_type, timeout=2500) == []
    _, stored = await baton.request("GET", f"/tasks/{task['taskId']}")
    assert (stored["status"], stored["workerId"]) == ("IN_PROGRESS", "acks")


async def test_reconciliation_republishes_a_task_whose_message_vanished(
    baton: Baton, request: pytest.FixtureRequest
) -> None:
    task_type = unique("vanished")
    workflow_id = await one_task_workflow(baton, task_type)
    await purge(baton, task_type, request)
    assert await baton.poll(task_type, timeout=300) == []

    result = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert result.republished == 1
    again = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert again.republished == 0

    task = await baton.poll_until(task_type)
    assert task["workflowInstanceId"] == workflow_id
    await baton.complete(task)
    assert (await baton.workflow(workflow_id))["status"] == "COMPLETED"


async def test_reconciliation_resumes_a_workflow_stalled_after_its_task_ended(
    baton: Baton,
) -> None:
    """The terminal update is applied, then its process dies before the
    next task is scheduled: a retried update finds the task ended and
    changes nothing, and only a sweep moves the workflow on."""
    first, second = unique("stalled"), unique("next")
    name = unique("wf")
    await baton.register_workflow(name, [first, second])
    workflow_id = await baton.start(name, {"x": 1})
    task = await baton.poll_until(first)
    done = await baton.runtime.store.transition_task(
        task["taskId"],
        ("IN_PROGRESS",),
        {"status": "COMPLETED", "outputData": {"value": 2}, "endTime": 1},
    )
    assert done is not None
    assert await baton.complete(task, {"value": 2}) == (200, task["taskId"])
    assert len((await baton.workflow(workflow_id))["tasks"]) == 1

    result = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert result.resumed_workflows == 1
    again = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert again.resumed_workflows == 0

    following = await baton.poll_until(second)
    assert following["inputData"] == {"value": 2}
    await baton.complete(following, {"value": 3})
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"value": 3}


async def test_reconciliation_schedules_the_first_task_of_a_workflow_stored_without_it(
    baton: Baton,
) -> None:
    """A start cut short between its two writes (MongoDB stores the
    workflow, then its first task) leaves a RUNNING workflow with no task:
    a sweep schedules that task, once."""
    task_type = unique("unstarted")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    definition = await baton.runtime.store.get_workflow_def(name)
    assert definition is not None
    now = int(time.time() * 1000)
    workflow = Workflow(
        workflowId=unique("orphan"),
        workflowName=name,
        workflowVersion=definition.version,
        status="RUNNING",
        input={"x": 5},
        createTime=now,
        startTime=now,
        updateTime=now,
        workflowDefinition=definition,
    )
    await baton.runtime.store.insert_workflow(workflow)
    assert await baton.poll(task_type, timeout=0) == []

    result = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert result.resumed_workflows == 1
    again = await baton.scheduler.reconciler.sweep(grace_ms=0)
    assert again.resumed_workflows == 0

    task = await baton.poll_until(task_type)
    assert task["workflowInstanceId"] == workflow.workflowId
    assert task["inputData"] == {"value": 5}
    await baton.complete(task, {"value": 6})
    finished = await baton.workflow(workflow.workflowId)
    assert finished["status"] == "COMPLETED"
    assert [t["taskId"] for t in finished["tasks"]] == [task["taskId"]]


class _Held(Delivery):
    """A delivery of `message` that records how it was settled."""

    def __init__(self, message: TaskMessage) -> None:
        self.message = message
        self.redelivered = False
        self.settled = ""

    async def ack(self) -> None:
        self.settled = "ack"

    async def requeue(self) -> None:
        self.settled = "requeue"


async def test_a_timer_batch_that_fails_comes_back_whole(tmp_path: Path) -> None:
    """With the store down, a batch of timers is sent again later, every
    timer of it, rather than as an empty timer that guards nothing."""
    runtime = Runtime(Settings(sqlite_path=str(tmp_path / "baton.db")))
    await runtime.start()
    await runtime.engine.ensure_queue(TIMER_QUEUE)
    came_back: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()

    def receive(delivery: Delivery) -> None:
        if not came_back.done():
            came_back.set_result(delivery)

    subscription = await runtime.broker.subscribe(TIMER_QUEUE, 10, receive)
    batch = msgspec.structs.replace(
        TaskMessage.for_task("", 0, RESPONSE), batch=(("a", 1), ("b", 2))
    )
    held = _Held(batch)
    try:
        await runtime.store.close()
        await Scheduler(runtime)._handle_timer(held)  # its consumers not started
        again = await asyncio.wait_for(came_back, timeout=15)
    finally:
        await subscription.cancel()
        await runtime.stop()
    assert held.settled == "ack"
    assert (again.message.kind, again.message.batch) == (RESPONSE, batch.batch)


async def purge(baton: Baton, queue: str, request: pytest.FixtureRequest) -> None:
    """Delete a queue's messages behind Baton's back."""
    broker = baton.runtime.broker
    if baton.runtime.embedded_broker:
        # The embedded broker has no purge: reach into its queue.
        broker._queues[queue].ready.clear()  # type: ignore[attr-defined]
        return
    connection = await aio_pika.connect(request.getfixturevalue("amqp_url"))
    async with connection:
        channel = await connection.channel()
        physical = broker.physical_queue(queue)  # type: ignore[attr-defined]
        amqp_queue = await channel.declare_queue(physical, passive=True)
        await amqp_queue.purge()


async def wait_until_ended(
    baton: Baton, workflow_id: str, seconds: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        workflow = await baton.workflow(workflow_id)
        if workflow["status"] != "RUNNING":
            return workflow
        await asyncio.sleep(0.1)
    pytest.fail(f"workflow {workflow_id} still running after {seconds}s")
