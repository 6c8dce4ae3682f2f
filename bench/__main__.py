"""`python -m bench`: run the scenarios, print the table, write JSON."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aio_pika

from bench.gateway import GatewayError, broker_version
from bench.harness import BenchError
from bench.idle import run_idle
from bench.latency import run_latency
from bench.limits import raise_open_files
from bench.options import Options, parse_options
from bench.report import Section, render, write_json
from bench.throughput import run_callback, run_throughput

Scenario = Callable[[Options, Path], Awaitable[Section]]

SCENARIOS: dict[str, Scenario] = {
    "throughput": run_throughput,
    "callback": run_callback,
    "latency": run_latency,
    "idle": run_idle,
}


def _setup(options: Options, broker: str, open_files: int) -> Section:
    section = Section("setup", "Setup")
    add = section.add
    add("date", "date", time.strftime("%Y-%m-%d %H:%M:%S %z"))
    add("store", "store", options.store)
    add("broker", "broker", f"RabbitMQ {broker}")
    add("cpus", "CPUs", os.cpu_count() or 0)
    add("python", "Python", platform.python_version())
    add("gateways", "gateways (throughput, callback)", options.gateways)
    add("workers", "workers (one process)", options.workers)
    add("batch", "batch poll count", options.batch)
    add("poll_timeout_ms", "batch poll timeout", options.poll_timeout_ms, "ms")
    add("starts_in_flight", "workflow starts in flight", options.starters)
    add("backlog", "most workflows started, not done", options.backlog)
    add("warmup_s", "warm-up", options.warmup, "s")
    add("seconds", "measured per load run", options.seconds, "s")
    add("open_files", "open-file limit", open_files)
    return section


async def _run(options: Options) -> list[Section]:
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        broker = await broker_version(options.amqp_url)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        message = f"RabbitMQ at {options.amqp_url} does not answer: {exc}"
        raise BenchError(message) from exc

    sections = [_setup(options, broker, raise_open_files())]
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as workdir:
        for name in options.scenarios:
            print(f"bench: running {name} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            sections.append(await SCENARIOS[name](options, Path(workdir)))
            took = time.monotonic() - began
            print(f"bench: {name} done in {took:.0f} s", file=sys.stderr, flush=True)
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; return the process exit status."""
    options = parse_options(argv)
    try:
        sections = asyncio.run(_run(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; gateway and children stopped", file=sys.stderr)
        return 130
    except (BenchError, GatewayError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1

    print(render(sections))
    if options.json_path is not None:
        write_json(options.json_path, sections)
        print(f"\nfigures written to {options.json_path}")
    failed = any(
        f.key == "all_completed" and f.value is False
        for s in sections
        for f in s.figures
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
