"""A task type's hand-out limits: `concurrentExecLimit` and
`rateLimitPerFrequency`, from its registered definition.

A poll asks for an `Allowance` before it takes deliveries and releases it
when it ends. The concurrency room is the store's count of IN_PROGRESS
tasks, less what this gateway's other polls may still claim (those are
not in the count yet). The rate is reserved in the store for the current
fixed window, one guarded write, and what the poll did not hand out is
given back.
"""

from __future__ import annotations

import logging
from collections import Counter

from shared.clock import now_ms
from shared.definitions import DefinitionCache
from shared.errors import BatonError
from shared.interfaces import RateWindow, Store

log = logging.getLogger(__name__)


class Allowance:
    """How many tasks one poll may hand out; `release` it when it ends."""

    def __init__(
        self,
        limits: HandOutLimits,
        task_type: str,
        count: int,
        reserved: int,
        window: RateWindow | None,
    ) -> None:
        self.count = count
        self._limits = limits
        self._task_type = task_type
        self._reserved = reserved
        self._window = window

    async def release(self, handed_out: int) -> None:
        """End the allowance of a poll that handed out `handed_out` tasks."""
        self._limits.unreserve(self._task_type, self._reserved)
        self._reserved = 0
        unused = self.count - handed_out
        if self._window is None or unused <= 0:
            return
        # A failure only leaves the slots unused until the window ends.
        try:
            await self._limits.store.release_rate_slots(
                self._task_type, self._window, unused
            )
        except BatonError as exc:
            log.warning(
                "giving back %d rate slots of %s failed: %s",
                unused,
                self._task_type,
                exc,
            )


class HandOutLimits:
    """The limits of every task type, for the polls of one gateway."""

    def __init__(self, definitions: DefinitionCache, store: Store) -> None:
        self.store = store
        self._definitions = definitions
        # Per task type, what polls of this gateway may still claim under
        # a concurrentExecLimit.
        self._reserved: Counter[str] = Counter()

    async def allow(self, task_type: str, wanted: int) -> Allowance:
        """What a poll for `wanted` tasks may hand out: all of them for a
        type with neither limit, with no store read."""
        definition = await self._definitions.task_def(task_type)
        concurrency = definition.concurrentExecLimit
        rate = definition.rateLimitPerFrequency
        count, reserved = wanted, 0
        if concurrency and count:
            in_progress = await self.store.count_in_progress(task_type)
            room = concurrency - in_progress - self._reserved[task_type]
            count = reserved = max(0, min(count, room))
            if reserved:
                self._reserved[task_type] += reserved
        window = None
        if rate and count:
            seconds = definition.rateLimitFrequencyInSeconds or 1
            window = RateWindow.at(now_ms(), seconds * 1000)
            try:
                granted = await self.store.take_rate_slots(
                    task_type, window, rate, count
                )
            except BaseException:
                self.unreserve(task_type, reserved)
                raise
            if reserved:
                self.unreserve(task_type, reserved - granted)
                reserved = granted
            count = granted
        return Allowance(self, task_type, count, reserved, window)

    def unreserve(self, task_type: str, count: int) -> None:
        """Drop `count` of this gateway's reservations for `task_type`."""
        if count <= 0:
            return
        self._reserved[task_type] -= count
        if self._reserved[task_type] <= 0:
            del self._reserved[task_type]
