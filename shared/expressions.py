"""Conductor's parameter expressions: `${workflow.input.x}`, `${ref.output.y}`.

A string that is exactly one expression takes the referenced value with
its type; expressions inside a longer string are interpolated as text.
Paths use dots and `[n]` list indices; a missing path resolves to None.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

_EXPR = re.compile(r"\$\{([^}]+)\}")
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def referenced_tasks(params: Any) -> set[str]:
    """Return the task reference names that `params` reads from."""
    found: set[str] = set()
    for text in _strings(params):
        for match in _EXPR.finditer(text):
            head = match.group(1).split(".", 1)[0].split("[", 1)[0]
            if head != "workflow":
                found.add(head)
    return found


def resolve(params: Any, context: Mapping[str, Any]) -> Any:
    """Return `params` with every expression replaced from `context`.

    `context` maps `workflow` and each task reference name to a mapping
    with `input` and `output` (and, for the workflow, its other fields).
    """
    if isinstance(params, str):
        return _resolve_string(params, context)
    if isinstance(params, Mapping):
        return {key: resolve(value, context) for key, value in params.items()}
    if isinstance(params, list):
        return [resolve(value, context) for value in params]
    return params


def _resolve_string(text: str, context: Mapping[str, Any]) -> Any:
    whole = _EXPR.fullmatch(text)
    if whole:
        return _lookup(whole.group(1), context)

    def substitute(match: re.Match[str]) -> str:
        value = _lookup(match.group(1), context)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        return msgspec.json.encode(value).decode()

    return _EXPR.sub(substitute, text)


def _lookup(path: str, context: Mapping[str, Any]) -> Any:
    value: Any = context
    for name, index in _STEP.findall(path.strip()):
        if name:
            if not isinstance(value, Mapping):
                return None
            value = value.get(name)
        else:
            position = int(index)
            if not isinstance(value, list) or position >= len(value):
                return None
            value = value[position]
        if value is None:
            return None
    return value


def _strings(params: Any) -> list[str]:
    if isinstance(params, str):
        return [params]
    if isinstance(params, Mapping):
        return [s for value in params.values() for s in _strings(value)]
    if isinstance(params, list):
        return [s for value in params for s in _strings(value)]
    return []
