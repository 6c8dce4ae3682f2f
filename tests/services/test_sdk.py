"""The official Python SDK (conductor-python 2.0.0), unchanged, against Baton."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conductor.client.automator.task_handler import TaskHandler
from conductor.client.configuration.configuration import Configuration
from conductor.client.context.task_context import TaskInProgress
from conductor.client.http.models.task import Task
from conductor.client.worker.exception import NonRetryableException
from conductor.client.worker.worker import Worker

from tests.services.conftest import Baton, unique

pytestmark = pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)


def add_one(task: Task) -> dict[str, Any]:
    return {"value": task.input_data["value"] + 1}


def refuse(task: Task) -> dict[str, Any]:
    raise NonRetryableException("this input can never work")


def fail_first_attempt(task: Task) -> dict[str, Any]:
    if task.retry_count == 0:
        raise RuntimeError("transient failure")
    return {"value": task.input_data["value"], "attempt": task.retry_count}


POLLED_AT: dict[str, list[float]] = {}


def finish_after_a_callback(task: Task) -> dict[str, Any] | TaskInProgress:
    POLLED_AT.setdefault(task.task_id, []).append(time.monotonic())
    if task.poll_count == 1:
        return TaskInProgress(callback_after_seconds=2, output={"stage": 1})
    return {"stage": 2, "polls": task.poll_count}


@asynccontextmanager
async def sdk_workers(
    baton: Baton,
    monkeypatch: pytest.MonkeyPatch,
    workers: dict[str, Callable[..., Any]],
) -> AsyncIterator[None]:
    """Run SDK workers (threads) for the given task types while inside."""
    monkeypatch.setenv("CONDUCTOR_WORKER_ISOLATION", "thread")
    configured = [
        Worker(task_type, function, poll_interval=10, worker_id=f"sdk-{task_type}")
        for task_type, function in workers.items()
    ]
    handler = TaskHandler(
        workers=configured,
        configuration=Configuration(server_api_url=baton.api),
        scan_for_annotated_workers=False,
        monitor_processes=False,
    )
    # In thread mode the SDK's stop_processes() cannot stop its runner
    # threads (it only terminates processes): pause the workers so they
    # stop polling, and make the threads daemons so they never hold up
    # the interpreter's exit.
    for runner in handler.task_runner_processes:
        runner.daemon = True
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, handler.start_processes)
    try:
        yield
    finally:
        for worker in configured:
            worker.paused = True
        await loop.run_in_executor(None, handler.stop_processes)


async def wait_for_end(baton: Baton, workflow_id: str, seconds: float = 30) -> Any:
    """Read the workflow until it has ended, failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        workflow = await baton.workflow(workflow_id)
        if workflow["status"] != "RUNNING":
            return workflow
        await asyncio.sleep(0.05)
    pytest.fail(f"workflow {workflow_id} still running after {seconds}s")


async def test_sdk_workers_complete_a_three_task_workflow(
    baton: Baton, monkeypatch: pytest.MonkeyPatch
) -> None:
    types = [unique("sdk_a"), unique("sdk_b"), unique("sdk_c")]
    name = unique("sdk_wf")
    await baton.register_workflow(
        name, types, outputParameters={"result": "${t2.output.value}"}
    )
    async with sdk_workers(baton, monkeypatch, dict.fromkeys(types, add_one)):
        workflow_id = await baton.start(name, {"x": 10})
        workflow = await wait_for_end(baton, workflow_id)

    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"result": 13}
    assert [t["workerId"] for t in workflow["tasks"]] == [f"sdk-{t}" for t in types]


async def test_sdk_non_retryable_exception_fails_the_workflow(
    baton: Baton, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_type = unique("sdk_refuse")
    name = unique("sdk_wf")
    await baton.register_workflow(name, [task_type])
    async with sdk_workers(baton, monkeypatch, {task_type: refuse}):
        workflow_id = await baton.start(name, {"x": 1})
        workflow = await wait_for_end(baton, workflow_id)

    assert workflow["status"] == "FAILED"
    assert "this input can never work" in workflow["reasonForIncompletion"]
    [task] = workflow["tasks"]
    assert task["status"] == "FAILED_WITH_TERMINAL_ERROR"


async def test_sdk_worker_failing_once_succeeds_on_retry(
    baton: Baton, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_type = unique("sdk_flaky")
    name = unique("sdk_wf")
    status, _ = await baton.request(
        "POST",
        "/metadata/taskdefs",
        json=[{"name": task_type, "retryCount": 2, "retryDelaySeconds": 0}],
    )
    assert status == 200
    await baton.register_workflow(name, [task_type])
    async with sdk_workers(baton, monkeypatch, {task_type: fail_first_attempt}):
        workflow_id = await baton.start(name, {"x": 5})
        workflow = await wait_for_end(baton, workflow_id)

    assert workflow["status"] == "COMPLETED"
    assert [t["status"] for t in workflow["tasks"]] == ["FAILED", "COMPLETED"]
    assert workflow["output"] == {"value": 5, "attempt": 1}
    logs = await baton.request("GET", f"/tasks/{workflow['tasks'][0]['taskId']}/log")
    assert logs[0] == 200
    assert any("transient failure" in entry["log"] for entry in logs[1])


async def test_sdk_task_in_progress_comes_back_after_its_callback(
    baton: Baton, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_type = unique("sdk_callback")
    name = unique("sdk_wf")
    await baton.register_workflow(name, [task_type])
    async with sdk_workers(baton, monkeypatch, {task_type: finish_after_a_callback}):
        workflow_id = await baton.start(name, {"x": 1})
        workflow = await wait_for_end(baton, workflow_id)

    assert workflow["status"] == "COMPLETED"
    [task] = workflow["tasks"]
    assert task["pollCount"] == 2
    assert workflow["output"] == {"stage": 2, "polls": 2}
    first, second = POLLED_AT[task["taskId"]]
    assert second - first >= 2.0
