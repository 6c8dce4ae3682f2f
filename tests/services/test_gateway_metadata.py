"""Task and workflow definitions through a real socket."""

from __future__ import annotations

from tests.services.conftest import Baton, unique


async def test_task_definitions_are_created_read_updated_and_deleted(
    baton: Baton,
) -> None:
    name = unique("def")
    status, _ = await baton.request(
        "POST", "/metadata/taskdefs", json=[{"name": name, "retryCount": 5}]
    )
    assert status == 200

    status, definition = await baton.request("GET", f"/metadata/taskdefs/{name}")
    assert status == 200
    assert definition["retryCount"] == 5
    assert definition["responseTimeoutSeconds"] == 3600
    assert definition["timeoutPolicy"] == "TIME_OUT_WF"
    assert definition["retryDelaySeconds"] == 60

    status, _ = await baton.request(
        "PUT", "/metadata/taskdefs", json={"name": name, "retryCount": 1}
    )
    assert status == 200
    status, everything = await baton.request("GET", "/metadata/taskdefs")
    assert [d["retryCount"] for d in everything if d["name"] == name] == [1]

    assert (await baton.request("DELETE", f"/metadata/taskdefs/{name}"))[0] == 200
    assert (await baton.request("GET", f"/metadata/taskdefs/{name}"))[0] == 404
    assert (await baton.request("DELETE", f"/metadata/taskdefs/{name}"))[0] == 404


async def test_updating_a_missing_task_definition_is_404(baton: Baton) -> None:
    status, body = await baton.request(
        "PUT", "/metadata/taskdefs", json={"name": unique("missing")}
    )
    assert status == 404
    assert body["status"] == 404


async def test_workflow_definition_versions_and_overwrite(baton: Baton) -> None:
    name = unique("wfdef")
    task = {"name": unique("t"), "taskReferenceName": "t0"}
    first = {"name": name, "version": 1, "tasks": [task], "description": "one"}
    assert (await baton.request("POST", "/metadata/workflow", json=first))[0] == 200

    status, body = await baton.request("POST", "/metadata/workflow", json=first)
    assert status == 409
    assert body["status"] == 409
    changed = {**first, "description": "changed"}
    status, _ = await baton.request(
        "POST", "/metadata/workflow", json=changed, params={"overwrite": "true"}
    )
    assert status == 200

    second = {**first, "version": 2, "description": "two"}
    status, bulk = await baton.request("PUT", "/metadata/workflow", json=[second])
    assert status == 200
    assert bulk["bulkSuccessfulResults"] == [name]

    status, listed = await baton.request("GET", "/metadata/workflow")
    assert status == 200
    assert sorted(d["version"] for d in listed if d["name"] == name) == [1, 2]

    status, latest = await baton.request("GET", f"/metadata/workflow/{name}")
    assert (status, latest["version"], latest["description"]) == (200, 2, "two")
    status, older = await baton.request(
        "GET", f"/metadata/workflow/{name}", params={"version": 1}
    )
    assert (status, older["description"]) == (200, "changed")
    status, _ = await baton.request(
        "GET", f"/metadata/workflow/{name}", params={"version": 7}
    )
    assert status == 404


async def test_workflow_definition_with_unsupported_task_type_is_refused(
    baton: Baton,
) -> None:
    name = unique("wfdef")
    definition = {
        "name": name,
        "tasks": [{"name": "x", "taskReferenceName": "x", "type": "HTTP"}],
    }
    status, body = await baton.request("POST", "/metadata/workflow", json=definition)
    assert status == 400
    assert body["validationErrors"][0]["path"] == "tasks[0].type"
    assert (await baton.request("GET", f"/metadata/workflow/{name}"))[0] == 404
