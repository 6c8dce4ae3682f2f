"""Operational endpoints every Baton service serves: health, readiness and
metrics, plus the middleware that times each request.

- `GET /health` is liveness: 200 whenever the process and its event loop
  run, whatever the state of the backends.
- `GET /ready` is readiness: 200 once the topology is declared and while
  the broker and the store both answer a ping, 503 otherwise (and from the
  moment the process starts shutting down).
- `GET /metrics` renders the process's Prometheus metrics; the queue
  gauges are refreshed from the backends on each scrape.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from shared.errors import BatonError
from shared.metrics import CONTENT_TYPE, METRICS, Metrics
from shared.models import ErrorResponse
from shared.runtime import Runtime

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 3.0
"""How long `/ready` waits for the broker and the store to answer."""

SCRAPE_TIMEOUT_S = 3.0
"""How long `/metrics` waits for the backends before rendering without
queue gauges."""

_HOST = socket.gethostname()


@dataclass(slots=True)
class Readiness:
    """What `/ready` knows besides the backends' answers.

    `declared` is true once the runtime is started (the broker's shared
    topology is declared); `draining` becomes true when the process starts
    shutting down, after which the service takes no new work.
    """

    declared: bool = True
    draining: bool = False


@dataclass(slots=True)
class Operations:
    """What the operational endpoints of one application read."""

    runtime: Runtime
    readiness: Readiness
    metrics: Metrics
    waiting_polls: Callable[[], int] | None = None


OPERATIONS = web.AppKey("operations", Operations)


def unavailable(message: str) -> web.Response:
    """A 503 JSON ErrorResponse marked retryable."""
    body = ErrorResponse(
        status=503,
        message=message,
        code="UNAVAILABLE",
        instance=_HOST,
        retryable=True,
    )
    return web.Response(
        status=503, body=msgspec.json.encode(body), content_type="application/json"
    )


async def health(request: web.Request) -> web.StreamResponse:
    """Liveness: 200 `{"healthy": true}` whenever the event loop answers.

    The backends are not consulted: an outage of RabbitMQ or the store
    shows on `/ready`, and restarting the process would not end it.
    """
    return web.Response(body=b'{"healthy":true}', content_type="application/json")


async def ready(request: web.Request) -> web.StreamResponse:
    """Readiness: 200 `{"ready": true}` when the topology is declared and
    the broker and the store answer a ping; a 503 ErrorResponse otherwise."""
    operations = request.app[OPERATIONS]
    state = operations.readiness
    if state.draining:
        return unavailable("not ready: shutting down")
    if not state.declared:
        return unavailable("not ready: broker topology not declared yet")
    runtime = operations.runtime
    try:
        await asyncio.wait_for(
            asyncio.gather(runtime.store.ping(), runtime.broker.ping()),
            timeout=READY_TIMEOUT_S,
        )
    except BatonError as exc:
        return unavailable(f"not ready: {exc}")
    except TimeoutError:
        return unavailable(
            f"not ready: broker or store did not answer within {READY_TIMEOUT_S} s"
        )
    return web.Response(body=b'{"ready":true}', content_type="application/json")


async def metrics(request: web.Request) -> web.StreamResponse:
    """The Prometheus text exposition of this process's metrics."""
    operations = request.app[OPERATIONS]
    if operations.waiting_polls is not None:
        operations.metrics.long_polls_waiting.set(operations.waiting_polls())
    try:
        await asyncio.wait_for(_refresh_queues(operations), timeout=SCRAPE_TIMEOUT_S)
    except (BatonError, TimeoutError) as exc:
        log.debug("queue gauges not refreshed: %s", exc)
        operations.metrics.set_queues(())
    response = web.Response(body=operations.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def _refresh_queues(operations: Operations) -> None:
    runtime = operations.runtime
    names = [n for n in await runtime.store.list_queues() if not n.startswith("@")]
    stats = await asyncio.gather(*(runtime.broker.stats(name) for name in names))
    operations.metrics.set_queues(zip(names, stats, strict=True))


def route_template(request: web.Request) -> str:
    """The canonical path template of the route a request matched, e.g.
    `/api/tasks/poll/batch/{taskType}`; `unmatched` when none did."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Observe each request's duration by method, route template and status.

    A request whose client went away before the answer counts as 499.
    """
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (ConnectionError, asyncio.CancelledError):
        status = 499
        raise
    finally:
        metrics = request.app[OPERATIONS].metrics
        metrics.child(
            metrics.http_duration, request.method, route_template(request), str(status)
        ).observe(time.monotonic() - started)


def add_health_routes(
    app: web.Application,
    runtime: Runtime,
    *,
    readiness: Readiness | None = None,
    metrics_: Metrics | None = None,
    waiting_polls: Callable[[], int] | None = None,
) -> Operations:
    """Serve `/health`, `/ready` and `/metrics` for `runtime` on `app`.

    `readiness` defaults to a started, not draining state; `metrics_` to
    the process's metrics. Returns what the endpoints read, so the caller
    can mark the service draining.
    """
    operations = Operations(
        runtime=runtime,
        readiness=readiness or Readiness(),
        metrics=metrics_ or METRICS,
        waiting_polls=waiting_polls,
    )
    app[OPERATIONS] = operations
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return operations
