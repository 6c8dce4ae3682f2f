"""Task and workflow definitions: validation and a short-lived cache.

Definitions are read on every workflow start and every scheduled task, so
each process keeps them for `ttl_ms`; a change made through another
gateway is seen within that time.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from shared.errors import BadRequest, NotFound
from shared.interfaces import Store
from shared.models import TaskDef, WorkflowDef
from shared.queues import check_name

_T = TypeVar("_T")
_MAX_ENTRIES = 10_000


class _TimedCache(Generic[_T]):
    """Entries live `ttl_ms`; past `_MAX_ENTRIES`, the expired ones go, and
    all of them if none had expired."""

    def __init__(self, ttl_ms: int) -> None:
        self._ttl = ttl_ms / 1000
        self._entries: dict[object, tuple[float, _T]] = {}

    def get(self, key: object) -> _T | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: object, value: _T) -> None:
        if self._ttl <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= _MAX_ENTRIES:
            fresh = {k: e for k, e in self._entries.items() if e[0] >= now}
            self._entries = fresh if len(fresh) < _MAX_ENTRIES else {}
        self._entries[key] = (now + self._ttl, value)

    def clear(self) -> None:
        self._entries.clear()


def validate_task_def(definition: TaskDef) -> None:
    """Raise BadRequest unless a task definition is usable."""
    check_name(definition.name, "name")
    timeout = definition.timeoutSeconds
    if timeout > 0 and definition.responseTimeoutSeconds > timeout:
        raise BadRequest(
            f"TaskDef: {definition.name} responseTimeoutSeconds: "
            f"{definition.responseTimeoutSeconds} must be less than timeoutSeconds: "
            f"{timeout}",
            path="responseTimeoutSeconds",
            invalid_value=definition.responseTimeoutSeconds,
        )
    total = definition.totalTimeoutSeconds
    if timeout > 0 and total > 0 and timeout > total:
        raise BadRequest(
            f"TaskDef: {definition.name} timeoutSeconds: {timeout} must be less "
            f"than totalTimeoutSeconds: {total}",
            path="timeoutSeconds",
            invalid_value=timeout,
        )


def validate_workflow_def(definition: WorkflowDef) -> None:
    """Raise BadRequest unless a workflow definition can run here."""
    if not definition.tasks:
        raise BadRequest("WorkflowDef tasks cannot be empty", path="tasks")
    seen: set[str] = set()
    for position, step in enumerate(definition.tasks):
        path = f"tasks[{position}]"
        if step.type != "SIMPLE":
            raise BadRequest(
                f"task type {step.type} is not supported; only SIMPLE tasks run",
                path=f"{path}.type",
                invalid_value=step.type,
            )
        check_name(step.name, f"{path}.name")
        if step.taskReferenceName in seen:
            raise BadRequest(
                f"taskReferenceName {step.taskReferenceName} is used more than once",
                path=f"{path}.taskReferenceName",
                invalid_value=step.taskReferenceName,
            )
        seen.add(step.taskReferenceName)
        if step.taskDefinition is not None:
            validate_task_def(step.taskDefinition)


class DefinitionCache:
    """Reads definitions through a per-process cache."""

    def __init__(self, store: Store, ttl_ms: int) -> None:
        self._store = store
        self._tasks: _TimedCache[TaskDef] = _TimedCache(ttl_ms)
        self._workflows: _TimedCache[WorkflowDef] = _TimedCache(ttl_ms)

    async def task_def(self, name: str, inline: TaskDef | None = None) -> TaskDef:
        """Return the definition a task runs with.

        An inline definition on the workflow step wins; an unregistered
        task runs with Conductor's defaults.
        """
        if inline is not None:
            return inline
        cached = self._tasks.get(name)
        if cached is None:
            # An unregistered type is cached with the defaults too: polls
            # look its definition up, and would otherwise read the store
            # every time.
            cached = await self._store.get_task_def(name) or TaskDef(name=name)
            self._tasks.put(name, cached)
        return cached

    async def workflow_def(self, name: str, version: int | None) -> WorkflowDef:
        """Return a workflow definition, the latest version if None.

        Raises NotFound.
        """
        key = (name, version)
        cached = self._workflows.get(key)
        if cached is None:
            cached = await self._store.get_workflow_def(name, version)
            if cached is None:
                raise NotFound(
                    f"No such workflow found by name: {name}, version: {version}"
                )
            self._workflows.put(key, cached)
        return cached

    def forget(self) -> None:
        """Drop everything cached, after a local change."""
        self._tasks.clear()
        self._workflows.clear()
