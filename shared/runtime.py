"""Builds the backends a service runs on, from its settings.

When tracing is on (see `shared.telemetry`), the store and the broker are
wrapped in the tracing decorators of `shared.adapters.traced`; when it is
off they are used as they are.
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry.trace import TracerProvider

from shared.config import Settings
from shared.engine import Engine
from shared.interfaces import Broker, Store
from shared.polldata import PollRecorder
from shared.telemetry import setup_tracing

log = logging.getLogger(__name__)


def create_store(settings: Settings) -> Store:
    """MongoDB when `MONGODB_URL` is set, else the embedded SQLite store."""
    if settings.mongodb_url:
        from shared.adapters.mongo_store import MongoStore

        return MongoStore(settings.mongodb_url, settings.mongodb_database)
    from shared.adapters.sqlite_store import SQLiteStore

    return SQLiteStore(settings.sqlite_path)


def create_broker(settings: Settings) -> Broker:
    """RabbitMQ when `AMQP_URL` is set, else the embedded in-process broker."""
    if settings.amqp_url:
        from shared.adapters.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(
            settings.amqp_url,
            prefix=settings.queue_prefix,
            queue_type=settings.queue_type,
        )
    from shared.adapters.memory_broker import MemoryBroker

    return MemoryBroker()


def traced_backends(
    store: Store, broker: Broker, provider: TracerProvider
) -> tuple[Store, Broker]:
    """Wrap a store and a broker so that they trace into `provider`."""
    from shared.adapters.memory_broker import MemoryBroker
    from shared.adapters.sqlite_store import SQLiteStore
    from shared.adapters.traced import TracedBroker, TracedStore

    messaging = "baton.memory" if isinstance(broker, MemoryBroker) else "rabbitmq"
    database = "sqlite" if isinstance(store, SQLiteStore) else "mongodb"
    return (
        TracedStore(store, provider, db_system=database, messaging_system=messaging),
        TracedBroker(broker, provider, messaging_system=messaging),
    )


class Runtime:
    """A store, a broker and the engine over them, started and stopped together.

    `tracer_provider` turns tracing on with that provider; when None,
    `setup_tracing(service_name)` decides from the environment, and with
    tracing off the backends are not wrapped at all.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        broker: Broker | None = None,
        *,
        service_name: str = "baton",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider or setup_tracing(service_name)
        store = store or create_store(settings)
        broker = broker or create_broker(settings)
        if self.tracer_provider is not None:
            store, broker = traced_backends(store, broker, self.tracer_provider)
        self.store = store
        self.broker = broker
        self.polls = PollRecorder(self.store, settings.poll_data_flush_ms)
        self.engine = Engine(self.store, self.broker, self.polls, settings)

    @property
    def tracing(self) -> bool:
        """True when the backends are traced."""
        return self.tracer_provider is not None

    @property
    def embedded_broker(self) -> bool:
        """True when the broker lives in this process."""
        return not self.settings.amqp_url

    async def start(self) -> None:
        """Connect both backends. Raises StoreError or BrokerError."""
        await self.store.start()
        await self.broker.start()
        self.polls.start()
        log.info(
            "backends ready: store=%s broker=%s",
            type(self.store).__name__,
            type(self.broker).__name__,
        )

    async def stop(self) -> None:
        """Flush poll data and timers, then close both backends."""
        await self.polls.stop()
        await self.engine.timers.close()
        await self.broker.close()
        await self.store.close()
        flush = getattr(self.tracer_provider, "force_flush", None)
        if flush is not None:
            await asyncio.to_thread(flush)
