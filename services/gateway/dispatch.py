"""Long polls served from shared broker consumers.

Each queue has one dispatcher per gateway. While any poll waits on it,
the dispatcher keeps one consumer on the queue and hands each delivery to
the oldest waiting poll; with nobody waiting it keeps the consumer for a
short linger (so back-to-back polls cost no consume/cancel round trip),
then cancels it and returns whatever it buffered, so that tasks never
wait in a gateway that has no pollers for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any

from shared.errors import BrokerError
from shared.interfaces import Broker, Delivery, Subscription

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("count", "deliveries", "ready")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.count = count
        self.deliveries: list[Delivery] = []
        self.ready: asyncio.Future[None] = loop.create_future()

    def give(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if not self.ready.done():
            self.ready.set_result(None)

    @property
    def full(self) -> bool:
        return len(self.deliveries) >= self.count


class QueueDispatcher:
    """Serves the polls of one queue from one consumer."""

    def __init__(
        self, broker: Broker, queue: str, prefetch: int, linger_ms: int
    ) -> None:
        self.queue = queue
        self._broker = broker
        self._prefetch = prefetch
        self._linger = linger_ms / 1000
        self._waiters: deque[_Waiter] = deque()
        self._buffer: deque[Delivery] = deque()
        self._subscription: Subscription | None = None
        self._subscribing: asyncio.Task[Subscription] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Polls waiting on this queue now."""
        return len(self._waiters)

    async def take(self, count: int, wait_seconds: float) -> list[Delivery]:
        """Wait up to `wait_seconds` for deliveries; return 0 to `count`.

        Returns as soon as at least one delivery is at hand. Raises
        BrokerError when the queue cannot be consumed.
        """
        taken = self._from_buffer(count)
        if taken or self._closed:
            return taken
        loop = asyncio.get_running_loop()
        waiter = _Waiter(count, loop)
        self._waiters.append(waiter)
        self._cancel_linger()
        try:
            await self._ensure_consumer()
            if not waiter.deliveries:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter.ready), wait_seconds)
        except BaseException:
            self._withdraw(waiter)
            for delivery in waiter.deliveries:
                self._hand_back(delivery)
            raise
        self._withdraw(waiter)
        return waiter.deliveries

    def give_back(self, deliveries: list[Delivery]) -> None:
        """Return deliveries that were taken but not used to the next poll."""
        for delivery in deliveries:
            self._on_delivery(delivery)

    async def close(self) -> None:
        """Cancel the consumer and return everything buffered."""
        self._closed = True
        self._cancel_linger()
        for waiter in list(self._waiters):
            if not waiter.ready.done():
                waiter.ready.set_result(None)
        await self._stop_consumer()

    def _from_buffer(self, count: int) -> list[Delivery]:
        taken: list[Delivery] = []
        while self._buffer and len(taken) < count:
            taken.append(self._buffer.popleft())
        return taken

    def _on_delivery(self, delivery: Delivery) -> None:
        for waiter in self._waiters:
            if not waiter.full:
                waiter.give(delivery)
                return
        self._buffer.append(delivery)
        if not self._waiters and self._subscription is None:
            self._hand_back(self._buffer.pop())

    def _withdraw(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not self._waiters:
            self._start_linger()

    def _start_linger(self) -> None:
        if self._closed:
            return
        self._cancel_linger()
        loop = asyncio.get_running_loop()
        self._linger_timer = loop.call_later(self._linger, self._linger_over)

    def _cancel_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _linger_over(self) -> None:
        self._linger_timer = None
        if not self._waiters:
            _spawn(self._stop_consumer())

    async def _ensure_consumer(self) -> None:
        if self._subscription is not None:
            return
        if self._subscribing is None:
            self._subscribing = asyncio.ensure_future(
                self._broker.subscribe(self.queue, self._prefetch, self._on_delivery)
            )
        subscribing = self._subscribing
        try:
            subscription = await asyncio.shield(subscribing)
        except BaseException:
            # A failed attempt must not be awaited again by the next poll.
            if self._subscribing is subscribing and subscribing.done():
                self._subscribing = None
            raise
        if self._subscribing is subscribing:
            self._subscribing = None
            self._subscription = subscription
            if not self._waiters:
                self._start_linger()

    async def _stop_consumer(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.cancel()
            except BrokerError as exc:
                log.warning("cancelling consumer of %s failed: %s", self.queue, exc)
        while self._buffer:
            self._hand_back(self._buffer.popleft())

    def _hand_back(self, delivery: Delivery) -> None:
        _spawn(_settle(delivery.requeue()))


_background: set[asyncio.Task[None]] = set()


def _spawn(work: Coroutine[Any, Any, None]) -> None:
    # The loop keeps only weak references to tasks: hold one until done.
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _settle(settling: Awaitable[None]) -> None:
    try:
        await settling
    except BrokerError as exc:
        log.debug("settling a delivery failed, the broker requeues it: %s", exc)


class Dispatchers:
    """One dispatcher per queue, created on first poll."""

    def __init__(self, broker: Broker, prefetch: int, linger_ms: int) -> None:
        self._broker = broker
        self._prefetch = prefetch
        self._linger_ms = linger_ms
        self._by_queue: dict[str, QueueDispatcher] = {}

    def get(self, queue: str) -> QueueDispatcher:
        """Return the dispatcher of a logical queue."""
        dispatcher = self._by_queue.get(queue)
        if dispatcher is None:
            dispatcher = QueueDispatcher(
                self._broker, queue, self._prefetch, self._linger_ms
            )
            self._by_queue[queue] = dispatcher
        return dispatcher

    @property
    def waiting(self) -> int:
        """Polls waiting across every queue."""
        return sum(d.waiting for d in self._by_queue.values())

    async def close(self) -> None:
        """Answer every waiting poll and release every consumer."""
        await asyncio.gather(*(d.close() for d in self._by_queue.values()))
