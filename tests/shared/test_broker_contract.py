"""The `Broker` contract, run against the embedded broker and RabbitMQ.

Both adapters must behave alike: the gateway is written once against the
contract. Tests that need RabbitMQ's own machinery (connections, the delay
ladder's queues) come last and run on RabbitMQ only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import pytest

from shared.adapters.memory_broker import MemoryBroker
from shared.adapters.rabbitmq import RabbitMQBroker, delay_routing_key
from shared.interfaces import Broker, Delivery, TaskMessage
from tests.fixtures.rabbitmq import AmqpNames

WAIT = 5.0  # longest wait for something that must happen
QUIET = 0.3  # how long to watch for something that must not happen
EARLY = 0.01  # clock granularity allowed on "not before"
LATE = 1.0  # how late the broker may deliver a delayed message


class Inbox:
    """A delivery callback that queues what it receives."""

    def __init__(self) -> None:
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.arrived: dict[str, float] = {}
        self.seen: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.seen.append(delivery)
        self.arrived.setdefault(delivery.message.message_id, time.monotonic())
        self.deliveries.put_nowait(delivery)

    async def next(self, within: float = WAIT) -> Delivery:
        return await asyncio.wait_for(self.deliveries.get(), within)

    async def take(self, count: int, within: float = WAIT) -> list[Delivery]:
        return [await self.next(within) for _ in range(count)]

    async def assert_quiet(self, seconds: float = QUIET) -> None:
        await asyncio.sleep(seconds)
        assert self.deliveries.empty(), "an unexpected delivery arrived"


def new_queue() -> str:
    return f"q-{uuid.uuid4().hex[:12]}"


def new_messages(count: int) -> list[TaskMessage]:
    return [TaskMessage.for_task(uuid.uuid4().hex, i) for i in range(count)]


BrokerFactory = Callable[[], Broker]


@pytest.fixture(params=["memory", "rabbitmq"])
def make_broker(request: pytest.FixtureRequest) -> Iterator[BrokerFactory]:
    """Build unstarted brokers of one kind; record RabbitMQ names for cleanup."""
    if request.param == "memory":
        yield MemoryBroker
        return
    url: str = request.getfixturevalue("amqp_url")
    prefix: str = request.getfixturevalue("broker_prefix")
    names: AmqpNames = request.getfixturevalue("amqp_names")
    made: list[RabbitMQBroker] = []

    def make() -> Broker:
        broker = RabbitMQBroker(url, prefix=prefix)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        names.add(*broker.topology_names())


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> AsyncIterator[Broker]:
    """A started broker, closed after the test."""
    instance = make_broker()
    await instance.start()
    yield instance
    await instance.close()


async def test_published_message_is_delivered_unchanged(broker: Broker) -> None:
    queue = new_queue()
    [message] = new_messages(1)
    await broker.publish(queue, [message])
    inbox = Inbox()
    await broker.subscribe(queue, 10, inbox)
    delivery = await inbox.next()
    assert delivery.message == message
    assert delivery.redelivered is False
    await delivery.ack()


async def test_ack_removes_the_message(broker: Broker) -> None:
    queue = new_queue()
    await broker.publish(queue, new_messages(1))
    inbox = Inbox()
    subscription = await broker.subscribe(queue, 10, inbox)
    delivery = await inbox.next()
    assert await broker.stats(queue) == (0, 1)
    await delivery.ack()
    assert await broker.stats(queue) == (0, 0)
    # Cancelling releases the channel: an ack that never reached the broker
    # would put the message back in the queue now.
    await subscription.cancel()
    assert await broker.stats(queue) == (0, 0)
    await inbox.assert_quiet()


async def test_requeue_returns_the_message_as_redelivered(broker: Broker) -> None:
    queue = new_queue()
    [message] = new_messages(1)
    await broker.publish(queue, [message])
    inbox = Inbox()
    await broker.subscribe(queue, 10, inbox)
    first = await inbox.next()
    assert first.redelivered is False
    await first.requeue()
    second = await inbox.next()
    assert second.message == message
    assert second.redelivered is True
    await second.ack()
    await first.ack()  # settled already: nothing happens
    await inbox.assert_quiet()
    assert await broker.stats(queue) == (0, 0)


async def test_prefetch_limits_unsettled_deliveries(broker: Broker) -> None:
    queue = new_queue()
    await broker.publish(queue, new_messages(5))
    inbox = Inbox()
    await broker.subscribe(queue, 2, inbox)
    held = await inbox.take(2)
    await inbox.assert_quiet()
    assert await broker.stats(queue) == (3, 2)
    await held.pop().ack()
    held.append(await inbox.next())
    await inbox.assert_quiet()
    for delivery in held:
        await delivery.ack()
    held = await inbox.take(2)
    await inbox.assert_quiet()
    for delivery in held:
        await delivery.ack()
    assert len(held) == 2
    assert await broker.stats(queue) == (0, 0)


async def test_cancel_stops_deliveries_but_outstanding_can_be_acked(
    broker: Broker,
) -> None:
    queue = new_queue()
    [first, second] = new_messages(2)
    await broker.publish(queue, [first])
    inbox = Inbox()
    subscription = await broker.subscribe(queue, 10, inbox)
    held = await inbox.next()
    await subscription.cancel()
    await broker.publish(queue, [second])
    await inbox.assert_quiet()
    await held.ack()
    assert await broker.stats(queue) == (1, 0)
    # The acked message is gone for good; only the second one is left.
    again = Inbox()
    await broker.subscribe(queue, 10, again)
    delivery = await again.next()
    assert delivery.message == second
    assert delivery.redelivered is False
    await delivery.ack()
    await again.assert_quiet()


async def test_second_ack_is_harmless(broker: Broker) -> None:
    queue = new_queue()
    await broker.publish(queue, new_messages(2))
    inbox = Inbox()
    await broker.subscribe(queue, 2, inbox)
    first, second = await inbox.take(2)
    await first.ack()
    await first.ack()
    await first.requeue()
    # A tag acked twice would have closed the channel and returned `second`
    # to the queue; it must still be ours to ack.
    await inbox.assert_quiet()
    assert await broker.stats(queue) == (0, 1)
    await second.ack()
    [third] = new_messages(1)
    await broker.publish(queue, [third])
    delivery = await inbox.next()
    assert delivery.message == third
    assert delivery.redelivered is False
    await delivery.ack()
    await inbox.assert_quiet()
    assert await broker.stats(queue) == (0, 0)


async def test_two_subscriptions_share_a_queue(broker: Broker) -> None:
    queue = new_queue()
    left, right = Inbox(), Inbox()
    await broker.subscribe(queue, 10, left)
    await broker.subscribe(queue, 10, right)
    messages = new_messages(10)
    await broker.publish(queue, messages)
    # Either window could take all ten; the broker must spread them.
    held: list[Delivery] = []
    while len(held) < len(messages):
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(inbox.next()) for inbox in (left, right)],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in pending:
            task.cancel()
        held.extend(task.result() for task in done)
    counts = {
        name: sum(d in seen for d in held)
        for name, seen in (("left", left.seen), ("right", right.seen))
    }
    assert counts["left"] >= 1 and counts["right"] >= 1, counts
    for delivery in held:
        await delivery.ack()
    await left.assert_quiet()
    assert right.deliveries.empty()
    assert sorted(d.message.task_id for d in held) == sorted(
        m.task_id for m in messages
    )
    assert await broker.stats(queue) == (0, 0)


async def test_batch_of_100_is_delivered_exactly_once(broker: Broker) -> None:
    queue = new_queue()
    messages = new_messages(100)
    await broker.publish(queue, messages)
    assert await broker.stats(queue) == (100, 0)
    inbox = Inbox()
    await broker.subscribe(queue, 10, inbox)
    seen: list[TaskMessage] = []
    for _ in messages:
        delivery = await inbox.next()
        seen.append(delivery.message)
        await delivery.ack()
    await inbox.assert_quiet()
    assert sorted(seen, key=str) == sorted(messages, key=str)
    assert await broker.stats(queue) == (0, 0)


async def test_stats_count_ready_and_unacked(broker: Broker) -> None:
    queue = new_queue()
    assert await broker.stats(queue) == (0, 0)
    await broker.declare(queue)
    await broker.publish(queue, new_messages(3))
    assert await broker.stats(queue) == (3, 0)
    inbox = Inbox()
    await broker.subscribe(queue, 2, inbox)
    held = await inbox.take(2)
    assert await broker.stats(queue) == (1, 2)
    await held[0].ack()
    held[0] = await inbox.next()
    assert await broker.stats(queue) == (0, 2)
    await held[1].requeue()
    held[1] = await inbox.next()
    assert held[1].redelivered is True
    assert await broker.stats(queue) == (0, 2)
    for delivery in held:
        await delivery.ack()
    assert await broker.stats(queue) == (0, 0)


async def test_domain_queue_name(broker: Broker) -> None:
    queue = f"dom{uuid.uuid4().hex[:8]}:some.task-type_1"
    [message] = new_messages(1)
    inbox = Inbox()
    await broker.subscribe(queue, 10, inbox)
    await broker.publish(queue, [message])
    delivery = await inbox.next()
    assert delivery.message == message
    assert await broker.stats(queue) == (0, 1)
    await delivery.ack()
    assert await broker.stats(queue) == (0, 0)


async def test_delays_arrive_in_order_and_never_early(broker: Broker) -> None:
    queue = new_queue()
    # A queue whose name ends with the other's: a delayed message for it
    # must not also reach `queue` (topic bindings match on dotted words).
    lookalike = (
        f"x.{broker.physical_queue(queue)}"
        if isinstance(broker, RabbitMQBroker)
        else f"x.{queue}"
    )
    domain = f"dom{uuid.uuid4().hex[:8]}:delayed.type"
    inbox, other, in_domain = Inbox(), Inbox(), Inbox()
    await broker.subscribe(queue, 10, inbox)
    await broker.subscribe(lookalike, 10, other)
    await broker.subscribe(domain, 10, in_domain)
    sent: dict[str, tuple[int, float]] = {}
    for delay in (5, 3, 1):
        [message] = new_messages(1)
        sent[message.message_id] = (delay, time.monotonic())
        await broker.publish(queue, [message], delay_seconds=delay)
    [stray, domain_message] = new_messages(2)
    await broker.publish(lookalike, [stray], delay_seconds=2)
    domain_published = time.monotonic()
    await broker.publish(domain, [domain_message], delay_seconds=1)
    assert await broker.stats(queue) == (0, 0)
    order = []
    for _ in sent:
        delivery = await inbox.next(within=5 + LATE + WAIT)
        assert delivery.message.message_id in sent, "another queue's message"
        delay, published = sent[delivery.message.message_id]
        waited = inbox.arrived[delivery.message.message_id] - published
        assert delay - EARLY <= waited <= delay + LATE, (delay, waited)
        order.append(delay)
        await delivery.ack()
    assert order == [1, 3, 5]
    assert (await other.next()).message == stray
    assert (await in_domain.next()).message == domain_message
    waited = in_domain.arrived[domain_message.message_id] - domain_published
    assert 1 - EARLY <= waited <= 1 + LATE
    await inbox.assert_quiet()


async def test_delay_beyond_the_ladder_is_refused(broker: Broker) -> None:
    queue = new_queue()
    with pytest.raises(ValueError):
        await broker.publish(queue, new_messages(1), delay_seconds=1 << 22)
    with pytest.raises(ValueError):
        await broker.publish(queue, new_messages(1), delay_seconds=-1)


async def test_settling_after_close_is_a_noop(broker: Broker) -> None:
    queue = new_queue()
    await broker.publish(queue, new_messages(1))
    inbox = Inbox()
    await broker.subscribe(queue, 1, inbox)
    delivery = await inbox.next()
    await broker.close()
    await delivery.ack()
    await delivery.requeue()


async def test_memory_broker_never_delivers_inside_the_caller() -> None:
    broker = MemoryBroker()
    await broker.start()
    queue = new_queue()
    inside = False
    calls: list[bool] = []
    held: list[Delivery] = []

    def on_delivery(delivery: Delivery) -> None:
        calls.append(inside)
        held.append(delivery)

    await broker.subscribe(queue, 1, on_delivery)
    inside = True
    await broker.publish(queue, new_messages(2))
    inside = False
    await asyncio.sleep(0)
    assert calls == [False]
    inside = True
    await held[0].ack()
    inside = False
    await asyncio.sleep(0)
    assert calls == [False, False]
    await broker.close()


# RabbitMQ only.


@pytest.fixture
def rabbit_factory(
    amqp_url: str, broker_prefix: str, amqp_names: AmqpNames
) -> Iterator[Callable[..., RabbitMQBroker]]:
    made: list[RabbitMQBroker] = []

    def make(prefix: str = broker_prefix) -> RabbitMQBroker:
        broker = RabbitMQBroker(amqp_url, prefix=prefix)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        amqp_names.add(*broker.topology_names())


async def test_closing_a_connection_returns_its_deliveries(
    rabbit_factory: Callable[..., RabbitMQBroker],
) -> None:
    queue = new_queue()
    [message] = new_messages(1)
    dying, survivor = rabbit_factory(), rabbit_factory()
    await dying.start()
    await survivor.start()
    try:
        await dying.publish(queue, [message])
        inbox = Inbox()
        await dying.subscribe(queue, 1, inbox)
        held = await inbox.next()
        assert held.redelivered is False
        await dying.close()
        heir = Inbox()
        await survivor.subscribe(queue, 1, heir)
        delivery = await heir.next()
        assert delivery.message == message
        assert delivery.redelivered is True
        await held.ack()  # the old channel is gone: must not ack anything
        assert await survivor.stats(queue) == (0, 1)
        await delivery.ack()
        assert await survivor.stats(queue) == (0, 0)
    finally:
        await dying.close()
        await survivor.close()


async def test_delay_visits_only_the_tiers_of_its_bits(
    rabbit_factory: Callable[..., RabbitMQBroker], amqp_url: str, broker_prefix: str
) -> None:
    # A ladder of its own, so no other test's delayed messages are counted.
    broker = rabbit_factory(prefix=f"{broker_prefix}-ladder-{uuid.uuid4().hex[:6]}")
    await broker.start()
    queue = new_queue()
    connection = await aio_pika.connect(amqp_url)
    try:
        await broker.publish(queue, new_messages(1), delay_seconds=300)
        channel = await connection.channel()
        tiers = [
            await channel.declare_queue(broker.delay_tier_name(tier), passive=True)
            for tier in range(22)
        ]
        counts = [tier.declaration_result.message_count for tier in tiers]
        assert counts == [int(tier == 8) for tier in range(22)]
        assert await broker.stats(queue) == (0, 0)
        await tiers[8].purge()
    finally:
        await connection.close()
        await broker.close()


async def test_undecodable_message_is_dropped(
    rabbit_factory: Callable[..., RabbitMQBroker],
    amqp_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = rabbit_factory()
    await broker.start()
    queue = new_queue()
    [message] = new_messages(1)
    connection = await aio_pika.connect(amqp_url)
    try:
        await broker.declare(queue)
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"not a task"), broker.physical_queue(queue)
        )
        await broker.publish(queue, [message])
        inbox = Inbox()
        await broker.subscribe(queue, 10, inbox)
        delivery = await inbox.next()
        assert delivery.message == message
        await delivery.ack()
        await inbox.assert_quiet()
        assert await broker.stats(queue) == (0, 0)
        assert "not a TaskMessage" in caplog.text
    finally:
        await connection.close()
        await broker.close()


def test_delay_routing_key_spells_the_delay_in_binary() -> None:
    key = delay_routing_key(300, "baton.task.t", 22)
    words = key.split(".")
    assert words[:22] == list("0" * 13 + "100101100")
    assert ".".join(words[22:]) == "baton.task.t"
    assert delay_routing_key(1, "q", 3) == "0.0.1.q"
    assert delay_routing_key(7, "a.b", 3) == "1.1.1.a.b"
    for bad in (0, -1, 8):
        with pytest.raises(ValueError):
            delay_routing_key(bad, "q", 3)
