"""Idle long polls: what thousands of waiting polls cost the gateway.

One client process opens `--idle-polls` batch long polls (timeout 5 s) on
one task type, the harder case since one queue consumer serves them all,
and re-polls as soon as one comes back empty. Once all are open the bench
watches the gateway for `--idle-seconds`: peak RSS sampled every 100 ms,
CPU from its clock, and its established TCP connections.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.client import TASK_TYPE
from bench.counters import Idle
from bench.harness import Harness
from bench.monitor import MIB, CpuMark, CpuMeter
from bench.options import Options
from bench.pollers import IdleSpec, run_idle_client
from bench.report import Section

LONG_POLL_MS = 5000
_SAMPLE_S = 0.1
_OPEN_TIMEOUT_S = 60.0


async def run_idle(options: Options, workdir: Path) -> Section:
    """Hold many idle long polls and measure the gateway meanwhile."""
    async with Harness(options, "idle", workdir) as harness:
        return await _IdleRun(harness).execute()


@dataclass(slots=True)
class _Window:
    """What was seen while the polls were held."""

    first: CpuMark
    last: CpuMark
    before: list[int]
    after: list[int]
    baseline_rss: int
    peak_rss: int
    opened_in: float
    open_min: int
    open_mean: float
    connections: int
    failures: list[str] = field(default_factory=list)


class _IdleRun:
    def __init__(self, harness: Harness) -> None:
        self._harness = harness
        self._options = harness.options
        self._counters = harness.counters(Idle)

    async def execute(self) -> Section:
        harness = self._harness
        monitor = harness.gateway.monitor
        await asyncio.sleep(0.5)
        baseline = monitor.rss if monitor else 0

        results = harness.queue()
        client = harness.spawn(run_idle_client, self._counters, self._spec(), results)
        opened_in = await harness.wait_for(
            lambda: self._counters.get(Idle.OPEN) >= self._options.idle_polls,
            _OPEN_TIMEOUT_S,
            f"{self._options.idle_polls} polls to open",
        )
        meter = harness.cpu_meter({"client": client})
        if monitor:
            monitor.reset_peak()
        window = await self._watch(meter, baseline, opened_in)
        window.peak_rss = monitor.peak_rss if monitor else 0

        self._counters.set(Idle.STOP, 1)
        window.failures = await harness.receive(results, _OPEN_TIMEOUT_S)
        return self._section(window)

    def _spec(self) -> IdleSpec:
        return IdleSpec(
            self._harness.gateway.base_url,
            TASK_TYPE,
            self._options.idle_polls,
            LONG_POLL_MS,
        )

    async def _watch(self, meter: CpuMeter, baseline: int, opened_in: float) -> _Window:
        """Sample the open polls for `--idle-seconds`; count the gateway's
        connections half way through."""
        loop = asyncio.get_running_loop()
        first, before = meter.mark(), self._counters.snapshot()
        until = loop.time() + self._options.idle_seconds
        middle = loop.time() + self._options.idle_seconds / 2
        samples: list[int] = []
        connections = 0
        while loop.time() < until:
            self._harness.check_alive()
            samples.append(self._counters.get(Idle.OPEN))
            if not connections and loop.time() >= middle:
                connections = self._count_connections()
            await asyncio.sleep(_SAMPLE_S)
        return _Window(
            first=first,
            last=meter.mark(),
            before=before,
            after=self._counters.snapshot(),
            baseline_rss=baseline,
            peak_rss=0,
            opened_in=opened_in,
            open_min=min(samples, default=0),
            open_mean=sum(samples) / len(samples) if samples else 0.0,
            connections=connections,
        )

    def _count_connections(self) -> int:
        try:
            process = psutil.Process(self._harness.gateway.pid)
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in connections if c.status == psutil.CONN_ESTABLISHED)

    def _section(self, window: _Window) -> Section:
        polls = self._options.idle_polls
        section = Section(
            "idle",
            f"Idle long polls: {polls:,} on one task type, "
            f"timeout {LONG_POLL_MS} ms, re-polled when empty",
        )
        seconds = window.last.at - window.first.at
        returned = window.after[Idle.RETURNED] - window.before[Idle.RETURNED]
        grown = (window.peak_rss - window.baseline_rss) / 1024 / polls

        add = section.add
        add("polls", "long polls requested", polls)
        add("open_seconds", "time to open them all", window.opened_in, "s")
        add("measured_seconds", "held for", seconds, "s")
        add("open_min", "polls open (client side), minimum", window.open_min)
        add("open_mean", "polls open (client side), mean", window.open_mean)
        add("gateway_connections", "gateway TCP connections", window.connections)
        add("returned_per_s", "empty polls answered", returned / seconds, "/s")
        add("tasks", "tasks received (expected 0)", window.after[Idle.TASKS])
        add("errors", "failed polls", window.after[Idle.ERRORS])
        baseline = window.baseline_rss / MIB
        add("gateway_baseline_rss_mib", "gateway RSS before polls", baseline, "MiB")
        peak = window.peak_rss / MIB
        add("gateway_peak_rss_mib", "gateway peak RSS while held", peak, "MiB")
        add("rss_per_poll_kib", "RSS per open poll", grown, "KiB")
        self._add_cpu(section, CpuMeter.percent(window.first, window.last))
        if window.failures:
            section.details["failures"] = window.failures
        return section

    @staticmethod
    def _add_cpu(section: Section, cpu: dict[str, float]) -> None:
        for name, label in (
            ("gateway", "gateway"),
            ("client", "poll client"),
            ("rabbitmq", "rabbitmq"),
        ):
            add_label = f"CPU {label} (100 = one core)"
            section.add(f"cpu_{name}_pct", add_label, cpu.get(name), "%")
        section.add(
            "cpu_machine_pct", "CPU machine (100 = all cores)", cpu["machine"], "%"
        )
