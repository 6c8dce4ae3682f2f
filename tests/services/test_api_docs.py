"""`GET /api-docs` describes every route the gateway serves, and only those."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from services.gateway.api_docs import document
from services.gateway.app import build_app
from shared.config import Settings
from shared.runtime import Runtime
from tests.services.conftest import Baton

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route the application serves."""
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    # aiohttp answers HEAD on a GET route by itself; HEAD is GET without the
    # body (RFC 9110), so the document describes the GET only.
    return {
        (method, path)
        for method, path in routes
        if not (method == "HEAD" and ("GET", path) in routes)
    }


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(method, path template) of every operation in an OpenAPI document."""
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in _METHODS
    }


@pytest.fixture
def offline_settings(tmp_path: Path) -> Settings:
    """Settings for an application that is built but never started."""
    return Settings(sqlite_path=str(tmp_path / "baton.db"))


def test_every_route_is_documented_and_every_operation_is_served(
    offline_settings: Settings,
) -> None:
    app = build_app(Runtime(offline_settings))
    served = served_routes(app)
    documented = documented_routes(document(offline_settings))
    assert served - documented == set(), "routes missing from /api-docs"
    assert documented - served == set(), "operations /api-docs has but no route"


def test_document_is_valid_openapi(offline_settings: Settings) -> None:
    validate(document(offline_settings))


def test_document_states_the_configured_limits(offline_settings: Settings) -> None:
    settings = dataclasses.replace(
        offline_settings, max_poll_count=7, max_poll_timeout_ms=250
    )
    poll = document(settings)["paths"]["/api/tasks/poll/batch/{taskType}"]["get"]
    schemas = {p["name"]: p["schema"] for p in poll["parameters"]}
    assert schemas["count"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 7,
        "default": 1,
    }
    assert schemas["timeout"]["maximum"] == 250
    assert "429" in poll["responses"]


def test_operations_are_uniquely_identified(offline_settings: Settings) -> None:
    doc = document(offline_settings)
    ids = [
        operation["operationId"]
        for item in doc["paths"].values()
        for operation in item.values()
    ]
    assert len(ids) == len(set(ids))


async def test_document_is_served_without_the_api_prefix(baton: Baton) -> None:
    async with baton.session.get(f"{baton.url}/api-docs") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        served = await response.json()
    assert served == document(baton.runtime.settings)
