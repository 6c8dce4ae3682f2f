"""Health endpoints every Baton service serves."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from shared.errors import BatonError
from shared.models import ErrorResponse
from shared.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


async def health(request: web.Request) -> web.StreamResponse:
    """200 when the broker and the store answer, 503 otherwise."""
    runtime = request.app[RUNTIME]
    try:
        await asyncio.wait_for(
            asyncio.gather(runtime.store.ping(), runtime.broker.ping()), timeout=5
        )
    except (BatonError, TimeoutError) as exc:
        body = ErrorResponse(
            status=503,
            message=f"unhealthy: {exc}",
            code="UNAVAILABLE",
            retryable=True,
        )
        return web.Response(
            status=503,
            body=msgspec.json.encode(body),
            content_type="application/json",
        )
    return web.Response(body=b'{"healthy":true}', content_type="application/json")


def add_health_routes(app: web.Application, runtime: Runtime) -> None:
    """Serve `/health` for `runtime`."""
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
