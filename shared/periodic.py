"""A background loop that runs an action at a fixed interval.

Stopping sets an event that the loop waits on, rather than cancelling the
task. On Python 3.11, `asyncio.wait_for`, which database and broker
drivers use around socket I/O, drops a cancellation that arrives just as
the operation it guards completes: a cancelled loop would then carry on,
and whoever awaits it after cancelling would wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `action` every `interval_s` seconds until stopped.

    A failing action is logged and tried again at the next interval, so
    one outage does not end the loop.
    """

    def __init__(
        self, interval_s: float, action: Callable[[], Awaitable[None]], name: str
    ) -> None:
        self._interval = interval_s
        self._action = action
        self._name = name
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop; the first run is one interval from now."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """End the loop, after the run under way (if any) finishes."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                await self._action()
            except Exception:
                log.exception(
                    "%s failed; trying again in %s s", self._name, self._interval
                )
