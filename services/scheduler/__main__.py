"""Run the background service: `python -m services.scheduler`."""

from __future__ import annotations

from aiohttp import web

from services.health import add_health_routes
from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.runtime import Runtime
from shared.service import configure_logging, run, wait_for_stop_signal


async def serve(settings: Settings) -> None:
    """Run the scheduler and its health listener until SIGTERM."""
    runtime = Runtime(settings)
    await runtime.start()
    scheduler = Scheduler(runtime)
    await scheduler.start()
    app = web.Application()
    add_health_routes(app, runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.scheduler_port).start()
    try:
        await wait_for_stop_signal()
    finally:
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
