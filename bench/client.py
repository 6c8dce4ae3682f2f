"""A small client for the parts of Baton's API the bench drives."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, NamedTuple

import msgspec

from bench.http import HttpClient, ProtocolError

JSON = dict[str, Any]

TASK_TYPE = "bench_task"
WORKFLOW_NAME = "bench_workflow"

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class HttpError(Exception):
    """The gateway answered with a status the bench did not expect."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path}: {status} {body[:200]!r}")
        self.status = status


FAILURES = (OSError, ProtocolError, HttpError, TimeoutError, msgspec.DecodeError)
"""What a request can fail with; the load loops count these and go on."""


class Polled(NamedTuple):
    """A batch poll's tasks and when the answer arrived (epoch ms)."""

    tasks: list[JSON]
    arrived_ms: float


def task_def() -> JSON:
    """The bench task's definition: no retries, so a failure shows."""
    return {
        "name": TASK_TYPE,
        "retryCount": 0,
        "timeoutSeconds": 0,
        "responseTimeoutSeconds": 300,
        "ownerEmail": "bench@baton.invalid",
    }


def workflow_def() -> JSON:
    """A workflow of one SIMPLE task."""
    return {
        "name": WORKFLOW_NAME,
        "version": 1,
        "schemaVersion": 2,
        "ownerEmail": "bench@baton.invalid",
        "tasks": [
            {
                "name": TASK_TYPE,
                "taskReferenceName": "only",
                "type": "SIMPLE",
                "inputParameters": {"n": "${workflow.input.n}"},
            }
        ],
    }


class BatonClient:
    """One keep-alive connection pool to a gateway.

    `connections` bounds the pool (0: unbounded); use as an async context
    manager inside the event loop that will use it.
    """

    def __init__(
        self, base_url: str, *, connections: int, timeout_s: float = 30.0
    ) -> None:
        self._base = base_url.rstrip("/")
        self._connections = connections
        self._timeout = timeout_s
        self._http: HttpClient | None = None

    async def __aenter__(self) -> BatonClient:
        self._http = HttpClient(
            self._base, connections=self._connections, timeout_s=self._timeout
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _request(
        self, method: str, path: str, body: object = None
    ) -> tuple[int, bytes]:
        if self._http is None:
            raise RuntimeError("BatonClient is not open")
        data = None if body is None else _encode(body)
        return await self._http.request(method, path, data)

    async def _expect(
        self, method: str, path: str, body: object = None, ok: tuple[int, ...] = (200,)
    ) -> tuple[int, bytes]:
        status, payload = await self._request(method, path, body)
        if status not in ok:
            raise HttpError(method, path, status, payload)
        return status, payload

    async def healthy(self) -> bool:
        """True when `/health` answers 200."""
        try:
            status, _ = await self._request("GET", "/health")
        except FAILURES:
            return False
        return status == 200

    async def register(self, task: JSON, workflow: JSON) -> None:
        """Register a task definition and a workflow definition."""
        await self._expect("POST", "/api/metadata/taskdefs", [task])
        await self._expect("POST", "/api/metadata/workflow?overwrite=true", workflow)

    async def start_workflow(self, name: str, workflow_input: JSON) -> str:
        """Start a workflow with a StartWorkflowRequest; return its id."""
        request = {"name": name, "version": 1, "input": workflow_input}
        _, payload = await self._expect("POST", "/api/workflow", request)
        return payload.decode()

    async def get_workflow(self, workflow_id: str) -> JSON:
        """Read a workflow without its tasks."""
        path = f"/api/workflow/{workflow_id}?includeTasks=false"
        _, payload = await self._expect("GET", path)
        workflow: JSON = _decode(payload)
        return workflow

    async def poll_batch(
        self, task_type: str, worker_id: str, count: int, timeout_ms: int
    ) -> Polled:
        """Batch-poll a task type, as Conductor's SDKs do."""
        path = (
            f"/api/tasks/poll/batch/{task_type}"
            f"?workerid={worker_id}&count={count}&timeout={timeout_ms}"
        )
        _, payload = await self._expect("GET", path)
        arrived_ms = time.time() * 1000
        tasks: list[JSON] = _decode(payload)
        return Polled(tasks, arrived_ms)

    async def update_v2(self, result: JSON) -> JSON | None:
        """Report a result; return the next task of the same type, if any."""
        status, payload = await self._expect(
            "POST", "/api/tasks/update-v2", result, ok=(200, 204)
        )
        if status == 204 or not payload:
            return None
        task: JSON = _decode(payload)
        return task if task.get("taskId") else None

    async def queue_names(self) -> list[str]:
        """The logical queues the gateway has registered."""
        _, payload = await self._expect("GET", "/api/tasks/queue/all")
        sizes: dict[str, int] = _decode(payload)
        return list(sizes)

    async def update(self, result: JSON) -> None:
        """Report a result with the v1 call, which hands out no next task."""
        await self._expect("POST", "/api/tasks", result)
