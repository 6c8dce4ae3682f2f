"""A MongoDB connection that stops answering, while it stays open.

A frozen server, or a route that drops packets without a reset, leaves
the store's connections open and silent. An operation on one must fail
(as a StoreError, which the gateway answers with a retryable 503 and
which makes a poll give its deliveries back) rather than wait for ever
holding them; and the store must work again once the link does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from shared.adapters.mongo_store import MongoStore
from shared.errors import StoreError
from tests.chaos.deployment import through
from tests.chaos.proxy import TcpProxy

SOCKET_TIMEOUT_MS = 500


@pytest.fixture
async def store_link(mongodb_url: str) -> AsyncIterator[TcpProxy]:
    """A proxy to the suite's MongoDB."""
    parts = urlsplit(mongodb_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_an_operation_on_a_silent_connection_fails_and_the_store_recovers(
    store_link: TcpProxy, mongodb_url: str, mongo_database: str
) -> None:
    store = MongoStore(
        through(mongodb_url, store_link),
        mongo_database,
        socket_timeout_ms=SOCKET_TIMEOUT_MS,
    )
    await store.start()
    try:
        assert await store.get_task("absent") is None
        store_link.stall()
        with pytest.raises(StoreError):
            # Without a socket timeout the operation waits until the
            # driver's monitor gives the server up (20 s and more), or for
            # ever when only this connection went silent.
            await asyncio.wait_for(store.get_task("absent"), timeout=10)
        store_link.restore()
        assert await asyncio.wait_for(store.get_task("absent"), timeout=30) is None
    finally:
        store_link.restore()
        await store.close()
