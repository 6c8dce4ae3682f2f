"""Prometheus metrics of a Baton process.

Every metric lives in one registry per process (`METRICS`), separate from
prometheus_client's global default registry, and is created exactly once
when this module is imported; building several applications in one
process (as the tests do) shares it. Counters only grow, so a reader
compares values before and after what it measures.

Gauges that describe the current state (queue depth, waiting long polls)
are set by the process that serves a scrape, just before it renders.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from shared.interfaces import Delivery, QueueStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The media type of `Metrics.render`'s output."""

_M = TypeVar("_M", Counter, Histogram)

_POLL_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Baton's metrics, all registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # labels() validates and locks on every call; children of counters
        # and histograms are never removed, so they are looked up once.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.queue_depth = Gauge(
            "baton_queue_depth",
            "Messages ready in a task queue, as the broker reports them.",
            ["task_type", "domain"],
            registry=r,
        )
        self.queue_unacked = Gauge(
            "baton_queue_unacked",
            "Deliveries of a task queue this process holds unsettled.",
            ["task_type", "domain"],
            registry=r,
        )
        self.polls = Counter(
            "baton_polls",
            "Polls answered, by task type and whether they carried tasks.",
            ["task_type", "result"],
            registry=r,
        )
        self.poll_wait = Histogram(
            "baton_poll_wait_seconds",
            "Time a poll waited for tasks before it was answered.",
            buckets=_POLL_WAIT_BUCKETS,
            registry=r,
        )
        self.tasks_handed_out = Counter(
            "baton_tasks_handed_out",
            "Tasks given to workers by polls.",
            ["task_type"],
            registry=r,
        )
        self.redeliveries = Counter(
            "baton_redeliveries",
            "Deliveries the broker marked redelivered, taken by polls.",
            ["task_type"],
            registry=r,
        )
        self.updates = Counter(
            "baton_task_updates",
            "Task results reported by workers, by reported status.",
            ["status"],
            registry=r,
        )
        self.retries = Counter(
            "baton_task_retries",
            "Retry attempts scheduled for failed or timed-out tasks.",
            ["task_type"],
            registry=r,
        )
        self.timeouts = Counter(
            "baton_task_timeouts",
            "Task timers that fired, by kind (response, timeout, poll, ack).",
            ["kind"],
            registry=r,
        )
        self.reconciled = Counter(
            "baton_reconciled_tasks",
            "Tasks whose lost messages or timers a sweep published again.",
            registry=r,
        )
        self.long_polls_waiting = Gauge(
            "baton_long_polls_waiting",
            "Polls waiting for tasks in this process now.",
            registry=r,
        )
        self.http_duration = Histogram(
            "baton_http_request_duration_seconds",
            "HTTP request duration by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )

    def child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, looked up once per label values.

        Only for counters and histograms: their children are never removed.
        """
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def poll_answered(
        self, task_type: str, handed_out: int, waited_seconds: float
    ) -> None:
        """Count one answered poll that handed out `handed_out` tasks."""
        result = "tasks" if handed_out else "empty"
        self.child(self.polls, task_type, result).inc()
        self.poll_wait.observe(max(0.0, waited_seconds))
        if handed_out:
            self.child(self.tasks_handed_out, task_type).inc(handed_out)

    def taken(self, task_type: str, deliveries: Sequence[Delivery]) -> None:
        """Count the redelivered ones among deliveries a poll took."""
        redelivered = sum(1 for d in deliveries if d.redelivered)
        if redelivered:
            self.child(self.redeliveries, task_type).inc(redelivered)

    def set_queues(self, queues: Iterable[tuple[str, QueueStats]]) -> None:
        """Replace the queue gauges with `(logical queue name, stats)` pairs."""
        self.queue_depth.clear()
        self.queue_unacked.clear()
        for name, stats in queues:
            domain, _, task_type = name.rpartition(":")
            self.queue_depth.labels(task_type=task_type, domain=domain).set(stats.ready)
            self.queue_unacked.labels(task_type=task_type, domain=domain).set(
                stats.unacked
            )

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


METRICS = Metrics()
"""The metrics of this process."""
