"""A TCP proxy that a fault scenario puts between a service and a backend.

The service connects to the proxy's port instead of the backend's. The
proxy forwards bytes both ways until told otherwise:

- `cut()` resets every open connection (RST, as a dropped link or a
  crashed peer looks) and refuses new ones until `restore()`;
- `slow(latency_s)` holds every chunk for that long before passing it on,
  in order, without throttling bandwidth: a long, thin link;
- `stall()` keeps every connection open and passes nothing on, as a
  frozen peer or a route that drops packets silently does.

A connection that fails in one direction is reset in both, as a real one
would be; a proxy never swallows one direction while the other lives.

`forwarded(pattern)` waits until bytes containing `pattern` have been
passed on toward the backend (`upstream`) or toward the service, so a
test can act at a known point of a protocol exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 64 << 10


@dataclass(eq=False)
class _Link:
    """One proxied connection: the service's side and the backend's."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            _reset(writer)
        for pump in self.pumps:
            pump.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST instead of an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.latency_s = 0.0
        self.refusing = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._watches: list[tuple[bytes, bool, asyncio.Future[None]]] = []
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and reset whatever is still connected."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._reset_all()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `restore()`."""
        self.refusing = True
        self.cuts += 1
        self._reset_all()

    def slow(self, latency_s: float) -> None:
        """Delay every chunk by `latency_s` in both directions."""
        self.latency_s = latency_s

    def stall(self) -> None:
        """Pass nothing on, in either direction, until `restore()`."""
        self._flowing.clear()

    def restore(self) -> None:
        """Accept connections again and forward without delay."""
        self.refusing = False
        self.latency_s = 0.0
        self._flowing.set()

    async def forwarded(self, pattern: bytes, *, upstream: bool) -> None:
        """Wait until a chunk containing `pattern` is passed on from now."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watch = (pattern, upstream, future)
        self._watches.append(watch)
        try:
            await future
        finally:
            self._watches.remove(watch)

    def _seen(self, chunk: bytes, upstream: bool) -> None:
        for pattern, direction, future in self._watches:
            if direction == upstream and pattern in chunk and not future.done():
                future.set_result(None)

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    def _reset_all(self) -> None:
        links, self._links = self._links, set()
        for link in links:
            link.reset()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.refusing:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(link, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, upstream=False)),
        ]
        await asyncio.gather(*link.pumps, return_exceptions=True)
        if link in self._links:
            self._links.discard(link)
            for side in (writer, up_writer):
                side.close()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        """Copy one direction; a delay is applied per chunk, in order."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(held, writer, upstream))
        try:
            while chunk := await reader.read(_CHUNK):
                if sender.done():
                    break
                held.put_nowait((loop.time() + self.latency_s, chunk))
            else:
                held.put_nowait((loop.time() + self.latency_s, b""))
                await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
        if sender.done() and not sender.cancelled() and sender.exception():
            self._links.discard(link)
            link.reset()

    async def _send(
        self,
        held: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await held.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not chunk:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
                return
            writer.write(chunk)
            self._seen(chunk, upstream)
            await writer.drain()
