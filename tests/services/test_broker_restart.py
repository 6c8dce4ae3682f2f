"""A delayed task across a RabbitMQ restart, on a node of the test's own.

Restarting the machine's broker would fault every other test using it,
so this module's gateway talks to a private node that the test stops and
starts again.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.rabbitmq_node import RabbitNode, unavailable_reason
from tests.services.conftest import Baton, unique
from tests.services.test_time import one_task_workflow


@pytest.fixture(scope="module")
def rabbit_node() -> Iterator[RabbitNode]:
    """A started private RabbitMQ node, destroyed after the module."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    node = RabbitNode()
    try:
        try:
            node.start()
        except (RuntimeError, subprocess.SubprocessError) as exc:
            pytest.skip(f"no private RabbitMQ node could start here: {exc}")
        yield node
    finally:
        node.destroy()


@pytest.fixture
def gateway_amqp_url(rabbit_node: RabbitNode) -> str:
    """The gateway of this module runs on the private node."""
    return rabbit_node.url


@pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)
async def test_delayed_task_survives_a_broker_restart(
    baton: Baton, rabbit_node: RabbitNode
) -> None:
    task_type = unique("restart")
    workflow_id = await one_task_workflow(baton, task_type)
    task = await baton.poll_until(task_type)
    asked_at = time.monotonic()
    await baton.complete(task, status="IN_PROGRESS", callbackAfterSeconds=6)

    try:
        await asyncio.to_thread(rabbit_node.stop_app)
        await asyncio.to_thread(rabbit_node.start_app)
    except subprocess.SubprocessError as exc:
        pytest.fail(f"could not restart the node: {exc}\n{rabbit_node.log()[-4000:]}")

    again = None
    deadline = time.monotonic() + 40
    while again is None and time.monotonic() < deadline:
        status, body = await baton.request(
            "GET",
            f"/tasks/poll/batch/{task_type}",
            params={"timeout": 2000, "workerid": "after-restart"},
        )
        if status == 200 and body:
            again = body[0]
        elif status != 200:
            await asyncio.sleep(0.5)
    assert again is not None, "the delayed task never came back"
    assert again["taskId"] == task["taskId"]
    assert again["pollCount"] == 2
    assert time.monotonic() - asked_at >= 6
    await baton.complete(again)
    assert (await baton.workflow(workflow_id))["status"] == "COMPLETED"
