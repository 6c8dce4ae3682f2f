"""Starting, reading and terminating workflows through a real socket."""

from __future__ import annotations

from tests.services.conftest import Baton, unique


async def test_start_by_name_with_input_correlation_and_priority(
    baton: Baton,
) -> None:
    task_type = unique("byname")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])

    status, workflow_id = await baton.request(
        "POST",
        f"/workflow/{name}",
        json={"x": 41},
        params={"correlationId": "order-9", "priority": 7},
    )
    assert status == 200
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "RUNNING"
    assert workflow["input"] == {"x": 41}
    assert workflow["correlationId"] == "order-9"
    assert workflow["priority"] == 7
    assert workflow["workflowName"] == name
    task = await baton.poll_until(task_type)
    assert task["inputData"] == {"value": 41}
    assert task["correlationId"] == "order-9"


async def test_workflow_without_tasks_listed_when_asked(baton: Baton) -> None:
    task_type = unique("notasks")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)
    status, workflow = await baton.request(
        "GET", f"/workflow/{workflow_id}", params={"includeTasks": "false"}
    )
    assert status == 200
    assert workflow["tasks"] == []
    assert len((await baton.workflow(workflow_id))["tasks"]) == 1


async def test_terminate_cancels_pending_tasks(baton: Baton) -> None:
    task_type = unique("terminate")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    workflow_id = await baton.start(name)
    task = await baton.poll_until(task_type)

    status, _ = await baton.request(
        "DELETE", f"/workflow/{workflow_id}", params={"reason": "no longer needed"}
    )
    assert status == 200
    workflow = await baton.workflow(workflow_id)
    assert workflow["status"] == "TERMINATED"
    assert workflow["reasonForIncompletion"] == "no longer needed"
    assert [t["status"] for t in workflow["tasks"]] == ["CANCELED"]

    status, _ = await baton.complete(task)
    assert status == 200
    assert (await baton.workflow(workflow_id))["tasks"][0]["status"] == "CANCELED"
    assert (await baton.request("DELETE", f"/workflow/{workflow_id}"))[0] == 409


async def test_unknown_workflows_are_404(baton: Baton) -> None:
    status, body = await baton.request(
        "POST", "/workflow", json={"name": unique("nope")}
    )
    assert status == 404
    assert body["status"] == 404
    assert (await baton.request("GET", "/workflow/missing"))[0] == 404
    assert (await baton.request("DELETE", "/workflow/missing"))[0] == 404


async def test_health_answers_when_backends_do(baton: Baton) -> None:
    async with baton.session.get(f"{baton.url}/health") as response:
        assert response.status == 200
        assert await response.json() == {"healthy": True}
