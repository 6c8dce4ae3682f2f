"""The embedded store: one SQLite file, owned by one thread.

sqlite3 blocks, so the connection lives on a dedicated thread and the event
loop only hands it operations, batched per loop turn. The thread runs
whatever is queued inside one transaction, commits once, and only then
resolves the callers: a burst of writes costs one commit and one wake-up
each way, and nobody sees a write that could still be lost. If one
operation of a group fails, the group is rolled back and its operations
run again one transaction each, so a failure undoes only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import msgspec
from msgspec import UNSET

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

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

_MAX_GROUP: Final = 512
_MAX_VARIABLES: Final = 500
_BUSY_TIMEOUT_MS: Final = 5000
_TASK_FIELDS: Final = frozenset(Task.__struct_fields__)
_WORKFLOW_PATCH_FIELDS: Final = frozenset(Workflow.__struct_fields__) - {
    "workflowId",
    "tasks",
}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS task_defs (
    name TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS workflow_defs (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS workflows_status ON workflows (status);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    workflow_id TEXT,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    task_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    claim TEXT,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_workflow ON tasks (workflow_id, seq);
CREATE INDEX IF NOT EXISTS tasks_status_type ON tasks (status, task_type);
CREATE TABLE IF NOT EXISTS task_results (
    id INTEGER PRIMARY KEY,
    task_id TEXT,
    received_at INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS task_results_task
    ON task_results (task_id, received_at);
CREATE TABLE IF NOT EXISTS task_logs (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    log TEXT,
    created_time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS task_logs_task ON task_logs (task_id);
CREATE TABLE IF NOT EXISTS poll_data (
    queue_name TEXT NOT NULL,
    domain TEXT NOT NULL,
    worker_id TEXT,
    last_poll_time INTEGER NOT NULL,
    PRIMARY KEY (queue_name, domain)
);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate_windows (
    task_type TEXT NOT NULL,
    period INTEGER NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (task_type, period)
) WITHOUT ROWID;
"""

_encode = msgspec.json.Encoder().encode
_decode_task = msgspec.json.Decoder(Task).decode
_decode_workflow = msgspec.json.Decoder(Workflow).decode
_decode_task_def = msgspec.json.Decoder(TaskDef).decode
_decode_workflow_def = msgspec.json.Decoder(WorkflowDef).decode
_decode_task_result = msgspec.json.Decoder(TaskResult).decode


def _create_schema(conn: sqlite3.Connection) -> None:
    # Statement by statement: executescript would commit the open group.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class _Request(NamedTuple):
    operation: Operation | None  # None asks the thread to stop.
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class _Outcome(NamedTuple):
    request: _Request
    value: Any
    error: BaseException | None


def _store_error(exc: Exception) -> StoreError:
    error = StoreError(f"SQLite operation failed: {exc}")
    error.__cause__ = exc
    return error


def _settle(outcomes: list[_Outcome]) -> None:
    for request, value, error in outcomes:
        if request.future.done():
            continue
        if error is None:
            request.future.set_result(value)
        else:
            request.future.set_exception(error)


def _deliver(outcomes: list[_Outcome]) -> None:
    """Resolve futures on their own loops, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome.request.loop, []).append(outcome)
    for loop, group in by_loop.items():
        # A closed loop has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, group)


def _value(operation: Operation | None, conn: sqlite3.Connection) -> Any:
    """Run an operation; a cursor it returns is closed here, not passed on."""
    assert operation is not None
    value = operation(conn)
    if isinstance(value, sqlite3.Cursor):
        # A cursor must not travel to the event loop's thread: finalised
        # there, it races this thread's use of the connection.
        value.close()
        return None
    return value


def _check_patch(patch: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = patch.keys() - allowed
    if unknown:
        raise ValueError(f"cannot patch unknown fields {sorted(unknown)}")


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _tasks_by_id(
    conn: sqlite3.Connection, columns: str, ids: Sequence[str]
) -> list[Any]:
    """`columns` of the tasks whose id is in `ids`, in no set order."""
    rows: list[Any] = []
    for chunk in _chunks(ids, _MAX_VARIABLES):
        marks = ",".join("?" * len(chunk))
        rows.extend(
            conn.execute(
                f"SELECT {columns} FROM tasks WHERE id IN ({marks})", chunk
            ).fetchall()
        )
    return rows


def _poll_data(
    queue_name: str, domain: str, worker_id: str | None, last_poll_time: int
) -> PollData:
    return PollData(
        queueName=queue_name,
        domain=domain or UNSET,
        workerId=UNSET if worker_id is None else worker_id,
        lastPollTime=last_poll_time,
    )


_TaskRow = tuple[str, str | None, int, str, str, bytes]


def _task_row(task: Task) -> _TaskRow:
    return (
        task.taskId,
        task.workflowInstanceId or None,
        task.seq,
        task.status,
        task.taskType,
        _encode(task),
    )


def _insert_task_rows(conn: sqlite3.Connection, rows: Sequence[_TaskRow]) -> None:
    conn.executemany(
        "INSERT INTO tasks "
        "(id, workflow_id, seq, status, task_type, version, claim, doc) "
        "VALUES (?, ?, ?, ?, ?, 0, NULL, ?) ON CONFLICT (id) DO NOTHING",
        rows,
    ).close()


def _insert_result(
    conn: sqlite3.Connection, row: tuple[str | None, int, bytes]
) -> None:
    conn.execute(
        "INSERT INTO task_results (task_id, received_at, doc) VALUES (?, ?, ?)",
        row,
    ).close()


def _transition(
    conn: sqlite3.Connection,
    task_id: str,
    allowed: frozenset[str],
    changes: dict[str, Any],
    expected_version: int | None,
) -> VersionedTask | None:
    row = conn.execute(
        "SELECT status, version, doc FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    if row is None or row[0] not in allowed:
        return None
    if expected_version is not None and row[1] != expected_version:
        return None
    task = msgspec.structs.replace(_decode_task(row[2]), **changes)
    blob = _encode(task)
    version = row[1] + 1
    conn.execute(
        "UPDATE tasks SET workflow_id = ?, seq = ?, status = ?, "
        "task_type = ?, version = ?, doc = ? WHERE id = ?",
        (
            task.workflowInstanceId or None,
            task.seq,
            task.status,
            task.taskType,
            version,
            blob,
            task_id,
        ),
    )
    return VersionedTask(task, version)


class SQLiteStore(Store):
    """The embedded store: a SQLite file in WAL mode, one writer thread.

    Tables hold each record as msgspec JSON next to the columns that
    queries filter or sort on, with an index for each of those queries.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[list[_Request]] = queue.SimpleQueue()
        self._pending: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # Lifecycle.

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, name=f"sqlite-store:{self._path}", daemon=True
        )
        self._thread.start()
        try:
            await self._call(_create_schema)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submit(loop)
        self._queue.put([_Request(None, future, loop)])
        await future
        self._thread = None

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._stopping:
            raise StoreError("SQLite store is not started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Operations asked for in one loop turn cross to the thread as one
        # batch: one wake-up of the thread rather than one per operation.
        pending = self._pending.get(loop)
        if pending is None:
            self._pending[loop] = pending = []
            loop.call_soon(self._submit, loop)
        pending.append(_Request(operation, future, loop))
        return await future

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, None)
        if batch:
            self._queue.put(batch)

    # The connection's thread.

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        return conn

    def _serve(self) -> None:
        conn: sqlite3.Connection | None
        broken: StoreError | None = None
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            conn, broken = None, _store_error(exc)
        backlog: deque[_Request] = deque()
        stop: _Request | None = None
        while stop is None:
            if not backlog:
                backlog.extend(self._queue.get())
            if backlog[0].operation is None:
                stop = backlog.popleft()
                break
            if conn is None:
                _deliver([_Outcome(backlog.popleft(), None, broken)])
                continue
            stop = self._run_group(conn, backlog)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if stop is not None:
            _deliver([_Outcome(stop, None, None)])

    def _next(self, backlog: deque[_Request]) -> _Request | None:
        """The next queued request without waiting, or None."""
        if not backlog:
            try:
                backlog.extend(self._queue.get_nowait())
            except queue.Empty:
                return None
        return backlog.popleft() if backlog else None

    def _run_group(
        self, conn: sqlite3.Connection, backlog: deque[_Request]
    ) -> _Request | None:
        """Run the queued requests, up to `_MAX_GROUP`, in one transaction.

        Should one of them fail, the transaction is rolled back and each
        request runs again in a transaction of its own, so a failure
        undoes only its own request. Returns the stop request if one was
        dequeued.
        """
        requests = [backlog.popleft()]
        stop: _Request | None = None
        while len(requests) < _MAX_GROUP:
            following = self._next(backlog)
            if following is None:
                break
            if following.operation is None:
                stop = following
                break
            requests.append(following)
        outcomes = self._run_together(conn, requests)
        if outcomes is None:
            outcomes = [self._run_alone(conn, request) for request in requests]
        _deliver(outcomes)
        return stop

    @staticmethod
    def _run_together(
        conn: sqlite3.Connection, requests: list[_Request]
    ) -> list[_Outcome] | None:
        # No savepoint per request: every statement releases and retakes
        # the GIL, and on a busy event loop each retake can wait. Requests
        # are functions of the connection alone, so running them again
        # after a rollback is safe.
        try:
            conn.execute("BEGIN IMMEDIATE")
            values = [_value(request.operation, conn) for request in requests]
            conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return None
        return [_Outcome(r, v, None) for r, v in zip(requests, values, strict=True)]

    @staticmethod
    def _run_alone(conn: sqlite3.Connection, request: _Request) -> _Outcome:
        try:
            conn.execute("BEGIN IMMEDIATE")
            value = _value(request.operation, conn)
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error | msgspec.DecodeError):
                return _Outcome(request, None, _store_error(exc))
            return _Outcome(request, None, exc)
        return _Outcome(request, value, None)

    # Definitions.

    async def upsert_task_defs(self, defs: Sequence[TaskDef]) -> None:
        rows = [(d.name, _encode(d)) for d in defs]
        if not rows:
            return
        await self._call(
            lambda conn: conn.executemany(
                "INSERT INTO task_defs (name, doc) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
                rows,
            )
        )

    async def get_task_def(self, name: str) -> TaskDef | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM task_defs WHERE name = ?", (name,)
            ).fetchone()
        )
        return None if row is None else _decode_task_def(row[0])

    async def list_task_defs(self) -> list[TaskDef]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM task_defs ORDER BY name"
            ).fetchall()
        )
        return [_decode_task_def(row[0]) for row in rows]

    async def delete_task_def(self, name: str) -> bool:
        deleted = await self._call(
            lambda conn: (
                conn.execute("DELETE FROM task_defs WHERE name = ?", (name,)).rowcount
            )
        )
        return deleted > 0

    async def put_workflow_def(self, definition: WorkflowDef, overwrite: bool) -> bool:
        row = (definition.name, definition.version, _encode(definition))
        on_conflict = "DO UPDATE SET doc = excluded.doc" if overwrite else "DO NOTHING"
        sql = (
            "INSERT INTO workflow_defs (name, version, doc) VALUES (?, ?, ?) "
            f"ON CONFLICT (name, version) {on_conflict}"
        )
        written = await self._call(lambda conn: conn.execute(sql, row).rowcount)
        return written > 0

    async def get_workflow_def(
        self, name: str, version: int | None = None
    ) -> WorkflowDef | None:
        if version is None:
            sql = (
                "SELECT doc FROM workflow_defs WHERE name = ? "
                "ORDER BY version DESC LIMIT 1"
            )
            params: tuple[Any, ...] = (name,)
        else:
            sql = "SELECT doc FROM workflow_defs WHERE name = ? AND version = ?"
            params = (name, version)
        row = await self._call(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else _decode_workflow_def(row[0])

    async def list_workflow_defs(self) -> list[WorkflowDef]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM workflow_defs ORDER BY name, version"
            ).fetchall()
        )
        return [_decode_workflow_def(row[0]) for row in rows]

    # Workflows.

    async def insert_workflow(
        self, workflow: Workflow, tasks: Sequence[Task] = ()
    ) -> None:
        row = (
            workflow.workflowId,
            workflow.status,
            _encode(msgspec.structs.replace(workflow, tasks=[])),
        )
        task_rows = [_task_row(task) for task in tasks]

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO workflows (id, status, doc) VALUES (?, ?, ?)", row
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateKey(
                    f"workflow {workflow.workflowId} exists already"
                ) from exc
            _insert_task_rows(conn, task_rows)

        await self._call(insert)

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM workflows WHERE id = ?", (workflow_id,)
            ).fetchone()
        )
        return None if row is None else _decode_workflow(row[0])

    async def finish_workflow(
        self, workflow_id: str, status: WorkflowStatus, patch: Mapping[str, Any]
    ) -> Workflow | None:
        _check_patch(patch, _WORKFLOW_PATCH_FIELDS)
        changes = {**patch, "status": status}

        def finish(conn: sqlite3.Connection) -> Workflow | None:
            row = conn.execute(
                "SELECT status, doc FROM workflows WHERE id = ?", (workflow_id,)
            ).fetchone()
            if row is None or row[0] != "RUNNING":
                return None
            updated = msgspec.structs.replace(_decode_workflow(row[1]), **changes)
            blob = _encode(updated)
            conn.execute(
                "UPDATE workflows SET status = ?, doc = ? WHERE id = ?",
                (updated.status, blob, workflow_id),
            )
            return updated

        return await self._call(finish)

    # Tasks.

    async def insert_tasks(self, tasks: Sequence[Task]) -> None:
        rows = [_task_row(task) for task in tasks]
        if rows:
            await self._call(lambda conn: _insert_task_rows(conn, rows))

    async def get_task(self, task_id: str) -> VersionedTask | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT doc, version FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        )
        return None if row is None else VersionedTask(_decode_task(row[0]), row[1])

    async def get_tasks(self, task_ids: Sequence[str]) -> list[VersionedTask]:
        ids = list(dict.fromkeys(task_ids))

        rows = (
            await self._call(lambda conn: _tasks_by_id(conn, "doc, version", ids))
            if ids
            else []
        )
        return [VersionedTask(_decode_task(doc), version) for doc, version in rows]

    async def workflow_tasks(self, workflow_id: str) -> list[Task]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM tasks WHERE workflow_id = ? ORDER BY seq",
                (workflow_id,),
            ).fetchall()
        )
        return [_decode_task(row[0]) for row in rows]

    async def claim_tasks(
        self, messages: Sequence[TaskMessage], worker_id: str | None, now: int
    ) -> list[Task]:
        unique: dict[str, TaskMessage] = {}
        for message in messages:
            unique.setdefault(message.message_id, message)
        if not unique:
            return []
        ids = list({message.task_id for message in unique.values()})
        worker = UNSET if worker_id is None else worker_id

        def claim(conn: sqlite3.Connection) -> list[Task]:
            current: dict[str, tuple[str, int, str | None, bytes]] = {
                task_id: (status, version, claimed_by, doc)
                for task_id, status, version, claimed_by, doc in _tasks_by_id(
                    conn, "id, status, version, claim, doc", ids
                )
            }
            winners: list[Task] = []
            updates: list[tuple[int, str, bytes, str]] = []
            for message in unique.values():
                state = current.get(message.task_id)
                if state is None:
                    continue
                status, version, claimed_by, doc = state
                fresh = status == "SCHEDULED" and version == message.version
                redelivered = (
                    status == "IN_PROGRESS"
                    and claimed_by == message.message_id
                    and version == message.version + 1
                )
                if not (fresh or redelivered):
                    continue
                task = _decode_task(doc)
                task = msgspec.structs.replace(
                    task,
                    status="IN_PROGRESS",
                    pollCount=task.pollCount + 1,
                    workerId=worker,
                    updateTime=now,
                    callbackAfterSeconds=0,
                    startTime=task.startTime or now,
                )
                blob = _encode(task)
                new_version = message.version + 1
                # A later message in this batch must see the claim.
                current[message.task_id] = (
                    "IN_PROGRESS",
                    new_version,
                    message.message_id,
                    blob,
                )
                updates.append((new_version, message.message_id, blob, task.taskId))
                winners.append(task)
            if updates:
                conn.executemany(
                    "UPDATE tasks SET status = 'IN_PROGRESS', version = ?, "
                    "claim = ?, doc = ? WHERE id = ?",
                    updates,
                )
            return winners

        return await self._call(claim)

    async def transition_task(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        expected_version: int | None = None,
    ) -> VersionedTask | None:
        _check_patch(patch, _TASK_FIELDS)
        allowed = frozenset(from_statuses)
        changes = dict(patch)
        return await self._call(
            lambda conn: _transition(conn, task_id, allowed, changes, expected_version)
        )

    async def record_result(
        self,
        task_id: str,
        from_statuses: Collection[str],
        patch: Mapping[str, Any],
        result: TaskResult,
        received_at: int,
    ) -> tuple[VersionedTask, Workflow | None] | None:
        _check_patch(patch, _TASK_FIELDS)
        allowed = frozenset(from_statuses)
        changes = dict(patch)
        row = (task_id, received_at, _encode(result))

        def record(
            conn: sqlite3.Connection,
        ) -> tuple[VersionedTask, Workflow | None] | None:
            changed = _transition(conn, task_id, allowed, changes, None)
            if changed is None:
                return None
            _insert_result(conn, row)
            workflow = conn.execute(
                "SELECT doc FROM workflows WHERE id = ?",
                (changed.task.workflowInstanceId or "",),
            ).fetchone()
            return changed, None if workflow is None else _decode_workflow(workflow[0])

        return await self._call(record)

    async def scheduled_tasks(
        self, task_type: str | None = None
    ) -> list[VersionedTask]:
        return await self._tasks_in("SCHEDULED", task_type)

    async def in_progress_tasks(self) -> list[VersionedTask]:
        return await self._tasks_in("IN_PROGRESS", None)

    async def running_workflow_ids(self) -> list[str]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT id FROM workflows WHERE status = 'RUNNING'"
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def count_in_progress(self, task_type: str) -> int:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT COUNT(*) FROM tasks "
                "WHERE status = 'IN_PROGRESS' AND task_type = ?",
                (task_type,),
            ).fetchone()
        )
        return int(row[0])

    async def take_rate_slots(
        self, task_type: str, window: RateWindow, limit: int, wanted: int
    ) -> int:
        period = window.start_ms

        def take(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM rate_windows WHERE task_type = ? AND period < ?",
                (task_type, period),
            )
            row = conn.execute(
                "SELECT used FROM rate_windows WHERE task_type = ? AND period = ?",
                (task_type, period),
            ).fetchone()
            granted = max(0, min(wanted, limit - (row[0] if row else 0)))
            if granted:
                conn.execute(
                    "INSERT INTO rate_windows (task_type, period, used) "
                    "VALUES (?, ?, ?) ON CONFLICT (task_type, period) "
                    "DO UPDATE SET used = used + excluded.used",
                    (task_type, period, granted),
                )
            return granted

        return await self._call(take)

    async def release_rate_slots(
        self, task_type: str, window: RateWindow, count: int
    ) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE rate_windows SET used = MAX(0, used - ?) "
                "WHERE task_type = ? AND period = ?",
                (count, task_type, window.start_ms),
            ).close()

        await self._call(release)

    async def _tasks_in(
        self, status: str, task_type: str | None
    ) -> list[VersionedTask]:
        if task_type is None:
            sql = "SELECT doc, version FROM tasks WHERE status = ?"
            params: tuple[Any, ...] = (status,)
        else:
            sql = "SELECT doc, version FROM tasks WHERE status = ? AND task_type = ?"
            params = (status, task_type)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [VersionedTask(_decode_task(doc), version) for doc, version in rows]

    # History.

    async def add_task_result(self, result: TaskResult, received_at: int) -> None:
        row = (result.taskId, received_at, _encode(result))
        await self._call(lambda conn: _insert_result(conn, row))

    async def task_results(self, task_id: str) -> list[TaskResult]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT doc FROM task_results WHERE task_id = ? "
                "ORDER BY received_at, id",
                (task_id,),
            ).fetchall()
        )
        return [_decode_task_result(row[0]) for row in rows]

    async def add_logs(
        self, task_id: str, logs: Sequence[TaskExecLog], keep: int | None = None
    ) -> None:
        rows = [(task_id, line.log, line.createdTime) for line in logs]
        if not rows:
            return

        def append(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO task_logs (task_id, log, created_time) VALUES (?, ?, ?)",
                rows,
            )
            if keep is not None:
                conn.execute(
                    "DELETE FROM task_logs WHERE task_id = ? AND id NOT IN "
                    "(SELECT id FROM task_logs WHERE task_id = ? "
                    "ORDER BY id DESC LIMIT ?)",
                    (task_id, task_id, keep),
                )

        await self._call(append)

    async def get_logs(self, task_id: str) -> list[TaskExecLog]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT log, created_time FROM task_logs WHERE task_id = ? ORDER BY id",
                (task_id,),
            ).fetchall()
        )
        return [
            TaskExecLog(log=log, taskId=task_id, createdTime=created)
            for log, created in rows
        ]

    # Poll data and queues.

    async def save_poll_data(self, entries: Sequence[PollData]) -> None:
        latest: dict[tuple[str, str], PollData] = {}
        for entry in entries:
            # An empty domain is no domain, as in Conductor's queue names;
            # NULL would not be unique in the primary key.
            domain = entry.domain if isinstance(entry.domain, str) else ""
            key = (entry.queueName, domain)
            seen = latest.get(key)
            if seen is None or entry.lastPollTime >= seen.lastPollTime:
                latest[key] = entry
        rows = [
            (
                queue_name,
                domain,
                entry.workerId if isinstance(entry.workerId, str) else None,
                entry.lastPollTime,
            )
            for (queue_name, domain), entry in latest.items()
        ]
        if not rows:
            return
        await self._call(
            lambda conn: conn.executemany(
                "INSERT INTO poll_data "
                "(queue_name, domain, worker_id, last_poll_time) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (queue_name, domain) DO UPDATE SET "
                "worker_id = excluded.worker_id, "
                "last_poll_time = max(last_poll_time, excluded.last_poll_time)",
                rows,
            )
        )

    async def get_poll_data(self, task_type: str | None = None) -> list[PollData]:
        columns = "SELECT queue_name, domain, worker_id, last_poll_time FROM poll_data"
        if task_type is None:
            sql = f"{columns} ORDER BY queue_name, domain"
            params: tuple[Any, ...] = ()
        else:
            sql = f"{columns} WHERE queue_name = ? ORDER BY domain"
            params = (task_type,)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        return [_poll_data(*row) for row in rows]

    async def register_queues(self, queues: Sequence[str]) -> None:
        rows = [(name,) for name in dict.fromkeys(queues)]
        if not rows:
            return
        await self._call(
            lambda conn: conn.executemany(
                "INSERT INTO queues (name) VALUES (?) ON CONFLICT (name) DO NOTHING",
                rows,
            )
        )

    async def list_queues(self) -> list[str]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT name FROM queues ORDER BY name"
            ).fetchall()
        )
        return [row[0] for row in rows]
