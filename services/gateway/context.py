"""What every gateway route reaches through the application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from services.gateway.dispatch import Dispatchers
from services.gateway.poller import Poller
from shared.config import Settings
from shared.engine import Engine
from shared.interfaces import Broker, Store
from shared.polldata import PollRecorder


@dataclass(slots=True)
class Context:
    """The gateway's collaborators, shared by all routes."""

    settings: Settings
    store: Store
    broker: Broker
    engine: Engine
    polls: PollRecorder
    dispatchers: Dispatchers
    poller: Poller


CONTEXT = web.AppKey("baton", Context)


def context(request: web.Request) -> Context:
    """Return the gateway context of a request."""
    return request.app[CONTEXT]
