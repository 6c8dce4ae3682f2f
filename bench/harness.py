"""One scenario's gateway and child processes, set up and torn down together."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from enum import IntEnum
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.client import TASK_TYPE, BatonClient, task_def, workflow_def
from bench.counters import Counters
from bench.gateway import (
    Gateway,
    delete_broker_names,
    drop_mongo_database,
    free_ports,
)
from bench.monitor import CpuMeter, find_rabbitmq
from bench.options import Options

_CTX = multiprocessing.get_context("spawn")
_JOIN_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
STOP_SLOT = 0


class BenchError(Exception):
    """A scenario could not run to the end."""


class WaitTimeout(BenchError):
    """Something the bench waited for did not happen in time."""


class Harness:
    """Fresh gateways (own queues, own store) and the scenario's children.

    `gateways` processes share the queue prefix and the store; the first
    runs the scheduler, the others do not. Use as an async context
    manager: on exit, by success, failure or Ctrl-C, the children and the
    gateways are stopped and their queues, exchanges and MongoDB database
    are deleted.
    """

    def __init__(
        self, options: Options, scenario: str, workdir: Path, *, gateways: int = 1
    ) -> None:
        self.options = options
        self.prefix = f"bench-{os.getpid()}-{scenario}"
        self._database = self.prefix.replace("-", "_")
        store_env = self._store_env(workdir)
        self.gateways = [
            Gateway(
                options.amqp_url,
                self.prefix,
                store_env,
                workdir,
                name=f"gateway-{n}" if gateways > 1 else "gateway",
                port=port,
                run_scheduler=n == 0,
            )
            for n, port in enumerate(free_ports(max(1, gateways)))
        ]
        self._children: list[tuple[SpawnProcess, Counters]] = []
        self._queues: list[Queue[Any]] = []

    @property
    def gateway(self) -> Gateway:
        """The first gateway, the one that runs the scheduler."""
        return self.gateways[0]

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every gateway's root URL, in order."""
        return tuple(g.base_url for g in self.gateways)

    def _store_env(self, workdir: Path) -> dict[str, str]:
        if self.options.mongodb_url:
            return {
                "MONGODB_URL": self.options.mongodb_url,
                "BATON_MONGODB_DATABASE": self._database,
            }
        return {"BATON_SQLITE_PATH": str(workdir / f"{self.prefix}.db")}

    async def __aenter__(self) -> Harness:
        try:
            # One at a time, so that they do not set up the store at once.
            for gateway in self.gateways:
                gateway.launch()
                await gateway.wait_ready()
            async with BatonClient(self.gateway.base_url, connections=1) as client:
                await client.register(task_def(), workflow_def())
        except BaseException:
            await self._tear_down()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._tear_down()

    async def _tear_down(self) -> None:
        await self._stop_children()
        queues = [TASK_TYPE, *await self.gateway.queue_names()]
        for gateway in self.gateways:
            gateway.stop()
        await delete_broker_names(self.options.amqp_url, self.prefix, queues)
        if self.options.mongodb_url:
            await asyncio.to_thread(
                drop_mongo_database, self.options.mongodb_url, self._database
            )

    # Children.

    @staticmethod
    def counters(slots: type[IntEnum]) -> Counters:
        """Counters to share with a child."""
        return Counters(_CTX, slots)

    def queue(self) -> Queue[Any]:
        """A queue for a child's final results."""
        results: Queue[Any] = _CTX.Queue()
        self._queues.append(results)
        return results

    def spawn(
        self, target: Callable[..., None], counters: Counters, *args: object
    ) -> SpawnProcess:
        """Start `target(counters, *args)` in a fresh interpreter.

        Slot 0 of `counters` is the child's STOP flag.
        """
        child = _CTX.Process(target=target, args=(counters, *args), daemon=True)
        child.start()
        self._children.append((child, counters))
        return child

    async def _stop_children(self) -> None:
        """Stop every child: by its STOP flag, else by signal.

        A child exits only once what it put on a queue has been read, so
        unread results are drained and dropped meanwhile.
        """
        for _, counters in self._children:
            counters.set(STOP_SLOT, 1)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while time.monotonic() < deadline and self._children_alive():
            self._drain_queues()
            await asyncio.sleep(0.05)
        for child, _ in self._children:
            if child.is_alive():
                child.terminate()
                child.join(_JOIN_TIMEOUT_S)
            if child.is_alive():
                child.kill()
                child.join()
        self._children.clear()
        for results in self._queues:
            results.close()
        self._queues.clear()

    def _children_alive(self) -> bool:
        return any(child.is_alive() for child, _ in self._children)

    def _drain_queues(self) -> None:
        for results in self._queues:
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                while True:
                    results.get_nowait()

    async def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str
    ) -> float:
        """Wait until `condition()` holds; return the seconds it took.

        Raises WaitTimeout when it does not hold within `timeout`, and
        BenchError or GatewayError when a child or the gateway dies.
        """
        began = time.monotonic()
        while not condition():
            self.check_alive()
            if time.monotonic() - began > timeout:
                raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.02)
        return time.monotonic() - began

    async def wait_ready(self, counters: Counters, slot: int, what: str) -> None:
        """Wait until a child sets its READY counter."""
        await self.wait_for(lambda: counters.get(slot) > 0, READY_TIMEOUT_S, what)

    def check_alive(self) -> None:
        """Raise if a gateway or a child process died."""
        for gateway in self.gateways:
            gateway.check_alive()
        for child, _ in self._children:
            if child.exitcode not in (None, 0):
                raise BenchError(f"{child.name} exited with {child.exitcode}")

    async def receive(self, results: Queue[Any], timeout: float) -> Any:
        """The one result a child puts on `results` before it exits."""
        began = time.monotonic()
        while True:
            with contextlib.suppress(queue.Empty):
                return results.get_nowait()
            self.check_alive()
            if time.monotonic() - began > timeout:
                raise WaitTimeout("a child process sent no result in time")
            await asyncio.sleep(0.05)

    def cpu_meter(self, children: dict[str, SpawnProcess]) -> CpuMeter:
        """CPU clocks of the gateways, RabbitMQ and the given children.

        Gateway n is watched as `gateway_n`; `gateway` is their sum.
        """
        watched: dict[str, psutil.Process] = {
            gateway_key(n): psutil.Process(g.pid) for n, g in enumerate(self.gateways)
        }
        members = list(watched)
        rabbitmq = find_rabbitmq()
        if rabbitmq is not None:
            watched["rabbitmq"] = rabbitmq
        for name, child in children.items():
            if child.pid is not None:
                watched[name] = psutil.Process(child.pid)
        return CpuMeter(watched, {"gateway": members})


def gateway_key(n: int) -> str:
    """The CPU meter's name for gateway `n`."""
    return f"gateway_{n}"
