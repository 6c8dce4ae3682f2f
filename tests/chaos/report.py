"""The table the fault suite prints: one row per scenario run."""

from __future__ import annotations

from tests.chaos.runner import Outcome

OUTCOMES: list[Outcome] = []
"""Every run of this session, in the order they finished."""

_COLUMNS = (
    ("scenario", 24),
    ("scale", 5),
    ("workflows", 9),
    ("tasks", 5),
    ("completed", 9),
    ("retried", 7),
    ("hand-outs", 9),
    ("unanswered", 10),
    ("dup. absorbed", 13),
    ("doubled", 7),
    ("lost", 4),
    ("503/429", 7),
    ("conn. errors", 12),
    ("recover s", 9),
    ("run s", 5),
    ("result", 6),
)

LEGEND = """\
tasks: task ids the store scheduled, retries included; completed: of them,
COMPLETED. hand-outs: tasks workers received. unanswered: claims whose poll
answer never reached a worker (a gateway killed or a client gone while it
answered). dup. absorbed: updates answered 2xx that changed nothing (sent
twice, after a timeout, or retried after a lost answer). doubled: tasks
handed to a second worker because a fault lost the first poll's ack (a
documented limitation; at any other time it fails the run). lost: workflows
that never ended or steps never completed (must be 0). 503/429 and conn.
errors: what the workers and the starter were told to retry. recover s:
from a fault's end until every workflow started before it had ended.
run s: the whole run, deployment and audit included."""


def _row(outcome: Outcome) -> tuple[str, ...]:
    books, traffic = outcome.books, outcome.traffic
    recover = "-" if outcome.recover_s is None else f"{outcome.recover_s:.1f}"
    return (
        outcome.scenario,
        outcome.scale,
        str(books.workflows),
        str(books.tasks),
        str(books.completed),
        str(books.retried),
        str(books.hand_outs),
        str(books.unanswered_claims),
        str(books.duplicates_absorbed),
        str(books.doubled),
        str(books.lost),
        str(traffic.refusals),
        str(sum(traffic.failures.values())),
        recover,
        f"{outcome.seconds:.0f}",
        "ok" if not outcome.problems else "FAILED",
    )


def notes(outcomes: list[Outcome]) -> str:
    """What each run injected, and what it counted beside the table."""
    lines: list[str] = []
    for outcome in outcomes:
        said = list(outcome.notes)
        gaps = outcome.books.history_gaps
        if gaps:
            said.append(
                f"{gaps} ended task(s) without their TaskResult document "
                "(MongoDB writes it after the task)"
            )
        if outcome.books.applied_unanswered:
            said.append(
                f"{outcome.books.applied_unanswered} update(s) applied whose "
                "answer was lost"
            )
        if said:
            lines.append(f"{outcome.scenario} ({outcome.scale}): {'; '.join(said)}")
    return "\n".join(lines)


def table(outcomes: list[Outcome]) -> str:
    """The report as fixed-width text."""
    widths = [max(width, len(name)) for name, width in _COLUMNS]
    rows = [tuple(name for name, _ in _COLUMNS), *map(_row, outcomes)]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
