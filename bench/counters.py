"""Counters in shared memory, read by the bench while its children work.

Each counter has one writer (a child's event loop, or the bench for the
stop flag), so plain aligned 64-bit stores need no lock.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from multiprocessing.context import SpawnContext
from typing import Any


class Work(IntEnum):
    """Slots of a worker process."""

    STOP = 0
    READY = 1
    POLLS = 2
    EMPTY_POLLS = 3
    POLLED = 4
    CHAINED = 5
    COMPLETED = 6
    IN_PROGRESS = 7
    ERRORS = 8


class Start(IntEnum):
    """Slots of the starter process."""

    STOP = 0
    READY = 1
    DONE = 2
    STARTED = 3
    ERRORS = 4


class Idle(IntEnum):
    """Slots of the idle long-poll client."""

    STOP = 0
    READY = 1
    OPEN = 2
    RETURNED = 3
    TASKS = 4
    ERRORS = 5


class Counters:
    """A fixed set of int64 counters shared with one child process.

    Pass it to the child as a `Process` argument: shared memory can only
    be handed over while the child is being spawned.
    """

    def __init__(self, ctx: SpawnContext, slots: type[IntEnum]) -> None:
        self._cells: Any = ctx.RawArray(ctypes.c_int64, len(slots))

    def add(self, slot: int, amount: int = 1) -> None:
        """Add `amount` to a counter."""
        self._cells[slot] += amount

    def set(self, slot: int, value: int) -> None:
        """Overwrite a counter."""
        self._cells[slot] = value

    def get(self, slot: int) -> int:
        """Read a counter."""
        return int(self._cells[slot])

    def snapshot(self) -> list[int]:
        """Read every counter at once."""
        return list(self._cells)


class FailureLog:
    """Counts failed requests in a counter and keeps the first few reasons."""

    def __init__(self, counters: Counters, slot: int, keep: int = 5) -> None:
        self._counters = counters
        self._slot = slot
        self._keep = keep
        self.reasons: list[str] = []

    def record(self, what: str, error: BaseException) -> None:
        """Count a failure of `what` (e.g. "poll") caused by `error`."""
        self._counters.add(self._slot)
        if len(self.reasons) < self._keep:
            self.reasons.append(f"{what}: {error!r}"[:300])
