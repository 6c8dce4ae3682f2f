"""The background loop behind poll-data flushing and the sweep watchdog."""

from __future__ import annotations

import asyncio

from shared.periodic import Periodic

INTERVAL_S = 0.01


async def test_runs_the_action_at_every_interval() -> None:
    calls = 0
    third = asyncio.Event()

    async def action() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()

    loop = Periodic(INTERVAL_S, action, "counting")
    loop.start()
    async with asyncio.timeout(5):
        await third.wait()
    await loop.stop()
    stopped_at = calls
    await asyncio.sleep(INTERVAL_S * 5)
    assert calls == stopped_at


async def test_a_failing_action_is_tried_again() -> None:
    calls = 0
    again = asyncio.Event()

    async def action() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store down")
        again.set()

    loop = Periodic(INTERVAL_S, action, "failing")
    loop.start()
    async with asyncio.timeout(5):
        await again.wait()
    await loop.stop()


async def test_stop_waits_for_the_run_under_way_and_never_cancels_it() -> None:
    # An action that carries on when cancelled, as an operation guarded by
    # Python 3.11's `asyncio.wait_for` can: a loop stopped by cancelling
    # would go on running and its stop never return.
    started = asyncio.Event()
    outcomes: list[str] = []

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.sleep(0.05)
            outcomes.append("finished")
        except asyncio.CancelledError:
            outcomes.append("cancelled")

    loop = Periodic(INTERVAL_S, stubborn, "stubborn")
    loop.start()
    async with asyncio.timeout(5):
        await started.wait()
        await loop.stop()
    assert outcomes == ["finished"]


async def test_stop_before_start_is_harmless() -> None:
    async def action() -> None:
        raise AssertionError("never runs")

    await Periodic(INTERVAL_S, action, "idle").stop()
