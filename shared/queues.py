"""Logical queue names: `taskType` or `domain:taskType`, as Conductor names them."""

from __future__ import annotations

import re

from shared.errors import BadRequest

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def check_name(value: str, field: str) -> str:
    """Return `value` if it may become part of a queue name.

    Raises BadRequest naming `field` otherwise: task types and domains
    become broker queue names, so only letters, digits, `_`, `-` and `.`
    are allowed, up to 200 characters.
    """
    if not _NAME.fullmatch(value):
        raise BadRequest(
            f"{field} may only contain letters, digits, '_', '-' and '.', "
            "1 to 200 characters",
            path=field,
            invalid_value=value,
        )
    return value


def queue_name(task_type: str, domain: str | None = None) -> str:
    """Return the logical queue for a task type in a domain (None: default)."""
    return f"{domain}:{task_type}" if domain else task_type


def split_queue_name(queue: str) -> tuple[str, str | None]:
    """Return (taskType, domain) for a logical queue name."""
    domain, sep, task_type = queue.partition(":")
    return (task_type, domain) if sep else (queue, None)
