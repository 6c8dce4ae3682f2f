"""Request parsing and response helpers shared by the gateway's routes."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from shared.errors import BadRequest, PayloadTooLarge
from shared.queues import check_name

_T = TypeVar("_T")
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}

NO_CONTENT = 204


def json_response(value: Any, status: int = 200) -> web.Response:
    """Encode `value` (Structs included) as a JSON response."""
    return web.Response(
        body=_encoder.encode(value), status=status, content_type="application/json"
    )


def text_response(text: str) -> web.Response:
    """A text/plain answer, as Conductor gives for ids and counts."""
    return web.Response(text=text, content_type="text/plain")


def encode(value: Any) -> bytes:
    """Encode a value as JSON bytes."""
    return _encoder.encode(value)


async def read_body(request: web.Request) -> bytes:
    """Read the whole body, translating an oversized one into a 413."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            f"request body is larger than {request.client_max_size} bytes"
        ) from exc


async def decode_body(request: web.Request, kind: type[_T]) -> _T:
    """Decode the JSON body as `kind`; BadRequest names the bad field."""
    body = await read_body(request)
    if not body.strip():
        raise BadRequest("request body is required", path="$")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        value: _T = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _bad_field(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}", path="$") from None
    return value


def _bad_field(message: str) -> BadRequest:
    match = _PATH.search(message)
    path = match.group(1) if match else None
    text = _PATH.sub("", message)
    if path:
        return BadRequest(f"{path}: {text}", path=path)
    return BadRequest(text, path="$")


def query_int(
    request: web.Request,
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """Read an integer query parameter within bounds, or raise BadRequest."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(
            f"{name} must be an integer", path=name, invalid_value=raw
        ) from None
    if minimum is not None and value < minimum:
        raise BadRequest(
            f"{name} must be at least {minimum}", path=name, invalid_value=value
        )
    if maximum is not None and value > maximum:
        raise BadRequest(
            f"{name} must be at most {maximum}", path=name, invalid_value=value
        )
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    """Read a boolean query parameter (`true`/`false`), or raise BadRequest."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise BadRequest(f"{name} must be true or false", path=name, invalid_value=raw)
    return lowered == "true"


def query_name(request: web.Request, name: str) -> str | None:
    """Read an optional task type or domain parameter, validated."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    return check_name(raw, name)


def path_name(request: web.Request, name: str) -> str:
    """Read a task type or domain from the path, validated."""
    return check_name(request.match_info[name], name)
