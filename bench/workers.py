"""The worker process: Conductor-style workers on one event loop.

Each worker batch-polls, "executes" every task at once and reports it
with update-v2, executing the task that the answer carries straight away,
as the Conductor SDKs do. Figures go to shared counters; latency samples
(when asked for) come back through a queue at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from dataclasses import dataclass
from multiprocessing.queues import Queue

from bench.client import FAILURES, JSON, BatonClient
from bench.counters import Counters, FailureLog, Work
from bench.limits import raise_open_files
from shared.service import run

STOP_GRACE_S = 2.0
_RETRY_PAUSE_S = 0.05

LatencySample = tuple[int, float]
"""A task's scheduledTime (epoch ms) and its delay to delivery (ms)."""


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What the worker process sends back when it stops."""

    samples: list[LatencySample]
    failures: list[str]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the worker process runs.

    Worker i polls and reports to gateway `base_urls[i % len(base_urls)]`.
    """

    base_urls: tuple[str, ...]
    task_type: str
    workers: int
    batch: int
    poll_timeout_ms: int
    chain: bool = True
    callback_ratio: float = 0.0
    callback_seconds: int = 1
    record_latency: bool = False


def run_workers(
    counters: Counters, spec: WorkerSpec, results: Queue[WorkerReport]
) -> None:
    """Process entry point: work until the STOP counter is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files()
    results.put(run(_serve(spec, counters)))


async def _serve(spec: WorkerSpec, counters: Counters) -> WorkerReport:
    samples: list[LatencySample] = []
    failures = FailureLog(counters, Work.ERRORS)
    gateways = len(spec.base_urls)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                BatonClient(url, connections=2 * _share(spec.workers, gateways, g))
            )
            for g, url in enumerate(spec.base_urls)
        ]
        workers = [
            asyncio.create_task(
                _Worker(
                    clients[n % gateways], spec, counters, failures, n, samples
                ).run()
            )
            for n in range(spec.workers)
        ]
        counters.set(Work.READY, 1)
        await wait_for_stop(counters, Work.STOP)
        await finish(workers, STOP_GRACE_S)
    return WorkerReport(samples, failures.reasons)


def _share(workers: int, gateways: int, gateway: int) -> int:
    """How many of `workers` use `gateway` when worker i uses i mod `gateways`."""
    return max(1, len(range(gateway, workers, gateways)))


async def wait_for_stop(counters: Counters, slot: int) -> None:
    """Return once the bench sets the STOP counter."""
    # The flag is shared memory written by another process: there is no
    # event to await, so it is read every 50 ms.
    while not counters.get(slot):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def finish(tasks: list[asyncio.Task[None]], grace_s: float) -> None:
    """Let `tasks` end by themselves for `grace_s`, then cancel the rest."""
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class _Worker:
    def __init__(
        self,
        client: BatonClient,
        spec: WorkerSpec,
        counters: Counters,
        failures: FailureLog,
        index: int,
        samples: list[LatencySample],
    ) -> None:
        self._client = client
        self._spec = spec
        self._counters = counters
        self._failures = failures
        self._id = f"bench-worker-{index}"
        self._rng = random.Random(index)
        self._samples = samples

    @property
    def _stopping(self) -> bool:
        return bool(self._counters.get(Work.STOP))

    async def run(self) -> None:
        spec = self._spec
        while not self._stopping:
            try:
                polled = await self._client.poll_batch(
                    spec.task_type, self._id, spec.batch, spec.poll_timeout_ms
                )
            except FAILURES as exc:
                self._failures.record("poll", exc)
                await asyncio.sleep(_RETRY_PAUSE_S)
                continue

            self._counters.add(Work.POLLS)
            if not polled.tasks:
                self._counters.add(Work.EMPTY_POLLS)
            self._counters.add(Work.POLLED, len(polled.tasks))
            if spec.record_latency:
                self._samples.extend(
                    (t["scheduledTime"], polled.arrived_ms - t["scheduledTime"])
                    for t in polled.tasks
                )
            for task in polled.tasks:
                await self._execute(task)

    async def _execute(self, task: JSON | None) -> None:
        while task is not None:
            result = self._result(task)
            try:
                task = await self._report(result)
            except FAILURES as exc:
                self._failures.record("update", exc)
                return
            if result["status"] == "COMPLETED":
                self._counters.add(Work.COMPLETED)
            else:
                self._counters.add(Work.IN_PROGRESS)

    async def _report(self, result: JSON) -> JSON | None:
        # Once stopping, report without taking a next task, so that no
        # task is left in progress with nobody to finish it.
        if not self._spec.chain or self._stopping:
            await self._client.update(result)
            return None
        following = await self._client.update_v2(result)
        if following is not None:
            self._counters.add(Work.CHAINED)
        return following

    def _result(self, task: JSON) -> JSON:
        result: JSON = {
            "workflowInstanceId": task["workflowInstanceId"],
            "taskId": task["taskId"],
            "workerId": self._id,
            "status": "COMPLETED",
            "outputData": {"n": task.get("inputData", {}).get("n")},
        }
        ratio = self._spec.callback_ratio
        first_delivery = task.get("pollCount", 0) <= 1
        if ratio and first_delivery and self._rng.random() < ratio:
            result["status"] = "IN_PROGRESS"
            result["callbackAfterSeconds"] = self._spec.callback_seconds
            result["outputData"] = {}
        return result
