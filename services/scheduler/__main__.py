"""Run the background service: `python -m services.scheduler`."""

from __future__ import annotations

import logging

from aiohttp import web

from services.health import Readiness, add_health_routes, timed
from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.runtime import Runtime
from shared.service import configure_logging, run, wait_for_stop_signal

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    """Run the scheduler and its listener (`/health`, `/ready`, `/metrics`)
    until SIGTERM or SIGINT, then stop consuming and close the backends."""
    runtime = Runtime(settings, service_name="baton-scheduler")
    await runtime.start()
    scheduler = Scheduler(runtime)
    await scheduler.start()
    readiness = Readiness()
    app = web.Application(middlewares=[timed])
    add_health_routes(app, runtime, readiness=readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.scheduler_port).start()
    log.info("scheduler listening on %s:%d", settings.host, settings.scheduler_port)
    try:
        await wait_for_stop_signal()
        log.info("stopping")
    finally:
        readiness.draining = True
        await runner.cleanup()
        await scheduler.stop()
        await runtime.stop()


def main() -> None:
    """Console entry point."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    run(serve(settings))


if __name__ == "__main__":
    main()
