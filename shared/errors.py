"""Baton's exception tree.

Every error the API can answer with derives from `BatonError`, which
carries the HTTP status it maps to. Adapter errors (aio-pika, PyMongo,
sqlite3, msgspec) are translated into this tree at the boundary.
"""

from __future__ import annotations

from typing import Any


class BatonError(Exception):
    """Root of Baton's errors; `status` is the HTTP status it answers with."""

    status = 500
    code = "INTERNAL"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        invalid_value: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.invalid_value = invalid_value


class BadRequest(BatonError):
    """The request is malformed or fails validation (400)."""

    status = 400
    code = "INVALID_INPUT"


class Unauthorized(BatonError):
    """The request carries no valid credentials (401); `code` names why."""

    status = 401
    code = "UNAUTHORIZED"


class NotFound(BatonError):
    """The named task, workflow or definition does not exist (404)."""

    status = 404
    code = "NOT_FOUND"


class Conflict(BatonError):
    """The resource exists already (409)."""

    status = 409
    code = "CONFLICT"


class PayloadTooLarge(BatonError):
    """The request body is over the configured limit (413)."""

    status = 413
    code = "PAYLOAD_TOO_LARGE"


class TooManyRequests(BatonError):
    """The gateway holds as many requests of this kind as it allows (429);
    `retry_after` is the number of seconds a client should wait."""

    status = 429
    code = "TOO_MANY_REQUESTS"
    retryable = True
    retry_after = 1


class Unavailable(BatonError):
    """A backend (broker or store) cannot be reached right now (503)."""

    status = 503
    code = "UNAVAILABLE"
    retryable = True


class StoreError(Unavailable):
    """The store failed or is unreachable."""


class BrokerError(Unavailable):
    """The broker failed or is unreachable."""


class DuplicateKey(BatonError):
    """An insert hit an existing key; raised by stores, never answered."""

    status = 409
    code = "CONFLICT"
