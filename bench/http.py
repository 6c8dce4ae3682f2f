"""A minimal HTTP/1.1 keep-alive client for the bench's load processes.

The load runs on the same two cores as the gateway and RabbitMQ, so every
microsecond a client spends per request is taken from what is measured.
This client does only what the bench needs: one request at a time per
connection, bodies framed by Content-Length (as the gateway sends them),
connections reused from a pool. A full client costs about four times as
much CPU per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server answered something this client does not read."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `request` may not be called concurrently."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._head: tuple[int, int, bool] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except ProtocolError as exc:
            self._fail(exc)
            self.close()

    async def request(self, message: bytes) -> tuple[int, bytes]:
        if self.closed or self._transport is None:
            raise ConnectionResetError("connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(message)
        return await self._answer

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    def _parse(self) -> None:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = self._read_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
        status, length, keep_alive = self._head
        if len(self._buffer) < length:
            return
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._head = None
        if not keep_alive:
            self.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((status, body))

    @staticmethod
    def _read_head(head: bytes) -> tuple[int, int, bool]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0]!r}")
        status = int(parts[1])
        length = 0
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ProtocolError("chunked responses are not supported")
            elif name == b"connection":
                keep_alive = value.strip().lower() == b"keep-alive"
        return status, length, keep_alive


class HttpClient:
    """A pool of keep-alive connections to one `http://host:port` origin.

    `connections` bounds the pool; 0 leaves it unbounded. Raises OSError
    (including ConnectionError) when a connection fails, TimeoutError
    when an answer takes longer than `timeout_s`, ProtocolError for an
    answer it cannot read.
    """

    def __init__(self, base_url: str, *, connections: int, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host:port URL, got {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = f"{self._host}:{self._port}".encode()
        self._timeout = timeout_s
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(connections) if connections > 0 else None

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send one request; return the status and the body."""
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(),
            path.encode(),
            self._authority,
        )
        if body is None:
            message = head + b"\r\n"
        else:
            framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            message = head + framing % len(body) + body
        if self._slots is None:
            return await self._send(message)
        async with self._slots:
            return await self._send(message)

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.popleft().close()

    async def _send(self, message: bytes) -> tuple[int, bytes]:
        connection = await self._connection()
        try:
            async with asyncio.timeout(self._timeout):
                answer = await connection.request(message)
        except BaseException:
            connection.close()
            raise
        if not connection.closed:
            self._idle.append(connection)
        return answer

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Connection, self._host, self._port)
        return protocol
