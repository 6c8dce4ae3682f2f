"""Every configurable limit answers a 4xx naming the field, and a request
it rejects changes nothing in the store."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
import pytest

from shared.config import Settings
from tests.services.conftest import Baton, unique
from tests.services.test_gateway_errors import assert_error
from tests.services.test_operations import eventually, scrape, value

PAYLOAD = 2048
LOG_BYTES = 64
LOGS_PER_TASK = 3
WAITING_POLLS = 2
POLL_COUNT = 5


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The backend pair's settings with small limits."""
    return dataclasses.replace(
        settings,
        max_payload_bytes=PAYLOAD,
        max_log_bytes=LOG_BYTES,
        max_logs_per_task=LOGS_PER_TASK,
        max_waiting_polls=WAITING_POLLS,
        max_poll_count=POLL_COUNT,
    )


@pytest.fixture
async def held_task(baton: Baton) -> dict[str, Any]:
    """A task handed to a worker."""
    task_type = unique("limit")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    return await baton.poll_until(task_type)


async def stored_state(baton: Baton, task_id: str | None = None) -> Any:
    """What a rejected request must not change: the task at its version,
    its results and logs, every definition and every known queue."""
    store = baton.runtime.store
    state: dict[str, Any] = {
        "queues": sorted(await store.list_queues()),
        "task_defs": await store.list_task_defs(),
        "workflow_defs": await store.list_workflow_defs(),
    }
    if task_id is not None:
        state["task"] = await store.get_task(task_id)
        state["results"] = await store.task_results(task_id)
        state["logs"] = await store.get_logs(task_id)
    return msgspec.to_builtins(state)


def over(limit: int) -> str:
    """A string whose JSON encoding is just over `limit` bytes."""
    return "x" * limit


def result_for(task: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "taskId": task["taskId"],
        "workflowInstanceId": task["workflowInstanceId"],
        "status": "COMPLETED",
        **fields,
    }


# Payloads.


@pytest.mark.parametrize("route", ["/tasks", "/tasks/update-v2"])
async def test_output_over_the_payload_limit_is_413_and_changes_nothing(
    baton: Baton, held_task: dict[str, Any], route: str
) -> None:
    before = await stored_state(baton, held_task["taskId"])
    result = result_for(held_task, outputData={"blob": over(PAYLOAD)})
    status, error = await baton.request("POST", route, json=result)
    assert_error(status, error, 413, "outputData")
    assert "outputData" in error["message"]
    assert await stored_state(baton, held_task["taskId"]) == before


async def test_output_at_the_payload_limit_is_accepted(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    wrapping = len(b'{"blob":""}')
    output = {"blob": "x" * (PAYLOAD - wrapping)}
    status, body = await baton.request(
        "POST", "/tasks", json=result_for(held_task, outputData=output)
    )
    assert (status, body) == (200, held_task["taskId"])


async def test_output_by_reference_over_the_limit_is_413_and_changes_nothing(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    before = await stored_state(baton, held_task["taskId"])
    path = f"/tasks/{held_task['workflowInstanceId']}/t0/COMPLETED"
    status, error = await baton.request("POST", path, json={"blob": over(PAYLOAD)})
    assert_error(status, error, 413, "outputData")
    assert await stored_state(baton, held_task["taskId"]) == before


async def test_workflow_input_over_the_limit_is_413_and_starts_nothing(
    baton: Baton,
) -> None:
    task_type = unique("input")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_input = {"x": over(PAYLOAD)}

    status, error = await baton.request(
        "POST", "/workflow", json={"name": name, "input": workflow_input}
    )
    assert_error(status, error, 413, "input")
    status, error = await baton.request(
        "POST", f"/workflow/{name}", json=workflow_input
    )
    assert_error(status, error, 413, "input")
    assert await baton.poll(task_type, timeout=200) == []
    assert (await baton.runtime.store.scheduled_tasks(task_type)) == []


# Log lines.


async def test_log_line_over_the_limit_is_413_and_changes_nothing(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    task_id = held_task["taskId"]
    before = await stored_state(baton, task_id)

    status, error = await baton.request(
        "POST", f"/tasks/{task_id}/log", data=over(LOG_BYTES + 1)
    )
    assert_error(status, error, 413, "log")
    logs = [{"log": "fine"}, {"log": over(LOG_BYTES + 1)}]
    status, error = await baton.request(
        "POST", "/tasks", json=result_for(held_task, logs=logs)
    )
    assert_error(status, error, 413, "logs[1].log")
    assert await stored_state(baton, task_id) == before


async def test_log_line_limit_counts_utf8_bytes(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    path = f"/tasks/{held_task['taskId']}/log"
    fits = "é" * (LOG_BYTES // 2)
    assert (await baton.request("POST", path, data=fits.encode()))[0] == 200
    status, error = await baton.request("POST", path, data=(fits + "é").encode())
    assert_error(status, error, 413, "log")


async def test_a_task_keeps_its_newest_log_lines(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    path = f"/tasks/{held_task['taskId']}/log"
    for line in ("one", "two", "three"):
        assert (await baton.request("POST", path, data=line))[0] == 200
    logs = [{"log": "four"}, {"log": "five"}]
    status, body = await baton.request(
        "POST", "/tasks", json=result_for(held_task, logs=logs)
    )
    assert (status, body) == (200, held_task["taskId"])

    status, stored = await baton.request("GET", path)
    assert status == 200
    assert [entry["log"] for entry in stored] == ["three", "four", "five"]
    status, task = await baton.request("GET", f"/tasks/{held_task['taskId']}")
    assert task["status"] == "COMPLETED"


async def test_one_update_with_too_many_lines_keeps_the_last_ones(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    logs = [{"log": f"line {n}"} for n in range(LOGS_PER_TASK + 4)]
    status, _ = await baton.request(
        "POST", "/tasks", json=result_for(held_task, logs=logs)
    )
    assert status == 200
    status, stored = await baton.request("GET", f"/tasks/{held_task['taskId']}/log")
    assert [entry["log"] for entry in stored] == [
        f"line {n}" for n in range(4, LOGS_PER_TASK + 4)
    ]


# Polls.


async def test_poll_count_over_the_limit_is_400(baton: Baton) -> None:
    task_type = unique("count")
    status, error = await baton.request(
        "GET", f"/tasks/poll/batch/{task_type}", params={"count": POLL_COUNT + 1}
    )
    assert_error(status, error, 400, "count")
    assert error["validationErrors"][0]["invalidValue"] == POLL_COUNT + 1
    assert await baton.runtime.polls.read(task_type) == []


async def _waiting_polls(baton: Baton) -> float:
    _, samples = await scrape(baton.session, baton.url)
    return value(samples, "baton_long_polls_waiting")


async def test_polls_beyond_the_waiting_limit_are_429(
    baton: Baton, held_task: dict[str, Any]
) -> None:
    task_types = [unique("waiting") for _ in range(WAITING_POLLS)]
    waiting = [asyncio.ensure_future(baton.poll(t, timeout=5000)) for t in task_types]

    async def saturated() -> bool:
        return await _waiting_polls(baton) == WAITING_POLLS

    await eventually(saturated, f"{WAITING_POLLS} polls waiting")
    refused = unique("refused")
    for path in (f"/tasks/poll/batch/{refused}", f"/tasks/poll/{refused}"):
        async with baton.session.get(f"{baton.api}{path}") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            error = await response.json()
        assert error["code"] == "TOO_MANY_REQUESTS"
        assert error["retryable"] is True
    assert await baton.runtime.polls.read(refused) == []

    # An update is never refused for the chained poll: it applies, and the
    # poll is skipped.
    status, _ = await baton.request(
        "POST", "/tasks/update-v2", json=result_for(held_task)
    )
    assert status == 204
    status, task = await baton.request("GET", f"/tasks/{held_task['taskId']}")
    assert task["status"] == "COMPLETED"

    for task_type in task_types:
        name = unique("wf")
        await baton.register_workflow(name, [task_type])
        await baton.start(name)
    assert [len(tasks) for tasks in await asyncio.gather(*waiting)] == [1, 1]
    assert await baton.poll(refused, timeout=0) == []


async def test_head_on_a_poll_route_takes_no_task(baton: Baton) -> None:
    task_type = unique("head")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    for path in (f"/tasks/poll/batch/{task_type}", f"/tasks/poll/{task_type}"):
        async with baton.session.head(f"{baton.api}{path}") as response:
            assert response.status == 405
    assert len(await baton.poll(task_type, timeout=2000)) == 1


# Names: a task type or a domain becomes a queue name.


async def test_bad_names_are_400_and_create_no_queue_or_definition(
    baton: Baton,
) -> None:
    before = await stored_state(baton)
    bad = "amq.gen x"
    good = unique("good")
    step = {"name": good, "taskReferenceName": "t0"}
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/metadata/taskdefs", [{"name": bad}], "[0].name"),
        ("PUT", "/metadata/taskdefs", {"name": bad}, "name"),
        (
            "POST",
            "/metadata/workflow",
            {"name": unique("wf"), "tasks": [{**step, "name": bad}]},
            "tasks[0].name",
        ),
        (
            "PUT",
            "/metadata/workflow",
            [{"name": unique("wf"), "tasks": [{**step, "name": bad}]}],
            "[0].tasks[0].name",
        ),
        (
            "POST",
            "/metadata/workflow",
            {
                "name": unique("wf"),
                "tasks": [{**step, "taskDefinition": {"name": bad}}],
            },
            "name",
        ),
        (
            "POST",
            "/workflow",
            {
                "name": unique("wf"),
                "workflowDef": {"name": "inline", "tasks": [{**step, "name": bad}]},
            },
            "tasks[0].name",
        ),
        (
            "POST",
            "/workflow",
            {
                "name": unique("wf"),
                "workflowDef": {"name": "inline", "tasks": [step]},
                "taskToDomain": {good: "d1,bad/domain"},
            },
            f"taskToDomain.{good}",
        ),
    ]
    for method, path, body, field in cases:
        status, error = await baton.request(method, path, json=body)
        assert_error(status, error, 400, field)
    for path, params in [
        ("/tasks/queue/size", {"taskType": bad}),
        ("/tasks/queue/size", {"taskType": good, "domain": bad}),
        ("/tasks/queue/sizes", {"taskType": bad}),
        ("/tasks/queue/polldata", {"taskType": bad}),
        (f"/tasks/poll/{good}", {"domain": "a:b"}),
    ]:
        status, error = await baton.request("GET", path, params=params)
        assert status == 400, (path, error)
    status, error = await baton.request("POST", "/tasks/queue/requeue/%40timers")
    assert_error(status, error, 400, "taskType")
    assert await stored_state(baton) == before
    assert await baton.poll(good, timeout=0) == []
