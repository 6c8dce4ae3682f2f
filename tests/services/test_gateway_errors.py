"""Bad input gets a 4xx JSON error naming the problem and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.services.conftest import Baton, unique


def assert_error(status: int, body: Any, expected: int, path: str | None) -> None:
    assert status == expected, body
    assert isinstance(body, dict), body
    assert body["status"] == expected
    assert body["message"]
    if path is not None:
        assert [e["path"] for e in body["validationErrors"]] == [path], body


@pytest.fixture
async def held_task(baton: Baton) -> dict[str, Any]:
    """A task handed to a worker, whose state bad updates must not touch."""
    task_type = unique("held")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name)
    return await baton.poll_until(task_type)


async def _unchanged(baton: Baton, task: dict[str, Any]) -> None:
    status, stored = await baton.request("GET", f"/tasks/{task['taskId']}")
    assert status == 200
    assert stored["status"] == "IN_PROGRESS"
    assert stored["outputData"] == task["outputData"]
    assert stored["updateTime"] == task["updateTime"]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"{not json", "$"),
        (b"", "$"),
        (b"[1, 2]", "$"),
        (b'{"taskId": 5}', "taskId"),
        (b'{"callbackAfterSeconds": "soon"}', "callbackAfterSeconds"),
        (b'{"callbackAfterSeconds": -1}', "callbackAfterSeconds"),
        (b'{"status": "DONE"}', "status"),
        (b'{"outputData": [1]}', "outputData"),
    ],
)
async def test_malformed_task_results_are_400(
    baton: Baton, held_task: dict[str, Any], body: bytes, path: str
) -> None:
    for route in ("/tasks", "/tasks/update-v2"):
        status, error = await baton.request(
            "POST", route, data=body, headers={"Content-Type": "application/json"}
        )
        assert_error(status, error, 400, path)
    await _unchanged(baton, held_task)


@pytest.mark.parametrize(
    ("missing", "path"),
    [("taskId", "taskId"), ("workflowInstanceId", "workflowInstanceId")],
)
async def test_task_result_without_ids_is_400(
    baton: Baton, held_task: dict[str, Any], missing: str, path: str
) -> None:
    result = {
        "taskId": held_task["taskId"],
        "workflowInstanceId": held_task["workflowInstanceId"],
        "status": "COMPLETED",
    }
    result[missing] = ""
    status, error = await baton.request("POST", "/tasks", json=result)
    assert_error(status, error, 400, path)
    await _unchanged(baton, held_task)


async def test_result_for_unknown_task_is_404(baton: Baton) -> None:
    result = {"taskId": "nope", "workflowInstanceId": "nope", "status": "COMPLETED"}
    status, error = await baton.request("POST", "/tasks", json=result)
    assert_error(status, error, 404, None)


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"timeout": 5001}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "long"}, "timeout"),
        ({"count": -1}, "count"),
        ({"count": "many"}, "count"),
        ({"domain": "bad domain!"}, "domain"),
    ],
)
async def test_bad_poll_parameters_are_400(
    baton: Baton, params: dict[str, Any], path: str
) -> None:
    task_type = unique("badpoll")
    status, error = await baton.request(
        "GET", f"/tasks/poll/batch/{task_type}", params=params
    )
    assert_error(status, error, 400, path)
    status, entries = await baton.request(
        "GET", "/tasks/queue/polldata", params={"taskType": task_type}
    )
    assert (status, entries) == (200, [])


async def test_task_type_that_cannot_name_a_queue_is_400(baton: Baton) -> None:
    status, error = await baton.request("GET", "/tasks/poll/batch/amq.gen%20x")
    assert_error(status, error, 400, "taskType")


async def test_oversized_body_is_413(baton: Baton, held_task: dict[str, Any]) -> None:
    limit = baton.runtime.settings.max_body_bytes
    result = {
        "taskId": held_task["taskId"],
        "workflowInstanceId": held_task["workflowInstanceId"],
        "status": "COMPLETED",
        "outputData": {"blob": "x" * (limit + 1)},
    }
    status, error = await baton.request("POST", "/tasks", json=result)
    assert_error(status, error, 413, None)
    await _unchanged(baton, held_task)


async def test_bad_status_in_path_is_400(baton: Baton) -> None:
    status, error = await baton.request("POST", "/tasks/wf/ref/FINISHED", json={})
    assert_error(status, error, 400, "status")


async def test_bad_definitions_are_400_and_not_stored(baton: Baton) -> None:
    name = unique("baddef")
    cases: list[tuple[Any, str]] = [
        ([{"name": name, "retryCount": -1}], "[0].retryCount"),
        ([{"name": name, "responseTimeoutSeconds": 0}], "[0].responseTimeoutSeconds"),
        (
            [{"name": name, "timeoutSeconds": 10, "responseTimeoutSeconds": 20}],
            "[0].responseTimeoutSeconds",
        ),
        ([{"retryCount": 1}], "[0]"),
        ([], "$"),
    ]
    for body, path in cases:
        status, error = await baton.request("POST", "/metadata/taskdefs", json=body)
        assert_error(status, error, 400, None)
        assert error["validationErrors"][0]["path"].startswith(path), error
    assert (await baton.request("GET", f"/metadata/taskdefs/{name}"))[0] == 404


async def test_bad_workflow_start_requests_are_400(baton: Baton) -> None:
    task_type = unique("badstart")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    cases: list[tuple[Any, str]] = [
        ({"name": name, "priority": 100}, "priority"),
        ({"name": name, "input": "text"}, "input"),
        ({"name": name, "taskToDomain": {"*": "bad domain"}}, "taskToDomain.*"),
        ({"version": 1}, "$"),
    ]
    for body, path in cases:
        status, error = await baton.request("POST", "/workflow", json=body)
        assert_error(status, error, 400, None)
        assert error["validationErrors"][0]["path"] == path, error
    status, error = await baton.request(
        "POST", f"/workflow/{name}", params={"priority": "high"}, json={}
    )
    assert_error(status, error, 400, "priority")
    assert await baton.poll(task_type, timeout=200) == []


async def test_unknown_route_and_method_are_json_errors(baton: Baton) -> None:
    status, error = await baton.request("GET", "/nothing/here")
    assert_error(status, error, 404, None)
    status, error = await baton.request("PATCH", "/tasks")
    assert_error(status, error, 405, None)
