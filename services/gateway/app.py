"""The gateway's aiohttp application: routes, error handling, health,
readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web
from aiohttp.typedefs import Handler

from services.gateway import api_docs, metadata, tasks, workflows
from services.gateway.auth import add_auth, require_token
from services.gateway.context import CONTEXT, Context
from services.gateway.dispatch import Dispatchers
from services.gateway.http import json_response
from services.gateway.poller import Poller
from services.health import (
    OPERATIONS,
    Readiness,
    add_health_routes,
    timed,
)
from shared.errors import BatonError, TooManyRequests
from shared.metrics import Metrics
from shared.models import ErrorResponse, ValidationError
from shared.runtime import Runtime
from shared.telemetry import tracing_middleware

log = logging.getLogger(__name__)

_HOST = socket.gethostname()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    path: str | None = None,
    invalid_value: object = None,
    retryable: bool = False,
) -> web.Response:
    """Conductor's ErrorResponse body with the given status."""
    details = []
    if path is not None:
        detail = ValidationError(path=path, message=message)
        if invalid_value is not None:
            detail.invalidValue = invalid_value
        details.append(detail)
    body = ErrorResponse(
        status=status,
        message=message,
        instance=_HOST,
        retryable=retryable,
        validationErrors=details,
    )
    if code:
        body.code = code
        if status == 401:
            body.error = code
    return json_response(body, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with a JSON ErrorResponse."""
    try:
        return await handler(request)
    except BatonError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        response = error_response(
            exc.status,
            exc.message,
            code=exc.code,
            path=exc.path,
            invalid_value=exc.invalid_value,
            retryable=exc.retryable,
        )
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, code=exc.reason.upper())
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if _backend_failure(exc):
            log.warning("%s %s: backend failed: %r", request.method, request.path, exc)
            return error_response(
                503,
                f"a backend is unavailable: {type(exc).__name__}",
                code="UNAVAILABLE",
                retryable=True,
            )
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error", code="INTERNAL")


_ADAPTER_PACKAGES = frozenset({"pymongo", "aio_pika", "aiormq", "pamqp", "sqlite3"})


def _backend_failure(exc: Exception) -> bool:
    """True for a broker or store failure an adapter let through untranslated
    (a driver's own exception, a socket error or a timeout)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    return type(exc).__module__.partition(".")[0] in _ADAPTER_PACKAGES


def build_app(
    runtime: Runtime,
    *,
    readiness: Readiness | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """Create the gateway application over started backends.

    `readiness` (default: ready) is what `/ready` reports besides the
    backends; `metrics` defaults to the process's metrics.
    """
    settings = runtime.settings
    dispatchers = Dispatchers(
        runtime.broker, settings.prefetch, settings.consumer_linger_ms
    )
    # Each layer costs every request: the tracing and token layers are
    # there only when tracing and authentication are on.
    layers = [
        tracing_middleware(runtime.tracer_provider),
        timed,
        errors_as_json,
        require_token if settings.auth_keys else None,
    ]
    app = web.Application(
        middlewares=[layer for layer in layers if layer is not None],
        client_max_size=settings.max_body_bytes,
    )
    app[CONTEXT] = Context(
        settings=settings,
        store=runtime.store,
        broker=runtime.broker,
        engine=runtime.engine,
        polls=runtime.polls,
        dispatchers=dispatchers,
        poller=Poller(
            runtime.engine, dispatchers, runtime.polls, settings.max_waiting_polls
        ),
    )
    add_health_routes(
        app,
        runtime,
        readiness=readiness,
        metrics_=metrics,
        waiting_polls=lambda: dispatchers.waiting,
    )
    app.add_routes(tasks.routes)
    app.add_routes(metadata.routes)
    app.add_routes(workflows.routes)
    add_auth(app, settings)
    api_docs.add_route(app, settings)
    app.on_shutdown.append(_release_polls)
    return app


async def _release_polls(app: web.Application) -> None:
    """Stop taking polls, then answer the waiting ones empty."""
    app[OPERATIONS].readiness.draining = True
    await app[CONTEXT].dispatchers.close()
