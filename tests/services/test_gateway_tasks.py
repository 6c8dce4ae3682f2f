"""The task API through a real socket, on both backend pairs."""

from __future__ import annotations

import asyncio
import time

from shared.interfaces import TaskMessage
from tests.services.conftest import Baton, unique


async def test_three_task_workflow_completes_with_wired_inputs(baton: Baton) -> None:
    types = [unique("a"), unique("b"), unique("c")]
    name = unique("wf")
    await baton.register_workflow(
        name, types, outputParameters={"final": "${t2.output.value}"}
    )
    workflow_id = await baton.start(name, {"x": 1})

    value = None
    for task_type in types:
        task = await baton.poll_until(task_type)
        assert task["workflowInstanceId"] == workflow_id
        value = task["inputData"]["value"]
        status, body = await baton.complete(task, {"value": value + 1})
        assert (status, body) == (200, task["taskId"])

    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"final": 4}
    assert [t["status"] for t in workflow["tasks"]] == ["COMPLETED"] * 3
    assert [t["seq"] for t in workflow["tasks"]] == [1, 2, 3]


async def test_empty_polls_follow_the_conductor_contract(baton: Baton) -> None:
    task_type = unique("empty")
    status, body = await baton.request("GET", f"/tasks/poll/{task_type}")
    assert (status, body) == (204, "")
    status, body = await baton.request(
        "GET", f"/tasks/poll/batch/{task_type}", params={"timeout": 0}
    )
    assert (status, body) == (200, [])


async def test_poll_hands_out_task_in_progress_with_worker_fields(
    baton: Baton,
) -> None:
    task_type = unique("fields")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)

    before = int(time.time() * 1000)
    task = await baton.poll_until(task_type, worker="w-7")
    assert task["status"] == "IN_PROGRESS"
    assert task["workerId"] == "w-7"
    assert task["pollCount"] == 1
    assert task["startTime"] >= before - 1000
    assert task["updateTime"] >= task["startTime"]
    status, stored = await baton.request("GET", f"/tasks/{task['taskId']}")
    assert status == 200
    assert stored["status"] == "IN_PROGRESS"
    assert stored["workerId"] == "w-7"


async def test_poll_data_is_recorded_for_empty_polls_too(baton: Baton) -> None:
    task_type = unique("polldata")
    await baton.poll(task_type, timeout=0, worker="w-1")
    await baton.poll(task_type, timeout=0, worker="w-2", domain="blue")

    status, entries = await baton.request(
        "GET", "/tasks/queue/polldata", params={"taskType": task_type}
    )
    assert status == 200
    by_domain = {entry.get("domain"): entry for entry in entries}
    assert set(by_domain) == {None, "blue"}
    assert by_domain[None]["workerId"] == "w-1"
    assert by_domain["blue"]["workerId"] == "w-2"
    assert by_domain["blue"]["queueName"] == task_type
    assert by_domain["blue"]["lastPollTime"] > 0

    status, everything = await baton.request("GET", "/tasks/queue/polldata/all")
    assert status == 200
    assert {e["queueName"] for e in everything} >= {task_type}


async def test_batch_poll_returns_task_scheduled_while_it_waits(baton: Baton) -> None:
    task_type = unique("longpoll")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])

    waiting = asyncio.create_task(baton.poll(task_type, count=5, timeout=5000))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    started = time.monotonic()
    workflow_id = await baton.start(name)
    tasks = await waiting
    elapsed = time.monotonic() - started

    assert [t["workflowInstanceId"] for t in tasks] == [workflow_id]
    assert elapsed < 2.5, f"long poll answered after {elapsed:.2f}s"


async def test_batch_poll_returns_up_to_count_tasks(baton: Baton) -> None:
    task_type = unique("batch")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    started = {await baton.start(name) for _ in range(5)}

    handed: list[dict[str, object]] = []
    while len(handed) < 5:
        batch = await baton.poll(task_type, count=3, timeout=2000)
        assert 1 <= len(batch) <= 3
        handed.extend(batch)
    assert {t["workflowInstanceId"] for t in handed} == started
    assert await baton.poll(task_type, count=3, timeout=100) == []


async def test_domain_is_chosen_from_active_pollers(baton: Baton) -> None:
    task_type = unique("domain")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])

    await baton.poll(task_type, timeout=0, domain="green")
    await baton.start(name, taskToDomain={"*": "red,green,NO_DOMAIN"})
    assert await baton.poll(task_type, timeout=200) == []
    assert await baton.poll(task_type, domain="red", timeout=200) == []
    task = await baton.poll_until(task_type, domain="green")
    assert task["domain"] == "green"

    await baton.start(name, taskToDomain={task_type: "purple,NO_DOMAIN"})
    task = await baton.poll_until(task_type)
    assert "domain" not in task

    await baton.start(name, taskToDomain={task_type: "purple,orange"})
    task = await baton.poll_until(task_type, domain="orange")
    assert task["domain"] == "orange"


async def test_in_progress_update_requeues_the_same_task(baton: Baton) -> None:
    task_type = unique("callback")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)

    first = await baton.poll_until(task_type)
    status, _ = await baton.complete(
        first, {"step": 1}, status="IN_PROGRESS", callbackAfterSeconds=0
    )
    assert status == 200
    again = await baton.poll_until(task_type)
    assert again["taskId"] == first["taskId"]
    assert again["pollCount"] == 2
    assert again["outputData"] == {"step": 1}
    assert again["startTime"] == first["startTime"]


async def test_update_after_the_task_ended_changes_nothing(baton: Baton) -> None:
    task_type = unique("twice")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)
    task = await baton.poll_until(task_type)

    assert (await baton.complete(task, {"n": 1}))[0] == 200
    status, body = await baton.complete(task, {"n": 2}, status="FAILED")
    assert (status, body) == (200, task["taskId"])

    stored = (await baton.request("GET", f"/tasks/{task['taskId']}"))[1]
    assert stored["status"] == "COMPLETED"
    assert stored["outputData"] == {"n": 1}
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert len(workflow["tasks"]) == 1
    results = await baton.runtime.store.task_results(task["taskId"])
    assert [r.status for r in results] == ["COMPLETED"]


async def test_update_v2_chains_the_next_task_of_the_same_type(baton: Baton) -> None:
    task_type = unique("chain")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    first_wf = await baton.start(name)
    second_wf = await baton.start(name)

    first = await baton.poll_until(task_type)
    result = {
        "taskId": first["taskId"],
        "workflowInstanceId": first["workflowInstanceId"],
        "workerId": "chained",
        "status": "COMPLETED",
    }
    status, following = await baton.request("POST", "/tasks/update-v2", json=result)
    assert status == 200
    assert following["status"] == "IN_PROGRESS"
    assert following["workerId"] == "chained"
    assert {first["workflowInstanceId"], following["workflowInstanceId"]} == {
        first_wf,
        second_wf,
    }

    result = {**result, "taskId": following["taskId"], "status": "IN_PROGRESS"}
    result["workflowInstanceId"] = following["workflowInstanceId"]
    status, body = await baton.request("POST", "/tasks/update-v2", json=result)
    assert (status, body) == (204, "")

    result["status"] = "COMPLETED"
    again = await baton.poll_until(task_type)
    status, body = await baton.request("POST", "/tasks/update-v2", json=result)
    assert again["taskId"] == following["taskId"]
    assert (status, body) == (204, "")


async def test_failed_task_is_retried_as_a_new_task(baton: Baton) -> None:
    task_type = unique("retry")
    name = unique("wf")
    status, _ = await baton.request(
        "POST",
        "/metadata/taskdefs",
        json=[{"name": task_type, "retryCount": 1, "retryDelaySeconds": 0}],
    )
    assert status == 200
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)

    first = await baton.poll_until(task_type)
    await baton.complete(first, status="FAILED", reasonForIncompletion="boom")
    second = await baton.poll_until(task_type)
    assert second["taskId"] != first["taskId"]
    assert second["retriedTaskId"] == first["taskId"]
    assert second["retryCount"] == 1
    await baton.complete(second, status="FAILED", reasonForIncompletion="boom again")

    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "FAILED"
    assert "boom again" in workflow["reasonForIncompletion"]
    assert workflow["failedReferenceTaskNames"] == ["t0"]
    assert [t["retried"] for t in workflow["tasks"]] == [True, False]


async def test_terminal_error_fails_the_workflow_despite_retries(baton: Baton) -> None:
    task_type = unique("terminal")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)

    task = await baton.poll_until(task_type)
    await baton.complete(
        task, status="FAILED_WITH_TERMINAL_ERROR", reasonForIncompletion="bad input"
    )
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "FAILED"
    assert "bad input" in workflow["reasonForIncompletion"]
    assert len(workflow["tasks"]) == 1


async def test_ack_answers_whether_the_worker_holds_the_task(baton: Baton) -> None:
    task_type = unique("ack")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    task = await baton.poll_until(task_type, worker="holder")

    path = f"/tasks/{task['taskId']}/ack"
    assert await baton.request("POST", path, params={"workerid": "holder"}) == (
        200,
        "true",
    )
    assert await baton.request("POST", path, params={"workerid": "other"}) == (
        200,
        "false",
    )
    await baton.complete(task)
    assert await baton.request("POST", path, params={"workerid": "holder"}) == (
        200,
        "false",
    )
    assert await baton.request("POST", "/tasks/missing/ack") == (200, "false")


async def test_logs_are_appended_and_read_back(baton: Baton) -> None:
    task_type = unique("logs")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    task = await baton.poll_until(task_type)
    path = f"/tasks/{task['taskId']}/log"

    assert (await baton.request("GET", path))[0] == 204
    assert (await baton.request("POST", path, data="first line"))[0] == 200
    await baton.complete(task, logs=[{"log": "second line", "createdTime": 5}])
    status, logs = await baton.request("GET", path)
    assert status == 200
    assert [entry["log"] for entry in logs] == ["first line", "second line"]
    assert all(entry["taskId"] == task["taskId"] for entry in logs)


async def test_get_task_of_unknown_id_is_404(baton: Baton) -> None:
    status, body = await baton.request("GET", "/tasks/no-such-task")
    assert status == 404
    assert body["status"] == 404
    assert "no-such-task" in body["message"]


async def test_queue_sizes_count_ready_tasks_per_type_and_domain(
    baton: Baton,
) -> None:
    task_type = unique("sizes")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    for _ in range(2):
        await baton.start(name)
    await baton.start(name, taskToDomain={task_type: "teal"})

    assert await baton.request(
        "GET", "/tasks/queue/size", params={"taskType": task_type}
    ) == (200, 2)
    assert await baton.request(
        "GET", "/tasks/queue/size", params={"taskType": task_type, "domain": "teal"}
    ) == (200, 1)
    status, sizes = await baton.request(
        "GET", "/tasks/queue/sizes", params={"taskType": task_type}
    )
    assert (status, sizes) == (200, {task_type: 2})
    status, everything = await baton.request("GET", "/tasks/queue/all")
    assert everything[task_type] == 2
    assert everything[f"teal:{task_type}"] == 1
    status, verbose = await baton.request("GET", "/tasks/queue/all/verbose")
    assert verbose[task_type] == {"a": {"size": 2, "uacked": 0}}


async def test_requeue_republishes_and_duplicates_are_absorbed(baton: Baton) -> None:
    task_type = unique("requeue")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)

    status, count = await baton.request("POST", f"/tasks/queue/requeue/{task_type}")
    assert (status, count) == (200, "1")
    tasks = await baton.poll(task_type, count=10, timeout=1000)
    assert [t["workflowInstanceId"] for t in tasks] == [workflow_id]
    assert await baton.poll(task_type, count=10, timeout=300) == []


async def test_a_message_published_twice_hands_its_task_out_once(baton: Baton) -> None:
    task_type = unique("dup")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    scheduled = await baton.runtime.store.scheduled_tasks(task_type)
    assert len(scheduled) == 1
    task, version = scheduled[0]
    message = TaskMessage.for_task(task.taskId, version)
    await baton.runtime.broker.publish(task_type, [message, message])

    handed = await baton.poll(task_type, count=10, timeout=1000)
    handed += await baton.poll(task_type, count=10, timeout=300)
    assert [t["taskId"] for t in handed] == [task.taskId]
    assert (await baton.runtime.broker.stats(task_type)).ready == 0


async def test_update_by_reference_name_completes_the_pending_task(
    baton: Baton,
) -> None:
    task_type = unique("byref")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)
    task = await baton.poll_until(task_type)

    status, body = await baton.request(
        "POST", f"/tasks/{workflow_id}/t0/COMPLETED", json={"done": True}
    )
    assert (status, body) == (200, task["taskId"])
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"done": True}
    status, body = await baton.request(
        "POST", f"/tasks/{workflow_id}/t0/COMPLETED", json={}
    )
    assert (status, body) == (200, "")


async def test_unregistered_task_runs_with_conductor_defaults(baton: Baton) -> None:
    task_type = unique("adhoc")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    task = await baton.poll_until(task_type)
    assert task["responseTimeoutSeconds"] == 3600
    assert task["workflowTask"]["taskDefinition"]["retryCount"] == 3


async def test_single_poll_hands_out_one_task(baton: Baton) -> None:
    task_type = unique("single")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)

    status, task = await baton.request(
        "GET", f"/tasks/poll/{task_type}", params={"workerid": "solo"}
    )
    assert status == 200
    assert task["workflowInstanceId"] == workflow_id
    assert (task["status"], task["workerId"]) == ("IN_PROGRESS", "solo")
    status, body = await baton.request("GET", f"/tasks/poll/{task_type}")
    assert (status, body) == (204, "")


async def three_workflows_of_a_limited_type(
    baton: Baton, **limits: int
) -> tuple[str, set[str]]:
    """Register a task type with `limits` and start three one-task
    workflows of it; return the type and the workflow ids."""
    task_type = unique("limited")
    status, body = await baton.request(
        "POST", "/metadata/taskdefs", json=[{"name": task_type, **limits}]
    )
    assert status == 200, body
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    return task_type, {await baton.start(name) for _ in range(3)}


async def poll_exactly(
    baton: Baton, task_type: str, expected: int
) -> list[dict[str, object]]:
    """Batch-poll for five until `expected` tasks came, never more."""
    handed: list[dict[str, object]] = []
    while len(handed) < expected:
        batch = await baton.poll(task_type, count=5, timeout=2000)
        assert 1 <= len(batch) <= expected - len(handed)
        handed.extend(batch)
    return handed


async def test_concurrent_exec_limit_caps_the_tasks_in_progress(baton: Baton) -> None:
    task_type, started = await three_workflows_of_a_limited_type(
        baton, concurrentExecLimit=2
    )
    handed = await poll_exactly(baton, task_type, 2)
    # Two in progress: the third task stays queued.
    assert await baton.poll(task_type, count=5, timeout=1000) == []

    # Completing one makes room, and the chained poll of update-v2 fills it.
    result = {
        "taskId": handed[0]["taskId"],
        "workflowInstanceId": handed[0]["workflowInstanceId"],
        "workerId": "worker-1",
        "status": "COMPLETED",
    }
    status, third = await baton.request("POST", "/tasks/update-v2", json=result)
    assert status == 200, third
    assert {t["workflowInstanceId"] for t in [*handed, third]} == started


async def test_rate_limit_caps_the_tasks_handed_out_per_window(baton: Baton) -> None:
    # A day-long window: the test does not straddle two of them.
    task_type, started = await three_workflows_of_a_limited_type(
        baton, rateLimitPerFrequency=2, rateLimitFrequencyInSeconds=86_400
    )
    handed = await poll_exactly(baton, task_type, 2)
    # Finished tasks do not give their hand-outs back: the rate is spent.
    for task in handed:
        assert (await baton.complete(task))[0] == 200
    assert await baton.poll(task_type, count=5, timeout=1000) == []
    [waiting] = started - {task["workflowInstanceId"] for task in handed}
    assert [t["status"] for t in (await baton.workflow(waiting))["tasks"]] == [
        "SCHEDULED"
    ]
