"""The router's side toward the backends: a keep-alive pool per backend address
(``UpstreamPool``) and its connections (``UpstreamConnection``), each carrying one exchange
at a time."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from modelcd.routing.http1 import quickack

if TYPE_CHECKING:
    from modelcd.routing.forward import Exchange
    from modelcd.routing.options import Options


class UpstreamPool:
    """Keep-alive connections to one backend address (host, port); idle ones are reused
    newest first and closed after ``upstream_idle_timeout``."""

    def __init__(self, host: str, port: int, options: Options) -> None:
        self.host = host
        self.port = port
        self.options = options
        self.idle: list[UpstreamConnection] = []
        self.closed = False
        self.down_until = 0.0  # loop time until which requests skip this backend (0: up)

    def take(self) -> UpstreamConnection | None:
        """An idle open connection, or None."""
        while self.idle:
            conn = self.idle.pop()
            if conn.open:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
            self.options.connect_timeout)
        return conn

    def release(self, conn: UpstreamConnection, now: float) -> None:
        if self.closed or not conn.open or len(self.idle) >= self.options.max_idle_per_backend:
            conn.close()
            return
        conn.resume()
        conn.idle_since = now
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close_idle(self, older_than: float | None = None) -> None:
        """Close idle connections (all, or those idle since before ``older_than``)."""
        keep = []
        for conn in self.idle:
            if older_than is None or conn.idle_since < older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self) -> None:
        self.closed = True
        self.close_idle()


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend; carries one exchange at a time (no pipelining)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.open = False
        self.paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.pool.discard(self)
        if self.exchange is not None:
            self.exchange.upstream_lost()

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # bytes nobody asked for: the connection is not reusable
            self.close()
            return
        self.exchange.feed(data)

    def quickack(self) -> None:
        quickack(self.transport)

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()
