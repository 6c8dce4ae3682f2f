"""Idle long polls: what thousands of waiting polls cost the gateway.

One client process opens `--idle-polls` batch long polls (timeout 5 s) on
one task type, the harder case since one queue consumer serves them all,
and re-polls as soon as one comes back empty. Once all are open the bench
watches the gateway for `--idle-seconds`: peak RSS sampled every 100 ms,
CPU from its clock, and its established TCP connections.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil

from bench.client import TASK_TYPE
from bench.counters import Idle
from bench.harness import Harness
from bench.monitor import MIB, CpuMeter
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


class _IdleRun:
    def __init__(self, harness: Harness) -> None:
        self._harness = harness
        self._options = harness.options
        self._counters = harness.counters(Idle)
        self._open_min = self._options.idle_polls
        self._open_sum = 0
        self._samples = 0
        self._connections = 0

    async def execute(self) -> Section:
        harness, options = self._harness, self._options
        monitor = harness.gateway.monitor
        await asyncio.sleep(0.5)
        baseline = monitor.rss if monitor else 0

        spec = IdleSpec(
            harness.gateway.base_url, TASK_TYPE, options.idle_polls, LONG_POLL_MS
        )
        results = harness.queue()
        client = harness.spawn(run_idle_client, self._counters, spec, results)
        opened_in = await harness.wait_for(
            lambda: self._counters.get(Idle.OPEN) >= options.idle_polls,
            _OPEN_TIMEOUT_S,
            f"{options.idle_polls} polls to open",
        )

        meter = harness.cpu_meter({"client": client})
        if monitor:
            monitor.reset_peak()
        first, counts_before = meter.mark(), self._counters.snapshot()
        await self._watch(options.idle_seconds)
        last, counts_after = meter.mark(), self._counters.snapshot()
        peak = monitor.peak_rss if monitor else 0
        self._counters.set(Idle.STOP, 1)
        failures: list[str] = await harness.receive(results, _OPEN_TIMEOUT_S)

        section = Section(
            "idle",
            f"Idle long polls: {options.idle_polls:,} on one task type, "
            f"timeout {LONG_POLL_MS} ms, re-polled when empty",
        )
        seconds = last.at - first.at
        cpu = CpuMeter.percent(first, last)
        returned = counts_after[Idle.RETURNED] - counts_before[Idle.RETURNED]
        add = section.add
        add("polls", "long polls requested", options.idle_polls)
        add("open_seconds", "time to open them all", opened_in, "s")
        add("measured_seconds", "held for", seconds, "s")
        add("open_min", "polls open (client side), minimum", self._open_min)
        add("open_mean", "polls open (client side), mean", self._open_mean())
        add("gateway_connections", "gateway TCP connections", self._connections)
        add("returned_per_s", "empty polls answered", returned / seconds, "/s")
        add("tasks", "tasks received (expected 0)", counts_after[Idle.TASKS])
        add("errors", "failed polls", counts_after[Idle.ERRORS])
        add(
            "gateway_baseline_rss_mib",
            "gateway RSS before polls",
            baseline / MIB,
            "MiB",
        )
        add("gateway_peak_rss_mib", "gateway peak RSS while held", peak / MIB, "MiB")
        add(
            "rss_per_poll_kib",
            "RSS per open poll",
            (peak - baseline) / 1024 / options.idle_polls,
            "KiB",
        )
        add("cpu_gateway_pct", "CPU gateway (100 = one core)", cpu.get("gateway"), "%")
        add(
            "cpu_client_pct", "CPU poll client (100 = one core)", cpu.get("client"), "%"
        )
        add("cpu_machine_pct", "CPU machine (100 = all cores)", cpu["machine"], "%")
        if failures:
            section.details["failures"] = failures
        return section

    async def _watch(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        middle = loop.time() + seconds / 2
        while loop.time() < until:
            self._harness.check_alive()
            opened = self._counters.get(Idle.OPEN)
            self._open_min = min(self._open_min, opened)
            self._open_sum += opened
            self._samples += 1
            if not self._connections and loop.time() >= middle:
                self._connections = self._count_connections()
            await asyncio.sleep(_SAMPLE_S)

    def _open_mean(self) -> float:
        return self._open_sum / self._samples if self._samples else 0.0

    def _count_connections(self) -> int:
        try:
            process = psutil.Process(self._harness.gateway.pid)
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in connections if c.status == psutil.CONN_ESTABLISHED)
