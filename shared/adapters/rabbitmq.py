"""RabbitMQ broker: durable task queues, manual acks and a delay ladder.

Every name lives under a prefix: the task queue of logical queue `X` is
`{prefix}.task.X`. Delays use a ladder of `delay_levels` tiers and no
plugin: tier k is a topic exchange and a queue whose messages all live
2^k seconds before they are dead-lettered into tier k-1, and tier 0
dead-letters into `{prefix}.delay.deliver`. The delay is written in binary
into the routing key, one word per tier from the highest down, followed by
the destination queue, so a message waits only in the tiers whose bit is
set. A tier holds one fixed TTL because RabbitMQ expires messages only at
the head of a queue.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity

from shared.errors import BrokerError
from shared.interfaces import (
    NO_HEADERS,
    SWEEP_QUEUE,
    Broker,
    Delivery,
    DeliveryCallback,
    QueueStats,
    Subscription,
    TaskMessage,
)

log = logging.getLogger(__name__)

# Errors a broker round trip can end with: aiormq's protocol errors, a
# closed channel or connection (aio-pika raises RuntimeError, of which
# ChannelInvalidStateError is one), socket errors and timeouts (both
# OSError subclasses).
_AMQP_ERRORS = (aiormq.exceptions.AMQPError, RuntimeError, OSError)

_TIMEOUT = 30.0
_MAX_SHORTSTR = 255
_PREFIX = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")

_decoder = msgspec.json.Decoder(TaskMessage)
_encoder = msgspec.json.Encoder()


def _string_headers(raw: Mapping[str, Any] | None) -> Mapping[str, str]:
    """The string-valued headers a message was published with.

    RabbitMQ's own headers (`x-death`, `x-first-death-*` and the like,
    added when a message is dead-lettered through the delay ladder) are
    left out, as are values that are not strings.
    """
    if not raw:
        return NO_HEADERS
    kept: dict[str, str] = {}
    for name, value in raw.items():
        if name.startswith("x-"):
            continue
        if isinstance(value, bytes):
            kept[name] = value.decode("utf-8", "replace")
        elif isinstance(value, str):
            kept[name] = value
    return MappingProxyType(kept) if kept else NO_HEADERS


async def _outcome(confirm: Coroutine[Any, Any, Any]) -> BaseException | None:
    """Await a publish; return its failure instead of raising it.

    aiormq fails a confirm future by cancelling it when its channel closes:
    that CancelledError is a failed publish, unless this task itself is
    being cancelled.
    """
    try:
        await confirm
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return exc
    except _AMQP_ERRORS as exc:
        return exc
    return None


def delay_routing_key(delay_seconds: int, destination: str, levels: int) -> str:
    """Return the routing key that carries a message through the ladder.

    One word per tier, highest first, `1` where that tier's bit of
    `delay_seconds` is set, then `destination`. Raises ValueError unless
    0 < delay_seconds < 2**levels.
    """
    if not 0 < delay_seconds < 1 << levels:
        raise ValueError(
            f"delay must be between 1 and {(1 << levels) - 1} seconds, "
            f"got {delay_seconds}"
        )
    return ".".join(format(delay_seconds, f"0{levels}b")) + "." + destination


class _RabbitDelivery(Delivery):
    """A message received on one subscription's channel."""

    def __init__(
        self,
        subscription: _RabbitSubscription,
        channel: aiormq.abc.AbstractChannel,
        tag: int,
        redelivered: bool,
        headers: Mapping[str, str],
        message: TaskMessage,
    ) -> None:
        self.message = message
        self.redelivered = redelivered
        self.headers = headers
        self.tag = tag
        self.settled = False
        self._subscription = subscription
        self._channel = channel

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        """The channel this delivery came on; only it may settle the tag."""
        return self._channel

    @property
    def returned(self) -> bool:
        """True once the channel closed: RabbitMQ has requeued the message."""
        return self._channel.is_closed

    async def ack(self) -> None:
        """Remove the message from its queue; a no-op if already settled.

        Acks are written at the end of the current event-loop turn, as one
        `multiple` ack where the tags allow it.
        """
        if self.settled:
            return
        # Marked at once so that a second settle never sends the tag again:
        # a tag settled twice closes the channel.
        self.settled = True
        self._subscription.queue_ack(self)

    async def requeue(self) -> None:
        """Return the message to its queue; a no-op if already settled."""
        if self.settled:
            return
        self.settled = True
        await self._subscription.nack(self)


class _Settle(NamedTuple):
    """One ack or nack frame, for the channel the delivery came on."""

    channel: aiormq.abc.AbstractChannel
    tag: int
    multiple: bool
    requeue: bool | None  # None: an ack; otherwise a nack with this flag.


class _RabbitSubscription(Subscription):
    """A consumer on its own channel; see `RabbitMQBroker.subscribe`.

    It consumes through the channel's aiormq layer: aio-pika's message
    wrappers cost about as much CPU as the AMQP work itself. The robust
    channel still restores the queue and the prefetch after a reconnect,
    and `_on_reopen` starts consuming again on the new channel.

    Acks are coalesced. `_outstanding` holds the unsettled deliveries of
    the current channel in tag order (RabbitMQ numbers a channel's
    deliveries upwards); at the end of each loop turn, `_flush` acks with
    `multiple` up to the highest tag below which every delivery is acked,
    and the rest one by one. Every ack and nack frame then leaves through
    one sender task, in the order it was decided: aiormq's bounded write
    queue can reorder frames of concurrent writers, and a `multiple` ack
    overtaken by a single ack or a nack of a tag it covers would close
    the channel (RabbitMQ: unknown delivery tag).
    """

    def __init__(
        self,
        broker: RabbitMQBroker,
        queue: str,
        channel: AbstractRobustChannel,
        on_delivery: DeliveryCallback,
    ) -> None:
        self.queue = queue
        self._broker = broker
        self._channel = channel
        self._on_delivery = on_delivery
        self._physical = ""
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._outstanding: dict[int, _RabbitDelivery] = {}
        self._acked: set[int] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._frames: deque[_Settle] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._cancelled = False
        self._closed = False

    async def start(self, physical: str, prefetch: int, arguments: Any) -> None:
        """Set the prefetch window and start consuming."""
        self._physical = physical
        self._channel.close_callbacks.add(self._on_channel_closed)
        self._channel.reopen_callbacks.add(self._on_reopen)
        await self._channel.set_qos(prefetch_count=prefetch, timeout=_TIMEOUT)
        await self._channel.declare_queue(
            physical, durable=True, arguments=arguments, timeout=_TIMEOUT
        )
        await self._consume()

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        consumed = await underlay.basic_consume(
            self._physical, self._on_message, no_ack=False, timeout=_TIMEOUT
        )
        self._underlay = underlay
        self._tag = consumed.consumer_tag

    def unsettled(self) -> int:
        """Deliveries handed out and not settled, on a channel still open."""
        self._reap()
        return sum(1 for d in self._outstanding.values() if not d.settled)

    async def cancel(self) -> None:
        """Send basic.cancel; close the channel once nothing is outstanding."""
        if self._cancelled:
            return
        self._cancelled = True
        underlay, tag = self._underlay, self._tag
        if underlay is not None and tag is not None and not underlay.is_closed:
            try:
                await underlay.basic_cancel(tag, timeout=_TIMEOUT)
            except _AMQP_ERRORS:
                log.debug("basic.cancel failed, channel gone", exc_info=True)
        self._reap()
        if not self._outstanding:
            await self.close()

    async def close(self) -> None:
        """Write pending acks, then close the channel; RabbitMQ requeues
        whatever is still unacked."""
        if self._closed:
            return
        self._closed = True
        self._cancelled = True
        self._broker._forget(self)
        self._flush()
        if self._sender is not None:
            # An ack lost with the channel would bring a handed-out task
            # back as a redelivery.
            await asyncio.shield(self._sender)
        self._forget_all()
        try:
            await self._channel.close()
        except _AMQP_ERRORS:
            log.debug("channel close failed", exc_info=True)

    def abandon(self) -> None:
        """Forget every delivery; closing the connection returns them."""
        self._closed = True
        self._cancelled = True
        self._forget_all()
        self._frames.clear()

    def _forget_all(self) -> None:
        for delivery in self._outstanding.values():
            delivery.settled = True
        self._outstanding.clear()
        self._acked.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def queue_ack(self, delivery: _RabbitDelivery) -> None:
        """Ack `delivery` with the next flush, at the end of this loop turn."""
        if self._outstanding.get(delivery.tag) is not delivery:
            return
        self._acked.add(delivery.tag)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self._flush)

    async def nack(self, delivery: _RabbitDelivery) -> None:
        """Requeue `delivery` now."""
        if self._outstanding.pop(delivery.tag, None) is not delivery:
            return
        # Left `_outstanding` above, so no later flush covers this tag.
        self._send(_Settle(delivery.channel, delivery.tag, False, True))
        self._close_if_done()

    def _flush(self) -> None:
        self._flush_handle = None
        # Deliveries of a closed channel are gone; what is left came on
        # the one open channel, in tag order.
        self._reap()
        if not self._acked:
            return
        highest = 0
        for tag in self._outstanding:
            if tag not in self._acked:
                break
            highest = tag
        channel = self._outstanding[next(iter(self._acked))].channel
        if highest:
            self._send(_Settle(channel, highest, True, None))
        for tag in sorted(self._acked):
            del self._outstanding[tag]
            if tag > highest:
                self._send(_Settle(channel, tag, False, None))
        self._acked.clear()
        self._close_if_done()

    def _send(self, frame: _Settle) -> None:
        self._frames.append(frame)
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._write_frames())

    async def _write_frames(self) -> None:
        try:
            while self._frames:
                channel, tag, multiple, requeue = self._frames.popleft()
                if channel.is_closed:
                    # RabbitMQ requeued the channel's deliveries itself.
                    continue
                try:
                    if requeue is None:
                        await channel.basic_ack(tag, multiple=multiple, wait=False)
                    else:
                        await channel.basic_nack(tag, requeue=requeue, wait=False)
                except _AMQP_ERRORS:
                    log.debug("settle skipped, channel closed", exc_info=True)
        finally:
            self._sender = None

    def _close_if_done(self) -> None:
        if self._cancelled and not self._outstanding and not self._closed:
            self._broker._spawn(self.close())

    async def _on_message(self, incoming: aiormq.abc.DeliveredMessage) -> None:
        channel = incoming.channel
        frame = incoming.delivery
        if not isinstance(frame, aiormq.spec.Basic.Deliver):
            return
        tag = frame.delivery_tag
        if channel.is_closed or tag is None:
            # The channel closed before this task ran; RabbitMQ has
            # already requeued the message.
            return
        if self._cancelled:
            # Sent before the broker processed our basic.cancel: hand it
            # straight back rather than to a caller that stopped listening.
            self._send(_Settle(channel, tag, False, True))
            return
        try:
            message = _decoder.decode(incoming.body)
        except msgspec.DecodeError:
            log.warning(
                "dropping a message on %s that is not a TaskMessage: %r",
                self.queue,
                bytes(incoming.body[:200]),
            )
            self._send(_Settle(channel, tag, False, None))
            return
        delivery = _RabbitDelivery(
            self,
            channel,
            tag,
            bool(frame.redelivered),
            _string_headers(incoming.header.properties.headers),
            message,
        )
        self._outstanding[tag] = delivery
        try:
            self._on_delivery(delivery)
        except Exception:
            log.exception("delivery callback failed on %s; requeueing", self.queue)
            await delivery.requeue()

    def _on_channel_closed(
        self, _channel: AbstractChannel | None, _exc: BaseException | None
    ) -> None:
        # Deliveries of a closed channel went back to the queue with it; the
        # robust channel reopens, and `_on_reopen` consumes again unless
        # this subscription was cancelled.
        self._reap()
        self._close_if_done()

    async def _on_reopen(self, _channel: Any) -> None:
        self._reap()
        if self._cancelled or self._closed:
            return
        try:
            await self._consume()
        except _AMQP_ERRORS:
            log.warning(
                "consuming %s again after a reconnect failed",
                self.queue,
                exc_info=True,
            )

    def _reap(self) -> None:
        dead = [t for t, d in self._outstanding.items() if d.returned]
        for tag in dead:
            self._outstanding.pop(tag).settled = True
            self._acked.discard(tag)


class RabbitMQBroker(Broker):
    """The `Broker` contract on RabbitMQ 3.10+ (classic or quorum queues).

    One robust connection; one publisher channel with confirms, on which
    the topology is declared (aio-pika re-declares it after a reconnect);
    one channel per subscription; one plain channel for passive declares.
    Processes sharing a prefix must use the same `delay_levels`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "baton",
        queue_type: str = "classic",
        delay_levels: int = 22,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type must be classic or quorum: {queue_type!r}")
        if not 1 <= delay_levels <= 32:
            raise ValueError(f"delay_levels must be 1 to 32, got {delay_levels}")
        if not _PREFIX.fullmatch(prefix) or prefix.startswith("amq."):
            raise ValueError(f"invalid prefix {prefix!r}")
        self._url = url
        self._prefix = prefix
        self._queue_type = queue_type
        self._levels = delay_levels
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        # Indexed by tier: a delayed message enters at its highest set bit.
        self._tier_exchanges: list[AbstractExchange] = []
        self._stats_channel: aiormq.abc.AbstractChannel | None = None
        self._stats_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._declaring: dict[str, asyncio.Future[None]] = {}
        self._subscriptions: dict[str, set[_RabbitSubscription]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._deliver_name = f"{prefix}.delay.deliver"

    # Names.

    def physical_queue(self, queue: str) -> str:
        """Return the RabbitMQ queue name of a logical queue."""
        if not queue:
            raise ValueError("queue name is empty")
        if "*" in queue or "#" in queue:
            # Topic wildcards in a deliver binding would route other
            # queues' delayed messages here.
            raise ValueError(f"queue name contains a wildcard: {queue!r}")
        name = f"{self._prefix}.task.{queue}"
        if len(name.encode()) > _MAX_SHORTSTR:
            raise ValueError(f"queue name too long for RabbitMQ: {name!r}")
        return name

    def delay_tier_name(self, tier: int) -> str:
        """Return the name of the exchange and the queue of delay tier `tier`."""
        return f"{self._prefix}.delay.{tier:02d}"

    def topology_names(self) -> tuple[list[str], list[str]]:
        """Return (queues, exchanges) this instance declared, by name.

        Still valid after `close()`, for housekeeping.
        """
        tiers = [self.delay_tier_name(k) for k in range(self._levels)]
        queues = tiers + sorted(self.physical_queue(q) for q in self._declared)
        return queues, [*tiers, self._deliver_name]

    def _queue_arguments(self, queue: str) -> dict[str, Any] | None:
        arguments: dict[str, Any] = {}
        if self._queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        if queue == SWEEP_QUEUE:
            arguments["x-single-active-consumer"] = True
        return arguments or None

    def _deliver_binding(self, physical: str) -> str:
        # Anchored on the exact number of delay words rather than `#.`:
        # names contain dots, so `#.baton.task.a` would also match the
        # routing key of a queue named `baton.task.x.baton.task.a`.
        return "*." * self._levels + physical

    # Lifecycle.

    async def start(self) -> None:
        """Connect, open the publisher channel and declare the delay ladder."""
        if self._connection is not None:
            return
        self._declared.clear()
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=_TIMEOUT,
                client_properties={"connection_name": f"baton {self._prefix}"},
            )
            channel = self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await channel.initialize(timeout=_TIMEOUT)
            self._publisher = channel
            await self._declare_ladder(channel)
        except _AMQP_ERRORS as exc:
            await self.close()
            raise BrokerError(f"cannot start RabbitMQ broker: {exc!r}") from exc

    async def _declare_ladder(self, channel: AbstractRobustChannel) -> None:
        # Exchanges from the top tier down, so that when aio-pika restores
        # them in declaration order after a reconnect, the source of every
        # exchange-to-exchange binding already exists.
        exchanges: list[AbstractExchange] = []
        for tier in reversed(range(self._levels)):
            exchange = await channel.declare_exchange(
                self.delay_tier_name(tier),
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                timeout=_TIMEOUT,
            )
            if exchanges:
                await exchange.bind(
                    exchanges[-1], self._tier_pattern(tier + 1, "0"), timeout=_TIMEOUT
                )
            exchanges.append(exchange)
        deliver = await channel.declare_exchange(
            self._deliver_name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            timeout=_TIMEOUT,
        )
        await deliver.bind(exchanges[-1], self._tier_pattern(0, "0"), timeout=_TIMEOUT)
        for tier, source in zip(reversed(range(self._levels)), exchanges, strict=True):
            arguments: dict[str, Any] = {
                "x-message-ttl": (1 << tier) * 1000,
                "x-dead-letter-exchange": (
                    self.delay_tier_name(tier - 1) if tier else self._deliver_name
                ),
            }
            if self._queue_type == "quorum":
                # Quorum queues dead-letter without loss only this way.
                arguments["x-queue-type"] = "quorum"
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
            queue = await channel.declare_queue(
                self.delay_tier_name(tier),
                durable=True,
                arguments=arguments,
                timeout=_TIMEOUT,
            )
            await queue.bind(source, self._tier_pattern(tier, "1"), timeout=_TIMEOUT)
        self._tier_exchanges = exchanges[::-1]

    def _tier_pattern(self, tier: int, bit: str) -> str:
        # Skip the words of the tiers above, then match this tier's bit.
        return "*." * (self._levels - 1 - tier) + bit + ".#"

    async def close(self) -> None:
        """Close every channel and the connection.

        Unsettled deliveries become no-ops; RabbitMQ requeues them.
        """
        connection, self._connection = self._connection, None
        self._publisher = None
        self._tier_exchanges = []
        self._stats_channel = None
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription.abandon()
        self._subscriptions.clear()
        for task in list(self._tasks):
            task.cancel()
        if connection is not None:
            try:
                await connection.close()
            except _AMQP_ERRORS:
                log.debug("connection close failed", exc_info=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, subscription: _RabbitSubscription) -> None:
        subscriptions = self._subscriptions.get(subscription.queue)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.queue]

    def _require_publisher(self) -> AbstractRobustChannel:
        if self._publisher is None or self._connection is None:
            raise BrokerError("RabbitMQ broker is not started")
        return self._publisher

    async def ping(self) -> None:
        """Make a round trip to RabbitMQ; raise BrokerError if it fails."""
        if self._connection is None or self._connection.is_closed:
            raise BrokerError("RabbitMQ connection is closed")
        async with self._stats_lock:
            try:
                channel = await self._open_stats_channel()
                await channel.basic_qos(prefetch_count=0, timeout=_TIMEOUT)
            except _AMQP_ERRORS as exc:
                raise BrokerError(f"RabbitMQ does not answer: {exc!r}") from exc

    # Queues.

    async def declare(self, queue: str) -> None:
        """Declare the task queue and bind it to the delay ladder, once."""
        if queue in self._declared:
            return
        pending = self._declaring.get(queue)
        if pending is None:
            pending = asyncio.ensure_future(self._declare(queue))
            self._declaring[queue] = pending
            pending.add_done_callback(lambda f: self._declared_done(queue, f))
        await asyncio.shield(pending)

    def _declared_done(self, queue: str, future: asyncio.Future[None]) -> None:
        self._declaring.pop(queue, None)
        if not future.cancelled() and future.exception() is None:
            self._declared.add(queue)

    async def _declare(self, queue: str) -> None:
        physical = self.physical_queue(queue)
        channel = self._require_publisher()
        try:
            amqp_queue = await channel.declare_queue(
                physical,
                durable=True,
                arguments=self._queue_arguments(queue),
                timeout=_TIMEOUT,
            )
            await amqp_queue.bind(
                self._deliver_name, self._deliver_binding(physical), timeout=_TIMEOUT
            )
        except _AMQP_ERRORS as exc:
            raise BrokerError(f"cannot declare queue {physical}: {exc!r}") from exc

    async def publish(
        self,
        queue: str,
        messages: Sequence[TaskMessage],
        delay_seconds: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish persistent messages concurrently; wait for every confirm.

        With `delay_seconds` > 0 the messages enter the delay ladder;
        `headers` become AMQP message headers, which dead-lettering keeps.
        Raises ValueError for a delay of 2**delay_levels seconds or more and
        BrokerError if RabbitMQ refuses, cannot route or does not confirm.
        """
        if delay_seconds < 0:
            raise ValueError(f"delay must not be negative, got {delay_seconds}")
        physical = self.physical_queue(queue)
        if delay_seconds:
            routing_key = delay_routing_key(delay_seconds, physical, self._levels)
            if len(routing_key.encode()) > _MAX_SHORTSTR:
                raise ValueError(f"queue name too long for a delay: {physical!r}")
        else:
            routing_key = physical
        if not messages:
            return
        await self.declare(queue)
        publisher = self._require_publisher()
        if publisher.is_closed:
            raise BrokerError(f"cannot publish to {physical}: channel is closed")
        exchange: str
        if not delay_seconds:
            exchange = ""
        elif self._tier_exchanges:
            # The tiers above the highest set bit would only pass the
            # message down: skipping them saves their routing work.
            exchange = self._tier_exchanges[delay_seconds.bit_length() - 1].name
        else:
            raise BrokerError("RabbitMQ broker is not started")
        try:
            channel = await publisher.get_underlay_channel()
        except _AMQP_ERRORS as exc:
            raise BrokerError(f"cannot publish to {physical}: {exc!r}") from exc
        if not isinstance(channel, aiormq.Channel):
            raise BrokerError(f"cannot publish to {physical}: not an aiormq channel")
        amqp_headers: dict[str, Any] | None = dict(headers) if headers else None
        confirms = [
            self._publish_one(channel, exchange, routing_key, message, amqp_headers)
            for message in messages
        ]
        if len(confirms) == 1:
            results: list[BaseException | None] = [await _outcome(confirms[0])]
        else:
            results = await asyncio.gather(*map(_outcome, confirms))
        for result in results:
            if result is not None:
                raise BrokerError(
                    f"publish to {physical} not confirmed: {result!r}"
                ) from result

    @staticmethod
    def _publish_one(
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        message: TaskMessage,
        headers: dict[str, Any] | None,
    ) -> Coroutine[Any, Any, Any]:
        # Straight to aiormq: aio-pika's Message wrapper costs more CPU
        # than the publish itself. The message id must be unique per
        # publish, since aiormq matches a returned message to its confirm
        # by it; TaskMessage ids are.
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=2,
            content_type="application/json",
            message_id=message.message_id,
            headers=headers,
        )
        return channel.basic_publish(
            _encoder.encode(message),
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=True,
            timeout=_TIMEOUT,
            wait=False,
        )

    async def subscribe(
        self, queue: str, prefetch: int, on_delivery: DeliveryCallback
    ) -> Subscription:
        """Consume `queue` on a dedicated channel with `prefetch` unacked.

        `on_delivery` runs on the event loop for each message; a body that
        is not a TaskMessage is acked, dropped and logged.
        """
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        physical = self.physical_queue(queue)
        await self.declare(queue)
        connection = self._connection
        if connection is None:
            raise BrokerError("RabbitMQ broker is not started")
        try:
            channel = connection.channel(publisher_confirms=False)
        except RuntimeError as exc:
            # aio-pika refuses a channel while the connection is down.
            raise BrokerError(f"cannot consume {physical}: {exc}") from exc
        subscription = _RabbitSubscription(self, queue, channel, on_delivery)
        try:
            await channel.initialize(timeout=_TIMEOUT)
            self._subscriptions.setdefault(queue, set()).add(subscription)
            await subscription.start(physical, prefetch, self._queue_arguments(queue))
        except _AMQP_ERRORS as exc:
            if channel.is_initialized:
                await subscription.close()
            raise BrokerError(f"cannot consume {physical}: {exc!r}") from exc
        return subscription

    async def stats(self, queue: str) -> QueueStats:
        """Ready messages as RabbitMQ counts them; unacked held here.

        RabbitMQ reports only ready messages over AMQP, so `unacked` counts
        this process's unsettled deliveries, not other consumers'.
        """
        physical = self.physical_queue(queue)
        unacked = sum(s.unsettled() for s in self._subscriptions.get(queue, ()))
        async with self._stats_lock:
            try:
                channel = await self._open_stats_channel()
                declared = await channel.queue_declare(
                    physical, passive=True, timeout=_TIMEOUT
                )
            except ChannelNotFoundEntity:
                # The 404 closed the channel; the next call opens a new one.
                self._stats_channel = None
                return QueueStats(0, unacked)
            except _AMQP_ERRORS as exc:
                self._stats_channel = None
                raise BrokerError(f"cannot inspect {physical}: {exc!r}") from exc
        return QueueStats(declared.message_count or 0, unacked)

    async def _open_stats_channel(self) -> aiormq.abc.AbstractChannel:
        # A plain aiormq channel, not a robust one: a passive declare of a
        # missing queue closes the channel, and a robust channel would start
        # reopening itself concurrently with the next call.
        channel = self._stats_channel
        if channel is not None and not channel.is_closed:
            return channel
        self._stats_channel = None
        connection = self._connection
        transport = connection.transport if connection is not None else None
        if transport is None or transport.connection.is_closed:
            raise ChannelInvalidStateError("RabbitMQ is not connected")
        channel = await transport.connection.channel(
            publisher_confirms=False, timeout=_TIMEOUT
        )
        self._stats_channel = channel
        return channel
