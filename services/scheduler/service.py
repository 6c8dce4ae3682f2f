"""The background service: timers and reconciliation.

Timers arrive on `TIMER_QUEUE` when they are due (see `shared.timers`).
Reconciliation runs whenever a sweep token arrives on `SWEEP_QUEUE`: the
handler sweeps, then publishes the next token with a delay of one sweep
interval, so the schedule itself lives in the broker. The sweep queue has
a single active consumer, so however many replicas run, one sweeps at a
time; surplus tokens (every replica publishes one when it starts) are
dropped by whoever receives them within half an interval of a sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from services.scheduler.reconcile import Reconciler
from shared.errors import BatonError
from shared.interfaces import (
    SWEEP_QUEUE,
    TIMER_QUEUE,
    Delivery,
    Subscription,
    TaskMessage,
)
from shared.periodic import Periodic
from shared.runtime import Runtime

log = logging.getLogger(__name__)

_TIMER_PREFETCH = 64
_RETRY_FAILED_TIMER_SECONDS = 5


class Scheduler:
    """Timers, retries and reconciliation for one Baton deployment."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._engine = runtime.engine
        self._interval = runtime.settings.sweep_seconds
        self.reconciler = Reconciler(runtime)
        self._subscriptions: list[Subscription] = []
        self._work: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0
        self._last_token = time.monotonic()
        self._watchdog = Periodic(self._interval, self._check_tokens, "sweep-watchdog")

    async def start(self) -> None:
        """Reconcile once, then consume timers and sweep tokens."""
        if self._runtime.embedded_broker:
            # The embedded broker's queues died with the last process: every
            # SCHEDULED task needs its message again.
            scheduled = await self._runtime.store.scheduled_tasks()
            await self._engine.republish(scheduled)
            log.info("re-published %d scheduled tasks", len(scheduled))
        broker = self._runtime.broker
        for queue in (TIMER_QUEUE, SWEEP_QUEUE):
            await self._engine.ensure_queue(queue)
        self._subscriptions = [
            await broker.subscribe(TIMER_QUEUE, _TIMER_PREFETCH, self._on_timer),
            await broker.subscribe(SWEEP_QUEUE, 1, self._on_token),
        ]
        await self._publish_token(0)
        self._watchdog.start()

    async def stop(self) -> None:
        """Stop consuming and let in-flight work finish."""
        await self._watchdog.stop()
        for subscription in self._subscriptions:
            with contextlib.suppress(BatonError):
                await subscription.cancel()
        if self._work:
            await asyncio.wait(self._work, timeout=5)

    def _on_timer(self, delivery: Delivery) -> None:
        self._spawn(self._handle_timer(delivery))

    def _on_token(self, delivery: Delivery) -> None:
        self._spawn(self._handle_token(delivery))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _handle_timer(self, delivery: Delivery) -> None:
        try:
            await self._engine.timers.fire(delivery.message)
        except BatonError as exc:
            # Not requeued at once: with the store down it would spin.
            log.warning(
                "timer for %s failed, retried later: %s", delivery.message.task_id, exc
            )
            await self._engine.send(
                TIMER_QUEUE, [delivery.message.anew()], _RETRY_FAILED_TIMER_SECONDS
            )
        await delivery.ack()

    async def _handle_token(self, delivery: Delivery) -> None:
        self._last_token = time.monotonic()
        if time.monotonic() - self._last_sweep < self._interval / 2:
            await delivery.ack()
            return
        self._last_sweep = time.monotonic()
        try:
            await self.reconciler.sweep()
        except BatonError as exc:
            log.warning("reconciliation sweep failed: %s", exc)
        await self._publish_token(self._interval)
        await delivery.ack()

    async def _publish_token(self, delay: int) -> None:
        token = TaskMessage.for_task("sweep", 0, "sweep")
        await self._engine.send(SWEEP_QUEUE, [token], delay)

    async def _check_tokens(self) -> None:
        # A token lost with a broker crash would end the sweeps for good;
        # any replica that has seen none for three intervals adds one.
        if time.monotonic() - self._last_token > 3 * self._interval:
            self._last_token = time.monotonic()
            try:
                await self._publish_token(0)
            except BatonError as exc:
                log.warning("sweep token not published, tried again later: %s", exc)
