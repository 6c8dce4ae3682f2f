"""A private RabbitMQ node for scenarios that stop, restart or cut RabbitMQ.

Other suites and benchmarks share the machine's broker on port 5672, so
the scenarios that take RabbitMQ away never touch it: they run their own
node, with its own name, ports and data directory, and control it with
`rabbitmqctl -n`. The node runs as the `rabbitmq` user, which is why the
directory is handed to that user and why starting one needs root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.fixtures.processes import free_port

STARTUP_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 120.0


def unavailable_reason() -> str | None:
    """Why a private node cannot run here, or None when it can."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        return "rabbitmq-server and rabbitmqctl are not installed"
    if os.geteuid() != 0:
        return "a private RabbitMQ node runs as the rabbitmq user: needs root"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no rabbitmq user to run a private node"
    return None


class RabbitNode:
    """One RabbitMQ node on free ports, in a directory of its own."""

    def __init__(self) -> None:
        self.name = f"baton-chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self._dist_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="baton-chaos-rabbitmq-"))

    @property
    def url(self) -> str:
        """The AMQP URL of the node's listener."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Start the node detached and wait until it accepts connections.

        Raises RuntimeError, with the node's log, if it does not.
        """
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(exist_ok=True)
        # `default` replaces the machine-wide `listeners.tcp.local`, which
        # would otherwise bind 5672 a second time.
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        shutil.chown(self.directory, "rabbitmq", "rabbitmq")
        for path in self.directory.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=CTL_TIMEOUT_S,
        )
        self.wait_listening()

    def wait_listening(self) -> None:
        """Wait until the AMQP port accepts connections."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"RabbitMQ node {self.name} not listening after "
                        f"{STARTUP_TIMEOUT_S} s:\n{self.log()[-4000:]}"
                    ) from None
                time.sleep(0.1)

    def ctl(self, *args: str) -> None:
        """Run `rabbitmqctl -n <node> args...`; raise if it fails."""
        subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=CTL_TIMEOUT_S,
        )

    def stop_app(self) -> None:
        """Stop the RabbitMQ application; the Erlang node keeps running."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the application again and wait until it listens."""
        self.ctl("start_app")
        self.ctl("await_startup")
        self.wait_listening()

    def destroy(self) -> None:
        """Stop the node and remove its directory."""
        try:
            self.ctl("stop")
        except (subprocess.SubprocessError, OSError):
            pid = self._pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        """The node's main log so far."""
        path = self.directory / "log" / f"{self.name}.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_DIST_PORT=str(self._dist_port),
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.directory / "log"),
            RABBITMQ_PID_FILE=str(self.directory / "pid"),
            RABBITMQ_CONFIG_FILE=str(self.directory / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS="",
        )
        return env
