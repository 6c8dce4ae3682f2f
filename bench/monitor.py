"""Resource figures: a process's peak memory and CPU use over a window."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped,unused-ignore]

SAMPLE_INTERVAL_S = 0.1
MIB = 1024 * 1024


class ProcessMonitor:
    """Samples a process's resident memory every 100 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peak = 0
        self._last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)

    @property
    def peak_rss(self) -> int:
        """The largest RSS seen since start or the last reset, in bytes."""
        return self._peak

    @property
    def rss(self) -> int:
        """The latest RSS sampled, in bytes."""
        return self._last

    def reset_peak(self) -> None:
        """Start a new peak from the latest sample."""
        self._peak = self._last

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._last = self._process.memory_info().rss
            except psutil.Error:
                return
            self._peak = max(self._peak, self._last)
            self._stop.wait(SAMPLE_INTERVAL_S)


def find_rabbitmq() -> psutil.Process | None:
    """The local RabbitMQ node's Erlang VM, if this machine runs one."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "beam.smp":
            return process
    return None


@dataclass(frozen=True, slots=True)
class CpuMark:
    """CPU seconds used so far by each watched process and the machine."""

    at: float
    processes: dict[str, float]
    machine_busy: float


class CpuMeter:
    """CPU use of named processes, and of the whole machine, between marks.

    Each of `groups` is also read as one process: the sum of its members'
    clocks, present only when every member could be read.
    """

    def __init__(
        self,
        processes: Mapping[str, psutil.Process],
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._processes = dict(processes)
        self._groups = {
            name: tuple(members) for name, members in (groups or {}).items()
        }

    def mark(self) -> CpuMark:
        """Read every clock now."""
        used: dict[str, float] = {}
        for name, process in self._processes.items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            used[name] = times.user + times.system
        for group, members in self._groups.items():
            if all(member in used for member in members):
                used[group] = sum(used[member] for member in members)
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return CpuMark(time.monotonic(), used, busy)

    @staticmethod
    def percent(first: CpuMark, last: CpuMark) -> dict[str, float]:
        """CPU % between two marks: per process, 100 = one core busy.

        `machine` is the share of all cores, 100 = every core busy.
        """
        wall = max(last.at - first.at, 1e-9)
        shares = {
            name: 100 * (last.processes[name] - first.processes[name]) / wall
            for name in first.processes
            if name in last.processes
        }
        cores = psutil.cpu_count() or 1
        shares["machine"] = (
            100 * (last.machine_busy - first.machine_busy) / (wall * cores)
        )
        return shares
