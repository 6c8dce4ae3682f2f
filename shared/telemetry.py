"""OpenTelemetry tracing: opt-in setup and the HTTP server middleware.

Tracing is on only when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is
not `true`). Then `setup_tracing` builds a `TracerProvider` exporting
OTLP over HTTP in batches, named by `OTEL_SERVICE_NAME` or the service's
default. Otherwise it returns None: no provider is built, the backends
are not wrapped (see `shared.runtime`) and the middleware passes requests
straight through, so tracing that is off costs nothing.

Everything here takes its provider as an argument so that tests can
trace into their own in-memory provider without touching global state.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

log = logging.getLogger(__name__)

TRACER_NAME = "baton"
"""The instrumentation scope of every span Baton makes."""

PROPAGATOR = TraceContextTextMapPropagator()
"""W3C trace context (`traceparent`, `tracestate`), used everywhere."""

_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_installed: TracerProvider | None = None
_install_lock = threading.Lock()


def tracing_configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def build_provider(
    service_name: str, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A provider exporting OTLP/HTTP in batches, configured by `environ`.

    The exporter reads its endpoint, headers, timeout and compression from
    the standard `OTEL_EXPORTER_OTLP_*` variables; `environ`, when given,
    supplies the endpoint instead of the process environment.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter,
    )

    env = os.environ if environ is None else environ
    name = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}), shutdown_on_exit=False
    )
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        endpoint = base.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint)))
    return provider


def setup_tracing(
    service_name: str,
    environ: Mapping[str, str] | None = None,
    *,
    install: bool = True,
) -> TracerProvider | None:
    """Build the process's tracer provider, or return None when off.

    With `install` (the default for services) the provider also becomes
    the global one, once per process: later calls return that same
    provider. Tests pass `install=False` and an explicit `environ` to get
    a private provider they flush and shut down themselves.
    """
    global _installed
    if not tracing_configured(environ):
        return None
    if not install:
        return build_provider(service_name, environ)
    with _install_lock:
        if _installed is None:
            _installed = build_provider(service_name, environ)
            trace.set_tracer_provider(_installed)
            log.info("tracing on: exporting OTLP over HTTP")
        return _installed


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Flush and stop `provider`'s exporters; a no-op for None.

    Blocking: call it from a thread when an event loop is running.
    """
    if provider is not None:
        provider.force_flush()
        provider.shutdown()


def get_tracer(provider: trace.TracerProvider | None) -> Tracer:
    """Baton's tracer from `provider`, or from the global provider if None."""
    if provider is None:
        return trace.get_tracer(TRACER_NAME)
    return provider.get_tracer(TRACER_NAME)


def tracing_middleware(
    provider: trace.TracerProvider | None = None,
) -> Middleware | None:
    """An aiohttp middleware making one SERVER span per request.

    Spans are named `{METHOD} {route template}`, children of an incoming
    W3C `traceparent`. A 5xx answer, or an exception that is not an HTTP
    answer, sets the ERROR status; a 4xx leaves the status unset. With
    `provider` None and no provider installed by `setup_tracing`, there is
    nothing to do and it returns None, so an untraced gateway has no layer
    for it. Install it first, outside the error mapper, so that it sees
    the final status.
    """
    if provider is None:
        provider = _installed
    if provider is None:
        return None

    tracer = get_tracer(provider)

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        parent = PROPAGATOR.extract(request.headers)
        method = request.method
        route = _route_template(request)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": request.path,
            "url.scheme": request.scheme,
        }
        if route is not None:
            attributes["http.route"] = route
        name = f"{method} {route}" if route is not None else method
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await handler(request)
            except web.HTTPException as answer:
                _record_status(span, answer.status)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
                raise
            _record_status(span, response.status)
            return response

    return traced


def _route_template(request: web.Request) -> str | None:
    """The matched route's template, such as `/api/tasks/{taskId}`."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return resource.canonical


def _record_status(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
