"""The fault scenarios, each one fault over the topology it needs.

Each `inject` runs while the workload is under way and marks the window
from the moment the fault starts until it has healed (the process is
back and healthy, the broker or the store answers again, the link is
restored). The scale decides how long a fault holds and how often it is
repeated.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from tests.chaos.deployment import Topology
from tests.chaos.proxy import TcpProxy
from tests.chaos.runner import Run, Scenario, gateway
from tests.chaos.workload import Mix

SLOW_LINK_S = 0.15
"""One-way latency of a slowed link: every chunk waits this long."""


async def kill_gateways(run: Run) -> None:
    """SIGKILL a gateway while a long poll waits on it and an update is in
    flight to it; restart it on the same port after the outage."""
    for n in range(run.scale.repeats):
        victim = gateway(run, n)
        index = run.cluster.gateways.index(victim)
        busy = await run.workload.activity.wait_busy(
            index, ("poll", "update"), timeout=10
        )
        caught = "mid long-poll and mid update" if busy else "idle"
        async with run.fault(f"SIGKILL {victim.name} ({caught})"):
            victim.kill()
            await run.hold()
            await victim.start()
        await run.pause()


async def kill_scheduler(run: Run) -> None:
    """SIGKILL the standalone scheduler, which holds the timers and the
    sweeps, and start it again after the outage."""
    scheduler = run.cluster.scheduler
    assert scheduler is not None
    for _ in range(run.scale.repeats):
        async with run.fault(f"SIGKILL {scheduler.name}"):
            scheduler.kill()
            await run.hold()
            await scheduler.start()
        await run.pause()


async def restart_rabbitmq(run: Run) -> None:
    """`rabbitmqctl stop_app`, then `start_app` after the outage."""
    node = run.deployment.rabbit_node
    assert node is not None
    for _ in range(run.scale.repeats):
        async with run.fault("rabbitmqctl stop_app / start_app"):
            await asyncio.to_thread(node.stop_app)
            await run.hold()
            await asyncio.to_thread(node.start_app)
        await run.pause()


async def stop_mongodb(run: Run) -> None:
    """Stop the MongoDB server, then start it on the same port and data."""
    server = run.deployment.mongo_server
    assert server is not None
    for _ in range(run.scale.repeats):
        async with run.fault("MongoDB server stopped"):
            await asyncio.to_thread(server.stop)
            await run.hold(store=True)
            await asyncio.to_thread(server.start)
        await run.pause()


async def freeze_mongodb(run: Run) -> None:
    """SIGSTOP the MongoDB server: connections stay up, nothing answers."""
    server = run.deployment.mongo_server
    assert server is not None
    for _ in range(run.scale.repeats):
        async with run.fault("MongoDB server frozen (SIGSTOP)"):
            server.freeze()
            try:
                await run.hold(store=True)
            finally:
                server.thaw()
        await run.pause()


def _hold_write_lock(path: str, seconds: float) -> None:
    # Another connection's exclusive transaction: Baton's writer waits on
    # its busy timeout, then fails, until the transaction ends.
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def lock_sqlite(run: Run) -> None:
    """Hold `BEGIN EXCLUSIVE` on the SQLite file: no write gets through."""
    assert run.deployment.sqlite_path is not None
    for _ in range(run.scale.repeats):
        async with run.fault("SQLite file locked (BEGIN EXCLUSIVE)"):
            await asyncio.to_thread(
                _hold_write_lock, run.deployment.sqlite_path, run.scale.store_outage_s
            )
        await run.pause()


async def cut_and_slow_broker_link(run: Run) -> None:
    """Reset the gateways' RabbitMQ connections and refuse new ones; then
    slow the link down."""
    proxy = run.deployment.broker_proxy
    assert proxy is not None
    await _cut_and_slow(run, proxy, "RabbitMQ", store=False)


async def cut_and_slow_store_link(run: Run) -> None:
    """Reset the gateways' MongoDB connections and refuse new ones; then
    slow the link down."""
    proxy = run.deployment.store_proxy
    assert proxy is not None
    await _cut_and_slow(run, proxy, "MongoDB", store=True)


async def _cut_and_slow(
    run: Run, proxy: TcpProxy, backend: str, *, store: bool
) -> None:
    # Each cycle is two faults, so one cycle fewer than the scale repeats:
    # at full scale, three would run the MongoDB stand-in past what it
    # serves (its claims slow down as the collections grow).
    for _ in range(max(1, run.scale.repeats - 1)):
        async with run.fault(f"gateways' {backend} link cut"):
            proxy.cut()
            try:
                await run.hold(store=store)
            finally:
                proxy.restore()
        await run.pause()
        async with run.fault(f"gateways' {backend} link slowed {SLOW_LINK_S} s"):
            proxy.slow(SLOW_LINK_S)
            try:
                await run.hold()
            finally:
                proxy.restore()
        await run.pause()


async def misbehave(run: Run) -> None:
    """No infrastructure fault: the workers themselves misbehave (see the
    scenario's mix), for the length of an outage."""
    for _ in range(run.scale.repeats):
        await run.hold()


UNRULY = Mix(fail=0.1, callback=0.1, silent=0.12, double=0.15, late=0.08)
"""Workers that crash after polling, update twice and update late, often."""

SCENARIOS = [
    Scenario("gateway-sigkill", Topology(), kill_gateways),
    Scenario("gateway-sigkill-sqlite", Topology(store="sqlite"), kill_gateways),
    Scenario("scheduler-sigkill", Topology(), kill_scheduler),
    Scenario("rabbitmq-restart", Topology(broker="private-rabbitmq"), restart_rabbitmq),
    Scenario("mongodb-stopped", Topology(store="private-mongodb"), stop_mongodb),
    Scenario("mongodb-frozen", Topology(store="private-mongodb"), freeze_mongodb),
    Scenario(
        "sqlite-locked",
        Topology(broker="embedded", store="sqlite", gateways=1, scheduler=False),
        lock_sqlite,
    ),
    Scenario(
        "rabbitmq-link-cut-slow",
        Topology(proxy_broker=True),
        cut_and_slow_broker_link,
    ),
    Scenario(
        "mongodb-link-cut-slow",
        Topology(proxy_store=True),
        cut_and_slow_store_link,
    ),
    Scenario(
        "workers-misbehave",
        Topology(),
        misbehave,
        mix=UNRULY,
        abandoning_pollers=2,
    ),
]
