"""Throughput and callback scenarios: workers against a free-running starter.

The worker process runs `--workers` SDK-style workers; the starter keeps
`--starters` workflow starts in flight. After the warm-up the bench reads
every counter, waits `--seconds`, reads them again, then stops the
starter, lets the workers drain what was started, and reads a sample of
the started workflows back to check that each one COMPLETED.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.client import FAILURES, TASK_TYPE, WORKFLOW_NAME, BatonClient
from bench.counters import Start, Work
from bench.harness import Harness, WaitTimeout, gateway_key
from bench.monitor import MIB, CpuMark, CpuMeter
from bench.options import Options
from bench.profile import hot_spots, start_profile
from bench.report import Section
from bench.starter import StarterSpec, StartReport, run_starter
from bench.workers import STOP_GRACE_S, WorkerReport, WorkerSpec, run_workers

_VERIFY_CONCURRENCY = 16
_ALWAYS_VERIFY_LAST = 50


@dataclass(frozen=True, slots=True)
class _Mark:
    cpu: CpuMark
    work: list[int]
    start: list[int]


@dataclass(frozen=True, slots=True)
class _Verdict:
    started: int
    completed: int
    drained: bool
    drain_seconds: float
    checked: int
    checked_completed: int
    not_completed: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.drained
            and self.completed >= self.started
            and self.checked == self.checked_completed
        )


async def run_throughput(options: Options, workdir: Path) -> Section:
    """Every task completed at once: the headline throughput."""
    async with Harness(
        options, "throughput", workdir, gateways=options.gateways
    ) as harness:
        return await _LoadRun(harness, callback=False).execute()


async def run_callback(options: Options, workdir: Path) -> Section:
    """A share of first updates are IN_PROGRESS with a callback delay."""
    async with Harness(
        options, "callback", workdir, gateways=options.gateways
    ) as harness:
        return await _LoadRun(harness, callback=True).execute()


class _LoadRun:
    def __init__(self, harness: Harness, *, callback: bool) -> None:
        self._harness = harness
        self._options = harness.options
        self._callback = callback
        self._work = harness.counters(Work)
        self._start = harness.counters(Start)
        self._work_results = harness.queue()
        self._start_results = harness.queue()

    async def execute(self) -> Section:
        meter = await self._spawn_children()
        await self._sleep(self._options.warmup)
        first = self._mark(meter)
        profiler = self._start_profile()
        await self._sleep(self._options.seconds)
        last = self._mark(meter)

        report = await self._stop_starter()
        verdict, failures = await self._drain_and_verify(report.ids)
        section = self._section(first, last, CpuMeter.percent(first.cpu, last.cpu))
        self._add_verdict(section, verdict)
        if failures or report.failures:
            section.details["failures"] = report.failures + failures
        if profiler is not None:
            await self._finish_profile(profiler, section)
        return section

    # Set-up.

    async def _spawn_children(self) -> CpuMeter:
        """Start the workers, then the starter; meter both and the servers."""
        harness = self._harness
        workers = harness.spawn(
            run_workers, self._work, self._worker_spec(), self._work_results
        )
        await harness.wait_ready(self._work, Work.READY, "workers")
        starter = harness.spawn(
            run_starter,
            self._start,
            self._starter_spec(),
            self._work,
            self._start_results,
        )
        await harness.wait_ready(self._start, Start.READY, "starter")
        return harness.cpu_meter({"workers": workers, "starter": starter})

    def _worker_spec(self) -> WorkerSpec:
        options = self._options
        return WorkerSpec(
            base_urls=self._harness.base_urls,
            task_type=TASK_TYPE,
            workers=options.workers,
            batch=options.batch,
            poll_timeout_ms=options.poll_timeout_ms,
            callback_ratio=options.callback_ratio if self._callback else 0.0,
        )

    def _starter_spec(self) -> StarterSpec:
        return StarterSpec(
            base_urls=self._harness.base_urls,
            workflow=WORKFLOW_NAME,
            concurrency=self._options.starters,
            backlog=self._options.backlog,
        )

    # Measuring.

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until:
            self._harness.check_alive()
            await asyncio.sleep(min(0.25, max(0.0, until - loop.time())))

    def _mark(self, meter: CpuMeter) -> _Mark:
        return _Mark(meter.mark(), self._work.snapshot(), self._start.snapshot())

    def _start_profile(self) -> subprocess.Popen[bytes] | None:
        path = self._options.profile_path
        if path is None or self._callback:
            return None
        try:
            return start_profile(self._harness.gateway.pid, path, self._options.seconds)
        except FileNotFoundError as exc:
            print(f"not profiling: {exc}", file=sys.stderr)
            return None

    async def _finish_profile(
        self, profiler: subprocess.Popen[bytes], section: Section
    ) -> None:
        path = self._options.profile_path
        code = await asyncio.to_thread(profiler.wait, 60)
        if code != 0 or path is None or not path.exists():
            stderr = profiler.stderr.read().decode() if profiler.stderr else ""
            section.details["profile_error"] = stderr.strip()[-500:]
            return
        spots = hot_spots(path)
        section.details["profile"] = str(path)
        section.details["hot_spots_self"] = [asdict(s) for s in spots["self"]]
        section.details["hot_spots_baton"] = [asdict(s) for s in spots["baton"]]

    # Stopping and checking.

    async def _stop_starter(self) -> StartReport:
        self._start.set(Start.STOP, 1)
        report: StartReport = await self._harness.receive(self._start_results, 60)
        return report

    async def _drain_and_verify(self, ids: list[str]) -> tuple[_Verdict, list[str]]:
        """Wait for the workers to finish what was started, stop them, and
        read a sample back; also return the workers' failure reasons."""
        started = self._start.get(Start.STARTED)
        loop = asyncio.get_running_loop()
        began = loop.time()
        drained = True
        try:
            await self._harness.wait_for(
                lambda: self._work.get(Work.COMPLETED) >= started,
                self._options.drain_timeout,
                "the workers to drain",
            )
        except WaitTimeout:
            drained = False
        drain_seconds = loop.time() - began
        self._work.set(Work.STOP, 1)
        report: WorkerReport = await self._harness.receive(
            self._work_results, STOP_GRACE_S + 30
        )

        sample = _sample(ids, self._options.verify)
        statuses = await _statuses(self._harness.gateway.base_url, sample)
        not_completed = [i for i, s in statuses.items() if s != "COMPLETED"]
        verdict = _Verdict(
            started=started,
            completed=self._work.get(Work.COMPLETED),
            drained=drained,
            drain_seconds=drain_seconds,
            checked=len(statuses),
            checked_completed=len(statuses) - len(not_completed),
            not_completed=not_completed[:10],
        )
        return verdict, report.failures

    # Figures.

    def _section(self, first: _Mark, last: _Mark, cpu: dict[str, float]) -> Section:
        name = "callback" if self._callback else "throughput"
        section = Section(name, self._title())
        executions = self._add_rates(section, first, last)
        self._add_resources(section, cpu, executions)
        return section

    def _title(self) -> str:
        if not self._callback:
            return "Throughput: one-task workflows, every task completed at once"
        return (
            f"Callback: {self._options.callback_ratio:.0%} of first updates "
            "IN_PROGRESS, callbackAfterSeconds 1"
        )

    def _add_rates(self, section: Section, first: _Mark, last: _Mark) -> float:
        """Add the rates measured between two marks; return executions/s."""
        seconds = last.cpu.at - first.cpu.at
        work = [b - a for a, b in zip(first.work, last.work, strict=True)]
        started = last.start[Start.STARTED] - first.start[Start.STARTED]
        executions = (work[Work.COMPLETED] + work[Work.IN_PROGRESS]) / seconds
        handed_out = work[Work.CHAINED] + work[Work.POLLED]

        add = section.add
        add("measured_seconds", "measured for", seconds, "s")
        add("workflows_started_per_s", "workflows started", started / seconds, "/s")
        add("executions_per_s", "task executions (updates)", executions, "/s")
        completed = work[Work.COMPLETED] / seconds
        add("workflows_completed_per_s", "workflows completed", completed, "/s")
        if self._callback:
            in_progress = work[Work.IN_PROGRESS] / seconds
            add("in_progress_per_s", "IN_PROGRESS updates", in_progress, "/s")
        per_worker = 1000 * self._options.workers / executions if executions else 0.0
        add("ms_per_execution", "time per execution, per worker", per_worker, "ms")
        add("polls_per_s", "batch polls", work[Work.POLLS] / seconds, "/s")
        empty = _pct(work[Work.EMPTY_POLLS], work[Work.POLLS])
        add("empty_poll_pct", "batch polls that came back empty", empty, "%")
        chained = _pct(work[Work.CHAINED], handed_out)
        add("chained_pct", "tasks handed out by update-v2", chained, "%")
        errors = last.work[Work.ERRORS] + last.start[Start.ERRORS]
        add("client_errors", "failed requests (whole run)", errors)
        return executions

    def _add_resources(
        self, section: Section, cpu: dict[str, float], executions: float
    ) -> None:
        """Add CPU and memory figures; the gateways' are sums over all of them."""
        gateways = self._harness.gateways
        label = (
            "gateway" if len(gateways) == 1 else f"gateways (sum of {len(gateways)})"
        )
        labels = {"gateway": label, "rabbitmq": "rabbitmq"}
        add = section.add
        for name in ("gateway", "rabbitmq", "workers", "starter"):
            if name in cpu:
                text = f"CPU {labels.get(name, name)} (100 = one core)"
                add(f"cpu_{name}_pct", text, cpu[name], "%")
        add("cpu_machine_pct", "CPU machine (100 = all cores)", cpu["machine"], "%")
        for name in ("gateway", "rabbitmq"):
            if name in cpu and executions:
                per_task = 10 * cpu[name] / executions
                add(
                    f"cpu_ms_{name}",
                    f"{labels[name]} CPU per execution",
                    per_task,
                    "ms",
                )
        peaks = [g.monitor.peak_rss / MIB if g.monitor else 0.0 for g in gateways]
        rss_label = "gateway peak RSS" if len(gateways) == 1 else f"{label} peak RSS"
        add("gateway_peak_rss_mib", rss_label, sum(peaks), "MiB")
        section.details["gateways"] = [
            {
                "gateway": g.name,
                "port": g.port,
                "scheduler": g.run_scheduler,
                "cpu_pct": round(cpu.get(gateway_key(n), 0.0), 1),
                "peak_rss_mib": round(peak, 1),
            }
            for n, (g, peak) in enumerate(zip(gateways, peaks, strict=True))
        ]

    @staticmethod
    def _add_verdict(section: Section, verdict: _Verdict) -> None:
        add = section.add
        add("started_total", "workflows started (whole run)", verdict.started)
        add("completed_total", "workflows completed (whole run)", verdict.completed)
        add(
            "drain_seconds",
            "drain after stopping the starter",
            verdict.drain_seconds,
            "s",
        )
        add("verified_checked", "workflows read back", verdict.checked)
        add("verified_completed", "  of which COMPLETED", verdict.checked_completed)
        add("all_completed", "every started workflow COMPLETED", verdict.ok)
        if verdict.not_completed:
            section.details["not_completed_sample"] = verdict.not_completed


def _pct(part: int, whole: int) -> float:
    return 100 * part / whole if whole else 0.0


def _sample(ids: list[str], size: int) -> list[str]:
    """A random `size` of `ids`, always with the last ones started."""
    if size <= 0 or not ids:
        return []
    chosen = set(random.sample(ids, min(size, len(ids))))
    chosen.update(ids[-_ALWAYS_VERIFY_LAST:])
    return sorted(chosen)


async def _statuses(base_url: str, ids: list[str]) -> dict[str, str]:
    """Each workflow's status, read back from the gateway."""
    slots = asyncio.Semaphore(_VERIFY_CONCURRENCY)
    statuses: dict[str, str] = {}
    async with BatonClient(base_url, connections=_VERIFY_CONCURRENCY) as client:

        async def read(workflow_id: str) -> None:
            async with slots:
                try:
                    workflow = await client.get_workflow(workflow_id)
                except FAILURES as exc:
                    statuses[workflow_id] = f"unreadable: {exc}"
                    return
                statuses[workflow_id] = str(workflow.get("status"))

        await asyncio.gather(*(read(i) for i in ids))
    return statuses
