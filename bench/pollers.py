"""The poller process: thousands of long polls that find nothing.

Each poll is re-sent as soon as it comes back empty, so the gateway holds
every one of them nearly all the time. Polls are opened in steps so the
gateway's listen backlog is not overrun.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from multiprocessing.queues import Queue

from bench.client import FAILURES, BatonClient
from bench.counters import Counters, FailureLog, Idle
from bench.limits import raise_open_files
from bench.workers import finish, wait_for_stop
from shared.service import run

_RETRY_PAUSE_S = 0.1
_CLIENT_SLACK_S = 30.0


@dataclass(frozen=True, slots=True)
class IdleSpec:
    """What the idle client runs."""

    base_url: str
    task_type: str
    polls: int
    timeout_ms: int
    step: int = 250
    step_pause_s: float = 0.05


def run_idle_client(
    counters: Counters, spec: IdleSpec, results: Queue[list[str]]
) -> None:
    """Process entry point: hold the polls until STOP is set.

    Puts the first few reasons polls failed on `results` at the end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files()
    results.put(run(_serve(spec, counters)))


async def _serve(spec: IdleSpec, counters: Counters) -> list[str]:
    failures = FailureLog(counters, Idle.ERRORS)
    timeout_s = spec.timeout_ms / 1000 + _CLIENT_SLACK_S
    async with BatonClient(spec.base_url, connections=0, timeout_s=timeout_s) as client:
        polls: list[asyncio.Task[None]] = []
        for n in range(spec.polls):
            hold = _hold(client, spec, counters, failures, n)
            polls.append(asyncio.create_task(hold))
            if (n + 1) % spec.step == 0:
                await asyncio.sleep(spec.step_pause_s)
        counters.set(Idle.READY, 1)
        await wait_for_stop(counters, Idle.STOP)
        await finish(polls, 0.0)
    return failures.reasons


async def _hold(
    client: BatonClient,
    spec: IdleSpec,
    counters: Counters,
    failures: FailureLog,
    n: int,
) -> None:
    worker_id = f"bench-idle-{n}"
    while not counters.get(Idle.STOP):
        counters.add(Idle.OPEN)
        try:
            polled = await client.poll_batch(
                spec.task_type, worker_id, 10, spec.timeout_ms
            )
        except FAILURES as exc:
            failures.record("poll", exc)
            await asyncio.sleep(_RETRY_PAUSE_S)
            continue
        finally:
            counters.add(Idle.OPEN, -1)
        counters.add(Idle.RETURNED)
        counters.add(Idle.TASKS, len(polled.tasks))
