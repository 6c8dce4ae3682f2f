"""The starter process: starts workflows, free-running or paced.

Free-running, `concurrency` starts are in flight at a time for as long as
the bench lets it run, pausing while more than `backlog` started
workflows wait for the workers. Paced, it starts `total` workflows at
`rate` per second. The ids it started come back through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from dataclasses import dataclass
from multiprocessing.queues import Queue

from bench.client import FAILURES, BatonClient
from bench.counters import Counters, FailureLog, Start, Work
from bench.limits import raise_open_files
from shared.service import run

_RETRY_PAUSE_S = 0.05
_BACKLOG_PAUSE_S = 0.002


@dataclass(frozen=True, slots=True)
class StartReport:
    """What the starter sends back when it stops."""

    ids: list[str]
    failures: list[str]


@dataclass(frozen=True, slots=True)
class StarterSpec:
    """What the starter process runs; starts go round-robin over `base_urls`."""

    base_urls: tuple[str, ...]
    workflow: str
    concurrency: int
    backlog: int = 0
    rate: float = 0.0
    total: int = 0


def run_starter(
    counters: Counters,
    spec: StarterSpec,
    work: Counters,
    results: Queue[StartReport],
) -> None:
    """Process entry point; `work` is the workers' counters, read only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files()
    results.put(run(_serve(spec, counters, work)))


async def _serve(spec: StarterSpec, counters: Counters, work: Counters) -> StartReport:
    ids: list[str] = []
    failures = FailureLog(counters, Start.ERRORS)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                BatonClient(url, connections=spec.concurrency)
            )
            for url in spec.base_urls
        ]
        starter = _Starter(clients, spec, counters, work, failures, ids)
        counters.set(Start.READY, 1)
        if spec.rate > 0:
            await starter.paced()
        else:
            await starter.free_running()
    counters.set(Start.DONE, 1)
    return StartReport(ids, failures.reasons)


class _Starter:
    def __init__(
        self,
        clients: list[BatonClient],
        spec: StarterSpec,
        counters: Counters,
        work: Counters,
        failures: FailureLog,
        ids: list[str],
    ) -> None:
        self._clients = itertools.cycle(clients)
        self._spec = spec
        self._counters = counters
        self._work = work
        self._failures = failures
        self._ids = ids

    @property
    def _stopping(self) -> bool:
        return bool(self._counters.get(Start.STOP))

    async def free_running(self) -> None:
        await asyncio.gather(*(self._loop() for _ in range(self._spec.concurrency)))

    async def paced(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        slots = asyncio.Semaphore(self._spec.concurrency)
        running: set[asyncio.Task[None]] = set()
        for n in range(self._spec.total):
            if self._stopping:
                break
            await asyncio.sleep(max(0.0, began + n / self._spec.rate - loop.time()))
            await slots.acquire()
            task = asyncio.create_task(self._start(n))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda _: slots.release())
        await asyncio.gather(*running)

    async def _loop(self) -> None:
        while not self._stopping:
            if self._backlogged():
                await asyncio.sleep(_BACKLOG_PAUSE_S)
                continue
            await self._start(len(self._ids))

    def _backlogged(self) -> bool:
        if not self._spec.backlog:
            return False
        started = self._counters.get(Start.STARTED)
        return started - self._work.get(Work.COMPLETED) >= self._spec.backlog

    async def _start(self, n: int) -> None:
        try:
            workflow_id = await next(self._clients).start_workflow(
                self._spec.workflow, {"n": n}
            )
        except FAILURES as exc:
            self._failures.record("start", exc)
            await asyncio.sleep(_RETRY_PAUSE_S)
            return
        self._ids.append(workflow_id)
        self._counters.add(Start.STARTED)
