"""The poll path: take deliveries, claim their tasks, answer, then ack.

A delivery stays unacked until the poll response carrying its task has
been written. If the gateway dies first, the broker redelivers the same
message, and the store lets that message claim its task again because it
carries the same message id. If the write fails, the delivery goes back
to the queue at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiohttp import web

from services.gateway.dispatch import Dispatchers
from services.gateway.limits import HandOutLimits
from shared.clock import now_ms
from shared.engine import Engine
from shared.errors import BatonError, TooManyRequests
from shared.interfaces import Delivery
from shared.metrics import METRICS
from shared.models import Task
from shared.polldata import PollRecorder
from shared.queues import queue_name

log = logging.getLogger(__name__)


class Poller:
    """Serves single, batch and chained polls."""

    def __init__(
        self,
        engine: Engine,
        dispatchers: Dispatchers,
        polls: PollRecorder,
        max_active: int,
    ) -> None:
        self._engine = engine
        self._dispatchers = dispatchers
        self._polls = polls
        self._max_active = max_active
        self._active = 0
        self._limits = HandOutLimits(engine.definitions, engine.store)

    @property
    def saturated(self) -> bool:
        """True while this gateway holds as many polls as it allows."""
        return self._active >= self._max_active

    async def poll(
        self,
        request: web.Request,
        task_type: str,
        domain: str | None,
        worker_id: str | None,
        count: int,
        timeout_ms: int,
    ) -> tuple[list[Task], list[Delivery]]:
        """Wait up to `timeout_ms` for up to `count` tasks and claim them.

        Returns the claimed tasks and the deliveries to settle once the
        answer is written (see `answer`), and counts the poll in the
        metrics. Raises TooManyRequests, having recorded nothing, while the
        gateway is saturated.
        """
        if self.saturated:
            raise TooManyRequests(
                f"this gateway holds {self._max_active} polls already; "
                f"retry in {TooManyRequests.retry_after} s or poll another replica"
            )
        self._polls.record(task_type, domain, worker_id, now_ms())
        started = time.monotonic()
        self._active += 1
        try:
            # A type at its concurrentExecLimit, or out of its rate, answers
            # at once, as Conductor does: a poll waiting for room would hold
            # deliveries it may not hand out.
            allowance = await self._limits.allow(task_type, count)
            tasks: list[Task] = []
            deliveries: list[Delivery] = []
            try:
                if allowance.count:
                    tasks, deliveries = await self._poll(
                        request,
                        task_type,
                        domain,
                        worker_id,
                        allowance.count,
                        timeout_ms,
                    )
            finally:
                await allowance.release(len(tasks))
        finally:
            self._active -= 1
        METRICS.poll_answered(task_type, len(tasks), time.monotonic() - started)
        return tasks, deliveries

    async def _poll(
        self,
        request: web.Request,
        task_type: str,
        domain: str | None,
        worker_id: str | None,
        count: int,
        timeout_ms: int,
    ) -> tuple[list[Task], list[Delivery]]:
        queue = queue_name(task_type, domain)
        await self._engine.ensure_queue(queue)
        dispatcher = self._dispatchers.get(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000

        while True:
            deliveries = await dispatcher.take(count, max(0.0, deadline - loop.time()))
            METRICS.taken(task_type, deliveries)
            if not deliveries:
                return [], []
            if _gone(request):
                dispatcher.give_back(deliveries)
                return [], []
            tasks, winners = await self._claim(deliveries, worker_id)
            if tasks or loop.time() >= deadline:
                return tasks, winners

    async def _claim(
        self, deliveries: list[Delivery], worker_id: str | None
    ) -> tuple[list[Task], list[Delivery]]:
        unique: dict[str, Delivery] = {}
        spare: list[Delivery] = []
        for delivery in deliveries:
            held = unique.get(delivery.message.task_id)
            if held is None or held.message.version < delivery.message.version:
                if held is not None:
                    spare.append(held)
                unique[delivery.message.task_id] = delivery
            else:
                spare.append(delivery)
        try:
            tasks = await self._engine.claim(
                [d.message for d in unique.values()], worker_id
            )
        except BatonError:
            await _settle(deliveries, ack=False)
            raise

        # A delivery whose channel closed during the claim is back in its
        # queue, and its redelivery may claim the task again (same message
        # id): handed out now as well, the task would be in two hands.
        returned = {d.message.task_id for d in unique.values() if d.returned}
        if returned:
            log.warning("not handing out %d tasks the broker took back", len(returned))
            tasks = [task for task in tasks if task.taskId not in returned]
        won = {task.taskId for task in tasks}
        winners = [d for d in unique.values() if d.message.task_id in won]
        stale = spare + [d for d in unique.values() if d.message.task_id not in won]
        if stale:
            log.debug("dropping %d stale or duplicate messages", len(stale))
            await _settle(stale, ack=True)
        return tasks, winners


async def answer(
    request: web.Request, response: web.StreamResponse, deliveries: Sequence[Delivery]
) -> web.StreamResponse:
    """Write `response`, then ack `deliveries`; requeue them if it fails."""
    if not deliveries:
        return response
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        await _settle(deliveries, ack=False)
        raise
    await _settle(deliveries, ack=True)
    return response


async def give_back(
    polling: asyncio.Future[tuple[list[Task], list[Delivery]]],
) -> None:
    """Requeue what a poll claims once it ends, its answer not to be sent.

    The poll is let run out (a chained poll waits 100 ms at most) rather
    than cancelled, which could strand deliveries mid-claim. A claimed
    task goes back with its message: the store lets that same message
    claim the task again, so the next poll hands it out.
    """
    try:
        _, deliveries = await polling
    except BatonError:
        return
    await _settle(deliveries, ack=False)


async def _settle(deliveries: Sequence[Delivery], *, ack: bool) -> None:
    settling = [d.ack() if ack else d.requeue() for d in deliveries]
    results = await asyncio.gather(*settling, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            log.warning("settling a delivery failed: %s", result)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
