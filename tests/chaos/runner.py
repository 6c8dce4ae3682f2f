"""Runs one scenario: deploy, load, inject the fault, drain, check the books.

A run goes through the same phases whatever the fault:

1. deploy: the backends (a RabbitMQ prefix or node, a MongoDB database or
   server, a SQLite file, TCP proxies) and Baton's processes;
2. load: register the definitions, start workers and the starter;
3. warm up, inject the scenario's fault (it records when each fault
   window opened and healed), let the load run on for a while;
4. drain: stop starting, then poll every workflow's status until all have
   ended (bounded), then wait until no task queue holds a message;
5. stop the processes and audit the store (see `tests.chaos.books`).

The outcome is one row of the report: the counts, the problems found,
and the time to recover, which is how long after a fault healed the last
workflow started before that moment took to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.chaos.books import Books, StoreView, audit
from tests.chaos.cluster import Cluster, Service
from tests.chaos.deployment import Deployment, Resources, Topology, broker_leftovers
from tests.chaos.workload import Api, CallFailed, Mix, Shape, Traffic, Workload

STEPS = 2


@dataclass(frozen=True)
class Scale:
    """How big and how long a run is."""

    name: str
    rate: float
    workers: int
    warmup_s: float
    outage_s: float
    store_outage_s: float
    tail_s: float
    between_s: float
    repeats: int
    response_timeout_s: int
    sweep_s: int
    drain_timeout_s: float


SHORT = Scale(
    name="short",
    rate=10,
    workers=6,
    warmup_s=1.5,
    outage_s=2.5,
    store_outage_s=6,
    tail_s=1,
    between_s=0.5,
    repeats=1,
    response_timeout_s=2,
    sweep_s=2,
    drain_timeout_s=90,
)
FULL = Scale(
    name="full",
    rate=20,
    workers=10,
    warmup_s=5,
    outage_s=10,
    store_outage_s=20,
    tail_s=5,
    between_s=5,
    repeats=3,
    response_timeout_s=4,
    sweep_s=5,
    drain_timeout_s=300,
)


@dataclass
class Run:
    """One scenario run: what it deployed and what happened to it."""

    scale: Scale
    deployment: Deployment
    cluster: Cluster
    workload: Workload
    windows: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def fault(self, what: str) -> AsyncIterator[None]:
        """Mark a fault window: from entering the block until it heals."""
        opened = time.time()
        yield
        self.windows.append((opened, time.time()))
        self.notes.append(what)

    async def hold(self, *, store: bool = False) -> None:
        """Keep a fault in place for the scale's outage; a store outage
        outlasts the store clients' own timeouts (5 s), so that requests
        fail rather than wait."""
        await asyncio.sleep(self.scale.store_outage_s if store else self.scale.outage_s)

    async def pause(self) -> None:
        """Let the load run between two faults."""
        await asyncio.sleep(self.scale.between_s)


Fault = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """A named fault over a topology, with the workers' mix of behaviours."""

    name: str
    topology: Topology
    inject: Fault
    mix: Mix = field(default_factory=Mix)
    abandoning_pollers: int = 0


@dataclass
class Outcome:
    """What one run found: a row of the report."""

    scenario: str
    scale: str
    books: Books
    traffic: Traffic
    recover_s: float | None
    seconds: float
    notes: list[str]
    logs: list[Path]
    errors_logged: list[str]

    @property
    def problems(self) -> list[str]:
        """Everything that failed the run."""
        found = list(self.books.problems)
        found += [f"HTTP 5xx other than 503: {e}" for e in self.traffic.server_errors]
        found += [f"unexpected answer: {e}" for e in self.traffic.unexpected]
        found += [f"logged: {line[:500]}" for line in self.errors_logged]
        return found


async def run(scenario: Scenario, scale: Scale, resources: Resources) -> Outcome:
    """Run `scenario` at `scale`; return its row of the report."""
    began = time.monotonic()
    deployment = Deployment(scenario.topology, resources)
    names = _names()
    cluster = Cluster(resources.directory)
    outcome: Outcome | None = None
    try:
        await deployment.start()
        for _ in range(scenario.topology.gateways):
            cluster.add_gateway(deployment.env(scale.sweep_s, gateway=True))
        if scenario.topology.scheduler:
            cluster.add_scheduler(deployment.env(scale.sweep_s, gateway=False))
        await asyncio.gather(*(service.start() for service in cluster.services))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            outcome = await _load(scenario, scale, deployment, cluster, session, names)
    finally:
        await asyncio.to_thread(cluster.stop)
        failed = outcome is None or bool(outcome.problems)
        await deployment.close(list(names[1]), keep_data=failed)
    outcome.seconds = time.monotonic() - began
    _write_books(resources.directory / "books.txt", outcome, deployment.database)
    return outcome


def _write_books(path: Path, outcome: Outcome, database: str) -> None:
    """Keep what a run found next to its logs."""
    counts = {k: v for k, v in vars(outcome.books).items() if k != "problems"}
    lines = [f"{outcome.scenario} ({outcome.scale}): {counts}"]
    if outcome.problems:
        lines.append(f"MongoDB database kept: {database}")
    lines += [f"fault: {note}" for note in outcome.notes]
    lines += [f"problem: {problem}" for problem in outcome.problems]
    lines += [f"traffic: {outcome.traffic.statuses} {outcome.traffic.failures}"]
    path.write_text("\n".join(lines) + "\n")


def _names() -> tuple[str, tuple[str, ...]]:
    tag = uuid.uuid4().hex[:8]
    return f"chaos_wf_{tag}", tuple(f"chaos_{tag}_{n}" for n in range(STEPS))


async def _load(
    scenario: Scenario,
    scale: Scale,
    deployment: Deployment,
    cluster: Cluster,
    session: aiohttp.ClientSession,
    names: tuple[str, tuple[str, ...]],
) -> Outcome:
    traffic = Traffic()
    api = Api(session, [g.url for g in cluster.gateways], traffic)
    workflow, task_types = names
    await _register(api, workflow, task_types, scale)
    shape = Shape(
        workflow=workflow,
        task_types=task_types,
        workers=scale.workers,
        rate=scale.rate,
        abandoning_pollers=scenario.abandoning_pollers,
    )
    workload = Workload(api, shape, scenario.mix, seed=uuid.uuid4().hex)
    current = Run(scale, deployment, cluster, workload)

    leftovers = await _drive(scenario, current, deployment, task_types)
    leftovers += await broker_leftovers(deployment, task_types)
    await asyncio.to_thread(cluster.stop)

    view = await asyncio.to_thread(deployment.read_store)
    books = audit(
        view,
        current.workload.ledger,
        STEPS,
        atomic_history=deployment.sqlite_path is not None,
        windows=current.windows,
    )
    books.problems += leftovers
    return Outcome(
        scenario=scenario.name,
        scale=scale.name,
        books=books,
        traffic=traffic,
        recover_s=_recovery(view, current.windows),
        seconds=0.0,
        notes=current.notes,
        logs=[p for s in cluster.services for p in s.log_paths()],
        errors_logged=cluster.error_lines(),
    )


async def _drive(
    scenario: Scenario, run: Run, deployment: Deployment, task_types: tuple[str, ...]
) -> list[str]:
    """Warm up, inject the fault, run on, then drain; return what did not
    end or empty in time."""
    workload, scale = run.workload, run.scale
    workload.begin()
    try:
        await asyncio.sleep(scale.warmup_s)
        await scenario.inject(run)
        await asyncio.sleep(scale.tail_s)
        await workload.stop_starting()
        running = await _drain(workload, deployment, scale.drain_timeout_s)
        await workload.settle(timeout=scale.drain_timeout_s)
        leftovers = await _wait_queues_empty(workload.api, task_types, timeout=30)
        if running or leftovers:
            await _save_metrics(run, workload.api.session)
    finally:
        await workload.halt()
    stuck = [f"workflow {w} still {s} after the drain" for w, s in running.items()]
    return stuck + leftovers


async def _save_metrics(run: Run, session: aiohttp.ClientSession) -> None:
    """Keep each service's metrics next to its logs, to see what it held."""
    for service in run.cluster.services:
        try:
            async with session.get(f"{service.url}/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            text = f"unreadable: {exc!r}"
        (run.cluster.directory / f"{service.name}-metrics.txt").write_text(text)


async def _drain(
    workload: Workload, deployment: Deployment, timeout: float
) -> dict[str, str]:
    """Wait for the started workflows to end, then for those the store took
    from a start whose answer was lost; return those still running."""
    until = time.monotonic() + timeout
    running = await workload.wait_terminal(timeout)
    orphans = await asyncio.to_thread(deployment.running_workflow_ids)
    running |= await workload.wait_terminal(max(0.0, until - time.monotonic()), orphans)
    return running


async def _register(
    api: Api, workflow: str, task_types: tuple[str, ...], scale: Scale
) -> None:
    definitions = [
        {
            "name": task_type,
            "retryCount": 4,
            "retryLogic": "FIXED",
            "retryDelaySeconds": 1,
            "responseTimeoutSeconds": scale.response_timeout_s,
        }
        for task_type in task_types
    ]
    status, body = await api.call(0, "POST", "/metadata/taskdefs", json=definitions)
    assert status == 200, body
    steps = [
        {
            "name": task_type,
            "taskReferenceName": f"t{n}",
            "type": "SIMPLE",
            "inputParameters": {
                "value": "${workflow.input.x}"
                if n == 0
                else f"${{t{n - 1}.output.value}}"
            },
        }
        for n, task_type in enumerate(task_types)
    ]
    definition = {"name": workflow, "version": 1, "tasks": steps}
    status, body = await api.call(0, "POST", "/metadata/workflow", json=definition)
    assert status == 200, body


async def _wait_queues_empty(
    api: Api, task_types: tuple[str, ...], timeout: float
) -> list[str]:
    """Wait, while the workers still poll, until every gateway reports the
    task queues empty with nothing held unacked; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left: list[str] = []
        for gateway in range(len(api.gateways)):
            try:
                _, queues = await api.call(gateway, "GET", "/tasks/queue/all/verbose")
            except CallFailed as exc:
                left.append(f"gateway {gateway}: queues unreadable: {exc!r}")
                continue
            for task_type in task_types:
                shard = (queues.get(task_type) or {}).get("a", {})
                if shard.get("size", 0) or shard.get("uacked", 0):
                    left.append(f"gateway {gateway}: queue {task_type} holds {shard}")
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.25)


def _recovery(view: StoreView, windows: list[tuple[float, float]]) -> float | None:
    """Seconds from each fault's end until every workflow started before
    it had ended; the longest over the run's faults."""
    if not windows:
        return None
    longest = 0.0
    for _, healed in windows:
        healed_ms = healed * 1000
        ends = [
            w.get("endTime", 0)
            for w in view.workflows
            if w.get("createTime", 0) <= healed_ms
        ]
        if ends:
            longest = max(longest, (max(ends) - healed_ms) / 1000)
    return longest


def gateway(run: Run, index: int) -> Service:
    """The run's gateway number `index`, wrapping around."""
    return run.cluster.gateways[index % len(run.cluster.gateways)]
