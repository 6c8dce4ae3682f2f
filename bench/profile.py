"""Optional py-spy profile of the gateway, summarised into hot spots."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_BATON_DIRS = ("/services/", "/shared/")


def find_py_spy() -> str | None:
    """py-spy next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def start_profile(pid: int, output: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Record `pid` for `seconds` into a speedscope file, in the background.

    Only the thread holding the GIL is sampled, so the profile shows where
    the gateway spends Python CPU time, not where it waits.

    Raises FileNotFoundError when py-spy is not installed.
    """
    py_spy = find_py_spy()
    if py_spy is None:
        raise FileNotFoundError("py-spy is not installed: pip install py-spy")
    command = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "100",
        "--gil",
        "--format",
        "speedscope",
        "--output",
        str(output),
        "--nonblocking",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass(frozen=True, slots=True)
class HotSpot:
    """A function and its share of the samples."""

    function: str
    location: str
    share: float


def _short_path(path: str) -> str:
    for marker in (*_BATON_DIRS, "/site-packages/", "/lib/python"):
        if marker in path:
            return path[path.index(marker) + 1 :]
    return path


def _is_baton(path: str) -> bool:
    # The entry point is in every stack of the main thread: leave it out.
    entry = path.endswith("__main__.py")
    return not entry and any(d in path for d in _BATON_DIRS)


def hot_spots(speedscope: Path, top: int = 10) -> dict[str, list[HotSpot]]:
    """Summarise a py-spy speedscope file, by function across its lines.

    Returns `self` (where samples land, any code) and `baton` (the
    functions of services/ and shared/ by share of samples that pass
    through them), `top` of each. Shares are of all samples, every thread.
    """
    data = json.loads(speedscope.read_text())
    functions = [
        (str(f.get("name", "?")), str(f.get("file", "")))
        for f in data["shared"]["frames"]
    ]
    own: Counter[tuple[str, str]] = Counter()
    through: Counter[tuple[str, str]] = Counter()
    total = 0.0
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            total += weight
            own[functions[stack[-1]]] += weight
            for function in {functions[i] for i in stack}:
                through[function] += weight

    def spots(counts: Counter[tuple[str, str]], baton_only: bool) -> list[HotSpot]:
        chosen = [
            HotSpot(name, _short_path(path), 100 * n / max(total, 1e-9))
            for (name, path), n in counts.most_common()
            if not baton_only or _is_baton(path)
        ]
        return chosen[:top]

    return {"self": spots(own, False), "baton": spots(through, True)}
