"""Logical queue names: `taskType` or `domain:taskType`, as Conductor names them."""

from __future__ import annotations

import re

from shared.errors import BadRequest

_NAME_CHARS = r"[A-Za-z0-9_.\-]{1,200}"
NAME_PATTERN = f"^{_NAME_CHARS}$"
"""What a task type or a domain may be, as a JSON Schema pattern."""

DOMAINS_PATTERN = f"^[ \\t]*({_NAME_CHARS}[ \\t]*)?(,[ \\t]*({_NAME_CHARS}[ \\t]*)?)*$"
"""A `taskToDomain` value: domains separated by commas, blanks allowed."""

_NAME = re.compile(NAME_PATTERN)
_DOMAINS = re.compile(DOMAINS_PATTERN)
_RULE = "only letters, digits, '_', '-' and '.', 1 to 200 characters"


def check_name(value: str, field: str) -> str:
    """Return `value` if it may become part of a queue name.

    Raises BadRequest naming `field` otherwise: task types and domains
    become broker queue names, so only letters, digits, `_`, `-` and `.`
    are allowed, up to 200 characters.
    """
    if not _NAME.fullmatch(value):
        raise BadRequest(
            f"{field} may only contain {_RULE}",
            path=field,
            invalid_value=value,
        )
    return value


def check_domains(value: str, field: str) -> list[str]:
    """Return the domains of a `taskToDomain` value such as `"d1, d2"`.

    Raises BadRequest naming `field` unless every domain could name a
    queue (see `check_name`).
    """
    if not _DOMAINS.fullmatch(value):
        raise BadRequest(
            f"{field} must be domains separated by commas, each with {_RULE}",
            path=field,
            invalid_value=value,
        )
    return [d for d in (part.strip(" \t") for part in value.split(",")) if d]


def queue_name(task_type: str, domain: str | None = None) -> str:
    """Return the logical queue for a task type in a domain (None: default)."""
    return f"{domain}:{task_type}" if domain else task_type


def split_queue_name(queue: str) -> tuple[str, str | None]:
    """Return (taskType, domain) for a logical queue name."""
    domain, sep, task_type = queue.partition(":")
    return (task_type, domain) if sep else (queue, None)
