"""Latency scenario: scheduling to delivery into a waiting long poll.

A few workers each hold a batch long poll (timeout 5 s) while the starter
starts workflows at a light, steady rate. For each task the worker takes
the time the poll answer arrived (epoch ms, same clock as the server) less
the task's `scheduledTime`, which the server set when it created the task.
Workers report with the v1 update, which hands out no next task, so every
task reaches a worker through a waiting poll. The first second's tasks are
left out as warm-up.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.client import TASK_TYPE, WORKFLOW_NAME
from bench.counters import Start, Work
from bench.harness import READY_TIMEOUT_S, Harness
from bench.monitor import CpuMeter
from bench.options import Options
from bench.report import Section
from bench.starter import StarterSpec, run_starter
from bench.workers import STOP_GRACE_S, WorkerReport, WorkerSpec, run_workers

LONG_POLL_MS = 5000
_START_CONCURRENCY = 8


def percentile(sorted_values: list[float], pct: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_latency(options: Options, workdir: Path) -> Section:
    """Measure scheduling-to-delivery delay at a light load."""
    async with Harness(options, "latency", workdir) as harness:
        warm = math.ceil(options.latency_rate)
        report, cpu = await _measure(harness, warm + options.latency_tasks)
    delays = sorted(delay for _, delay in sorted(report.samples)[warm:])
    section = _section(options, delays, cpu)
    if report.failures:
        section.details["failures"] = report.failures
    return section


def _specs(harness: Harness, total: int) -> tuple[WorkerSpec, StarterSpec]:
    options = harness.options
    base_urls = (harness.gateway.base_url,)
    workers = WorkerSpec(
        base_urls=base_urls,
        task_type=TASK_TYPE,
        workers=options.latency_workers,
        batch=options.batch,
        poll_timeout_ms=LONG_POLL_MS,
        chain=False,
        record_latency=True,
    )
    starter = StarterSpec(
        base_urls=base_urls,
        workflow=WORKFLOW_NAME,
        concurrency=_START_CONCURRENCY,
        rate=options.latency_rate,
        total=total,
    )
    return workers, starter


async def _measure(
    harness: Harness, total: int
) -> tuple[WorkerReport, dict[str, float]]:
    """Start `total` workflows at the paced rate and let the workers take
    them; return the workers' report and the CPU use meanwhile."""
    worker_spec, starter_spec = _specs(harness, total)
    work, start = harness.counters(Work), harness.counters(Start)
    work_results, start_results = harness.queue(), harness.queue()
    workers = harness.spawn(run_workers, work, worker_spec, work_results)
    await harness.wait_ready(work, Work.READY, "workers")
    starter = harness.spawn(run_starter, start, starter_spec, work, start_results)
    meter = harness.cpu_meter({"workers": workers, "starter": starter})
    first = meter.mark()

    pacing = total / starter_spec.rate + READY_TIMEOUT_S
    await harness.wait_for(lambda: start.get(Start.DONE) > 0, pacing, "the starter")
    await harness.receive(start_results, READY_TIMEOUT_S)
    started = start.get(Start.STARTED)
    await harness.wait_for(
        lambda: work.get(Work.COMPLETED) >= started,
        harness.options.drain_timeout,
        "the workers to finish",
    )
    last = meter.mark()

    work.set(Work.STOP, 1)
    report: WorkerReport = await harness.receive(
        work_results, STOP_GRACE_S + READY_TIMEOUT_S
    )
    return report, CpuMeter.percent(first, last)


def _section(options: Options, delays: list[float], cpu: dict[str, float]) -> Section:
    section = Section(
        "latency",
        f"Latency: scheduledTime to delivery into a waiting poll "
        f"({options.latency_rate:g} workflows/s, {options.latency_workers} "
        f"workers, poll timeout {LONG_POLL_MS} ms)",
    )
    add = section.add
    add("tasks", "tasks measured", len(delays))
    add("p50_ms", "p50", percentile(delays, 50), "ms")
    add("p90_ms", "p90", percentile(delays, 90), "ms")
    add("p99_ms", "p99", percentile(delays, 99), "ms")
    add("max_ms", "max", delays[-1] if delays else math.nan, "ms")
    add("mean_ms", "mean", sum(delays) / len(delays) if delays else math.nan, "ms")
    add("cpu_gateway_pct", "CPU gateway (100 = one core)", cpu.get("gateway"), "%")
    return section
