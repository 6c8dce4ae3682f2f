"""API keys and tokens, end to end: a gateway on a real socket with auth
on (or off), the official Python SDK against it, and gateway processes
for start-up refusal and the refusal log."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from aiohttp.web import AbstractRoute
from conductor.client.configuration.configuration import Configuration
from conductor.client.configuration.settings.authentication_settings import (
    AuthenticationSettings,
)
from conductor.client.http.api.task_resource_api import TaskResourceApi
from conductor.client.http.api_client import ApiClient
from conductor.client.http.rest import AuthorizationException

from services.gateway.app import build_app
from services.gateway.auth import HEADER, PUBLIC_ROUTES
from shared.auth import KeyHash, TokenSigner
from shared.clock import now_ms
from shared.config import Settings
from tests.fixtures.processes import GatewayProcesses
from tests.services.conftest import Baton, unique
from tests.services.test_sdk import add_one, sdk_workers, wait_for_end

KEY_ID = "worker-key"
SECRET = "key-secret-that-must-never-be-logged-51c9"
SIGNING_KEY = "signing-key-that-must-never-be-logged-" + "z" * 16
TTL_SECONDS = 600


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The embedded backends unless a test asks for others: authentication
    happens before any request reaches them."""
    return str(getattr(request, "param", "embedded"))


@pytest.fixture(scope="module")
def key_hash() -> KeyHash:
    """The stored hash of SECRET (scrypt is slow on purpose: made once)."""
    return KeyHash.of(SECRET)


@pytest.fixture
def auth(request: pytest.FixtureRequest) -> bool:
    """Whether the gateway has an API key (default) or runs open."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def settings(settings: Settings, auth: bool, key_hash: KeyHash) -> Settings:
    """The backend's settings, with one API key while `auth` is on."""
    if not auth:
        return settings
    return dataclasses.replace(
        settings,
        auth_keys=((KEY_ID, key_hash),),
        auth_signing_key=SIGNING_KEY,
        auth_token_ttl_seconds=TTL_SECONDS,
    )


open_gateway = pytest.mark.parametrize("auth", [False], indirect=True)


async def exchange(
    baton: Baton, key_id: str = KEY_ID, secret: str = SECRET
) -> tuple[int, Any]:
    """POST /api/token as the SDKs do."""
    return await baton.request(
        "POST", "/token", json={"keyId": key_id, "keySecret": secret}
    )


async def sign_in(baton: Baton) -> str:
    """Get a token and send it with every later request of `baton`."""
    status, body = await exchange(baton)
    assert status == 200, body
    token: str = body["token"]
    baton.session.headers[HEADER] = token
    return token


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def assert_refused(status: int, body: Any, code: str) -> None:
    """A 401 Conductor ErrorResponse naming `code` for the SDKs."""
    assert status == 401, body
    assert body["status"] == 401
    assert body["code"] == body["error"] == code
    assert body["message"]
    assert body["retryable"] is False


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The warnings the gateway's authentication logged."""
    return [
        record
        for record in caplog.records
        if record.name == "services.gateway.auth" and record.levelno == logging.WARNING
    ]


# The token exchange.


async def test_key_and_secret_are_exchanged_for_a_jwt_naming_the_key(
    baton: Baton,
) -> None:
    status, body = await exchange(baton)

    assert status == 200, body
    assert set(body) == {"token"}
    claims = claims_of(body["token"])
    assert claims["sub"] == KEY_ID
    assert claims["exp"] - claims["iat"] == TTL_SECONDS


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [(KEY_ID, SECRET + "x"), (KEY_ID, ""), ("other-key", SECRET)],
    ids=["wrong-secret", "empty-secret", "unknown-key"],
)
async def test_wrong_key_or_secret_gets_401(
    baton: Baton, key_id: str, secret: str
) -> None:
    status, body = await exchange(baton, key_id, secret)
    assert_refused(status, body, "INVALID_CREDENTIALS")
    assert "token" not in body


async def test_token_request_without_a_secret_is_400(baton: Baton) -> None:
    status, body = await baton.request("POST", "/token", json={"keyId": KEY_ID})
    assert status == 400, body
    assert [e["path"] for e in body["validationErrors"]] == ["$"]
    assert "keySecret" in body["message"]


# Which routes need a token.


def concrete_path(route: AbstractRoute) -> str:
    """The route's path template with every variable filled in."""
    assert route.resource is not None
    template = route.resource.canonical
    return re.sub(r"\{[^}]+\}", "x1", template)


async def test_every_private_route_answers_401_without_a_token(
    baton: Baton,
) -> None:
    app = build_app(baton.runtime)
    private = []
    for route in app.router.routes():
        path = concrete_path(route)
        matched = await app.router.resolve(make_mocked_request(route.method, path))
        assert matched.route is route, f"{path} does not reach {route}"
        if route.resource is not None and route.resource.canonical in PUBLIC_ROUTES:
            continue
        private.append((route.method, path))

    assert len(private) >= 25
    for method, path in private:
        async with baton.session.request(method, f"{baton.url}{path}") as response:
            assert response.status == 401, f"{method} {path}"
            if method != "HEAD":
                assert_refused(401, await response.json(), "INVALID_TOKEN")


async def test_unknown_paths_answer_401_without_a_token(baton: Baton) -> None:
    status, body = await baton.request("GET", "/no/such/route")
    assert_refused(status, body, "INVALID_TOKEN")


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/api-docs"])
async def test_operational_routes_answer_without_a_token(
    baton: Baton, path: str
) -> None:
    async with baton.session.get(f"{baton.url}{path}") as response:
        assert response.status == 200, await response.text()


async def test_a_valid_token_opens_the_api(baton: Baton) -> None:
    await sign_in(baton)
    task_type = unique("authed")
    name = unique("wf")
    await baton.register_workflow(name, [task_type])
    await baton.start(name, {"x": 1})

    task = await baton.poll_until(task_type)
    status, _ = await baton.complete(task, {"value": 2})

    assert status == 200
    assert (await baton.workflow(task["workflowInstanceId"]))["status"] == "COMPLETED"


# Tokens that are refused.


def forged(token: str) -> str:
    """`token` with its claims rewritten for another key, signature kept."""
    header, _, signature = token.split(".")
    claims = {**claims_of(token), "sub": "admin"}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return f"{header}.{payload.decode()}.{signature}"


def expired() -> str:
    """A token signed with the gateway's key whose `exp` has passed."""
    now = now_ms() // 1000
    signer = TokenSigner(SIGNING_KEY.encode(), TTL_SECONDS)
    return signer.issue(KEY_ID, now=now - TTL_SECONDS - 1)


BAD_TOKENS = {
    "missing": (lambda token: None, "INVALID_TOKEN"),
    "empty": (lambda token: "", "INVALID_TOKEN"),
    "malformed": (lambda token: "not a token", "INVALID_TOKEN"),
    "tampered": (forged, "INVALID_TOKEN"),
    "truncated-signature": (lambda token: token[:-2], "INVALID_TOKEN"),
    "other-signing-key": (
        lambda token: TokenSigner(b"k" * 40, TTL_SECONDS).issue(KEY_ID),
        "INVALID_TOKEN",
    ),
    "bearer-prefix": (lambda token: f"Bearer {token}", "INVALID_TOKEN"),
    "expired": (lambda token: expired(), "EXPIRED_TOKEN"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401_and_are_logged_without_the_token(
    baton: Baton, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, good = await exchange(baton)
    make, code = BAD_TOKENS[kind]
    token = make(good["token"])
    headers = {} if token is None else {HEADER: token}

    with caplog.at_level(logging.WARNING, logger="services.gateway.auth"):
        status, body = await baton.request(
            "GET", f"/tasks/poll/batch/{unique('t')}", headers=headers
        )

    assert_refused(status, body, code)
    (record,) = refusals(caplog)
    assert record.levelno == logging.WARNING
    assert code in record.getMessage()
    assert "/api/tasks/poll/batch/{taskType}" in record.getMessage()
    if token:
        assert token not in record.getMessage()
        assert good["token"] not in record.getMessage()


# The official Python SDK.


@pytest.mark.parametrize("backend", ["embedded", "rabbitmq"], indirect=True)
async def test_sdk_with_a_key_completes_a_workflow(
    baton: Baton, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sign_in(baton)
    types = [unique("sdk_auth_a"), unique("sdk_auth_b")]
    name = unique("sdk_wf")
    await baton.register_workflow(
        name, types, outputParameters={"result": "${t1.output.value}"}
    )
    monkeypatch.setenv("CONDUCTOR_AUTH_KEY", KEY_ID)
    monkeypatch.setenv("CONDUCTOR_AUTH_SECRET", SECRET)

    async with sdk_workers(baton, monkeypatch, dict.fromkeys(types, add_one)):
        workflow_id = await baton.start(name, {"x": 40})
        workflow = await wait_for_end(baton, workflow_id)

    assert workflow["status"] == "COMPLETED"
    assert workflow["output"] == {"result": 42}


def sdk_poll(api: str, secret: str, token: str | None = None) -> tuple[Any, Any]:
    """Batch-poll through the SDK's own client, keyed with KEY_ID and
    `secret`; if `token` is given, the SDK starts out holding it.
    Returns what the poll answered and the token the SDK holds after."""
    configuration = Configuration(
        server_api_url=api,
        authentication_settings=AuthenticationSettings(
            key_id=KEY_ID, key_secret=secret
        ),
    )
    client = ApiClient(configuration)
    try:
        if token is not None:
            configuration.update_token(token)
        tasks = TaskResourceApi(client).batch_poll(
            "sdk_nothing_here", workerid="sdk", count=1, timeout=1
        )
        return tasks, configuration.AUTH_TOKEN
    finally:
        client.rest_client.close()


async def test_sdk_renews_an_expired_token_and_retries(
    baton: Baton, caplog: pytest.LogCaptureFixture
) -> None:
    stale = expired()
    loop = asyncio.get_running_loop()

    with caplog.at_level(logging.WARNING, logger="services.gateway.auth"):
        tasks, held = await loop.run_in_executor(
            None, sdk_poll, baton.api, SECRET, stale
        )

    assert tasks == []
    assert held != stale
    assert claims_of(held)["sub"] == KEY_ID
    (refusal,) = refusals(caplog)
    assert "EXPIRED_TOKEN" in refusal.getMessage()


async def test_sdk_with_a_wrong_secret_is_refused(baton: Baton) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(AuthorizationException) as refused:
        await loop.run_in_executor(None, sdk_poll, baton.api, SECRET + "x")
    assert refused.value.status == 401


# Auth off.


@open_gateway
async def test_token_route_is_404_while_auth_is_off(baton: Baton) -> None:
    status, body = await exchange(baton)
    assert status == 404, body
    assert body["status"] == 404
    assert "error" not in body


@open_gateway
async def test_sdk_with_a_key_falls_back_to_open_mode_while_auth_is_off(
    baton: Baton,
) -> None:
    loop = asyncio.get_running_loop()
    tasks, held = await loop.run_in_executor(None, sdk_poll, baton.api, SECRET)
    assert tasks == []
    assert held is None


# Gateway processes.


def auth_env(key_hash: KeyHash, tmp_path: Path) -> dict[str, str]:
    return {
        "BATON_SQLITE_PATH": str(tmp_path / "auth.db"),
        "BATON_AUTH_KEYS": f"{KEY_ID}:{key_hash}",
        "BATON_AUTH_SIGNING_KEY": SIGNING_KEY,
    }


async def test_gateway_with_keys_but_no_signing_key_refuses_to_start(
    gateway_processes: GatewayProcesses, key_hash: KeyHash, tmp_path: Path
) -> None:
    env = auth_env(key_hash, tmp_path)
    del env["BATON_AUTH_SIGNING_KEY"]

    gateway = gateway_processes.launch("unsigned", env)

    assert await gateway.wait_exit(30) != 0
    assert "ConfigError" in gateway.log()
    assert "BATON_AUTH_SIGNING_KEY must be set" in gateway.log()


async def test_refusals_are_json_warnings_without_secrets_or_tokens(
    gateway_processes: GatewayProcesses, key_hash: KeyHash, tmp_path: Path
) -> None:
    gateway = await gateway_processes.start("auth", auth_env(key_hash, tmp_path))
    api = f"{gateway.url}/api"
    poll = f"{api}/tasks/poll/batch/{unique('t')}"
    async with aiohttp.ClientSession() as session:
        wrong = {"keyId": KEY_ID, "keySecret": SECRET[::-1]}
        async with session.post(f"{api}/token", json=wrong) as response:
            assert response.status == 401
        right = {"keyId": KEY_ID, "keySecret": SECRET}
        async with session.post(f"{api}/token", json=right) as response:
            token = (await response.json())["token"]
        for sent in (forged(token), expired()):
            async with session.get(poll, headers={HEADER: sent}) as response:
                assert response.status == 401
        async with session.get(poll, headers={HEADER: token}) as response:
            assert response.status == 200

    log = gateway.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    warnings = [
        e
        for e in entries
        if e["logger"] == "services.gateway.auth" and e["level"] == "WARNING"
    ]
    assert [w["message"].rsplit(" ", 1)[1] for w in warnings] == [
        "(INVALID_CREDENTIALS)",
        "(INVALID_TOKEN)",
        "(EXPIRED_TOKEN)",
    ]
    assert f"key '{KEY_ID}'" in warnings[0]["message"]
    for secret in (SECRET, SECRET[::-1], SIGNING_KEY, forged(token)):
        assert secret not in log
    for part in token.split(".")[1:]:
        assert part not in log
