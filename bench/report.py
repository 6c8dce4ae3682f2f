"""The bench's figures: a readable table and the same figures as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Value = int | float | str | bool | None


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured or configured value."""

    key: str
    label: str
    value: Value
    unit: str = ""


@dataclass(slots=True)
class Section:
    """The figures of one scenario (or of the setup)."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, label: str, value: Value, unit: str = "") -> None:
        """Append a figure."""
        self.figures.append(Figure(key, label, value, unit))

    def as_json(self) -> dict[str, Any]:
        """Figures by key (floats to 3 decimals), plus the details."""
        body: dict[str, Any] = {
            f.key: round(f.value, 3) if isinstance(f.value, float) else f.value
            for f in self.figures
        }
        body.update(self.details)
        return body


def _format(value: Value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def render(sections: list[Section]) -> str:
    """A plain-text table of every section."""
    width = max((len(f.label) for s in sections for f in s.figures), default=20)
    lines: list[str] = []
    for section in sections:
        lines.append("")
        lines.append(section.title)
        lines.append("-" * len(section.title))
        for figure in section.figures:
            value = _format(figure.value)
            unit = f" {figure.unit}" if figure.unit else ""
            lines.append(f"  {figure.label:<{width}}  {value:>14}{unit}")
        for name, rows in section.details.items():
            if isinstance(rows, list) and rows:
                lines.extend(_detail_rows(name, rows))
    return "\n".join(lines)


def _detail_rows(name: str, rows: list[Any]) -> list[str]:
    lines = [f"  {name}:"]
    for row in rows:
        if not isinstance(row, dict):
            lines.append(f"    {row}")
            continue
        share = row.get("share")
        if isinstance(share, float):
            head = f"{share:5.1f}%  "
            rest = "  ".join(str(v) for k, v in row.items() if k != "share")
        else:
            head = "  "
            rest = "  ".join(f"{k}={v}" for k, v in row.items())
        lines.append(f"    {head}{rest}")
    return lines


def write_json(path: Path, sections: list[Section]) -> None:
    """Write every section's figures to `path`."""
    document = {s.name: s.as_json() for s in sections}
    path.write_text(json.dumps(document, indent=2) + "\n")
