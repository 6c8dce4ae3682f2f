"""The workload of a fault scenario: workflows started at a steady rate and
workers that poll, update, fail, call back and go silent, over real HTTP.

Everything a worker sees is written to a `Ledger`: each hand-out (task,
poll count, worker, when), each update request with a request id (`rid`,
carried in `outputData`, so the store's history says which requests it
applied) and each workflow start. The books (see `tests.chaos.books`)
compare the ledger with the store.

What a worker does with a task is chosen per hand-out from a `Mix`: only
the first hand-out of a first attempt misbehaves, so that every workflow
can complete within its task definition's retries whatever the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

Json = dict[str, Any]

COMPLETE = "complete"
FAIL = "fail"
CALLBACK = "callback"
SILENT = "silent"
DOUBLE = "double"
LATE = "late"

TERMINAL_WORKFLOW = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"})
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Mix:
    """Shares of first hand-outs of a first attempt that misbehave.

    `fail`: FAILED, retried per the task definition. `callback`:
    IN_PROGRESS with `callbackAfterSeconds`, then COMPLETED when the same
    task comes back. `silent`: the worker crashes after polling and never
    answers, so the response timeout retries the task. `double`: COMPLETED
    sent twice at once. `late`: the worker holds the task past its
    response timeout and reports COMPLETED after the retry was scheduled.
    """

    fail: float = 0.06
    callback: float = 0.08
    silent: float = 0.04
    double: float = 0.04
    late: float = 0.02

    def choose(self, task: Json, rng: random.Random) -> str:
        """The behaviour for this hand-out of `task`."""
        if task.get("retryCount", 0) or task.get("pollCount", 1) > 1:
            return DOUBLE if rng.random() < self.double else COMPLETE
        draw = rng.random()
        for behaviour, share in (
            (FAIL, self.fail),
            (CALLBACK, self.callback),
            (SILENT, self.silent),
            (DOUBLE, self.double),
            (LATE, self.late),
        ):
            if draw < share:
                return behaviour
            draw -= share
        return COMPLETE


class CallFailed(Exception):
    """A request got no usable answer: no connection, a timeout, or a
    status a client retries (429, 5xx)."""


@dataclass
class Traffic:
    """What the gateways answered, counted for the report."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def refusals(self) -> int:
        """Answers that told the client to retry (429 and 503)."""
        return self.statuses[429] + self.statuses[503]


@dataclass
class HandOut:
    """A task as a worker received it."""

    task_id: str
    workflow_id: str
    reference: str
    retry_count: int
    poll_count: int
    value: Any
    worker: str
    gateway: int
    received: float
    behaviour: str


@dataclass
class Update:
    """One update request a worker sent (a retry is another request)."""

    rid: str
    hand: HandOut
    status: str
    sent: float
    answer: int | None = None

    @property
    def answered(self) -> bool:
        """True when the gateway answered 2xx."""
        return self.answer is not None and 200 <= self.answer < 300


@dataclass
class Ledger:
    """The workload's own record of what it started, received and sent."""

    started: dict[str, int] = field(default_factory=dict)
    start_requests: int = 0
    start_failures: int = 0
    hand_outs: list[HandOut] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)

    def by_task(self) -> dict[str, list[HandOut]]:
        """Hand-outs grouped by task id, in the order they arrived."""
        grouped: dict[str, list[HandOut]] = {}
        for hand in self.hand_outs:
            grouped.setdefault(hand.task_id, []).append(hand)
        return grouped


@dataclass
class Activity:
    """Requests in flight per gateway and kind (`poll`, `update`)."""

    in_flight: Counter[tuple[int, str]] = field(default_factory=Counter)

    @contextlib.contextmanager
    def track(self, gateway: int, kind: str) -> Iterator[None]:
        """Count a request of `kind` to `gateway` while the block runs."""
        key = (gateway, kind)
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1

    async def wait_busy(
        self, gateway: int, kinds: tuple[str, ...], timeout: float
    ) -> bool:
        """Wait until `gateway` has a request of every kind in flight.

        Returns False if that did not happen within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while not all(self.in_flight[(gateway, kind)] for kind in kinds):
            if time.monotonic() > deadline:
                return False
            # A millisecond: an update is in flight for a few of them.
            await asyncio.sleep(0.001)
        return True


class Api:
    """HTTP calls to a list of gateways, counted in `traffic`."""

    def __init__(
        self, session: aiohttp.ClientSession, gateways: list[str], traffic: Traffic
    ) -> None:
        self.session = session
        self.gateways = gateways
        self.traffic = traffic

    async def call(
        self,
        gateway: int,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 20.0,
    ) -> tuple[int, Any]:
        """Send a request; return its status and decoded body.

        Raises CallFailed when there is no answer or a retryable one.
        """
        url = f"{self.gateways[gateway % len(self.gateways)]}/api{path}"
        try:
            async with self.session.request(
                method,
                url,
                json=json,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                text = await response.text()
                status = response.status
                body: Any = text
                if response.content_type == "application/json" and text:
                    body = await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.traffic.failures[type(exc).__name__] += 1
            raise CallFailed(f"{method} {path}: {exc!r}") from exc
        self.traffic.statuses[status] += 1
        if status >= 500 and status != 503:
            self.traffic.server_errors.append(f"{method} {path} -> {status}: {text}")
        if status in _RETRYABLE:
            raise CallFailed(f"{method} {path} -> {status}: {text[:200]}")
        return status, body


@dataclass(frozen=True)
class Shape:
    """What the workload runs: names, sizes and timings."""

    workflow: str
    task_types: tuple[str, ...]
    workers: int
    rate: float
    batch: int = 5
    poll_timeout_ms: int = 1000
    callback_s: int = 1
    update_budget_s: float = 60.0
    start_budget_s: float = 60.0
    late_budget_s: float = 60.0
    abandoning_pollers: int = 0


class Workload:
    """Starts workflows and works their tasks until told to stop."""

    def __init__(self, api: Api, shape: Shape, mix: Mix, seed: str) -> None:
        self.api = api
        self.shape = shape
        self.mix = mix
        self.seed = seed
        self.ledger = Ledger()
        self.activity = Activity()
        self._starting = asyncio.Event()
        self._halt = asyncio.Event()
        self._starts: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._start_slots = asyncio.Semaphore(16)
        # Wall-clock seconds, to compare with the fault windows and the logs.
        self._clock = time.time

    # Lifecycle.

    def begin(self) -> None:
        """Start the workers and the workflow starter."""
        self._starting.set()
        for n in range(self.shape.workers):
            task_type = self.shape.task_types[n % len(self.shape.task_types)]
            self._loops.append(asyncio.create_task(self._worker(f"w{n}", task_type, n)))
        for n in range(self.shape.abandoning_pollers):
            task_type = self.shape.task_types[n % len(self.shape.task_types)]
            self._loops.append(asyncio.create_task(self._abandoner(task_type, n)))
        self._loops.append(asyncio.create_task(self._starter()))

    async def stop_starting(self) -> None:
        """Start no more workflows; wait for the starts under way."""
        self._starting.clear()
        if self._starts:
            await asyncio.wait(self._starts)

    async def settle(self, timeout: float) -> None:
        """Wait for tasks that workers still hold (late ones) to be sent."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    async def halt(self) -> None:
        """Stop every worker after its current poll, then cancel stragglers."""
        self._halt.set()
        self._starting.clear()
        running = [t for t in (*self._loops, *self._background) if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=15)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._loops:
            if task.done() and not task.cancelled() and (error := task.exception()):
                raise error

    # Starting workflows.

    async def _starter(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for x in itertools.count(1):
            if not self._starting.is_set() or self._halt.is_set():
                return
            task = asyncio.create_task(self._start(x))
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)
            # Pacing, not waiting for a behaviour: one start per 1/rate s.
            wait = began + x / self.shape.rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _start(self, x: int) -> None:
        body = {"name": self.shape.workflow, "input": {"x": x}}
        deadline = self._clock() + self.shape.start_budget_s
        async with self._start_slots:
            for attempt in itertools.count():
                self.ledger.start_requests += 1
                try:
                    status, workflow_id = await self.api.call(
                        x + attempt, "POST", "/workflow", json=body
                    )
                except CallFailed:
                    self.ledger.start_failures += 1
                    if self._clock() > deadline or self._halt.is_set():
                        return
                    await _backoff(attempt)
                    continue
                if status == 200:
                    self.ledger.started[str(workflow_id)] = x
                else:
                    self.api.traffic.unexpected.append(
                        f"start -> {status}: {workflow_id}"
                    )
                return

    # Working tasks.

    async def _worker(self, name: str, task_type: str, gateway: int) -> None:
        params = {
            "count": self.shape.batch,
            "timeout": self.shape.poll_timeout_ms,
            "workerid": name,
        }
        failures = 0
        while not self._halt.is_set():
            try:
                with self.activity.track(gateway % len(self.api.gateways), "poll"):
                    status, tasks = await self.api.call(
                        gateway, "GET", f"/tasks/poll/batch/{task_type}", params=params
                    )
            except CallFailed:
                failures += 1
                gateway += 1
                await _backoff(failures)
                continue
            failures = 0
            if status != 200 or not isinstance(tasks, list):
                self.api.traffic.unexpected.append(f"poll -> {status}: {tasks}")
                continue
            await asyncio.gather(*(self._work(t, name, gateway) for t in tasks))

    async def _abandoner(self, task_type: str, n: int) -> None:
        """A worker whose long polls die while they wait: each request is
        dropped after a few hundred milliseconds. An answer that arrives
        before the drop is worked like any worker's: only the polls are
        abandoned, so that a task's every attempt does not risk a hand-out
        nobody will answer."""
        rng = random.Random(f"{self.seed}:abandoner:{n}")
        name = f"abandoner{n}"
        params = {"count": 1, "timeout": 3000, "workerid": name}
        path = f"/tasks/poll/batch/{task_type}"
        while not self._halt.is_set():
            tasks: Any = None
            with contextlib.suppress(TimeoutError, CallFailed):
                status, tasks = await asyncio.wait_for(
                    self.api.call(n, "GET", path, params=params), rng.uniform(0.05, 0.4)
                )
                if status != 200:
                    tasks = None
            if isinstance(tasks, list):
                await asyncio.gather(*(self._work(t, name, n) for t in tasks))

    def _hand_out(self, task: Json, worker: str, gateway: int) -> HandOut:
        rng = random.Random(f"{self.seed}:{task['taskId']}:{task.get('pollCount')}")
        hand = HandOut(
            task_id=task["taskId"],
            workflow_id=task["workflowInstanceId"],
            reference=task.get("referenceTaskName", ""),
            retry_count=task.get("retryCount", 0),
            poll_count=task.get("pollCount", 0),
            value=(task.get("inputData") or {}).get("value"),
            worker=worker,
            gateway=gateway,
            received=self._clock(),
            behaviour=self.mix.choose(task, rng),
        )
        self.ledger.hand_outs.append(hand)
        return hand

    async def _work(self, task: Json, worker: str, gateway: int) -> None:
        """Act on a task, then on every task chained onto the answers."""
        current: Json | None = task
        while current is not None:
            hand = self._hand_out(current, worker, gateway)
            current = None
            if hand.behaviour == SILENT:
                return
            if hand.behaviour == LATE:
                self._spawn(self._late(hand))
                return
            if hand.behaviour == CALLBACK:
                await self._update(hand, "IN_PROGRESS")
            elif hand.behaviour == FAIL:
                current = await self._update(hand, "FAILED")
            elif hand.behaviour == DOUBLE:
                first, second = await asyncio.gather(
                    self._update(hand, "COMPLETED"), self._update(hand, "COMPLETED")
                )
                if second is not None:
                    self._spawn(self._work(second, worker, hand.gateway))
                current = first
            else:
                current = await self._update(hand, "COMPLETED")

    async def _late(self, hand: HandOut) -> None:
        """Hold a task until the server has timed it out, then complete it.

        A task still in progress after `late_budget_s` is recorded as
        overdue (its response timeout never took effect) and completed
        normally, so that its workflow can finish.
        """
        timed_out = await self._wait_ended(hand)
        if not timed_out:
            self.ledger.overdue.append(hand.task_id)
        chained = await self._update(hand, "COMPLETED", late=timed_out)
        if chained is not None:
            await self._work(chained, hand.worker, hand.gateway)

    async def _wait_ended(self, hand: HandOut) -> bool:
        deadline = self._clock() + self.shape.late_budget_s
        while self._clock() < deadline and not self._halt.is_set():
            try:
                status, task = await self.api.call(
                    hand.gateway, "GET", f"/tasks/{hand.task_id}"
                )
            except CallFailed:
                status, task = 0, None
            if status == 200 and task.get("status") != "IN_PROGRESS":
                return True
            await asyncio.sleep(0.2)
        return False

    async def _update(
        self, hand: HandOut, status: str, *, late: bool = False
    ) -> Json | None:
        """Send an update-v2 until a gateway answers it, as the SDKs retry;
        return the task chained onto the answer, if any."""
        deadline = self._clock() + self.shape.update_budget_s
        gateway = hand.gateway
        for attempt in itertools.count():
            update = Update(uuid.uuid4().hex, hand, status, self._clock())
            self.ledger.updates.append(update)
            try:
                with self.activity.track(gateway % len(self.api.gateways), "update"):
                    code, body = await self.api.call(
                        gateway,
                        "POST",
                        "/tasks/update-v2",
                        json=self._result(hand, status, update.rid, late),
                    )
            except CallFailed:
                if self._clock() > deadline or self._halt.is_set():
                    return None
                gateway += 1
                await _backoff(attempt)
                continue
            update.answer = code
            if code == 200 and isinstance(body, dict) and body.get("taskId"):
                return body
            if code != 204 and code != 200:
                self.api.traffic.unexpected.append(f"update -> {code}: {body}")
            return None
        return None

    def _result(self, hand: HandOut, status: str, rid: str, late: bool) -> Json:
        output: Json = {"rid": rid}
        result: Json = {
            "taskId": hand.task_id,
            "workflowInstanceId": hand.workflow_id,
            "workerId": hand.worker,
            "status": status,
            "outputData": output,
        }
        if status == "COMPLETED":
            output["value"] = -1 if late else _plus_one(hand.value)
            if late:
                output["late"] = True
        elif status == "IN_PROGRESS":
            result["callbackAfterSeconds"] = self.shape.callback_s
        elif status == "FAILED":
            result["reasonForIncompletion"] = "the worker failed on purpose"
        return result

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Draining.

    async def wait_terminal(
        self, timeout: float, workflow_ids: Iterable[str] | None = None
    ) -> dict[str, str]:
        """Poll the status of `workflow_ids` (by default every workflow the
        starter was told it started) until all have ended.

        Returns the last status seen of each workflow still running at the
        deadline (empty when every one ended).
        """
        deadline = self._clock() + timeout
        ids = self.ledger.started if workflow_ids is None else workflow_ids
        running = dict.fromkeys(ids, "RUNNING")
        slots = asyncio.Semaphore(16)

        async def check(workflow_id: str) -> None:
            async with slots:
                try:
                    code, workflow = await self.api.call(
                        hash(workflow_id), "GET", f"/workflow/{workflow_id}"
                    )
                except CallFailed:
                    return
            if code == 200 and workflow.get("status") in TERMINAL_WORKFLOW:
                running.pop(workflow_id, None)
            elif code == 200:
                running[workflow_id] = workflow.get("status", "?")

        while running and self._clock() < deadline:
            await asyncio.gather(*(check(w) for w in list(running)))
            if running:
                await asyncio.sleep(0.25)
        return running


def _plus_one(value: Any) -> Any:
    return value + 1 if isinstance(value, int) else value


async def _backoff(attempt: int) -> None:
    # Capped exponential backoff, as the SDKs' retries do (shorter).
    await asyncio.sleep(min(0.05 * 2 ** min(attempt, 6), 1.0))
