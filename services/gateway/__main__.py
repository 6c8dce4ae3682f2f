"""Run the gateway: `python -m services.gateway`."""

from __future__ import annotations

import logging

from aiohttp import web

from services.gateway.app import build_app
from services.health import Readiness
from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.runtime import Runtime
from shared.service import configure_logging, run, wait_for_stop_signal

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    """Serve the REST API until SIGTERM; with the embedded broker (or when
    asked) the background service runs in the same process.

    On SIGTERM the gateway stops listening, answers waiting polls empty and
    new polls 503, lets in-flight requests finish for up to
    `shutdown_grace_seconds`, then closes the backends and returns.
    """
    runtime = Runtime(settings, service_name="baton-gateway")
    await runtime.start()
    scheduler = None
    if settings.run_scheduler or runtime.embedded_broker:
        scheduler = Scheduler(runtime)
        await scheduler.start()
    readiness = Readiness()
    runner = web.AppRunner(
        build_app(runtime, readiness=readiness),
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("gateway listening on %s:%d", settings.host, settings.port)
    try:
        await wait_for_stop_signal()
        log.info("stopping: answering waiting polls and refusing new ones")
    finally:
        readiness.draining = True
        await runner.cleanup()
        if scheduler:
            await scheduler.stop()
        await runtime.stop()


def main() -> None:
    """Console entry point."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    run(serve(settings))


if __name__ == "__main__":
    main()
