"""Builds the backends a service runs on, from its settings."""

from __future__ import annotations

import logging

from shared.config import Settings
from shared.engine import Engine
from shared.interfaces import Broker, Store
from shared.polldata import PollRecorder

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


class Runtime:
    """A store, a broker and the engine over them, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or create_store(settings)
        self.broker = broker or create_broker(settings)
        self.polls = PollRecorder(self.store, settings.poll_data_flush_ms)
        self.engine = Engine(self.store, self.broker, self.polls, settings)

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
