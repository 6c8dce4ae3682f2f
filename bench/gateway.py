"""The gateway under test: a subprocess on a free port, and its cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aio_pika

from bench.client import FAILURES, BatonClient
from bench.monitor import ProcessMonitor

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DELAY_LEVELS = 22
INTERNAL_QUEUES = ("@timers", "@sweep")
"""Logical queues the server keeps for itself, deleted with the task queues."""
_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


class GatewayError(Exception):
    """The gateway did not start, or died."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that nothing listens on."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
        return ports


class Gateway:
    """`python -m services.gateway` with the bench's settings.

    `store_env` selects the store (`MONGODB_URL` and its database, or an
    SQLite file); the queues live under `prefix` on `amqp_url`. Several
    gateways may share a prefix and a store; only those with
    `run_scheduler` run the timers and sweeps. `name` tells them apart in
    errors and names the log file.
    """

    def __init__(
        self,
        amqp_url: str,
        prefix: str,
        store_env: dict[str, str],
        workdir: Path,
        *,
        name: str = "gateway",
        port: int | None = None,
        run_scheduler: bool = True,
    ) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.name = name
        self.port = free_port() if port is None else port
        self.run_scheduler = run_scheduler
        self.log_path = workdir / f"{prefix}-{name}.log"
        self._store_env = store_env
        self._process: subprocess.Popen[bytes] | None = None
        self.monitor: ProcessMonitor | None = None

    @property
    def base_url(self) -> str:
        """The gateway's root URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        if self._process is None:
            raise GatewayError(f"{self.name} is not running")
        return self._process.pid

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MONGODB_URL", "BATON_SQLITE_PATH")
        }
        env.update(self._store_env)
        env.update(
            AMQP_URL=self.amqp_url,
            BATON_HOST="127.0.0.1",
            BATON_PORT=str(self.port),
            BATON_QUEUE_PREFIX=self.prefix,
            BATON_RUN_SCHEDULER="true" if self.run_scheduler else "false",
            BATON_LOG_LEVEL="WARNING",
        )
        return env

    def launch(self) -> None:
        """Start the gateway process and sample its memory; see `wait_ready`."""
        with self.log_path.open("wb") as log:
            # A session of its own: Ctrl-C reaches only the bench, which
            # then stops the gateway in order.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway"],
                cwd=PROJECT_ROOT,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.monitor = ProcessMonitor(self._process.pid)
        self.monitor.start()

    async def queue_names(self) -> list[str]:
        """The logical queues it registered, or none if it does not answer."""
        try:
            async with BatonClient(self.base_url, connections=1) as client:
                return await client.queue_names()
        except FAILURES:
            return []

    async def wait_ready(self) -> None:
        """Wait until `/health` answers 200.

        Raises GatewayError, with the end of its log, if it does not.
        """
        deadline = time.monotonic() + _READY_TIMEOUT_S
        async with BatonClient(self.base_url, connections=1, timeout_s=5) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                if await client.healthy():
                    return
                await asyncio.sleep(0.1)
        raise GatewayError(f"{self.name} not healthy in time\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise GatewayError if the gateway has exited."""
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            raise GatewayError(f"{self.name} exited with {code}\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the gateway: SIGTERM, then SIGKILL if it lingers."""
        if self.monitor is not None:
            self.monitor.stop()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the gateway wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def broker_names(prefix: str, logical: list[str]) -> tuple[list[str], list[str]]:
    """Return the (queues, exchanges) a gateway declares under `prefix`.

    `logical` are the queues' logical names (`taskType`, `domain:taskType`).
    """
    tiers = [f"{prefix}.delay.{tier:02d}" for tier in range(DELAY_LEVELS)]
    names = sorted({*logical, *INTERNAL_QUEUES})
    queues = [f"{prefix}.task.{name}" for name in names] + tiers
    return queues, [*tiers, f"{prefix}.delay.deliver"]


async def delete_broker_names(amqp_url: str, prefix: str, logical: list[str]) -> None:
    """Delete the queues and exchanges under `prefix`, best effort."""
    queues, exchanges = broker_names(prefix, logical)
    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
    except (aio_pika.exceptions.AMQPError, OSError, TimeoutError):
        return
    try:
        channel = await connection.channel()
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                if channel.is_closed:
                    channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
    finally:
        await connection.close()


async def broker_version(amqp_url: str) -> str:
    """Return RabbitMQ's version. Raises OSError or AMQPError if unreachable."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        transport = connection.transport
        properties = transport.connection.server_properties if transport else {}
        version = properties.get("version", b"?")
    finally:
        await connection.close()
    return version.decode() if isinstance(version, bytes) else str(version)


def drop_mongo_database(url: str, name: str) -> None:
    """Drop the bench's MongoDB database, best effort."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient[dict[str, object]] = MongoClient(
        url, serverSelectionTimeoutMS=5000
    )
    try:
        client.drop_database(name)
    except PyMongoError:
        pass
    finally:
        client.close()
