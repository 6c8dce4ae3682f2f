"""Poll data: when each task type and domain was last polled, and by whom.

Every poll is recorded in memory at once and written to the store in
batches, at most every `flush_ms`, so a busy poll loop costs no store
round trip per request. Readers flush first, so a gateway always reports
its own polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from msgspec import UNSET

from shared.errors import StoreError
from shared.interfaces import Store
from shared.models import PollData
from shared.periodic import Periodic

log = logging.getLogger(__name__)

_Key = tuple[str, str | None]


class PollRecorder:
    """Collects poll data in memory and flushes it to the store."""

    def __init__(self, store: Store, flush_ms: int = 500) -> None:
        self._store = store
        self._interval = flush_ms / 1000
        self._latest: dict[_Key, PollData] = {}
        self._dirty: set[_Key] = set()
        self._lock = asyncio.Lock()
        self._flusher = Periodic(
            self._interval, self._flush_in_background, "poll-data-flush"
        )

    def record(
        self, task_type: str, domain: str | None, worker_id: str | None, now: int
    ) -> None:
        """Note a poll (empty or not) of `task_type` in `domain`."""
        key = (task_type, domain)
        self._latest[key] = PollData(
            queueName=task_type,
            domain=domain if domain is not None else UNSET,
            workerId=worker_id if worker_id is not None else UNSET,
            lastPollTime=now,
        )
        self._dirty.add(key)

    async def flush(self) -> None:
        """Write every poll recorded since the last flush."""
        async with self._lock:
            if not self._dirty:
                return
            keys, self._dirty = self._dirty, set()
            try:
                await self._store.save_poll_data([self._latest[k] for k in keys])
            except StoreError:
                self._dirty |= keys
                raise

    async def last_poll_times(self, task_type: str) -> dict[str | None, int]:
        """Return the latest poll per domain of a type, here or elsewhere."""
        latest: dict[str | None, int] = {}
        for entry in await self._store.get_poll_data(task_type):
            domain = entry.domain or None
            latest[domain] = max(latest.get(domain, 0), entry.lastPollTime)
        for (polled_type, domain), entry in self._latest.items():
            if polled_type == task_type:
                latest[domain] = max(latest.get(domain, 0), entry.lastPollTime)
        return latest

    async def read(self, task_type: str | None = None) -> list[PollData]:
        """Return stored poll data after flushing this process's polls."""
        await self.flush()
        return await self._store.get_poll_data(task_type)

    def start(self) -> None:
        """Start flushing in the background."""
        self._flusher.start()

    async def stop(self) -> None:
        """Stop the background flush and write what is left."""
        await self._flusher.stop()
        with contextlib.suppress(StoreError):
            await self.flush()

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        except StoreError as exc:
            log.warning("poll data not flushed: %s", exc)
