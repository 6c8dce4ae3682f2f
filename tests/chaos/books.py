"""The books of a scenario: the store's history checked against the ledger.

After the workload has drained, the scenario's whole store (its own
MongoDB database or SQLite file) is read directly: every workflow, every
task and every TaskResult a worker's update left behind. The checks:

- every workflow acknowledged to the starter is stored, and every stored
  workflow (including one whose start request failed after the store
  took it) has COMPLETED with the output its inputs imply;
- each step of a workflow is COMPLETED by exactly one task, every other
  attempt of it ended FAILED or TIMED_OUT and was retried, and no task
  is left SCHEDULED or IN_PROGRESS;
- a COMPLETED task has exactly one terminal TaskResult, a timed-out one
  none (an update that came after the timeout changed nothing), and no
  stored output comes from a late update. On MongoDB the TaskResult is a
  second document written after the task's own change, so a process
  killed or a store failing in between leaves a task ended with no
  TaskResult: counted as a history gap there, a failure on SQLite, which
  writes both in one transaction;
- no task was in two workers' hands at once: the same task id is handed
  out again only after the worker holding it reported IN_PROGRESS, and
  the store accepted that report before the next hand-out arrived. The
  one exception Baton documents, a poll answered in the instant a fault
  lost its ack (the broker then delivers the message again, and the
  same message may claim its task again), is counted as doubled when the
  first hand-out came at a fault, and fails the run at any other time.

An update the gateway answered with 2xx but whose request id the store
never recorded was absorbed: a duplicate, counted, not an error.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pymongo import MongoClient

from tests.chaos.workload import TERMINAL_WORKFLOW, HandOut, Ledger, Update

Json = dict[str, Any]

_PENDING = frozenset({"SCHEDULED", "IN_PROGRESS"})
_RETRIED_STATUSES = frozenset({"FAILED", "TIMED_OUT"})
_TERMINAL_RESULTS = frozenset({"COMPLETED", "FAILED", "FAILED_WITH_TERMINAL_ERROR"})

AT_FAULT_S = 2.0
"""How long before a fault window a lost ack still counts as that fault's."""


class StoreView(NamedTuple):
    """Everything one scenario's store holds."""

    workflows: list[Json]
    tasks: list[Json]
    results: list[Json]


def read_mongo(url: str, database: str) -> StoreView:
    """Read a MongoDB database Baton wrote."""
    client: MongoClient[Json]
    with MongoClient(url, serverSelectionTimeoutMS=10000) as client:
        db = client[database]
        return StoreView(
            list(db["workflows"].find({})),
            list(db["tasks"].find({})),
            list(db["task_results"].find({})),
        )


def read_sqlite(path: str) -> StoreView:
    """Read a SQLite file Baton wrote."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return StoreView(
            [json.loads(r[0]) for r in conn.execute("SELECT doc FROM workflows")],
            [json.loads(r[0]) for r in conn.execute("SELECT doc FROM tasks")],
            [json.loads(r[0]) for r in conn.execute("SELECT doc FROM task_results")],
        )


def running_in_mongo(url: str, database: str) -> list[str]:
    """Ids of the RUNNING workflows of a MongoDB database."""
    client: MongoClient[Json]
    with MongoClient(url, serverSelectionTimeoutMS=10000) as client:
        found = client[database]["workflows"].find({"status": "RUNNING"}, {"_id": 1})
        return [str(doc["_id"]) for doc in found]


def running_in_sqlite(path: str) -> list[str]:
    """Ids of the RUNNING workflows of a SQLite file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        query = "SELECT id FROM workflows WHERE status = 'RUNNING'"
        return [row[0] for row in conn.execute(query)]


@dataclass
class Books:
    """The counts of one scenario and everything that did not add up."""

    workflows: int = 0
    tasks: int = 0
    completed: int = 0
    retried: int = 0
    hand_outs: int = 0
    unanswered_claims: int = 0
    duplicates_absorbed: int = 0
    applied_unanswered: int = 0
    history_gaps: int = 0
    doubled: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        """Record something that does not add up."""
        self.problems.append(text)


def audit(
    view: StoreView,
    ledger: Ledger,
    steps: int,
    *,
    atomic_history: bool,
    windows: list[tuple[float, float]],
) -> Books:
    """Check the store's history against what the workload did.

    `atomic_history`: the store writes a task's change and its TaskResult
    in one transaction, so a missing TaskResult is a failure. `windows`:
    when faults were in place, as (opened, healed) wall-clock seconds.
    """
    books = Books(workflows=len(view.workflows), tasks=len(view.tasks))
    tasks_of: dict[str, list[Json]] = defaultdict(list)
    for task in view.tasks:
        tasks_of[task.get("workflowInstanceId", "")].append(task)
    results_of: dict[str, list[Json]] = defaultdict(list)
    for result in view.results:
        results_of[result.get("taskId", "")].append(result)

    _check_workflows(books, view, ledger, tasks_of, steps)
    _check_tasks(books, view.tasks, results_of, atomic_history)
    _count_updates(books, ledger.updates, view.results)
    for task_id in ledger.overdue:
        books.problem(f"task {task_id} was never timed out while its worker held it")
    _check_hands(books, ledger, view.tasks, results_of, windows)
    return books


def _check_workflows(
    books: Books,
    view: StoreView,
    ledger: Ledger,
    tasks_of: dict[str, list[Json]],
    steps: int,
) -> None:
    stored = {w.get("workflowId"): w for w in view.workflows}
    for workflow_id in ledger.started:
        if workflow_id not in stored:
            books.lost += 1
            books.problem(f"workflow {workflow_id} was acknowledged, not stored")
    for workflow_id, workflow in stored.items():
        status = workflow.get("status")
        if status != "COMPLETED":
            if status not in TERMINAL_WORKFLOW:
                books.lost += 1
            known = "acknowledged" if workflow_id in ledger.started else "orphan"
            statuses = [t.get("status") for t in tasks_of[workflow_id]]
            books.problem(
                f"workflow {workflow_id} ({known}) ended {status}, tasks {statuses}"
            )
            continue
        x = (workflow.get("input") or {}).get("x")
        if workflow.get("output", {}).get("value") != _value(x, steps):
            books.problem(
                f"workflow {workflow_id} output {workflow.get('output')}, "
                f"expected value {_value(x, steps)}"
            )
        for step in range(steps):
            attempts = [
                t
                for t in tasks_of[workflow_id]
                if t.get("referenceTaskName") == f"t{step}"
            ]
            _check_step(books, workflow_id, step, x, attempts)


def _check_step(
    books: Books, workflow_id: str, step: int, x: Any, attempts: list[Json]
) -> None:
    name = f"workflow {workflow_id} step t{step}"
    attempts.sort(key=lambda t: t.get("retryCount", 0))
    done = [t for t in attempts if t.get("status") == "COMPLETED"]
    if len(done) != 1:
        books.lost += not done
        books.problem(f"{name}: {len(done)} COMPLETED tasks")
        return
    if [t.get("retryCount", 0) for t in attempts] != list(range(len(attempts))):
        books.problem(f"{name}: attempts {[t.get('retryCount') for t in attempts]}")
    if attempts[-1] is not done[0]:
        books.problem(f"{name}: an attempt follows the COMPLETED one")
    for earlier in attempts[:-1]:
        if earlier.get("status") not in _RETRIED_STATUSES or not earlier.get("retried"):
            books.problem(
                f"{name}: attempt {earlier.get('retryCount')} is "
                f"{earlier.get('status')}, retried={earlier.get('retried')}"
            )
    output = done[0].get("outputData") or {}
    expected = _value(x, step + 1)
    if output.get("late") or output.get("value") != expected:
        books.problem(f"{name}: output {output}, expected value {expected}")
    if (done[0].get("inputData") or {}).get("value") != _value(x, step):
        books.problem(f"{name}: input {done[0].get('inputData')}")


def _check_tasks(
    books: Books,
    tasks: list[Json],
    results_of: dict[str, list[Json]],
    atomic_history: bool,
) -> None:
    for task in tasks:
        task_id = task.get("taskId", "")
        status = task.get("status")
        if status in _PENDING:
            books.problem(f"task {task_id} left {status}")
        books.completed += status == "COMPLETED"
        books.retried += bool(task.get("retried"))
        terminal = [
            r for r in results_of[task_id] if r.get("status") in _TERMINAL_RESULTS
        ]
        reported = [r.get("status") for r in terminal]
        if status == "TIMED_OUT" and terminal:
            books.problem(f"task {task_id} TIMED_OUT, yet has result {terminal[0]}")
        elif status in ("COMPLETED", "FAILED") and not reported and not atomic_history:
            books.history_gaps += 1
        elif status in ("COMPLETED", "FAILED") and reported != [status]:
            books.problem(f"task {task_id} {status} with terminal results {reported}")


def _count_updates(books: Books, updates: list[Update], results: list[Json]) -> None:
    recorded = Counter(_rid(r) for r in results)
    for rid, times in recorded.items():
        if rid and times > 1:
            books.problem(f"update {rid} recorded {times} times")
    for update in updates:
        if update.answered and not recorded[update.rid]:
            books.duplicates_absorbed += 1
        elif not update.answered and recorded[update.rid]:
            books.applied_unanswered += 1


def _check_hands(
    books: Books,
    ledger: Ledger,
    tasks: list[Json],
    results_of: dict[str, list[Json]],
    windows: list[tuple[float, float]],
) -> None:
    """A task id may be handed out again only once the store accepted the
    holder's IN_PROGRESS report, sent before the next hand-out arrived."""
    books.hand_outs = len(ledger.hand_outs)
    sent_at = {u.rid: u.sent for u in ledger.updates}
    by_task = ledger.by_task()
    for task in tasks:
        task_id = task.get("taskId", "")
        hands = by_task.get(task_id, [])
        books.unanswered_claims += max(0, task.get("pollCount", 0) - len(hands))
        released = sorted(
            sent_at[_rid(r)]
            for r in results_of[task_id]
            if r.get("status") == "IN_PROGRESS" and _rid(r) in sent_at
        )
        _check_task_hands(books, task_id, hands, released, windows)


def _check_task_hands(
    books: Books,
    task_id: str,
    hands: list[HandOut],
    released: list[float],
    windows: list[tuple[float, float]],
) -> None:
    counts = [h.poll_count for h in hands]
    if len(set(counts)) != len(counts):
        books.problem(f"task {task_id} handed out twice with poll counts {counts}")
    for previous, following in itertools.pairwise(hands):
        freed = [t for t in released if previous.received <= t <= following.received]
        if freed and previous.poll_count < following.poll_count:
            continue
        first = min(previous, following, key=lambda h: h.poll_count)
        if _at_fault(first.received, windows):
            books.doubled += 1
            continue
        books.problem(
            f"task {task_id} handed to {following.worker} (poll "
            f"{following.poll_count}, at {following.received:.3f}) while "
            f"{previous.worker} held it (poll {previous.poll_count}, "
            f"{previous.behaviour}, at {previous.received:.3f})"
        )


def _at_fault(when: float, windows: list[tuple[float, float]]) -> bool:
    # A poll answered in the instant its ack was lost: from just before a
    # fault was injected (RabbitMQ takes a moment to close its
    # connections, a kill lands mid-answer) until it healed.
    return any(opened - AT_FAULT_S <= when <= healed for opened, healed in windows)


def _rid(result: Json) -> str:
    return str((result.get("outputData") or {}).get("rid", ""))


def _value(x: Any, plus: int) -> Any:
    return x + plus if isinstance(x, int) else None
