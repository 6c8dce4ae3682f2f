"""A private MongoDB wire server that a scenario may stop, restart or freeze.

The suite's own MongoDB (see tests/fixtures/mongodb.py) is shared by every
test of the session, so the scenarios that take the store away run their
own `nx-27017` server (MongoDB's wire protocol on SQLite), on a port and a
data directory of their own. Stopped and started again on the same port
and directory, it keeps what it stored.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.fixtures.mongodb import start_nx_27017
from tests.fixtures.processes import free_port, stop_process


class MongoServer:
    """One nx-27017 process, restartable on the same port and data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's MongoDB URL."""
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Start the server and wait until it answers a ping."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.directory / f"server-{self.starts}.log"
        self.process = start_nx_27017(self.directory, self.port, log)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)
        stop_process(process)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: the server carries on where it stopped."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
