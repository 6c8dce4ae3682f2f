"""One contract suite for every Store adapter, run against each of them."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

from shared.adapters.mongo_store import MongoStore
from shared.adapters.sqlite_store import SQLiteStore
from shared.errors import DuplicateKey, StoreError
from shared.interfaces import RateWindow, Store, TaskMessage, VersionedTask
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


# Helpers.

CLAIM_FIELDS = {
    "status",
    "pollCount",
    "workerId",
    "updateTime",
    "startTime",
    "callbackAfterSeconds",
}


def make_workflow_def(
    name: str = "pipeline", version: int = 1, **fields: Any
) -> WorkflowDef:
    return WorkflowDef(
        name=name,
        version=version,
        tasks=[
            WorkflowTask(
                name="encode",
                taskReferenceName="encode_1",
                inputParameters={"file": "${workflow.input.file}"},
            )
        ],
        inputParameters=["file"],
        **fields,
    )


def make_workflow(workflow_id: str = "wf-1", **fields: Any) -> Workflow:
    values: dict[str, Any] = {
        "workflowName": "pipeline",
        "workflowVersion": 1,
        "status": "RUNNING",
        "input": {"file": "a.mp4"},
        "correlationId": "order-7",
        "taskToDomain": {"encode": "blue"},
        "createTime": NOW,
        "startTime": NOW,
        "updateTime": NOW,
        "workflowDefinition": make_workflow_def(),
    }
    values.update(fields)
    return Workflow(workflowId=workflow_id, **values)


def make_task(
    task_id: str,
    *,
    seq: int = 1,
    task_type: str = "encode",
    workflow_id: str = "wf-1",
    **fields: Any,
) -> Task:
    values: dict[str, Any] = {
        "status": "SCHEDULED",
        "inputData": {"file": "a.mp4", "seq": seq},
        "referenceTaskName": f"{task_type}_{seq}",
        "taskDefName": task_type,
        "scheduledTime": NOW - 1000,
        "responseTimeoutSeconds": 3600,
        "workflowType": "pipeline",
        "workflowTask": WorkflowTask(
            name=task_type, taskReferenceName=f"{task_type}_{seq}"
        ),
    }
    values.update(fields)
    return Task(
        taskId=task_id,
        taskType=task_type,
        seq=seq,
        workflowInstanceId=workflow_id,
        **values,
    )


def message(
    task_id: str, version: int = 0, message_id: str | None = None
) -> TaskMessage:
    """A message for a task version; a fresh message id unless one is given."""
    if message_id is None:
        return TaskMessage.for_task(task_id, version)
    return TaskMessage(task_id, version, message_id)


def changed(before: Task, after: Task) -> set[str]:
    """The names of the fields whose values differ."""
    old, new = _fields(before), _fields(after)
    return {name for name in old if old[name] != new[name]}


async def stored(store: Store, task_id: str) -> VersionedTask:
    found = await store.get_task(task_id)
    assert found is not None, f"task {task_id} is missing"
    return found


# Task definitions.


async def test_task_defs_are_upserted_by_name_and_listed_by_name(
    store: Store,
) -> None:
    encode = TaskDef(
        name="encode",
        retryCount=1,
        inputKeys=["file"],
        inputTemplate={"codec": "h264"},
        ownerEmail="ops@example.com",
    )
    resize = TaskDef(name="resize")
    await store.upsert_task_defs([resize, encode])
    await store.upsert_task_defs([])
    assert await store.get_task_def("encode") == encode
    assert await store.list_task_defs() == [encode, resize]

    replaced = TaskDef(name="encode", description="second", retryCount=5)
    await store.upsert_task_defs([replaced])
    assert await store.get_task_def("encode") == replaced
    assert await store.list_task_defs() == [replaced, resize]
    assert await store.get_task_def("none") is None


async def test_deleting_a_task_def_reports_whether_there_was_one(
    store: Store,
) -> None:
    await store.upsert_task_defs([TaskDef(name="encode"), TaskDef(name="resize")])
    assert await store.delete_task_def("encode") is True
    assert await store.get_task_def("encode") is None
    assert await store.delete_task_def("encode") is False
    assert await store.delete_task_def("never") is False
    assert await store.list_task_defs() == [TaskDef(name="resize")]


# Workflow definitions.


async def test_an_existing_workflow_def_is_kept_without_overwrite(
    store: Store,
) -> None:
    first = make_workflow_def(description="first")
    assert await store.put_workflow_def(first, overwrite=False) is True
    second = make_workflow_def(description="second", timeoutSeconds=60)
    assert await store.put_workflow_def(second, overwrite=False) is False
    assert await store.get_workflow_def("pipeline", 1) == first
    assert await store.list_workflow_defs() == [first]


async def test_an_existing_workflow_def_is_replaced_with_overwrite(
    store: Store,
) -> None:
    await store.put_workflow_def(make_workflow_def(description="first"), False)
    second = make_workflow_def(description="second", timeoutSeconds=60)
    assert await store.put_workflow_def(second, overwrite=True) is True
    assert await store.get_workflow_def("pipeline", 1) == second
    fresh = make_workflow_def("fresh")
    assert await store.put_workflow_def(fresh, overwrite=True) is True
    assert await store.get_workflow_def("fresh", 1) == fresh


async def test_the_latest_workflow_def_is_the_highest_version(store: Store) -> None:
    for version in (2, 10, 1):
        definition = make_workflow_def(version=version, description=f"v{version}")
        assert await store.put_workflow_def(definition, overwrite=False)
    await store.put_workflow_def(make_workflow_def("other", 99), overwrite=False)

    latest = await store.get_workflow_def("pipeline")
    assert latest == make_workflow_def(version=10, description="v10")
    assert await store.get_workflow_def("pipeline", None) == latest
    assert await store.get_workflow_def("pipeline", 2) == make_workflow_def(
        version=2, description="v2"
    )
    assert await store.get_workflow_def("pipeline", 3) is None
    assert await store.get_workflow_def("none") is None


async def test_workflow_defs_list_every_version_of_every_name(store: Store) -> None:
    definitions = [
        make_workflow_def("pipeline", 2),
        make_workflow_def("archive", 1),
        make_workflow_def("pipeline", 1),
    ]
    assert await store.list_workflow_defs() == []
    for definition in definitions:
        await store.put_workflow_def(definition, overwrite=False)
    listed = await store.list_workflow_defs()
    assert sorted(listed, key=lambda d: (d.name, d.version)) == [
        definitions[1],
        definitions[2],
        definitions[0],
    ]


# Workflows.


async def test_a_workflow_is_stored_without_its_tasks(store: Store) -> None:
    workflow = make_workflow(tasks=[make_task("t1")], variables={"attempt": 1})
    await store.insert_workflow(workflow)
    got = await store.get_workflow("wf-1")
    assert got == make_workflow(variables={"attempt": 1})
    assert got is not None and got.tasks == []
    assert await store.get_workflow("none") is None


async def test_inserting_a_workflow_id_twice_raises_duplicate_key(
    store: Store,
) -> None:
    await store.insert_workflow(make_workflow())
    with pytest.raises(DuplicateKey):
        await store.insert_workflow(make_workflow(workflowName="other"))
    assert await store.get_workflow("wf-1") == make_workflow()


async def test_get_tasks_returns_the_tasks_that_exist_with_their_versions(
    store: Store,
) -> None:
    await store.insert_workflow(make_workflow())
    ids = [f"t-{n}" for n in range(1200)]
    await store.insert_tasks([make_task(task_id) for task_id in ids])
    moved = await store.transition_task("t-7", ("SCHEDULED",), {"status": "CANCELED"})
    assert moved is not None

    found = await store.get_tasks([*ids, "missing", "t-7"])

    assert sorted(entry.task.taskId for entry in found) == sorted(ids)
    versions = {entry.task.taskId: entry.version for entry in found}
    assert versions["t-7"] == 1 and versions["t-8"] == 0
    assert await store.get_tasks([]) == []


async def test_a_failed_write_undoes_only_itself_among_concurrent_writes(
    store: Store,
) -> None:
    # Issued together, the embedded store runs these in one transaction.
    await store.insert_workflow(make_workflow())
    outcomes = await asyncio.gather(
        store.insert_workflow(make_workflow("wf-2"), [make_task("t-2")]),
        store.insert_workflow(make_workflow(workflowName="other")),
        store.insert_tasks([make_task("t-3", seq=2)]),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], DuplicateKey)
    assert await store.get_workflow("wf-1") == make_workflow()
    assert await store.get_workflow("wf-2") is not None
    assert await store.get_task("t-2") is not None
    assert await store.get_task("t-3") is not None


async def test_finishing_a_workflow_applies_its_patch_only_once(
    store: Store,
) -> None:
    await store.insert_workflow(make_workflow())
    patch: dict[str, Any] = {"output": {"url": "s3://out/a.mp4"}, "endTime": NOW + 5}
    expected = make_workflow(status="COMPLETED", **patch)

    assert await store.finish_workflow("wf-1", "COMPLETED", patch) == expected
    assert await store.get_workflow("wf-1") == expected
    again = await store.finish_workflow(
        "wf-1", "FAILED", {"reasonForIncompletion": "too late"}
    )
    assert again is None
    assert await store.get_workflow("wf-1") == expected
    assert await store.finish_workflow("none", "TERMINATED", {}) is None


async def test_running_workflow_ids_list_only_running_workflows(
    store: Store,
) -> None:
    for workflow_id in ("wf-1", "wf-2", "wf-3"):
        await store.insert_workflow(make_workflow(workflow_id))
    await store.finish_workflow("wf-2", "COMPLETED", {})
    assert sorted(await store.running_workflow_ids()) == ["wf-1", "wf-3"]


async def test_finishing_a_workflow_can_clear_a_field(store: Store) -> None:
    await store.insert_workflow(make_workflow())
    finished = await store.finish_workflow(
        "wf-1",
        "FAILED",
        {"correlationId": UNSET, "reasonForIncompletion": "encode failed"},
    )
    expected = make_workflow(
        status="FAILED", correlationId=UNSET, reasonForIncompletion="encode failed"
    )
    assert finished == expected
    assert await store.get_workflow("wf-1") == expected


# Tasks.


async def test_inserted_tasks_start_at_version_zero(store: Store) -> None:
    first = make_task("t1", correlationId="order-7", domain="blue")
    second = make_task("t2", seq=2, task_type="resize")
    await store.insert_tasks([first, second])
    await store.insert_tasks([])
    assert await store.get_task("t1") == (first, 0)
    assert await store.get_task("t2") == (second, 0)
    assert await store.get_task("none") is None


async def test_inserting_a_stored_task_id_keeps_the_original(store: Store) -> None:
    await store.insert_tasks([make_task("t1")])
    [claimed] = await store.claim_tasks([message("t1")], "w1", NOW)

    await store.insert_tasks(
        [make_task("t1", seq=9, inputData={"other": 1}), make_task("t2", seq=2)]
    )
    assert await store.get_task("t1") == (claimed, 1)
    assert await store.get_task("t2") == (make_task("t2", seq=2), 0)


async def test_workflow_tasks_are_ordered_by_seq(store: Store) -> None:
    tasks = [make_task(name, seq=seq) for name, seq in (("c", 3), ("a", 1), ("b", 2))]
    other = make_task("x", workflow_id="wf-2")
    await store.insert_tasks([*tasks, other])
    assert await store.workflow_tasks("wf-1") == [tasks[1], tasks[2], tasks[0]]
    assert await store.workflow_tasks("wf-2") == [other]
    assert await store.workflow_tasks("none") == []


# Claims.


async def test_a_message_at_the_task_version_claims_it(store: Store) -> None:
    task = make_task("t1")
    await store.insert_tasks([task])
    won = await store.claim_tasks([message("t1", 0)], "w1", NOW)
    expected = msgspec.structs.replace(
        task,
        status="IN_PROGRESS",
        pollCount=1,
        workerId="w1",
        updateTime=NOW,
        startTime=NOW,
    )
    assert won == [expected]
    assert await store.get_task("t1") == (expected, 1)
    assert changed(task, expected) == CLAIM_FIELDS - {"callbackAfterSeconds"}


async def test_a_stale_message_loses_and_changes_nothing(store: Store) -> None:
    await store.insert_tasks([make_task("t1"), make_task("done", status="COMPLETED")])
    before = await stored(store, "t1")
    assert await store.claim_tasks([message("t1", 1)], "w1", NOW) == []
    assert await store.claim_tasks([message("done", 0)], "w1", NOW) == []
    assert await store.get_task("t1") == before
    assert (await stored(store, "done")).task.status == "COMPLETED"

    await store.claim_tasks([message("t1", 0)], "w1", NOW)
    claimed = await stored(store, "t1")
    assert await store.claim_tasks([message("t1", 0)], "w2", NOW + 1) == []
    assert await store.get_task("t1") == claimed


async def test_a_duplicate_message_loses_while_the_task_is_in_progress(
    store: Store,
) -> None:
    await store.insert_tasks([make_task("t1")])
    assert len(await store.claim_tasks([message("t1", 0, "m-1")], "w1", NOW)) == 1
    claimed = await stored(store, "t1")
    assert await store.claim_tasks([message("t1", 0, "m-2")], "w2", NOW + 1) == []
    assert await store.get_task("t1") == claimed
    assert (claimed.task.workerId, claimed.task.pollCount) == ("w1", 1)


async def test_the_same_message_claims_again_after_its_holder_died(
    store: Store,
) -> None:
    await store.insert_tasks([make_task("t1")])
    delivered = message("t1")
    [first] = await store.claim_tasks([delivered], "w1", NOW)
    [second] = await store.claim_tasks([delivered], "w2", NOW + 60)

    assert (second.status, second.workerId, second.pollCount) == (
        "IN_PROGRESS",
        "w2",
        2,
    )
    assert (second.startTime, second.updateTime) == (NOW, NOW + 60)
    assert changed(first, second) == {"pollCount", "workerId", "updateTime"}
    assert await store.get_task("t1") == (second, 1)


async def test_a_redelivery_loses_once_the_task_has_changed(store: Store) -> None:
    await store.insert_tasks([make_task("t1"), make_task("t2", seq=2)])
    first, second = message("t1"), message("t2")
    await store.claim_tasks([first, second], "w1", NOW)
    await store.transition_task(
        "t1", {"IN_PROGRESS"}, {"status": "COMPLETED", "endTime": NOW + 5}
    )
    await store.transition_task("t2", {"IN_PROGRESS"}, {"outputData": {"p": 50}})
    done, updated = await stored(store, "t1"), await stored(store, "t2")

    assert await store.claim_tasks([first, second], "w2", NOW + 60) == []
    assert await store.get_task("t1") == done
    assert await store.get_task("t2") == updated


async def test_a_claim_resets_the_callback_delay_and_keeps_the_start_time(
    store: Store,
) -> None:
    await store.insert_tasks([make_task("t1")])
    await store.claim_tasks([message("t1")], "w1", NOW)
    requeued = await store.transition_task(
        "t1",
        {"IN_PROGRESS"},
        {"status": "SCHEDULED", "callbackAfterSeconds": 30, "updateTime": NOW + 1},
    )
    assert requeued is not None and requeued.version == 2

    [again] = await store.claim_tasks([message("t1", 2)], "w2", NOW + 31)
    assert again.callbackAfterSeconds == 0
    assert (again.startTime, again.updateTime) == (NOW, NOW + 31)
    assert (again.pollCount, again.workerId) == (2, "w2")
    assert await store.get_task("t1") == (again, 3)


async def test_a_claim_without_a_worker_id_leaves_the_worker_unset(
    store: Store,
) -> None:
    await store.insert_tasks([make_task("t1"), make_task("t2", seq=2)])
    [anonymous] = await store.claim_tasks([message("t1")], None, NOW)
    assert anonymous.workerId is UNSET
    assert (anonymous.status, anonymous.pollCount) == ("IN_PROGRESS", 1)
    assert await store.get_task("t1") == (anonymous, 1)

    delivered = message("t2")
    await store.claim_tasks([delivered], "w1", NOW)
    [reclaimed] = await store.claim_tasks([delivered], None, NOW + 1)
    assert reclaimed.workerId is UNSET
    assert (await stored(store, "t2")).task.workerId is UNSET


async def test_a_batch_of_ten_messages_claims_all_ten(store: Store) -> None:
    tasks = [make_task(f"t{i}", seq=i) for i in range(10)]
    await store.insert_tasks(tasks)
    messages = [message(task.taskId) for task in tasks]
    random.Random(10).shuffle(messages)

    won = await store.claim_tasks(messages, "w1", NOW)
    assert sorted(task.taskId for task in won) == sorted(t.taskId for t in tasks)
    for task in tasks:
        current = await stored(store, task.taskId)
        assert current.version == 1
        assert (current.task.status, current.task.pollCount) == ("IN_PROGRESS", 1)


async def test_a_mixed_batch_hands_out_only_the_winners(store: Store) -> None:
    await store.insert_tasks([make_task(f"t{i}", seq=i) for i in range(1, 5)])
    await store.claim_tasks([message("t2")], "w0", NOW - 10)
    busy = await stored(store, "t2")
    fresh = message("t1")
    batch = [
        message("missing"),
        fresh,
        message("t2"),  # a duplicate of a claimed task
        message("t3", 3),  # stale
        message("t4"),
        message("t4"),  # the same task published twice
        fresh,  # the same message twice
    ]

    won = await store.claim_tasks(batch, "w1", NOW)
    assert sorted(task.taskId for task in won) == ["t1", "t4"]
    for task_id in ("t1", "t4"):
        current = await stored(store, task_id)
        assert (current.version, current.task.pollCount) == (1, 1)
        assert current.task.workerId == "w1"
    assert await store.get_task("t2") == busy
    assert await store.get_task("t3") == (make_task("t3", seq=3), 0)
    assert await store.get_task("missing") is None


async def test_concurrent_claims_hand_each_task_to_one_caller(store: Store) -> None:
    tasks = [make_task(f"t{i:02}", seq=i) for i in range(20)]
    await store.insert_tasks(tasks)
    first = [message(task.taskId) for task in tasks]
    second = [message(task.taskId) for task in reversed(tasks)]

    won_a, won_b = await asyncio.gather(
        store.claim_tasks(first, "a", NOW), store.claim_tasks(second, "b", NOW)
    )
    ids_a = {task.taskId for task in won_a}
    ids_b = {task.taskId for task in won_b}
    assert len(ids_a) == len(won_a) and len(ids_b) == len(won_b)
    assert ids_a.isdisjoint(ids_b)
    assert ids_a | ids_b == {task.taskId for task in tasks}
    for task in tasks:
        current = await stored(store, task.taskId)
        assert (current.version, current.task.pollCount) == (1, 1)
        assert current.task.workerId == ("a" if task.taskId in ids_a else "b")


# Transitions.


async def test_a_transition_applies_its_patch_and_bumps_the_version(
    store: Store,
) -> None:
    await store.insert_tasks([make_task("t1")])
    [claimed] = await store.claim_tasks([message("t1")], "w1", NOW)
    patch = {
        "status": "COMPLETED",
        "outputData": {"url": "s3://out/a.mp4"},
        "endTime": NOW + 5,
        "updateTime": NOW + 5,
    }
    expected = msgspec.structs.replace(claimed, **patch)

    result = await store.transition_task("t1", {"IN_PROGRESS"}, patch)
    assert result == (expected, 2)
    assert await store.get_task("t1") == (expected, 2)


async def test_a_transition_from_another_status_changes_nothing(
    store: Store,
) -> None:
    task = make_task("t1")
    await store.insert_tasks([task])
    patch = {"status": "COMPLETED"}
    assert await store.transition_task("t1", {"IN_PROGRESS"}, patch) is None
    assert await store.transition_task("t1", [], patch) is None
    assert await store.transition_task("none", {"SCHEDULED"}, patch) is None
    assert await store.get_task("t1") == (task, 0)
    assert await store.get_task("none") is None


async def test_a_transition_accepts_any_of_its_statuses(store: Store) -> None:
    await store.insert_tasks([make_task("t1")])
    pending = ("SCHEDULED", "IN_PROGRESS")
    canceled = await store.transition_task("t1", pending, {"status": "CANCELED"})
    assert canceled is not None
    assert (canceled.task.status, canceled.version) == ("CANCELED", 1)
    assert await store.transition_task("t1", pending, {"status": "FAILED"}) is None


async def test_an_empty_transition_still_bumps_the_version(store: Store) -> None:
    task = make_task("t1")
    await store.insert_tasks([task])
    assert await store.transition_task("t1", {"SCHEDULED"}, {}) == (task, 1)
    assert await store.get_task("t1") == (task, 1)


async def test_a_transition_can_reset_the_start_time(store: Store) -> None:
    await store.insert_tasks([make_task("t1")])
    await store.claim_tasks([message("t1")], "w1", NOW)
    reset = await store.transition_task(
        "t1",
        {"IN_PROGRESS"},
        {"status": "SCHEDULED", "startTime": 0, "workerId": UNSET},
    )
    assert reset is not None and reset.version == 2
    assert (reset.task.startTime, reset.task.workerId) == (0, UNSET)
    assert await store.get_task("t1") == reset

    [again] = await store.claim_tasks([message("t1", 2)], "w2", NOW + 100)
    assert again.startTime == NOW + 100


async def test_a_transition_of_an_unknown_field_is_refused(store: Store) -> None:
    task = make_task("t1")
    await store.insert_tasks([task])
    with pytest.raises(ValueError):
        await store.transition_task("t1", {"SCHEDULED"}, {"bogus": 1})
    assert await store.get_task("t1") == (task, 0)


async def test_concurrent_transitions_move_a_task_once(store: Store) -> None:
    await store.insert_tasks([make_task("t1")])
    await store.claim_tasks([message("t1")], "w1", NOW)
    results = await asyncio.gather(
        store.transition_task("t1", {"IN_PROGRESS"}, {"status": "COMPLETED"}),
        store.transition_task("t1", {"IN_PROGRESS"}, {"status": "FAILED"}),
    )
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert winners[0].version == 2
    assert await store.get_task("t1") == winners[0]


# Scheduled tasks.


async def test_scheduled_tasks_lists_only_scheduled_ones_with_versions(
    store: Store,
) -> None:
    await store.insert_tasks(
        [
            make_task("a", seq=1),
            make_task("b", seq=2),
            make_task("c", seq=3, task_type="resize"),
            make_task("d", seq=4, status="COMPLETED"),
            make_task("e", seq=5),
        ]
    )
    await store.claim_tasks([message("a"), message("e")], "w1", NOW)
    retried = await store.transition_task("e", {"IN_PROGRESS"}, {"status": "SCHEDULED"})
    assert retried is not None

    def ids(found: list[VersionedTask]) -> list[tuple[str, int]]:
        return sorted((entry.task.taskId, entry.version) for entry in found)

    encode = await store.scheduled_tasks("encode")
    assert ids(encode) == [("b", 0), ("e", 2)]
    assert retried in encode
    assert ids(await store.scheduled_tasks()) == [("b", 0), ("c", 0), ("e", 2)]
    assert await store.scheduled_tasks("none") == []


async def test_count_in_progress_counts_one_type_in_every_domain(store: Store) -> None:
    await store.insert_tasks(
        [
            make_task("a", seq=1),
            make_task("b", seq=2, domain="blue"),
            make_task("c", seq=3),
            make_task("d", seq=4, task_type="resize"),
            make_task("e", seq=5, status="COMPLETED"),
        ]
    )
    assert await store.count_in_progress("encode") == 0
    await store.claim_tasks([message("a"), message("b"), message("d")], "w1", NOW)
    assert await store.count_in_progress("encode") == 2
    assert await store.count_in_progress("resize") == 1
    assert await store.count_in_progress("none") == 0

    done = await store.transition_task("a", {"IN_PROGRESS"}, {"status": "COMPLETED"})
    assert done is not None
    assert await store.count_in_progress("encode") == 1


async def test_rate_slots_are_granted_up_to_the_limit_of_a_window(
    store: Store,
) -> None:
    # The current time: a store may drop the records of ended windows.
    now = int(time.time() * 1000)
    first = RateWindow.at(now, 10_000)
    assert await store.take_rate_slots("encode", first, 5, 3) == 3
    assert await store.take_rate_slots("encode", first, 5, 3) == 2
    assert await store.take_rate_slots("encode", first, 5, 1) == 0
    assert await store.take_rate_slots("resize", first, 5, 4) == 4

    await store.release_rate_slots("encode", first, 2)
    assert await store.take_rate_slots("encode", first, 5, 3) == 2

    following = RateWindow.at(now + 10_000, 10_000)
    assert following.start_ms == first.start_ms + 10_000
    assert await store.take_rate_slots("encode", following, 5, 5) == 5


async def test_concurrent_rate_slot_takers_never_exceed_the_limit(store: Store) -> None:
    window = RateWindow.at(int(time.time() * 1000), 10_000)
    grants = await asyncio.gather(
        *(store.take_rate_slots("encode", window, 7, 2) for _ in range(10))
    )
    assert all(0 <= granted <= 2 for granted in grants)
    assert sum(grants) <= 7
    rest = await store.take_rate_slots("encode", window, 7, 7)
    assert sum(grants) + rest == 7


# Failures.


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A MongoDB URL on a local port that is bound but never listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"mongodb://127.0.0.1:{sock.getsockname()[1]}/"


async def test_a_started_store_answers_a_ping(store: Store) -> None:
    await store.ping()


async def test_a_closed_store_raises_store_error(store: Store) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.get_task("t1")
    with pytest.raises(StoreError):
        await store.insert_tasks([make_task("t1")])
    with pytest.raises(StoreError):
        await store.claim_tasks([message("t1")], "w1", NOW)


async def test_an_unreachable_mongodb_raises_store_error(refused_url: str) -> None:
    adapter = MongoStore(refused_url, "baton", server_selection_timeout_ms=200)
    with pytest.raises(StoreError):
        await adapter.start()
    with pytest.raises(StoreError):
        await adapter.get_task("t1")
    await adapter.close()


async def test_an_unopenable_sqlite_file_raises_store_error(tmp_path: Path) -> None:
    adapter = SQLiteStore(str(tmp_path / "missing" / "baton.db"))
    with pytest.raises(StoreError):
        await adapter.start()
    with pytest.raises(StoreError):
        await adapter.get_task("t1")
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
