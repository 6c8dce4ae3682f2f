"""One contract suite for every Store adapter, run against each of them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from msgspec import UNSET

from shared.adapters.mongo_store import MongoStore
from shared.adapters.sqlite_store import SQLiteStore
from shared.errors import DuplicateKey, StoreError
from shared.interfaces import Store, TaskMessage
from shared.models import (
    PollData,
    Task,
    TaskDef,
    TaskExecLog,
    TaskResult,
    Workflow,
    WorkflowDef,
    WorkflowTask,
)

NOW = 1_700_000_000_000


@pytest.fixture(params=["sqlite", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A started store of each kind, empty, closed after the test."""
    adapter: Store
    if request.param == "sqlite":
        adapter = SQLiteStore(str(tmp_path / "baton.db"))
    else:
        url = request.getfixturevalue("mongodb_url")
        adapter = MongoStore(url, request.getfixturevalue("mongo_database"))
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.close()


# History.


async def test_task_results_in_arrival_order(store: Store) -> None:

    def result(task_id: str, mark: int) -> TaskResult:
        return TaskResult(
            taskId=task_id,
            workflowInstanceId="wf-1",
            status="IN_PROGRESS",
            outputData={"mark": mark},
            logs=[TaskExecLog(log=f"line {mark}", createdTime=mark)],
        )

    await store.add_task_result(result("t1", 1), NOW)
    await store.add_task_result(result("t2", 9), NOW + 1)
    await store.add_task_result(result("t1", 2), NOW + 5)
    await store.add_task_result(result("t1", 3), NOW + 5)
    got = await store.task_results("t1")
    assert got == [result("t1", 1), result("t1", 2), result("t1", 3)]
    assert await store.task_results("t2") == [result("t2", 9)]
    assert await store.task_results("none") == []


async def test_logs_in_append_order(store: Store) -> None:
    await store.add_logs(
        "t1", [TaskExecLog(log="one", createdTime=3), TaskExecLog(log="two")]
    )
    await store.add_logs("t2", [TaskExecLog(log="other", createdTime=1)])
    await store.add_logs("t1", [TaskExecLog(log="three", createdTime=1)])
    await store.add_logs("t1", [])
    assert await store.get_logs("t1") == [
        TaskExecLog(log="one", taskId="t1", createdTime=3),
        TaskExecLog(log="two", taskId="t1", createdTime=0),
        TaskExecLog(log="three", taskId="t1", createdTime=1),
    ]
    assert await store.get_logs("none") == []


# Poll data and queues.


async def test_poll_data_per_queue_and_domain(store: Store) -> None:
    await store.save_poll_data(
        [
            PollData(queueName="encode", workerId="w1", lastPollTime=NOW),
            PollData(
                queueName="encode", domain="blue", workerId="w2", lastPollTime=NOW
            ),
            PollData(queueName="resize", workerId="w3", lastPollTime=NOW - 5),
        ]
    )
    await store.save_poll_data(
        [
            PollData(queueName="encode", workerId="w4", lastPollTime=NOW + 10),
            PollData(queueName="encode", workerId="w0", lastPollTime=NOW + 1),
        ]
    )
    await store.save_poll_data(
        [PollData(queueName="encode", domain="blue", lastPollTime=NOW - 100)]
    )
    await store.save_poll_data([])

    encode = await store.get_poll_data("encode")
    by_domain = {p.domain: p for p in encode}
    assert len(encode) == 2
    assert by_domain[UNSET] == PollData(
        queueName="encode", workerId="w4", lastPollTime=NOW + 10
    )
    assert by_domain["blue"].lastPollTime == NOW
    everything = await store.get_poll_data()
    assert sorted((p.queueName, p.domain or "") for p in everything) == [
        ("encode", ""),
        ("encode", "blue"),
        ("resize", ""),
    ]
    assert await store.get_poll_data("none") == []


async def test_queues_registered_sorted_and_unique(store: Store) -> None:
    assert await store.list_queues() == []
    await store.register_queues(["encode", "blue:encode", "encode"])
    await store.register_queues(["resize", "blue:encode"])
    await store.register_queues([])
    assert await store.list_queues() == ["blue:encode", "encode", "resize"]


# SQLite durability.


async def test_sqlite_keeps_everything_across_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "baton.db")
    first = SQLiteStore(path)
    await first.start()
    await first.upsert_task_defs([TaskDef(name="encode")])
    await first.put_workflow_def(WorkflowDef(name="pipeline"), overwrite=False)
    await first.insert_workflow(make_workflow())
    await first.insert_tasks([make_task("t1"), make_task("t2", seq=2)])
    await first.claim_tasks([message("t1")], "w1", NOW)
    await first.add_task_result(TaskResult(taskId="t1", status="COMPLETED"), NOW)
    await first.add_logs("t1", [TaskExecLog(log="hello")])
    await first.save_poll_data([PollData(queueName="encode", lastPollTime=NOW)])
    await first.register_queues(["encode"])
    await first.close()

    second = SQLiteStore(path)
    await second.start()
    try:
        assert await second.get_task_def("encode") == TaskDef(name="encode")
        assert await second.get_workflow_def("pipeline") == WorkflowDef(name="pipeline")
        workflow = await second.get_workflow("wf-1")
        assert workflow is not None and workflow.status == "RUNNING"
        t1 = await second.get_task("t1")
        assert t1 is not None
        assert (t1.task.status, t1.task.workerId, t1.version) == (
            "IN_PROGRESS",
            "w1",
            1,
        )
        assert [t.taskId for t in await second.workflow_tasks("wf-1")] == [
            "t1",
            "t2",
        ]
        assert await second.task_results("t1") == [
            TaskResult(taskId="t1", status="COMPLETED")
        ]
        assert [line.log for line in await second.get_logs("t1")] == ["hello"]
        assert [p.queueName for p in await second.get_poll_data()] == ["encode"]
        assert await second.list_queues() == ["encode"]
    finally:
        await second.close()


async def test_sqlite_closed_store_refuses_work(tmp_path: Path) -> None:
    adapter = SQLiteStore(str(tmp_path / "baton.db"))
    await adapter.start()
    await adapter.close()
    with pytest.raises(StoreError):
        await adapter.get_task("t1")


def _fields(struct: Any) -> dict[str, Any]:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}
