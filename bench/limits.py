"""Process limits the bench raises for itself and its children."""

from __future__ import annotations

import resource


def raise_open_files() -> int:
    """Raise this process's soft limit on open files to the hard limit.

    Children inherit it, so the gateway can hold thousands of long polls.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 16)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft
