"""What every Baton process shares: logging set-up and a signal-aware run."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
from opentelemetry import trace

T = TypeVar("T")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the
    trace id and task id (`extra={"task_id": ...}`) where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def configure_logging(level: str) -> None:
    """Send JSON lines to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_GC_YOUNG_THRESHOLD = 20_000


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a main coroutine to its end, on uvloop where it is installed.

    Every request allocates many short-lived objects that reference
    counting frees; collecting the youngest generation after every 700
    allocations (CPython's default) costs a few percent of the CPU for
    little garbage, so it runs less often here.
    """
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def wait_for_stop_signal() -> None:
    """Return when the process receives SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
