"""The one clock every timestamp comes from: epoch milliseconds."""

import time


def now_ms() -> int:
    """Return the current wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000
