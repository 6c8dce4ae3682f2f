"""A gateway on a real socket, over each backend pair, and a client for it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from services.gateway.app import build_app
from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.runtime import Runtime


class Baton:
    """A thin HTTP client for one running gateway."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        runtime: Runtime,
        scheduler: Scheduler,
    ) -> None:
        self.session = session
        self.url = url
        self.api = f"{url}/api"
        self.runtime = runtime
        self.scheduler = scheduler

    async def request(
        self, method: str, path: str, *, json: Any = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """Send a request; return the status and the decoded body."""
        async with self.session.request(
            method, f"{self.api}{path}", json=json, **kwargs
        ) as response:
            text = await response.text()
            if response.content_type == "application/json" and text:
                return response.status, await response.json()
            return response.status, text

    async def register_workflow(
        self, name: str, task_types: list[str], **extra: Any
    ) -> None:
        """Register a sequential workflow of SIMPLE tasks, each fed the
        workflow input `x` and the previous task's output."""
        tasks = []
        for position, task_type in enumerate(task_types):
            source = (
                "${workflow.input.x}"
                if position == 0
                else f"${{t{position - 1}.output.value}}"
            )
            tasks.append(
                {
                    "name": task_type,
                    "taskReferenceName": f"t{position}",
                    "type": "SIMPLE",
                    "inputParameters": {"value": source},
                }
            )
        definition = {"name": name, "version": 1, "tasks": tasks, **extra}
        status, body = await self.request("POST", "/metadata/workflow", json=definition)
        assert status == 200, body

    async def start(self, name: str, workflow_input: Any = None, **extra: Any) -> str:
        """Start a workflow; return its id."""
        body = {"name": name, "input": workflow_input or {}, **extra}
        status, workflow_id = await self.request("POST", "/workflow", json=body)
        assert status == 200, workflow_id
        return str(workflow_id)

    async def poll(
        self,
        task_type: str,
        *,
        count: int = 1,
        timeout: int = 100,
        worker: str = "worker-1",
        domain: str | None = None,
    ) -> list[dict[str, Any]]:
        """Batch-poll; return the tasks handed out."""
        params: dict[str, Any] = {
            "count": count,
            "timeout": timeout,
            "workerid": worker,
        }
        if domain:
            params["domain"] = domain
        status, tasks = await self.request(
            "GET", f"/tasks/poll/batch/{task_type}", params=params
        )
        assert status == 200, tasks
        assert isinstance(tasks, list)
        return tasks

    async def poll_until(
        self, task_type: str, *, timeout: int = 5000, **kwargs: Any
    ) -> dict[str, Any]:
        """Long-poll one task, failing the test if none arrives in time."""
        tasks = await self.poll(task_type, timeout=timeout, **kwargs)
        assert len(tasks) == 1, tasks
        return tasks[0]

    async def complete(
        self, task: dict[str, Any], output: dict[str, Any] | None = None, **extra: Any
    ) -> tuple[int, Any]:
        """Report a task COMPLETED (or another status given in `extra`)."""
        result = {
            "taskId": task["taskId"],
            "workflowInstanceId": task["workflowInstanceId"],
            "workerId": "worker-1",
            "status": "COMPLETED",
            "outputData": output or {},
            **extra,
        }
        return await self.request("POST", "/tasks", json=result)

    async def workflow(self, workflow_id: str) -> dict[str, Any]:
        """Read a workflow with its tasks."""
        status, workflow = await self.request(
            "GET", f"/workflow/{workflow_id}", params={"includeTasks": "true"}
        )
        assert status == 200, workflow
        assert isinstance(workflow, dict)
        return workflow


def unique(prefix: str) -> str:
    """A task type or workflow name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["embedded", "rabbitmq"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend pair the gateway runs on."""
    return str(request.param)


@pytest.fixture
def gateway_amqp_url(amqp_url: str) -> str:
    """The RabbitMQ a gateway on the `rabbitmq` backend connects to."""
    return amqp_url


@pytest.fixture
def settings(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> Settings:
    """Settings for a gateway on `backend`: embedded broker and SQLite, or
    RabbitMQ and the MongoDB wire server."""
    base = {
        "sqlite_path": str(tmp_path / "baton.db"),
        "consumer_linger_ms": 200,
        "poll_data_flush_ms": 50,
        "definition_cache_ms": 0,
        "timer_flush_ms": 50,
    }
    if backend == "rabbitmq":
        mongodb_url = request.getfixturevalue("mongodb_url")
        return Settings(
            amqp_url=request.getfixturevalue("gateway_amqp_url"),
            queue_prefix=request.getfixturevalue("broker_prefix"),
            mongodb_url=mongodb_url,
            mongodb_database=request.getfixturevalue("mongo_database"),
            **base,  # type: ignore[arg-type]
        )
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def baton(settings: Settings) -> AsyncIterator[Baton]:
    """A started gateway (with its background service) on a real socket."""
    runtime = Runtime(settings)
    await runtime.start()
    scheduler = Scheduler(runtime)
    await scheduler.start()
    server = TestServer(build_app(runtime), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        yield Baton(session, url, runtime, scheduler)
    await server.close()
    await scheduler.stop()
    await runtime.stop()
