"""Baton's services as real processes, which a scenario kills and restarts.

A `Service` is one `python -m services.gateway` or `python -m
services.scheduler` process on a port it keeps across restarts, so
workers reconnect to the same address. Each start logs to its own file in
the scenario's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from tests.fixtures.processes import free_port, stop_process, wait_healthy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0

GATEWAY = "services.gateway"
SCHEDULER = "services.scheduler"

# Never inherited from the environment the suite runs in: each scenario
# states what its services use.
_CONFIG_PREFIXES = ("BATON_", "AMQP_URL", "MONGODB_URL", "OTEL_")
_BATON_LOGGERS = ("shared.", "services.", "__main__")


class ServiceFailed(Exception):
    """A service exited or never became healthy."""


class Service:
    """One Baton process, restartable on the same port."""

    def __init__(
        self, name: str, module: str, env: Mapping[str, str], directory: Path
    ) -> None:
        self.name = name
        self.module = module
        self.env = dict(env)
        self.port = free_port()
        self.directory = directory
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Where the process answers HTTP, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def log_paths(self) -> list[Path]:
        """The log file of every start so far."""
        return [self._log_path(n) for n in range(1, self.starts + 1)]

    async def start(self) -> None:
        """Start the process and wait until `/health` answers 200.

        Raises ServiceFailed, with the log's tail, if it exits first or is
        not healthy within STARTUP_TIMEOUT_S.
        """
        self._launch()
        failure = await wait_healthy(self.url, lambda: self.running, STARTUP_TIMEOUT_S)
        if failure:
            raise ServiceFailed(f"{self.name} {failure}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps."""
        if self.process is not None:
            stop_process(self.process, STOP_GRACE_S)
        self._close_log()

    def tail(self, chars: int = 4000) -> str:
        """The end of the current start's log."""
        if not self.starts:
            return ""
        try:
            return self._log_path(self.starts).read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def error_lines(self) -> list[str]:
        """ERROR lines that Baton's own loggers wrote, in every start.

        In Baton an ERROR means work that was lost or could not be
        handled; the libraries' own ERROR lines (a client gone while its
        answer was written, a connection closed by the broker) are not.
        """
        lines: list[str] = []
        for path in self.log_paths():
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            lines.extend(line for line in text.splitlines() if _baton_error(line))
        return lines

    def _log_path(self, start: int) -> Path:
        return self.directory / f"{self.name}-{start}.log"

    def _launch(self) -> None:
        self._close_log()
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_CONFIG_PREFIXES)
        }
        environment.update(self.env)
        environment["BATON_HOST"] = "127.0.0.1"
        port_variable = (
            "BATON_PORT" if self.module == GATEWAY else "BATON_SCHEDULER_PORT"
        )
        environment[port_variable] = str(self.port)
        environment["PYTHONUNBUFFERED"] = "1"
        self.starts += 1
        self._log = self._log_path(self.starts).open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=PROJECT_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _baton_error(line: str) -> bool:
    if '"level":"ERROR"' not in line:
        return False
    try:
        logger = str(json.loads(line).get("logger", ""))
    except ValueError:
        return False
    return logger.startswith(_BATON_LOGGERS)


class Cluster:
    """The services of one scenario: gateways, and maybe a scheduler."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.gateways: list[Service] = []
        self.scheduler: Service | None = None

    def add_gateway(self, env: Mapping[str, str]) -> Service:
        """Add a gateway (not started) with `env`."""
        name = f"gateway-{chr(ord('a') + len(self.gateways))}"
        gateway = Service(name, GATEWAY, env, self.directory)
        self.gateways.append(gateway)
        return gateway

    def add_scheduler(self, env: Mapping[str, str]) -> Service:
        """Add the standalone scheduler (not started) with `env`."""
        self.scheduler = Service("scheduler", SCHEDULER, env, self.directory)
        return self.scheduler

    @property
    def services(self) -> list[Service]:
        """Every service of the cluster."""
        extra = [self.scheduler] if self.scheduler else []
        return [*self.gateways, *extra]

    async def start(self) -> None:
        """Start every service."""
        for service in self.services:
            await service.start()

    def stop(self) -> None:
        """Stop every service that still runs."""
        for service in self.services:
            service.stop()

    def error_lines(self) -> list[str]:
        """ERROR log lines of every service, each prefixed with its name."""
        return [
            f"{service.name}: {line}"
            for service in self.services
            for line in service.error_lines()
        ]
