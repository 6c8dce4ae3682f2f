"""Gateways as real processes: killed, restarted, stopped and run side by side.

Every test starts `python -m services.gateway` processes (see
tests/fixtures/processes.py) and talks to them over HTTP only; nothing
runs in-process. Gateways that share work share a RabbitMQ queue prefix
and one store: a SQLite file in WAL mode, or a MongoDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.interfaces import SWEEP_QUEUE, TIMER_QUEUE
from tests.fixtures.processes import GatewayProcess, GatewayProcesses
from tests.fixtures.rabbitmq import AmqpNames

Json = dict[str, Any]

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


def unique(prefix: str) -> str:
    """A task type or workflow name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0
) -> None:
    """Poll `check` until it returns True; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


class Client:
    """The worker and admin API of one gateway process, over HTTP."""

    def __init__(self, session: aiohttp.ClientSession, gateway: GatewayProcess):
        self.session = session
        self.gateway = gateway
        self.api = f"{gateway.url}/api"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """Send a request; return the status and the decoded body."""
        async with self.session.request(
            method, f"{self.api}{path}", json=json, params=params
        ) as response:
            text = await response.text()
            if response.content_type == "application/json" and text:
                return response.status, await response.json()
            return response.status, text

    async def register_workflow(self, name: str, task_types: list[str]) -> None:
        """Register a sequence of SIMPLE tasks, each fed the previous output."""
        tasks = [
            {
                "name": task_type,
                "taskReferenceName": f"t{position}",
                "type": "SIMPLE",
                "inputParameters": {
                    "value": "${workflow.input.x}"
                    if position == 0
                    else f"${{t{position - 1}.output.value}}"
                },
            }
            for position, task_type in enumerate(task_types)
        ]
        definition = {"name": name, "version": 1, "tasks": tasks}
        status, body = await self.request("POST", "/metadata/workflow", json=definition)
        assert status == 200, body

    async def start(self, name: str, x: int | str) -> str:
        """Start a workflow with input `{"x": x}`; return its id."""
        body = {"name": name, "input": {"x": x}}
        status, workflow_id = await self.request("POST", "/workflow", json=body)
        assert status == 200, workflow_id
        return str(workflow_id)

    async def poll(
        self, task_type: str, *, worker: str, count: int = 1, timeout: int = 100
    ) -> list[Json]:
        """Batch-poll; return the tasks handed out."""
        params = {"count": count, "timeout": timeout, "workerid": worker}
        status, tasks = await self.request(
            "GET", f"/tasks/poll/batch/{task_type}", params=params
        )
        assert status == 200, tasks
        assert isinstance(tasks, list)
        return tasks

    async def complete(
        self, task: Json, worker: str, output: Json | None = None
    ) -> None:
        """Report a task COMPLETED, by default with output `value` = input
        `value` + 1."""
        status, body = await self.request(
            "POST", "/tasks", json=result(task, worker, output)
        )
        assert (status, body) == (200, task["taskId"])

    async def complete_and_poll(self, task: Json, worker: str) -> Json | None:
        """Complete through update-v2, as the Conductor SDK does; return the
        next task of the same type the gateway chained onto the answer."""
        status, body = await self.request(
            "POST", "/tasks/update-v2", json=result(task, worker)
        )
        if status == 204:
            return None
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def workflow(self, workflow_id: str) -> Json:
        """A workflow with its tasks, as the store has it."""
        status, workflow = await self.request(
            "GET", f"/workflow/{workflow_id}", params={"includeTasks": "true"}
        )
        assert status == 200, workflow
        assert isinstance(workflow, dict)
        return workflow

    async def task(self, task_id: str) -> Json:
        """A task as the store has it."""
        status, task = await self.request("GET", f"/tasks/{task_id}")
        assert status == 200, task
        assert isinstance(task, dict)
        return task

    async def queue_size(self, task_type: str) -> int:
        """Messages ready in the task type's queue."""
        status, size = await self.request(
            "GET", "/tasks/queue/size", params={"taskType": task_type}
        )
        assert status == 200, size
        assert isinstance(size, int)
        return size

    async def unacked_here(self, task_type: str) -> int:
        """Deliveries of the queue this gateway holds unsettled."""
        status, queues = await self.request("GET", "/tasks/queue/all/verbose")
        assert status == 200, queues
        entry = queues.get(task_type)
        return int(entry["a"]["uacked"]) if entry else 0


def result(task: Json, worker: str, output: Json | None = None) -> Json:
    """A COMPLETED TaskResult; by default its output `value` is the input
    `value` + 1."""
    return {
        "taskId": task["taskId"],
        "workflowInstanceId": task["workflowInstanceId"],
        "workerId": worker,
        "status": "COMPLETED",
        "outputData": output or {"value": task["inputData"]["value"] + 1},
    }


# Bigger than the kernel lets a loopback connection hold in flight when the
# receiver never reads (tcp_wmem's ceiling is 4 MiB by default), so that a
# gateway answering with a task this big stalls in the middle of the write.
STALLING_SIZE = 8 << 20


@contextlib.contextmanager
def stalled_poll(
    gateway: GatewayProcess, task_type: str, *, worker: str, timeout: int
) -> Iterator[None]:
    """A one-task batch poll from a client that never reads the answer.

    The gateway claims the task it hands out, then blocks writing the
    answer, holding the delivery unacked, until the socket closes at the
    end of the block.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            f"GET /api/tasks/poll/batch/{task_type}?count=1&timeout={timeout}"
            f"&workerid={worker} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{gateway.port}\r\n\r\n".encode()
        )
        yield


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client session for the test."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as client_session:
        yield client_session


@pytest.fixture
def rabbitmq_env(
    amqp_url: str, broker_prefix: str, amqp_names: AmqpNames
) -> dict[str, str]:
    """Gateway settings for RabbitMQ under the session's queue prefix.

    The background service is off: its reconciliation sweeps may add a
    second message for a SCHEDULED task (which the guarded claim absorbs),
    and these tests count messages. Gateways still arm timers on every
    hand-out, so Baton's own queues are recorded for deletion too.
    """
    amqp_names.add(
        [f"{broker_prefix}.task.{queue}" for queue in (TIMER_QUEUE, SWEEP_QUEUE)], []
    )
    return {
        "AMQP_URL": amqp_url,
        "BATON_QUEUE_PREFIX": broker_prefix,
        "BATON_RUN_SCHEDULER": "false",
        "BATON_POLL_DATA_FLUSH_MS": "50",
        "BATON_DEFINITION_CACHE_MS": "0",
    }


@pytest.fixture
def task_type(broker_prefix: str, amqp_names: AmqpNames) -> str:
    """A fresh task type whose RabbitMQ queue is deleted after the session."""
    name = unique("task")
    amqp_names.add([f"{broker_prefix}.task.{name}"], [])
    return name


@pytest.fixture(params=["sqlite", "mongodb"])
def shared_store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings for one store every gateway of the test shares."""
    if request.param == "mongodb":
        return {
            "MONGODB_URL": request.getfixturevalue("mongodb_url"),
            "BATON_MONGODB_DATABASE": request.getfixturevalue("mongo_database"),
        }
    return {"BATON_SQLITE_PATH": str(tmp_path / "shared.db")}


def embedded_env(tmp_path: Path) -> dict[str, str]:
    """Settings for a gateway on the embedded broker and a SQLite file."""
    return {
        "BATON_SQLITE_PATH": str(tmp_path / "embedded.db"),
        "BATON_POLL_DATA_FLUSH_MS": "50",
        "BATON_DEFINITION_CACHE_MS": "0",
    }


@pytest.mark.parametrize("held", ["buffered", "claimed"])
async def test_killed_gateway_releases_its_held_delivery_to_another_gateway(
    gateway_processes: GatewayProcesses,
    session: aiohttp.ClientSession,
    rabbitmq_env: dict[str, str],
    shared_store_env: dict[str, str],
    task_type: str,
    held: str,
) -> None:
    """`buffered`: the holder received the delivery while no poll waited and
    never claimed the task. `claimed`: the holder claimed the task for a
    poll and died while writing the answer, before acking."""
    env = {
        **rabbitmq_env,
        **shared_store_env,
        "BATON_MAX_BODY_BYTES": str(4 * STALLING_SIZE),
        "BATON_MAX_PAYLOAD_BYTES": str(2 * STALLING_SIZE),
    }
    holder = await gateway_processes.start(
        "holder",
        {**env, "BATON_PREFETCH": "10", "BATON_CONSUMER_LINGER_MS": "60000"},
    )
    other = await gateway_processes.start("other", env)
    a, b = Client(session, holder), Client(session, other)
    name = unique("wf")
    await b.register_workflow(name, [task_type])

    async with contextlib.AsyncExitStack() as stack:
        if held == "buffered":
            # An empty poll subscribes the holder's consumer, which then
            # lingers for a minute with nobody waiting: what it receives,
            # it buffers unacked.
            assert await a.poll(task_type, worker="worker-a", timeout=0) == []
            x: Any = 1
        else:
            stack.enter_context(
                stalled_poll(holder, task_type, worker="worker-a", timeout=5000)
            )
            x = "x" * STALLING_SIZE
        workflow_id = await b.start(name, x)

        async def holder_has_it() -> bool:
            return await a.unacked_here(task_type) == 1

        await eventually(holder_has_it, "the holder holds the delivery")
        [scheduled] = (await b.workflow(workflow_id))["tasks"]
        task_id = scheduled["taskId"]

        if held == "buffered":
            stored = await b.task(task_id)
            assert (stored["status"], stored["pollCount"]) == ("SCHEDULED", 0)
        else:

            async def holder_claimed_it() -> bool:
                stored = await b.task(task_id)
                return bool(stored["status"] == "IN_PROGRESS")

            await eventually(holder_claimed_it, "the holder claimed the task")
            stored = await b.task(task_id)
            assert (stored["pollCount"], stored["workerId"]) == (1, "worker-a")
        assert await b.poll(task_type, worker="worker-b", timeout=500) == []
        assert await b.queue_size(task_type) == 0
        assert await a.unacked_here(task_type) == 1

        assert await holder.kill() == -signal.SIGKILL

    tasks = await b.poll(task_type, worker="worker-b", timeout=5000)
    assert [t["taskId"] for t in tasks] == [task_id]
    [task] = tasks
    assert (task["status"], task["workerId"]) == ("IN_PROGRESS", "worker-b")
    polls = 1 if held == "buffered" else 2
    assert task["pollCount"] == polls
    assert task["inputData"] == {"value": x}
    await b.complete(task, "worker-b", {"value": "done"})

    workflow = await b.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"value": "done"}
    [done] = workflow["tasks"]
    assert (done["taskId"], done["status"]) == (task_id, "COMPLETED")
    assert (done["pollCount"], done["workerId"]) == (polls, "worker-b")
    assert await b.poll(task_type, worker="worker-b", timeout=300) == []
    assert await b.queue_size(task_type) == 0


WORKFLOWS = 200
TASKS_PER_WORKFLOW = 2
WORKERS_PER_GATEWAY = 3
RUN_TIMEOUT_S = 60.0


@dataclass
class Tally:
    """What the workers of one test saw."""

    expected: int
    handed: Counter[str] = field(default_factory=Counter)
    by_gateway: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def hand_out(self, task: Json, gateway: str) -> None:
        self.handed[task["taskId"]] += 1
        self.by_gateway[gateway] += 1

    def complete(self) -> None:
        self.completed += 1
        if self.completed >= self.expected:
            self.done.set()


async def run_chain(client: Client, worker: str, task: Json, tally: Tally) -> None:
    """Complete `task` and every task the gateway chains onto the answers."""
    current: Json | None = task
    while current is not None:
        tally.hand_out(current, client.gateway.name)
        following = await client.complete_and_poll(current, worker)
        tally.complete()
        current = following


async def run_worker(client: Client, worker: str, task_type: str, tally: Tally) -> None:
    """Poll batches of 5 and work them concurrently until told to stop."""
    while not tally.stop.is_set():
        tasks = await client.poll(task_type, worker=worker, count=5, timeout=500)
        await asyncio.gather(*(run_chain(client, worker, t, tally) for t in tasks))


async def test_two_gateways_complete_200_workflows_exactly_once(
    gateway_processes: GatewayProcesses,
    session: aiohttp.ClientSession,
    rabbitmq_env: dict[str, str],
    shared_store_env: dict[str, str],
    task_type: str,
) -> None:
    env = {**rabbitmq_env, **shared_store_env}
    first = await gateway_processes.start("first", env)
    second = await gateway_processes.start("second", env)
    clients = [Client(session, first), Client(session, second)]
    name = unique("wf")
    await clients[0].register_workflow(name, [task_type] * TASKS_PER_WORKFLOW)

    tally = Tally(expected=WORKFLOWS * TASKS_PER_WORKFLOW)
    workers = [
        asyncio.create_task(
            run_worker(client, f"{client.gateway.name}-{n}", task_type, tally)
        )
        for client in clients
        for n in range(WORKERS_PER_GATEWAY)
    ]
    started: dict[str, int] = {}
    starting = asyncio.Semaphore(16)

    async def start(x: int) -> None:
        async with starting:
            started[await clients[x % 2].start(name, x)] = x

    finished = asyncio.create_task(tally.done.wait())
    try:
        await asyncio.gather(*(start(x) for x in range(WORKFLOWS)))
        await asyncio.wait(
            [finished, *workers],
            timeout=RUN_TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for worker in workers:
            if worker.done():
                worker.result()  # a worker's failure fails the test
        assert finished.done(), (
            f"{tally.completed} of {tally.expected} tasks completed "
            f"in {RUN_TIMEOUT_S} s"
        )
    finally:
        finished.cancel()
        tally.stop.set()
        results = await asyncio.gather(*workers, return_exceptions=True)
    assert [r for r in results if r is not None] == []

    assert len(tally.handed) == tally.expected
    assert sorted(tally.by_gateway) == ["first", "second"], tally.by_gateway
    assert [t for t, n in tally.handed.items() if n != 1] == []
    stored_ids: set[str] = set()
    reading = asyncio.Semaphore(16)

    async def check(workflow_id: str, x: int) -> None:
        async with reading:
            workflow = await clients[x % 2].workflow(workflow_id)
        assert workflow["status"] == "COMPLETED", workflow
        assert workflow["output"] == {"value": x + TASKS_PER_WORKFLOW}
        tasks = workflow["tasks"]
        assert [t["status"] for t in tasks] == ["COMPLETED"] * TASKS_PER_WORKFLOW
        assert [t["pollCount"] for t in tasks] == [1] * TASKS_PER_WORKFLOW
        stored_ids.update(t["taskId"] for t in tasks)

    await asyncio.gather(*(check(w, x) for w, x in started.items()))
    assert stored_ids == set(tally.handed)
    for client in clients:
        assert await client.queue_size(task_type) == 0


@pytest.mark.parametrize(
    "stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"]
)
async def test_restarted_embedded_gateway_loses_no_accepted_task(
    gateway_processes: GatewayProcesses,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    stop_signal: signal.Signals,
) -> None:
    env = embedded_env(tmp_path)
    before = await gateway_processes.start("before", env)
    client = Client(session, before)
    task_type, name = unique("task"), unique("wf")
    await client.register_workflow(name, [task_type])
    workflow_ids = [await client.start(name, x) for x in range(5)]
    accepted = {
        (await client.workflow(w))["tasks"][0]["taskId"]: w for w in workflow_ids
    }
    assert await client.queue_size(task_type) == 5

    before.signal(stop_signal)
    code = await before.wait_exit(10.0)
    assert code == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)

    after = await gateway_processes.start("after", env)
    client = Client(session, after)
    polled: list[Json] = []

    async def all_polled() -> bool:
        polled.extend(
            await client.poll(task_type, worker="worker", count=5, timeout=1000)
        )
        return len(polled) >= len(accepted)

    await eventually(all_polled, "every accepted task is pollable again")
    assert sorted(t["taskId"] for t in polled) == sorted(accepted)
    assert {t["status"] for t in polled} == {"IN_PROGRESS"}
    for task in polled:
        await client.complete(task, "worker")
    for x, workflow_id in enumerate(workflow_ids):
        workflow = await client.workflow(workflow_id)
        assert workflow["status"] == "COMPLETED"
        assert workflow["output"] == {"value": x + 1}
    assert await client.poll(task_type, worker="worker", timeout=200) == []


async def test_restarted_embedded_gateway_retries_the_task_it_died_handing_out(
    gateway_processes: GatewayProcesses,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The embedded broker's delivery dies with the process, so a task that
    was claimed for a poll whose answer was never written is not handed
    out again as such: its response timeout, checked by the restarted
    gateway's reconciliation, times it out and its retry is handed out."""
    env = {
        **embedded_env(tmp_path),
        "BATON_MAX_BODY_BYTES": str(4 * STALLING_SIZE),
        "BATON_MAX_PAYLOAD_BYTES": str(2 * STALLING_SIZE),
        "BATON_RECONCILE_GRACE_SECONDS": "0",
        "BATON_SWEEP_SECONDS": "1",
    }
    before = await gateway_processes.start("before", env)
    client = Client(session, before)
    task_type, name = unique("task"), unique("wf")
    definition = {
        "name": task_type,
        "responseTimeoutSeconds": 2,
        "retryCount": 1,
        "retryDelaySeconds": 0,
    }
    status, body = await client.request("POST", "/metadata/taskdefs", json=[definition])
    assert status == 200, body
    await client.register_workflow(name, [task_type])
    x = "x" * STALLING_SIZE
    with stalled_poll(before, task_type, worker="never-answered", timeout=5000):
        workflow_id = await client.start(name, x)
        [scheduled] = (await client.workflow(workflow_id))["tasks"]
        task_id = scheduled["taskId"]

        async def claimed() -> bool:
            stored = await client.task(task_id)
            return bool(stored["status"] == "IN_PROGRESS")

        await eventually(claimed, "the task is claimed for the stalled poll")
        assert await before.kill() == -signal.SIGKILL

    after = await gateway_processes.start("after", env)
    client = Client(session, after)
    polled: list[Json] = []

    async def retry_polled() -> bool:
        polled.extend(await client.poll(task_type, worker="worker", timeout=1000))
        return bool(polled)

    await eventually(retry_polled, "the retry is handed out", timeout_s=15.0)
    [retry] = polled
    assert retry["taskId"] != task_id
    assert (retry["retriedTaskId"], retry["retryCount"]) == (task_id, 1)
    assert retry["inputData"] == {"value": x}
    await client.complete(retry, "worker", {"value": "done"})

    workflow = await client.workflow(workflow_id)
    assert workflow["status"] == "COMPLETED"
    statuses = [(t["taskId"], t["status"]) for t in workflow["tasks"]]
    assert statuses == [(task_id, "TIMED_OUT"), (retry["taskId"], "COMPLETED")]


@pytest.fixture(params=["embedded", "rabbitmq"])
def any_broker_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings for a lone gateway on either broker, with a SQLite file."""
    env = embedded_env(tmp_path)
    if request.param == "rabbitmq":
        env.update(request.getfixturevalue("rabbitmq_env"))
    return env


async def test_gateway_exits_cleanly_on_sigterm(
    gateway_processes: GatewayProcesses,
    session: aiohttp.ClientSession,
    any_broker_env: dict[str, str],
    task_type: str,
) -> None:
    gateway = await gateway_processes.start("stopping", any_broker_env)
    client = Client(session, gateway)
    polling = asyncio.create_task(
        client.request(
            "GET",
            f"/tasks/poll/batch/{task_type}",
            params={"count": 1, "timeout": 5000, "workerid": "waiting"},
        )
    )

    async def poll_is_recorded() -> bool:
        status, data = await client.request(
            "GET", "/tasks/queue/polldata", params={"taskType": task_type}
        )
        assert status == 200, data
        return bool(data)

    try:
        await eventually(poll_is_recorded, "the long poll has reached the gateway")
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        status, body = await polling
    finally:
        polling.cancel()
    answered_after = time.monotonic() - signalled
    # Shutdown answers the waiting poll at once, as an ordinary empty poll.
    assert (status, body) == (200, [])
    assert answered_after < 2.0, f"the poll waited {answered_after:.2f} s"
    assert await gateway.wait_exit(5.0) == 0
    assert '"level":"ERROR"' not in gateway.log()
