"""A broker connection lost while a poll claims its task.

RabbitMQ takes back every unacked delivery of a channel that closes. A
poll whose task was being claimed at that moment must not hand the task
out: the message comes again, carrying the same message id, which lets
it claim the task again for another poll, and the task would then be in
two workers' hands. The store link is slowed so that the claim takes
over a second, and the broker link is cut once the claim is on its way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.chaos.cluster import GATEWAY, Service
from tests.chaos.deployment import delete_topology, through
from tests.chaos.proxy import TcpProxy
from tests.chaos.workload import Api, CallFailed, Traffic

STORE_LATENCY_S = 0.5


async def _proxy(url: str) -> TcpProxy:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return proxy


@pytest.fixture
async def links(
    chaos_amqp_url: str, mongodb_url: str
) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """A proxy to RabbitMQ and one to MongoDB."""
    broker, store = await _proxy(chaos_amqp_url), await _proxy(mongodb_url)
    yield broker, store
    await broker.close()
    await store.close()


async def _poll(api: Api, task_type: str, worker: str, timeout: int) -> Any:
    status, tasks = await api.call(
        0,
        "GET",
        f"/tasks/poll/batch/{task_type}",
        params={"count": 1, "timeout": timeout, "workerid": worker},
    )
    assert status == 200, tasks
    return tasks


async def _poll_until_handed_out(api: Api, task_type: str) -> Any:
    """Poll until a task comes, while the gateway reconnects to RabbitMQ."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            tasks = await _poll(api, task_type, "second", 2000)
        except CallFailed:
            await asyncio.sleep(0.2)
            continue
        if tasks:
            return tasks
    pytest.fail("the task was not handed out again within 60 s")


async def test_a_task_whose_delivery_returned_mid_claim_is_handed_out_once(
    links: tuple[TcpProxy, TcpProxy],
    chaos_amqp_url: str,
    mongodb_url: str,
    mongo_database: str,
    tmp_path: Path,
) -> None:
    broker_link, store_link = links
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    task_type, name = f"returned_{uuid.uuid4().hex[:8]}", "returned_wf"
    gateway = Service(
        "gateway",
        GATEWAY,
        {
            "AMQP_URL": through(chaos_amqp_url, broker_link),
            "BATON_QUEUE_PREFIX": prefix,
            "MONGODB_URL": through(mongodb_url, store_link),
            "BATON_MONGODB_DATABASE": mongo_database,
            "BATON_RUN_SCHEDULER": "false",
            # Nothing but the claim may write to the store while it is slow.
            "BATON_POLL_DATA_FLUSH_MS": "600000",
        },
        tmp_path,
    )
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, [gateway.url], Traffic())
            await _run(api, broker_link, store_link, task_type, name)
    finally:
        await asyncio.to_thread(gateway.stop)
        await delete_topology(chaos_amqp_url, prefix, [task_type])


async def _run(
    api: Api,
    broker_link: TcpProxy,
    store_link: TcpProxy,
    task_type: str,
    name: str,
) -> None:
    definition = {"name": task_type, "retryCount": 0, "responseTimeoutSeconds": 600}
    assert (await api.call(0, "POST", "/metadata/taskdefs", json=[definition]))[
        0
    ] == 200
    workflow = {
        "name": name,
        "version": 1,
        "tasks": [{"name": task_type, "taskReferenceName": "only", "type": "SIMPLE"}],
    }
    assert (await api.call(0, "POST", "/metadata/workflow", json=workflow))[0] == 200
    _, workflow_id = await api.call(0, "POST", "/workflow", json={"name": name})
    _, started = await api.call(
        0, "GET", f"/workflow/{workflow_id}", params={"includeTasks": "true"}
    )
    task_id = started["tasks"][0]["taskId"]

    store_link.slow(STORE_LATENCY_S)
    claim_sent = asyncio.ensure_future(
        store_link.forwarded(task_id.encode(), upstream=True)
    )
    first = asyncio.ensure_future(_poll(api, task_type, "first", 3000))
    await asyncio.wait_for(claim_sent, timeout=30)
    broker_link.cut()
    try:
        # Empty, or a 503 when the poll went on waiting without a broker.
        assert await first == []
    except CallFailed as exc:
        assert "-> 503" in str(exc)

    broker_link.restore()
    store_link.restore()
    _, claimed = await api.call(0, "GET", f"/tasks/{task_id}")
    assert (claimed["status"], claimed["pollCount"]) == ("IN_PROGRESS", 1)

    [again] = await _poll_until_handed_out(api, task_type)
    assert (again["taskId"], again["pollCount"]) == (task_id, 2)
    assert again["workerId"] == "second"
    result = {
        "taskId": task_id,
        "workflowInstanceId": workflow_id,
        "workerId": "second",
        "status": "COMPLETED",
    }
    assert (await api.call(0, "POST", "/tasks", json=result))[0] == 200
    _, ended = await api.call(0, "GET", f"/workflow/{workflow_id}")
    assert ended["status"] == "COMPLETED"
