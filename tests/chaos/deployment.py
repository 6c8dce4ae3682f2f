"""The backends of a scenario run, and how Baton's services reach them.

A run gets a RabbitMQ prefix of its own on the session's broker, or a
node of its own when it stops RabbitMQ; a MongoDB database of its own on
the session's server, or a server of its own when it stops MongoDB; or a
SQLite file. TCP proxies, when the scenario cuts links, stand between
the gateways and a backend; the scheduler always connects directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika

from shared.adapters.rabbitmq import RabbitMQBroker
from shared.interfaces import SWEEP_QUEUE, TIMER_QUEUE
from tests.chaos.books import (
    StoreView,
    read_mongo,
    read_sqlite,
    running_in_mongo,
    running_in_sqlite,
)
from tests.chaos.mongo_server import MongoServer
from tests.chaos.proxy import TcpProxy
from tests.fixtures.rabbitmq_node import RabbitNode


@dataclass(frozen=True)
class Topology:
    """What a scenario runs on.

    `broker`: "rabbitmq" (the session's, under a prefix of its own),
    "private-rabbitmq" (a node of its own) or "embedded". `store`:
    "mongodb" (the suite's server, a private database), "private-mongodb"
    (a server of its own) or "sqlite". With `proxy_broker` or
    `proxy_store`, the gateways reach that backend through a TcpProxy.
    """

    broker: str = "rabbitmq"
    store: str = "mongodb"
    gateways: int = 2
    scheduler: bool = True
    proxy_broker: bool = False
    proxy_store: bool = False


@dataclass
class Resources:
    """What the test session provides to a run: a broker that no scenario
    stops, a MongoDB server, and a directory for logs and files."""

    directory: Path
    amqp_url: str
    mongodb_url: str


class Deployment:
    """The backends of one run and the environment services get."""

    def __init__(self, topology: Topology, resources: Resources) -> None:
        self.topology = topology
        self.resources = resources
        self.prefix = f"chaos-{uuid.uuid4().hex[:8]}"
        self.database = f"baton_chaos_{uuid.uuid4().hex[:12]}"
        self.amqp_url: str | None = None
        self.mongodb_url: str | None = None
        self.sqlite_path: str | None = None
        self.rabbit_node: RabbitNode | None = None
        self.mongo_server: MongoServer | None = None
        self.broker_proxy: TcpProxy | None = None
        self.store_proxy: TcpProxy | None = None

    async def start(self) -> None:
        """Start or find the backends, and the proxies in front of them."""
        broker, store = self.topology.broker, self.topology.store
        if broker == "rabbitmq":
            self.amqp_url = self.resources.amqp_url
        elif broker == "private-rabbitmq":
            self.rabbit_node = RabbitNode()
            await asyncio.to_thread(self.rabbit_node.start)
            self.amqp_url = self.rabbit_node.url
        if store == "mongodb":
            self.mongodb_url = self.resources.mongodb_url
        elif store == "private-mongodb":
            self.mongo_server = MongoServer(self.resources.directory / "mongodb")
            await asyncio.to_thread(self.mongo_server.start)
            self.mongodb_url = self.mongo_server.url
        else:
            self.sqlite_path = str(self.resources.directory / "baton.db")
        if self.topology.proxy_broker and self.amqp_url:
            self.broker_proxy = await _proxy(self.amqp_url)
        if self.topology.proxy_store and self.mongodb_url:
            self.store_proxy = await _proxy(self.mongodb_url)

    def env(self, sweep_s: int, *, gateway: bool) -> dict[str, str]:
        """The environment of a gateway (through the proxies) or of the
        scheduler (straight to the backends)."""
        env = {
            "BATON_SWEEP_SECONDS": str(sweep_s),
            "BATON_RECONCILE_GRACE_SECONDS": str(sweep_s),
            "BATON_TIMER_FLUSH_MS": "200",
            "BATON_RUN_SCHEDULER": str(not self.topology.scheduler).lower(),
        }
        if self.amqp_url:
            proxy = self.broker_proxy if gateway else None
            env["AMQP_URL"] = through(self.amqp_url, proxy)
            env["BATON_QUEUE_PREFIX"] = self.prefix
        if self.mongodb_url:
            proxy = self.store_proxy if gateway else None
            env["MONGODB_URL"] = through(self.mongodb_url, proxy)
            env["BATON_MONGODB_DATABASE"] = self.database
        if self.sqlite_path:
            env["BATON_SQLITE_PATH"] = self.sqlite_path
        return env

    def running_workflow_ids(self) -> list[str]:
        """Ids of the store's RUNNING workflows, read directly."""
        if self.sqlite_path:
            return running_in_sqlite(self.sqlite_path)
        assert self.mongodb_url is not None
        return running_in_mongo(self.mongodb_url, self.database)

    def read_store(self) -> StoreView:
        """Everything the store holds, read directly."""
        if self.sqlite_path:
            return read_sqlite(self.sqlite_path)
        assert self.mongodb_url is not None
        return read_mongo(self.mongodb_url, self.database)

    async def close(self, task_queues: list[str], *, keep_data: bool) -> None:
        """Stop what `start` started; delete the queues, and drop the
        database unless `keep_data` (a failed run keeps it to look at)."""
        for proxy in (self.broker_proxy, self.store_proxy):
            if proxy is not None:
                await proxy.close()
        if self.mongo_server is not None:
            await asyncio.to_thread(self.mongo_server.stop)
        elif self.mongodb_url and not keep_data:
            await asyncio.to_thread(_drop_database, self.mongodb_url, self.database)
        if self.rabbit_node is not None:
            await asyncio.to_thread(self.rabbit_node.destroy)
        elif self.amqp_url:
            await delete_topology(self.amqp_url, self.prefix, task_queues)


async def _proxy(url: str) -> TcpProxy:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return proxy


def through(url: str, proxy: TcpProxy | None) -> str:
    """`url` with its host and port replaced by the proxy's, if any."""
    if proxy is None:
        return url
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}"))


def _drop_database(url: str, database: str) -> None:
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]]
    with MongoClient(url, serverSelectionTimeoutMS=10000) as client:
        client.drop_database(database)


async def delete_topology(url: str, prefix: str, task_queues: list[str]) -> None:
    """Delete the queues and exchanges Baton declared under `prefix`."""
    queues, exchanges = RabbitMQBroker(url, prefix=prefix).topology_names()
    names = [f"{prefix}.task.{q}" for q in (*task_queues, TIMER_QUEUE, SWEEP_QUEUE)]
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in [*queues, *names]:
            if channel.is_closed:
                channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
        for exchange in exchanges:
            if channel.is_closed:
                channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)


async def broker_leftovers(
    deployment: Deployment, task_types: tuple[str, ...]
) -> list[str]:
    """Messages RabbitMQ itself still counts in the run's queues."""
    if deployment.amqp_url is None:
        return []
    prefix = deployment.prefix
    left: list[str] = []
    connection = await aio_pika.connect(deployment.amqp_url, timeout=10)
    async with connection:
        for queue in (*task_types, TIMER_QUEUE):
            channel = await connection.channel()
            name = f"{prefix}.task.{queue}"
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                continue
            count = declared.declaration_result.message_count
            if count:
                left.append(f"RabbitMQ queue {name} holds {count} messages")
            await channel.close()
    return left
