"""The MongoDB store, on PyMongo's native asyncio client.

Every task state change is one guarded single-document update; the claim of
a batch of messages is one unordered bulk write plus one read of the
winners, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import msgspec
from msgspec import UNSET
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    IndexModel,
    ReplaceOne,
    ReturnDocument,
    UpdateOne,
)
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from shared.clock import now_ms
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
    WorkflowStatus,
)

Document = dict[str, Any]

_DUPLICATE_KEY: Final = 11000
_MAX_IDS: Final = 1000
_TASK_FIELDS: Final = frozenset(Task.__struct_fields__)
_WORKFLOW_PATCH_FIELDS: Final = frozenset(Workflow.__struct_fields__) - {
    "workflowId",
    "tasks",
}
_RATE_ATTEMPTS: Final = 8
_RATE_RECORD_KEPT_MS: Final = 60_000


_T = TypeVar("_T")


def _decode(doc: Document, kind: type[_T]) -> _T:
    # Lenient on scalars: a wire-compatible server may hand booleans back
    # as 0/1; every field is still checked against the model.
    return msgspec.convert(doc, kind, strict=False)


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Turn driver and decoding failures into StoreError."""
    try:
        yield
    except PyMongoError as exc:
        raise StoreError(f"MongoDB {operation} failed: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise StoreError(f"MongoDB {operation} returned a bad document: {exc}") from exc


def _only_duplicates(exc: BulkWriteError) -> bool:
    details = exc.details
    errors = details.get("writeErrors", [])
    return not details.get("writeConcernErrors") and all(
        error.get("code") == _DUPLICATE_KEY for error in errors
    )


def _task_doc(task: Task) -> Document:
    doc: Document = msgspec.to_builtins(task)
    doc["_id"] = task.taskId
    doc["_version"] = 0
    # Absent while 0, so that a claim can set it with `$min`.
    if not task.startTime:
        del doc["startTime"]
    return doc


def _task_def_doc(definition: TaskDef) -> Document:
    doc: Document = msgspec.to_builtins(definition)
    doc["_id"] = definition.name
    return doc


def _versioned(doc: Document) -> VersionedTask:
    return VersionedTask(_decode(doc, Task), doc["_version"])


def _split_patch(
    patch: Mapping[str, Any], allowed: frozenset[str]
) -> tuple[Document, Document]:
    """Split a patch into `$set` and `$unset` parts, as BSON-ready values."""
    unknown = patch.keys() - allowed
    if unknown:
        raise ValueError(f"cannot patch unknown fields {sorted(unknown)}")
    to_set: Document = {}
    to_unset: Document = {}
    for key, value in patch.items():
        if value is UNSET:
            to_unset[key] = ""
        else:
            to_set[key] = msgspec.to_builtins(value)
    return to_set, to_unset


def _poll_data(doc: Document) -> PollData:
    doc.pop("_id", None)
    if doc.get("domain") is None:
        doc.pop("domain", None)
    if doc.get("workerId") is None:
        doc.pop("workerId", None)
    return _decode(doc, PollData)


class MongoStore(Store):
    """The production store: one MongoDB database, one collection per kind.

    Tasks keep `_version` (bumped on every change), `_claim` (the message
    that claimed the task) and `_token` (the claim call that last won it)
    next to their Conductor fields.
    """

    def __init__(
        self,
        url: str,
        database: str = "baton",
        *,
        server_selection_timeout_ms: int = 5000,
        socket_timeout_ms: int = 10000,
    ) -> None:
        self._url = url
        self._database_name = database
        self._server_selection_timeout_ms = server_selection_timeout_ms
        self._socket_timeout_ms = socket_timeout_ms
        self._client: AsyncMongoClient[Document] | None = None
        self._db: AsyncDatabase[Document] | None = None

    # Lifecycle.

    async def start(self) -> None:
        try:
            # Without a socket timeout, an operation on a connection that
            # stops answering (a frozen server, a dropped route) waits for
            # ever, holding a poll's deliveries and a pooled connection.
            client: AsyncMongoClient[Document] = AsyncMongoClient(
                self._url,
                serverSelectionTimeoutMS=self._server_selection_timeout_ms,
                socketTimeoutMS=self._socket_timeout_ms,
            )
        except PyMongoError as exc:
            raise StoreError(f"bad MongoDB configuration: {exc}") from exc
        self._client = client
        self._db = client[self._database_name]
        try:
            with _translated("start"):
                await client.admin.command("ping")
                await self._create_indexes()
        except BaseException:
            await self.close()
            raise

    async def _create_indexes(self) -> None:
        await self._coll("tasks").create_indexes(
            [
                IndexModel([("workflowInstanceId", ASCENDING), ("seq", ASCENDING)]),
                IndexModel([("status", ASCENDING), ("taskType", ASCENDING)]),
            ]
        )
        # A task has few results and log lines: the index narrows to them
        # and orders them by arrival; `_id` only breaks ties in memory.
        await self._coll("task_results").create_index(
            [("taskId", ASCENDING), ("_received", ASCENDING)]
        )
        await self._coll("task_logs").create_index(
            [("taskId", ASCENDING), ("_at", ASCENDING)]
        )
        await self._coll("poll_data").create_index(
            [("queueName", ASCENDING), ("domain", ASCENDING)], unique=True
        )
        await self._coll("workflow_defs").create_index(
            [("name", ASCENDING), ("version", ASCENDING)], unique=True
        )
        await self._coll("workflows").create_index([("status", ASCENDING)])
        # A rate window's record goes a while after the window ends.
        await self._coll("rate_windows").create_index(
            [("expiresAt", ASCENDING)], expireAfterSeconds=0
        )

    async def close(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            await client.close()

    async def ping(self) -> None:
        if self._client is None:
            raise StoreError("MongoDB store is not started")
        with _translated("ping"):
            await self._client.admin.command("ping")

    def _coll(self, name: str) -> AsyncCollection[Document]:
        if self._db is None:
            raise StoreError("MongoDB store is not started")
        return self._db[name]

    # Definitions.

    async def upsert_task_defs(self, defs: Sequence[TaskDef]) -> None:
        if not defs:
            return
        ops: list[ReplaceOne[Document]] = [
            ReplaceOne({"_id": d.name}, _task_def_doc(d), upsert=True) for d in defs
        ]
        with _translated("upsert_task_defs"):
            await self._coll("task_defs").bulk_write(ops, ordered=True)

    async def get_task_def(self, name: str) -> TaskDef | None:
        with _translated("get_task_def"):
            doc = await self._coll("task_defs").find_one({"_id": name})
            return None if doc is None else _decode(doc, TaskDef)

    async def list_task_defs(self) -> list[TaskDef]:
        with _translated("list_task_defs"):
            cursor = self._coll("task_defs").find({}).sort("_id", ASCENDING)
            return [_decode(doc, TaskDef) async for doc in cursor]

    async def delete_task_def(self, name: str) -> bool:
        with _translated("delete_task_def"):
            result = await self._coll("task_defs").delete_one({"_id": name})
        return result.deleted_count > 0

    async def put_workflow_def(self, definition: WorkflowDef, overwrite: bool) -> bool:
        doc: Document = msgspec.to_builtins(definition)
        key = {"name": definition.name, "version": definition.version}
        coll = self._coll("workflow_defs")
        with _translated("put_workflow_def"):
            if not overwrite:
                try:
                    await coll.insert_one(doc)
                except DuplicateKeyError:
                    return False
                return True
            try:
                await coll.replace_one(key, doc, upsert=True)
            except DuplicateKeyError:
                # Two concurrent upserts both inserted; the loser now finds
                # the winner's document and replaces it.
                await coll.replace_one(key, doc, upsert=True)
        return True

    async def get_workflow_def(
        self, name: str, version: int | None = None
    ) -> WorkflowDef | None:
        coll = self._coll("workflow_defs")
        with _translated("get_workflow_def"):
            if version is not None:
                doc = await coll.find_one({"name": name, "version": version})
            else:
                doc = await coll.find_one(
                    {"name": name}, sort=[("version", DESCENDING)]
                )
            return None if doc is None else _decode(doc, WorkflowDef)

    async def list_workflow_defs(self) -> list[WorkflowDef]:
        with _translated("list_workflow_defs"):
            cursor = (
                self._coll("workflow_defs")
                .find({})
                .sort([("name", ASCENDING), ("version", ASCENDING)])
            )
            return [_decode(doc, WorkflowDef) async for doc in cursor]

    # Workflows.

    async def insert_workflow(
        self, workflow: Workflow, tasks: Sequence[Task] = ()
    ) -> None:
        doc: Document = msgspec.to_builtins(msgspec.structs.replace(workflow, tasks=[]))
        del doc["tasks"]
        doc["_id"] = workflow.workflowId
        with _translated("insert_workflow"):
            try:
                await self._coll("workflows").insert_one(doc)
            except DuplicateKeyError as exc:
                raise DuplicateKey(
                    f"workflow {workflow.workflowId} exists already"
                ) from exc
        # Written after the workflow: a crash in between leaves a workflow
        # with no task, never a task with no workflow.
        await self.insert_tasks(tasks)

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        with _translated("get_workflow"):
            doc = await self._coll("workflows").find_one({"_id": workflow_id})
            return None if doc is None else _decode(doc, Workflow)

    async def finish_workflow(
        self, workflow_id: str, status: WorkflowStatus, patch: Mapping[str, Any]
    ) -> Workflow | None:
        to_set, to_unset = _split_patch(patch, _WORKFLOW_PATCH_FIELDS)
        to_set["status"] = status
        update: Document = {"$set": to_set}
        if to_unset:
            update["$unset"] = to_unset
        with _translated("finish_workflow"):
            doc = await self._coll("workflows").find_one_and_update(
                {"_id": workflow_id, "status": "RUNNING"},
                update,
                return_document=ReturnDocument.AFTER,
            )
            return None if doc is None else _decode(doc, Workflow)

    # Tasks.

    async def insert_tasks(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            return
        docs = [_task_doc(task) for task in tasks]
        with _translated("insert_tasks"):
            try:
                await self._coll("tasks").insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                if not _only_duplicates(exc):
                    raise

    async def get_task(self, task_id: str) -> VersionedTask | None:
        with _translated("get_task"):
            doc = await self._coll("tasks").find_one({"_id": task_id})
            return None if doc is None else _versioned(doc)

    async def get_tasks(self, task_ids: Sequence[str]) -> list[VersionedTask]:
        ids = list(dict.fromkeys(task_ids))
        found: list[VersionedTask] = []
        with _translated("get_tasks"):
            for start in range(0, len(ids), _MAX_IDS):
                chunk = ids[start : start + _MAX_IDS]
                cursor = self._coll("tasks").find({"_id": {"$in": chunk}})
                found.extend([_versioned(doc) async for doc in cursor])
        return found

    async def workflow_tasks(self, workflow_id: str) -> list[Task]:
        with _translated("workflow_tasks"):
            cursor = (
                self._coll("tasks")
                .find({"workflowInstanceId": workflow_id})
                .sort("seq", ASCENDING)
            )
            return [_decode(doc, Task) async for doc in cursor]

    async def claim_tasks(
        self, messages: Sequence[TaskMessage], worker_id: str | None, now: int
    ) -> list[Task]:
        unique: dict[str, TaskMessage] = {}
        for message in messages:
            unique.setdefault(message.message_id, message)
        if not unique:
            return []
        token = os.urandom(12).hex()
        ops: list[UpdateOne] = []
        for message in unique.values():
            to_set: Document = {
                "status": "IN_PROGRESS",
                "_version": message.version + 1,
                "_claim": message.message_id,
                "_token": token,
                "updateTime": now,
                "callbackAfterSeconds": 0,
            }
            update: Document = {
                "$set": to_set,
                "$inc": {"pollCount": 1},
                "$min": {"startTime": now},
            }
            if worker_id is None:
                update["$unset"] = {"workerId": ""}
            else:
                to_set["workerId"] = worker_id
            guard = {
                "_id": message.task_id,
                "$or": [
                    {"status": "SCHEDULED", "_version": message.version},
                    {
                        "status": "IN_PROGRESS",
                        "_claim": message.message_id,
                        "_version": message.version + 1,
                    },
                ],
            }
            ops.append(UpdateOne(guard, update))
        coll = self._coll("tasks")
        ids = list({message.task_id for message in unique.values()})
        with _translated("claim_tasks"):
            result = await coll.bulk_write(ops, ordered=False)
            if result.modified_count == 0:
                return []
            won = {
                doc["_id"]: _decode(doc, Task)
                async for doc in coll.find({"_id": {"$in": ids}, "_token": token})
            }
        winners: list[Task] = []
        for message in unique.values():
            task = won.pop(message.task_id, None)
            if task is not None:
                winners.append(task)
        return winners

    async def transition_task(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        expected_version: int | None = None,
    ) -> VersionedTask | None:
        to_set, to_unset = _split_patch(patch, _TASK_FIELDS)
        if to_set.get("startTime") == 0:
            del to_set["startTime"]
            to_unset["startTime"] = ""
        update: Document = {"$inc": {"_version": 1}}
        if to_set:
            update["$set"] = to_set
        if to_unset:
            update["$unset"] = to_unset
        with _translated("transition_task"):
            query: Document = {"_id": task_id, "status": {"$in": list(from_statuses)}}
            if expected_version is not None:
                query["_version"] = expected_version
            doc = await self._coll("tasks").find_one_and_update(
                query,
                update,
                return_document=ReturnDocument.AFTER,
            )
            return None if doc is None else _versioned(doc)

    async def record_result(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        result: TaskResult,
        received_at: int,
    ) -> tuple[VersionedTask, Workflow | None] | None:
        changed = await self.transition_task(task_id, from_statuses, patch)
        if changed is None:
            return None
        _, workflow = await asyncio.gather(
            self.add_task_result(result, received_at),
            self.get_workflow(changed.task.workflowInstanceId or ""),
        )
        return changed, workflow

    async def scheduled_tasks(
        self, task_type: str | None = None
    ) -> list[VersionedTask]:
        return await self._tasks_in("SCHEDULED", task_type)

    async def in_progress_tasks(self) -> list[VersionedTask]:
        return await self._tasks_in("IN_PROGRESS", None)

    async def running_workflow_ids(self) -> list[str]:
        with _translated("running workflows"):
            cursor = self._coll("workflows").find({"status": "RUNNING"}, {"_id": 1})
            return [doc["_id"] async for doc in cursor]

    async def count_in_progress(self, task_type: str) -> int:
        with _translated("count_in_progress"):
            return await self._coll("tasks").count_documents(
                {"status": "IN_PROGRESS", "taskType": task_type}
            )

    async def take_rate_slots(
        self, task_type: str, window: RateWindow, limit: int, wanted: int
    ) -> int:
        # Read the window's count, then add to it only if it is unchanged:
        # a caller that lost the race reads again.
        key = f"{task_type}@{window.start_ms}"
        windows = self._coll("rate_windows")
        with _translated("take_rate_slots"):
            for _ in range(_RATE_ATTEMPTS):
                doc = await windows.find_one({"_id": key}, {"used": 1})
                used = int(doc["used"]) if doc else 0
                granted = min(wanted, limit - used)
                if granted <= 0:
                    return 0
                if doc is None:
                    expires = window.start_ms + window.length_ms + _RATE_RECORD_KEPT_MS
                    try:
                        await windows.insert_one(
                            {
                                "_id": key,
                                "taskType": task_type,
                                "used": granted,
                                "expiresAt": datetime.datetime.fromtimestamp(
                                    expires / 1000, datetime.UTC
                                ),
                            }
                        )
                    except DuplicateKeyError:
                        continue
                    return granted
                changed = await windows.update_one(
                    {"_id": key, "used": used}, {"$inc": {"used": granted}}
                )
                if changed.modified_count:
                    return granted
        return 0

    async def release_rate_slots(
        self, task_type: str, window: RateWindow, count: int
    ) -> None:
        with _translated("release_rate_slots"):
            await self._coll("rate_windows").update_one(
                {"_id": f"{task_type}@{window.start_ms}", "used": {"$gte": count}},
                {"$inc": {"used": -count}},
            )

    async def _tasks_in(
        self, status: str, task_type: str | None
    ) -> list[VersionedTask]:
        query: Document = {"status": status}
        if task_type is not None:
            query["taskType"] = task_type
        with _translated("tasks by status"):
            return [_versioned(doc) async for doc in self._coll("tasks").find(query)]

    # History.

    async def add_task_result(self, result: TaskResult, received_at: int) -> None:
        doc: Document = msgspec.to_builtins(result)
        doc["_received"] = received_at
        with _translated("add_task_result"):
            await self._coll("task_results").insert_one(doc)

    async def task_results(self, task_id: str) -> list[TaskResult]:
        with _translated("task_results"):
            cursor = (
                self._coll("task_results")
                .find({"taskId": task_id})
                .sort([("_received", ASCENDING), ("_id", ASCENDING)])
            )
            return [_decode(doc, TaskResult) async for doc in cursor]

    async def add_logs(
        self, task_id: str, logs: Sequence[TaskExecLog], keep: int | None = None
    ) -> None:
        if not logs:
            return
        now = now_ms()
        docs = [
            {
                "taskId": task_id,
                "log": line.log,
                "createdTime": line.createdTime,
                "_at": now,
            }
            for line in logs
        ]
        with _translated("add_logs"):
            await self._coll("task_logs").insert_many(docs, ordered=True)
            if keep is not None:
                await self._trim_logs(task_id, keep)

    async def _trim_logs(self, task_id: str, keep: int) -> None:
        # Not atomic with the insert: a crash in between leaves extra lines
        # that the next append of the task trims.
        cursor = (
            self._coll("task_logs")
            .find({"taskId": task_id}, {"_id": 1})
            .sort([("_at", DESCENDING), ("_id", DESCENDING)])
            .skip(keep)
        )
        stale = [doc["_id"] async for doc in cursor]
        if stale:
            await self._coll("task_logs").delete_many({"_id": {"$in": stale}})

    async def get_logs(self, task_id: str) -> list[TaskExecLog]:
        with _translated("get_logs"):
            cursor = (
                self._coll("task_logs")
                .find({"taskId": task_id})
                .sort([("_at", ASCENDING), ("_id", ASCENDING)])
            )
            return [_decode(doc, TaskExecLog) async for doc in cursor]

    # Poll data and queues.

    async def save_poll_data(self, entries: Sequence[PollData]) -> None:
        latest: dict[tuple[str, str | None], PollData] = {}
        for entry in entries:
            # An empty domain is no domain, as in Conductor's queue names.
            domain = entry.domain if isinstance(entry.domain, str) else None
            key = (entry.queueName, domain or None)
            seen = latest.get(key)
            if seen is None or entry.lastPollTime >= seen.lastPollTime:
                latest[key] = entry
        if not latest:
            return
        ops: list[UpdateOne] = []
        for (queue_name, domain), entry in latest.items():
            update: Document = {"$max": {"lastPollTime": entry.lastPollTime}}
            if entry.workerId is UNSET:
                update["$unset"] = {"workerId": ""}
            else:
                update["$set"] = {"workerId": entry.workerId}
            ops.append(
                UpdateOne(
                    {"queueName": queue_name, "domain": domain}, update, upsert=True
                )
            )
        await self._bulk_upsert("poll_data", ops)

    async def get_poll_data(self, task_type: str | None = None) -> list[PollData]:
        query: Document = {} if task_type is None else {"queueName": task_type}
        with _translated("get_poll_data"):
            cursor = (
                self._coll("poll_data")
                .find(query)
                .sort([("queueName", ASCENDING), ("domain", ASCENDING)])
            )
            return [_poll_data(doc) async for doc in cursor]

    async def register_queues(self, queues: Sequence[str]) -> None:
        names = dict.fromkeys(queues)
        if not names:
            return
        ops: list[ReplaceOne[Document]] = [
            ReplaceOne({"_id": name}, {"_id": name}, upsert=True) for name in names
        ]
        await self._bulk_upsert("queues", ops)

    async def list_queues(self) -> list[str]:
        with _translated("list_queues"):
            cursor = self._coll("queues").find({}, {"_id": 1}).sort("_id", ASCENDING)
            return [doc["_id"] async for doc in cursor]

    async def _bulk_upsert(
        self, collection: str, ops: Sequence[UpdateOne | ReplaceOne[Document]]
    ) -> None:
        """Run unordered upserts, retrying once those that raced an insert.

        Two concurrent upserts of one key can both try to insert; the loser
        fails with a duplicate key and succeeds as an update when retried.
        """
        coll = self._coll(collection)
        with _translated(f"{collection} upsert"):
            try:
                await coll.bulk_write(list(ops), ordered=False)
            except BulkWriteError as exc:
                if not _only_duplicates(exc):
                    raise
                failed = [ops[error["index"]] for error in exc.details["writeErrors"]]
                await coll.bulk_write(failed, ordered=False)
