"""The embedded broker: RabbitMQ's semantics inside one process.

Queues are deques that live as long as the broker object. Deliveries are
prefetch-limited per subscription and handed out round-robin across the
subscriptions of a queue, always from a `loop.call_soon` callback so that
callers see the same asynchrony as with RabbitMQ. A requeued delivery goes
back to the head of its queue and comes out again with `redelivered=True`.
Delayed publishes are `loop.call_later` timers: they live and die with the
process, like everything else here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from shared.errors import BrokerError
from shared.interfaces import (
    NO_HEADERS,
    Broker,
    Delivery,
    DeliveryCallback,
    QueueStats,
    Subscription,
    TaskMessage,
)

log = logging.getLogger(__name__)


_Entry = tuple[TaskMessage, bool, Mapping[str, str]]
"""A ready message, whether it was delivered before, and its headers."""


class _Queue:
    """Ready messages, the subscriptions that may take more, and counts."""

    __slots__ = (
        "dispatch_scheduled",
        "name",
        "ready",
        "ring",
        "subscriptions",
        "unsettled",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[_Entry] = deque()
        # Subscriptions with room for another delivery, in round-robin order.
        self.ring: deque[_MemorySubscription] = deque()
        # Live subscriptions, and cancelled ones still holding deliveries.
        self.subscriptions: set[_MemorySubscription] = set()
        self.unsettled = 0
        self.dispatch_scheduled = False


class _MemoryDelivery(Delivery):
    """A message handed to one subscription."""

    __slots__ = ("_broker", "_subscription", "headers", "settled")

    def __init__(
        self,
        broker: MemoryBroker,
        subscription: _MemorySubscription,
        message: TaskMessage,
        redelivered: bool,
        headers: Mapping[str, str],
    ) -> None:
        self.message = message
        self.redelivered = redelivered
        self.headers = headers
        self._broker = broker
        self._subscription = subscription
        self.settled = False

    async def ack(self) -> None:
        """Remove the message for good; a no-op if already settled."""
        self._broker._settle(self, self._subscription, requeue=False)

    async def requeue(self) -> None:
        """Return the message to the head of its queue; no-op if settled."""
        self._broker._settle(self, self._subscription, requeue=True)


class _MemorySubscription(Subscription):
    """A consumer of one in-process queue."""

    __slots__ = (
        "callback",
        "cancelled",
        "in_ring",
        "outstanding",
        "prefetch",
        "queue",
    )

    def __init__(self, queue: _Queue, prefetch: int, callback: DeliveryCallback):
        self.queue = queue
        self.prefetch = prefetch
        self.callback = callback
        self.outstanding: set[_MemoryDelivery] = set()
        self.cancelled = False
        self.in_ring = False

    def has_room(self) -> bool:
        """True if this subscription may take another delivery."""
        return not self.cancelled and len(self.outstanding) < self.prefetch

    async def cancel(self) -> None:
        """Stop new deliveries; outstanding ones stay settleable."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.in_ring:
            # Linear in the queue's subscriptions, which are few; this keeps
            # the ring from filling with dead entries under subscribe churn.
            self.queue.ring.remove(self)
            self.in_ring = False
        if not self.outstanding:
            self.queue.subscriptions.discard(self)


class MemoryBroker(Broker):
    """The `Broker` contract in process memory, for single-process setups.

    `delay_levels` bounds delays exactly as the RabbitMQ adapter's ladder
    does: a delay of 2**delay_levels seconds or more raises ValueError.
    """

    def __init__(self, *, delay_levels: int = 22) -> None:
        self._max_delay = (1 << delay_levels) - 1
        self._queues: dict[str, _Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._next_timer = 0

    async def start(self) -> None:
        """Bind to the running event loop."""
        self._loop = asyncio.get_running_loop()
        for queue in self._queues.values():
            self._schedule(queue)

    async def close(self) -> None:
        """Stop dispatching and drop pending delays.

        Unsettled deliveries return to the head of their queues, as
        RabbitMQ returns them when a connection closes, and settling them
        afterwards does nothing.
        """
        self._loop = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for queue in self._queues.values():
            returned: list[_MemoryDelivery] = []
            for subscription in queue.subscriptions:
                subscription.cancelled = True
                subscription.in_ring = False
                for delivery in subscription.outstanding:
                    delivery.settled = True
                    returned.append(delivery)
                subscription.outstanding.clear()
            queue.subscriptions.clear()
            queue.ring.clear()
            queue.ready.extendleft(
                (delivery.message, True, delivery.headers)
                for delivery in reversed(returned)
            )
            queue.unsettled = 0
            queue.dispatch_scheduled = False

    async def ping(self) -> None:
        """Raise BrokerError unless the broker is started."""
        self._require_loop()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            raise BrokerError("embedded broker is not started")
        return self._loop

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            if not name:
                raise ValueError("queue name is empty")
            queue = self._queues[name] = _Queue(name)
        return queue

    async def declare(self, queue: str) -> None:
        """Create the queue if it does not exist."""
        self._queue(queue)

    async def publish(
        self,
        queue: str,
        messages: Sequence[TaskMessage],
        delay_seconds: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Append messages to the queue, now or after `delay_seconds`."""
        if not 0 <= delay_seconds <= self._max_delay:
            raise ValueError(
                f"delay must be between 0 and {self._max_delay} seconds, "
                f"got {delay_seconds}"
            )
        loop = self._require_loop()
        target = self._queue(queue)
        if not messages:
            return
        batch = tuple(messages)
        kept = MappingProxyType(dict(headers)) if headers else NO_HEADERS
        if delay_seconds:
            key = self._next_timer
            self._next_timer += 1
            self._timers[key] = loop.call_later(
                delay_seconds, self._deliver_later, key, target, batch, kept
            )
        else:
            self._enqueue(target, batch, kept)

    def _deliver_later(
        self,
        key: int,
        queue: _Queue,
        batch: tuple[TaskMessage, ...],
        headers: Mapping[str, str],
    ) -> None:
        self._timers.pop(key, None)
        self._enqueue(queue, batch, headers)

    def _enqueue(
        self,
        queue: _Queue,
        batch: tuple[TaskMessage, ...],
        headers: Mapping[str, str],
    ) -> None:
        queue.ready.extend((message, False, headers) for message in batch)
        self._schedule(queue)

    async def subscribe(
        self, queue: str, prefetch: int, on_delivery: DeliveryCallback
    ) -> Subscription:
        """Start delivering `queue` with at most `prefetch` unsettled."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self._require_loop()
        target = self._queue(queue)
        subscription = _MemorySubscription(target, prefetch, on_delivery)
        target.subscriptions.add(subscription)
        subscription.in_ring = True
        target.ring.append(subscription)
        self._schedule(target)
        return subscription

    async def stats(self, queue: str) -> QueueStats:
        """Ready messages (delayed ones excluded) and unsettled deliveries."""
        target = self._queues.get(queue)
        if target is None:
            return QueueStats(0, 0)
        return QueueStats(len(target.ready), target.unsettled)

    def _settle(
        self,
        delivery: _MemoryDelivery,
        subscription: _MemorySubscription,
        *,
        requeue: bool,
    ) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        subscription.outstanding.discard(delivery)
        queue = subscription.queue
        queue.unsettled -= 1
        if requeue:
            queue.ready.appendleft((delivery.message, True, delivery.headers))
        if subscription.cancelled:
            if not subscription.outstanding:
                queue.subscriptions.discard(subscription)
        elif not subscription.in_ring:
            subscription.in_ring = True
            queue.ring.append(subscription)
        self._schedule(queue)

    def _schedule(self, queue: _Queue) -> None:
        if queue.dispatch_scheduled or not queue.ready or not queue.ring:
            return
        if self._loop is None:
            return
        queue.dispatch_scheduled = True
        self._loop.call_soon(self._dispatch, queue)

    def _dispatch(self, queue: _Queue) -> None:
        queue.dispatch_scheduled = False
        if self._loop is None:
            return
        ring = queue.ring
        # At most one pass over what is ready now: a callback that requeues
        # schedules another pass instead of spinning inside this one.
        budget = len(queue.ready)
        while budget and queue.ready and ring:
            subscription = ring.popleft()
            if not subscription.has_room():
                subscription.in_ring = False
                if subscription.cancelled and not subscription.outstanding:
                    queue.subscriptions.discard(subscription)
                continue
            budget -= 1
            message, redelivered, headers = queue.ready.popleft()
            delivery = _MemoryDelivery(
                self, subscription, message, redelivered, headers
            )
            subscription.outstanding.add(delivery)
            queue.unsettled += 1
            if subscription.has_room():
                ring.append(subscription)
            else:
                subscription.in_ring = False
            try:
                subscription.callback(delivery)
            except Exception:
                log.exception("delivery callback failed on %s; requeueing", queue.name)
                self._settle(delivery, subscription, requeue=True)
        self._schedule(queue)
