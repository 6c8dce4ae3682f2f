"""The background service: owns work that is not a response to a request.

At start-up it re-publishes every SCHEDULED task whose message may be
missing (with the embedded broker, all of them: its queues live in
memory), with the delay each still has to wait. Duplicate messages are
harmless: the guarded claim hands a task out once.
"""

from __future__ import annotations

import logging

from shared.runtime import Runtime

log = logging.getLogger(__name__)


class Scheduler:
    """Timers, retries and reconciliation for one Baton deployment."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def start(self) -> None:
        """Reconcile the queues with the store."""
        scheduled = await self._runtime.store.scheduled_tasks()
        await self._runtime.engine.republish(scheduled)
        log.info("reconciled %d scheduled tasks", len(scheduled))

    async def stop(self) -> None:
        """Stop background work."""
