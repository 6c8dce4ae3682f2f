"""Token authentication for the gateway's API.

Off unless API keys are configured. When on, `POST /api/token` trades
`{"keyId", "keySecret"}` for `{"token"}`, and every route outside
`PUBLIC_ROUTES` answers 401 without a valid token in `X-Authorization`.
When off, `POST /api/token` is not served: the official SDKs take its 404
for an open server, as they do with Conductor OSS.

A 401 names its cause in `code` and `error`: INVALID_TOKEN or
EXPIRED_TOKEN, on which the SDKs fetch a new token and retry once, or
INVALID_CREDENTIALS from `/api/token` itself, on which they back off.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from services.gateway.http import decode_body, json_response
from services.health import route_template
from shared.auth import Authenticator, InvalidToken
from shared.config import Settings
from shared.errors import Unauthorized

log = logging.getLogger(__name__)

TOKEN_ROUTE = "/api/token"
HEADER = "X-Authorization"
PUBLIC_ROUTES = frozenset({"/health", "/ready", "/metrics", "/api-docs", TOKEN_ROUTE})
"""Route templates served without a token, besides those under `/api-docs/`."""

_PUBLIC_PREFIX = "/api-docs/"
_EXCHANGES_AT_ONCE = 4
"""Secret checks running at once; each holds 16 MiB for tens of ms."""

_LOGGED_CHARS = 128


class TokenRequest(msgspec.Struct, kw_only=True):
    """The body of `POST /api/token`, as the SDKs send it."""

    keyId: str
    keySecret: str


class TokenResponse(msgspec.Struct, kw_only=True):
    """The answer to `POST /api/token`."""

    token: str


@dataclass(slots=True)
class Auth:
    """What the authentication of one application uses."""

    authenticator: Authenticator
    exchanges: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(_EXCHANGES_AT_ONCE)
    )


AUTH = web.AppKey("auth", Auth)


def add_auth(app: web.Application, settings: Settings) -> None:
    """Turn token authentication on for `app` if `settings` has API keys:
    serve `POST /api/token` and let `require_token` check every request."""
    if not settings.auth_keys:
        log.info("API authentication is off: no keys are configured")
        return
    app[AUTH] = Auth(
        Authenticator(
            dict(settings.auth_keys),
            settings.auth_signing_key,
            settings.auth_token_ttl_seconds,
        )
    )
    app.router.add_post(TOKEN_ROUTE, issue_token)
    log.info(
        "API authentication is on: %d keys, tokens valid for %d s",
        len(settings.auth_keys),
        settings.auth_token_ttl_seconds,
    )


def is_public(request: web.Request) -> bool:
    """True for the routes anyone may call: health, readiness, metrics,
    the API description and the token exchange.

    Decided by the route the request matched, never by its raw path, so
    no spelling of a path reaches a private route as a public one.
    """
    resource = request.match_info.route.resource
    if resource is None:
        return False
    template = resource.canonical
    return template in PUBLIC_ROUTES or template.startswith(_PUBLIC_PREFIX)


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a request outside the public routes unless it carries a
    valid token, while authentication is on.

    Raises InvalidToken or ExpiredToken (401).
    """
    auth = request.app.get(AUTH)
    if auth is None or is_public(request):
        return await handler(request)

    token = request.headers.get(HEADER)
    try:
        if not token:
            raise InvalidToken(f"the {HEADER} header is missing")
        auth.authenticator.authenticate(token)
    except InvalidToken as exc:
        _log_refusal(request, exc)
        raise
    return await handler(request)


async def issue_token(request: web.Request) -> web.Response:
    """`POST /api/token`: a token for a keyId and its secret.

    Raises BadRequest (malformed body) or InvalidCredentials (401).
    """
    body = await decode_body(request, TokenRequest)
    auth = request.app[AUTH]
    async with auth.exchanges:
        try:
            token = await asyncio.to_thread(
                auth.authenticator.exchange, body.keyId, body.keySecret
            )
        except Unauthorized as exc:
            _log_refusal(request, exc, key_id=body.keyId)
            raise
    log.info("issued a token to key %s", body.keyId)
    return json_response(TokenResponse(token=token))


def _log_refusal(
    request: web.Request, exc: Unauthorized, *, key_id: str | None = None
) -> None:
    """Log a refused request without its token or secret."""
    log.warning(
        "refused %s %s from %s%s: %s (%s)",
        request.method,
        route_template(request),
        request.remote,
        "" if key_id is None else f" for key {key_id[:_LOGGED_CHARS]!r}",
        exc.message,
        exc.code,
    )
