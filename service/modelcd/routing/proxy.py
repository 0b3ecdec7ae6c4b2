"""The built-in router process: a small HTTP/1.1 reverse proxy in front of the scoring
deployments, run as its own process so it keeps serving while the control plane is down.

    python -m modelcd.routing.proxy --table PATH --host 127.0.0.1 --port 8700

``ANY /{model}/{env}/{rest}`` goes to ``{backend.url}/{rest}`` of a backend picked by weight;
``/-/healthz``, ``/-/table`` and ``POST /-/reload`` are the admin routes (model names cannot
start with '-'). The table comes from a JSON file that the control plane replaces atomically;
it is re-read on ``/-/reload``, on SIGHUP and when the file changes (polled), and an invalid
file leaves the old table serving. One table is one immutable ``_State``: a request takes the
reference once, so it sees the old or the new table, never a mix.

Implementation: asyncio protocols with ``httptools`` (llhttp) parsing both sides, uvloop when
installed, keep-alive connection pools to the backends; chosen by measurement (see
docs/benchmarks-router.md). Standard library + httptools (+ uvloop) only: it starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools

from modelcd.errors import InvalidInput
from modelcd.routing.base import Backend, RoutingTable, WeightedChoice

log = logging.getLogger("modelcd.router")

ADMIN_PREFIX = b"/-/"
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# Request headers the router reads or rewrites; all others pass through as they came.
_REQUEST_SPECIAL = HOP_BY_HOP | {b"content-length", b"expect", b"host", b"x-forwarded-for"}
RESPONSE_DROP = HOP_BY_HOP | {b"x-modelcd-version", b"x-modelcd-deployment"}
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
MAX_PIPELINED = 16  # requests queued on one client connection before we stop reading it

# Outcomes of one attempt to forward a request.
OK = "ok"  # a response was relayed to the client
RETRY = "retry"  # the backend failed before sending a byte: safe to send elsewhere
ABORT = "abort"  # the backend failed after sending something (cut or malformed response)
TIMEOUT = "timeout"  # no complete response in time


@dataclass(frozen=True)
class Options:
    """Settings of one router process (all from the command line)."""

    table: Path
    host: str = "127.0.0.1"
    port: int = 8700
    max_body: int = 64 * 1024 * 1024  # larger request bodies get 413
    connect_timeout: float = 5.0
    upstream_timeout: float = 300.0  # whole request to a backend; then 504
    client_idle_timeout: float = 75.0  # idle keep-alive client connections are closed after this
    upstream_idle_timeout: float = 4.0  # below common backend keep-alive timeouts (uvicorn: 5 s)
    poll_interval: float = 0.5  # how often the table file's identity is checked
    drain_timeout: float = 30.0  # SIGTERM waits this long for in-flight requests
    max_idle_per_backend: int = 64


class _TooLarge(Exception):
    """A request body passed the size cap."""


class Request:
    """One parsed client request, body fully read (scoring bodies are small and idempotent,
    so buffering makes a retry on another backend possible)."""

    __slots__ = ("body", "error", "forwarded_for", "has_host", "http10", "keep_alive", "lines", "method", "named",
                 "url")

    def __init__(self, method: bytes, url: bytes, body: bytes, keep_alive: bool, http10: bool,
                 error: tuple[int, str, str] | None = None) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.error = error  # (status, code, message) to answer instead of forwarding
        self.lines: list[bytes] = []  # end-to-end headers, formatted "Name: value\r\n"
        self.forwarded_for = b""  # the client's X-Forwarded-For, if any
        self.has_host = False
        self.named: set[bytes] | None = None  # extra hop-by-hop names from the Connection header


class Target:
    """A backend of the applied table, with its connection pool and precomputed headers."""

    __slots__ = ("backend", "host_line", "marks", "pool", "prefix")

    def __init__(self, backend: Backend, pool: UpstreamPool) -> None:
        parts = urlsplit(backend.url)
        self.backend = backend
        self.pool = pool
        self.prefix = parts.path.rstrip("/").encode()
        self.host_line = b"host: " + parts.netloc.encode() + b"\r\n"  # for clients that sent no Host
        self.marks = b"x-modelcd-version: %d\r\nx-modelcd-deployment: %s\r\n" % (
            backend.version, backend.id.encode())


class _State:
    """One applied table: the table itself and its routes keyed by b"model/env"."""

    __slots__ = ("routes", "table")

    def __init__(self, table: RoutingTable, routes: dict[bytes, WeightedChoice[Target]]) -> None:
        self.table = table
        self.routes = routes


class UpstreamPool:
    """Keep-alive connections to one backend address (host, port); idle ones are reused
    newest first and closed after ``upstream_idle_timeout``."""

    def __init__(self, host: str, port: int, options: Options) -> None:
        self.host = host
        self.port = port
        self.options = options
        self.idle: list[UpstreamConnection] = []
        self.closed = False

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
        _quickack(self.transport)

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


class Forward:
    """One client request on its way to a backend: picks the backend, and on failure before
    any response byte tries a fresh connection (when a pooled one was stale) and then one
    other backend of weight > 0. Answers the client with 502/504 when all that fails."""

    __slots__ = ("choice", "client", "fresh_tried", "has_host", "headers", "key", "other_tried", "req", "rest",
                 "server", "target")

    def __init__(self, server: RouterServer, client: ClientConnection, req: Request,
                 choice: WeightedChoice[Target], key: bytes, rest: bytes) -> None:
        self.server = server
        self.client = client
        self.req = req
        self.choice = choice
        self.key = key
        self.rest = rest
        self.headers, self.has_host = server.request_headers(client, req, key)
        self.fresh_tried = False
        self.other_tried = False
        self.target: Target | None = None

    def send(self, target: Target, fresh: bool = False) -> None:
        """Send to ``target`` on a pooled connection, or on a new one (connect in a task)."""
        self.target = target
        payload = b"".join((self.req.method, b" ", target.prefix, self.rest, b" HTTP/1.1\r\n", self.headers,
                            b"" if self.has_host else target.host_line, b"\r\n", self.req.body))
        conn = None if fresh else target.pool.take()
        if conn is not None:
            Exchange(self, conn, True).start(payload)
        else:
            self.server.loop.create_task(self._connect(target, payload))

    async def _connect(self, target: Target, payload: bytes) -> None:
        try:
            conn = await target.pool.connect()
        except (OSError, TimeoutError):
            self.attempt_done(None, RETRY)
            return
        Exchange(self, conn, False).start(payload)

    def attempt_done(self, exchange: Exchange | None, outcome: str) -> None:
        """Called once per attempt: retry, fail over, or settle the request."""
        target, client, req, key = self.target, self.client, self.req, self.key
        assert target is not None
        if outcome == RETRY:
            if exchange is not None and exchange.reused and not self.fresh_tried:
                self.fresh_tried = True  # a stale keep-alive connection; its siblings likely too
                target.pool.close_idle()
                self.send(target, fresh=True)
                return
            other = None if self.other_tried else self.choice.pick_other(random.random(), target)
            if other is not None:
                log.warning("backend %s of %s unreachable; retrying on %s",
                            target.backend.id, key.decode("latin-1"), other.backend.id)
                self.other_tried = True
                self.fresh_tried = False
                self.send(other)
                return
            log.warning("no backend of %s reachable", key.decode("latin-1"))
            client.respond_error(req, 502, "bad_gateway", f"no backend of {key.decode('latin-1')!r} answered")
        elif outcome != OK and exchange is not None and exchange.flushed:
            log.warning("backend %s: response %s midway; closing the client connection",
                        target.backend.id, "timed out" if outcome == TIMEOUT else "cut")
            client.closing = True
        elif outcome == TIMEOUT:
            client.respond_error(req, 504, "gateway_timeout", "the backend did not answer in time")
        elif outcome == ABORT:
            client.respond_error(req, 502, "bad_gateway", "the backend's response was cut or malformed")
        client.request_done()


class Exchange:
    """One attempt: the request sent to one backend over one connection, and the response
    relayed to the client as it comes. Also the callback target of the response parser."""

    __slots__ = ("chunked", "chunked_in", "client", "complete", "conn", "flushed", "forward", "framed",
                 "has_length", "headers_done", "informational", "no_body", "out", "parser", "received", "req",
                 "reusable", "reused", "started", "target")

    def __init__(self, forward: Forward, conn: UpstreamConnection, reused: bool) -> None:
        self.forward = forward
        self.client = forward.client
        self.req = forward.req
        self.target: Target = forward.target  # type: ignore[assignment]
        self.conn = conn
        self.reused = reused  # the connection served earlier requests (it may have gone stale)
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.received = False  # any byte came back: no retry from here on
        self.headers_done = False
        self.flushed = False  # something reached the client: no error response possible
        self.informational = False
        self.no_body = False
        self.chunked = False  # we chunk-encode the body to the client
        self.framed = True  # the backend's response has Content-Length or chunked framing
        self.has_length = False  # ... Content-Length
        self.chunked_in = False  # ... chunked
        self.complete = False  # the whole response was parsed
        self.reusable = False  # ... and the connection may carry another request
        self.started = 0.0

    def start(self, payload: bytes) -> None:
        server = self.forward.server
        self.started = server.loop.time()
        server.inflight.add(self)
        self.conn.exchange = self
        self.client.exchange = self
        if self.conn.open:
            self.conn.transport.write(payload)  # type: ignore[union-attr]
        else:
            self.finish(RETRY)

    def feed(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            log.warning("backend %s sent a bad response: %s", self.target.backend.id, e)
            self.finish(ABORT)
            return
        if self.out:
            self.flush()
        if self.complete:
            self.finish(OK)
        else:
            self.conn.quickack()

    # -- response parser callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        self.informational = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # trailers of a chunked body: dropped
        lname = name.lower()
        if lname in RESPONSE_DROP:
            if lname == b"transfer-encoding":
                self.chunked_in = b"chunked" in value.lower()
            return
        if lname == b"content-length":
            self.has_length = True
        self.out.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.informational = True  # 100 Continue and friends: wait for the real response
            self.out = []
            self.has_length = self.chunked_in = False
            return
        self.headers_done = True
        lines, self.out = self.out, []
        self.out.append(self._head(status, lines))
        if self.req.method == b"HEAD":
            self._mark_complete(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self.no_body:
            return
        if self.chunked:
            self.out.append(b"%x\r\n" % len(body))
            self.out.append(body)
            self.out.append(b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self._mark_complete(reusable=self.parser.should_keep_alive())

    # -------------------------------------------------------------------------------------
    def _mark_complete(self, reusable: bool) -> None:
        self.complete = True
        self.reusable = reusable

    def _head(self, status: int, headers: list[bytes]) -> bytes:
        """The response head for the client: the backend's end-to-end headers (already
        filtered), our framing, our version/deployment marks."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)), *headers]
        self.no_body = self.req.method == b"HEAD" or status in (204, 304)
        self.framed = self.no_body or self.chunked_in or self.has_length
        client = self.client
        if not self.no_body and not self.has_length:
            if self.req.http10:
                client.closing = True  # the end of the body is the end of the connection
            else:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(self.target.marks)
        lines.append(client.connection_header(self.req))
        lines.append(b"\r\n")
        return b"".join(lines)

    def flush(self) -> None:
        out, self.out = self.out, []
        self.flushed = True
        self.client.write(b"".join(out))

    def upstream_lost(self) -> None:
        """The backend closed the connection during this exchange."""
        if not self.received:
            self.finish(RETRY)
        elif self.headers_done and not self.framed:
            if self.chunked:  # close-delimited body: the close is its end
                self.out.append(b"0\r\n\r\n")
            self._mark_complete(reusable=False)
            self.flush()
            self.finish(OK)
        else:
            self.finish(ABORT)

    def timed_out(self) -> None:
        self.finish(TIMEOUT)

    def finish(self, outcome: str) -> None:
        """Settle the attempt exactly once: return the connection to its pool or close it,
        then let the Forward decide what happens next."""
        conn = self.conn
        if conn.exchange is not self:
            return
        del self.parser  # it holds our bound methods: break the cycle, so no GC work per request
        conn.exchange = None
        self.client.exchange = None
        server = self.forward.server
        server.inflight.discard(self)
        if outcome == OK and self.reusable:
            conn.pool.release(conn, server.loop.time())
        else:
            conn.close()
        self.forward.attempt_done(self, outcome)


def _quickack(transport: asyncio.BaseTransport | None) -> None:
    """ACK now. A peer that sends one message in two writes with Nagle on (Python's
    http.server writes head and body apart) would otherwise wait for our delayed ACK, about
    40 ms per message. Called only while a message is incomplete."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def _build_reasons() -> dict[int, bytes]:
    from http import HTTPStatus

    return {s.value: s.phrase.encode() for s in HTTPStatus}


_REASONS = _build_reasons()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests (keep-alive, pipelining, chunked bodies) and
    answers them in order, one at a time."""

    def __init__(self, server: RouterServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.busy = False  # a request is being answered
        self.exchange: Exchange | None = None  # the attempt in flight, for write backpressure
        self.closing = False  # close once the response being written is done
        self.lost = False
        self.reading = True
        self.in_message = False
        self.discarding = False  # after an unparseable request: drop input until we close
        self.dispatching = False
        self.last_active = 0.0
        self.peer = ""
        self.peer_bytes = b""
        self._url = b""
        self._req = Request(b"", b"", b"", False, False)
        self._body: list[bytes] = []
        self._size = 0
        self._has_body = False
        self._expect = False
        self._error: tuple[int, str, str] | None = None

    # -- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.peer_bytes = self.peer.encode()
        self.last_active = self.server.loop.time()
        self.server.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.clients.discard(self)
        if self.exchange is not None:
            self.exchange.conn.resume()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.loop.time()
        while data and not self.discarding:
            try:
                self.parser.feed_data(data)
                data = b""
            except httptools.HttpParserUpgrade as e:
                if self._error is not None:
                    self.discarding = True  # its 501 answer is queued (on_message_complete)
                else:
                    data = data[e.args[0]:]  # upgrade ignored, as HTTP allows: go on with HTTP/1.1
            except httptools.HttpParserCallbackError as e:
                if isinstance(e.__context__, _TooLarge):
                    self._reject(413, "payload_too_large",
                                 f"request body is larger than {self.server.options.max_body} bytes")
                else:
                    log.error("internal error parsing a request", exc_info=e.__context__)
                    self._reject(500, "internal_error", "the router failed; see its log")
            except httptools.HttpParserError as e:
                self._reject(400, "bad_request", f"malformed HTTP request: {e}")
        if self.in_message and not self.discarding:
            _quickack(self.transport)
        self._next()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.pause()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.resume()

    # -- request parser callbacks --------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_message = True
        self._url = b""
        self._req = Request(b"", b"", b"", False, False)
        self._body = []
        self._size = 0
        self._has_body = self._expect = False
        self._error = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname not in _REQUEST_SPECIAL:
            self._req.lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"host":
            self._req.has_host = True
            self._req.lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"content-length":
            if value.strip().isdigit() and int(value) > self.server.options.max_body:
                raise _TooLarge()
            self._has_body = self._has_body or value.strip() not in (b"0", b"")
        elif lname == b"transfer-encoding":
            self._has_body = True
        elif lname == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif lname == b"x-forwarded-for":
            self._req.forwarded_for = value + b", "
        elif lname == b"connection":
            named = {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b"upgrade"}
            if named:
                self._req.named = (self._req.named or set()) | named

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and (self._has_body or self.parser.get_method() == b"CONNECT"):
            # llhttp skips the body of an upgrade request, so we could not forward it whole;
            # a bodiless one (curl's h2c offer) is served as plain HTTP/1.1 instead.
            self._error = (501, "not_implemented", "protocol upgrades are not supported")
        elif self._expect and not self.busy and not self.queue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.options.max_body:
            raise _TooLarge()
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        parser = self.parser
        req = self._req
        req.method = parser.get_method()
        req.url = self._url
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req.keep_alive = parser.should_keep_alive()
        req.http10 = parser.get_http_version() == "1.0"
        req.error = self._error
        self.queue.append(req)
        if len(self.queue) >= MAX_PIPELINED and self.reading:
            self.reading = False
            self.transport.pause_reading()  # type: ignore[union-attr]

    # -------------------------------------------------------------------------------------
    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer a request we cannot parse or accept (after those queued before it), then
        close: the rest of the byte stream cannot be trusted, so it is read and dropped
        until then (closing with unread input would reset the connection before the client
        reads our answer)."""
        self.in_message = False
        self.discarding = True
        self.queue.append(Request(b"", b"", b"", False, False, (status, code, message)))

    def _next(self) -> None:
        """Answer queued requests in order, one at a time; re-entrant calls return at once."""
        if self.dispatching:
            return
        self.dispatching = True
        try:
            while not self.busy and self.queue and not self.closing and not self.lost:
                req = self.queue.popleft()
                if not self.reading and len(self.queue) < MAX_PIPELINED // 2 and not self.discarding:
                    self.reading = True
                    self.transport.resume_reading()  # type: ignore[union-attr]
                if not req.keep_alive or self.server.draining:
                    self.closing = True
                self.busy = True
                try:
                    self.server.dispatch(self, req)
                except Exception:
                    log.exception("internal error answering %r", req.url[:200])
                    self.closing = True
                    self.respond_error(req, 500, "internal_error", "the router failed; see its log")
                    self.busy = False
        finally:
            self.dispatching = False
        if not self.busy and self.closing and not self.lost:
            self._close()

    def request_done(self) -> None:
        """The current request was answered: go on with the next one."""
        self.busy = False
        self.last_active = self.server.loop.time()
        self._next()

    def _close(self) -> None:
        self.lost = True  # nothing more is written or read
        transport = self.transport
        if not self.discarding or not transport.can_write_eof():  # type: ignore[union-attr]
            transport.close()  # type: ignore[union-attr]
            return
        transport.write_eof()  # type: ignore[union-attr]
        self.server.loop.call_later(2.0, transport.close)  # type: ignore[union-attr]

    def idle(self) -> bool:
        return not self.busy and not self.queue and not self.in_message

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def connection_header(self, req: Request) -> bytes:
        if self.closing or not req.keep_alive or self.server.draining:
            self.closing = True
            return b"connection: close\r\n"
        return b"connection: keep-alive\r\n" if req.http10 else b""

    def respond(self, req: Request, status: int, body: bytes) -> None:
        """Write a complete response generated by the router itself."""
        self.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
            status, _reason(status), len(body), self.connection_header(req),
            b"" if req.method == b"HEAD" else body))

    def respond_json(self, req: Request, status: int, payload: dict[str, Any]) -> None:
        self.respond(req, status, json.dumps(payload).encode())

    def respond_error(self, req: Request, status: int, code: str, message: str) -> None:
        self.respond_json(req, status, {"error": code, "message": message})


class RouterServer:
    """The router: applied table, client connections, backend pools, admin routes."""

    def __init__(self, options: Options, loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.loop = loop
        self.clients: set[ClientConnection] = set()
        self.inflight: set[Exchange] = set()
        self.pools: dict[tuple[str, int], UpstreamPool] = {}
        self.state = _State(RoutingTable(0, {}), {})
        self.table_error: str | None = None
        self.file_id: tuple[int, int, int] | None = None
        self.draining = False
        self.ticks = 0

    # -- table ---------------------------------------------------------------------------
    def apply(self, table: RoutingTable) -> None:
        """Swap in ``table`` (one reference assignment), then drop pools nobody routes to."""
        routes: dict[bytes, WeightedChoice[Target]] = {}
        used: set[tuple[str, int]] = set()
        for key, route in table.endpoints.items():
            targets = []
            for backend in route.backends:
                parts = urlsplit(backend.url)
                addr = (parts.hostname or "127.0.0.1", parts.port or 80)
                used.add(addr)
                pool = self.pools.get(addr)
                if pool is None:
                    pool = self.pools[addr] = UpstreamPool(addr[0], addr[1], self.options)
                targets.append(Target(backend, pool))
            routes[key.encode()] = WeightedChoice(targets, [b.weight for b in route.backends])
        old = self.state.table.generation
        self.state = _State(table, routes)
        for addr in set(self.pools) - used:
            self.pools.pop(addr).close()
        log.info("applied table generation %d (was %d): %d endpoint(s)", table.generation, old, len(routes))

    def reload(self) -> int:
        """Re-read the table file and apply it; raise InvalidInput/OSError and keep the old
        table if it cannot be read or is invalid."""
        try:
            with open(self.options.table, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
            self.file_id = (st.st_ino, st.st_mtime_ns, st.st_size)
            table = RoutingTable.from_json(data)
        except (OSError, InvalidInput) as e:
            self.table_error = str(e)
            log.error("table %s not applied, generation %d keeps serving: %s",
                      self.options.table, self.state.table.generation, e)
            raise
        self.table_error = None
        self.apply(table)
        return table.generation

    def poll(self, force: bool = False) -> None:
        """Reload when the table file was replaced or changed since we last read it."""
        try:
            st = os.stat(self.options.table)
        except FileNotFoundError:
            return
        if force or (st.st_ino, st.st_mtime_ns, st.st_size) != self.file_id:
            try:
                self.reload()
            except (OSError, InvalidInput):
                pass  # logged; the old table keeps serving

    def tick(self) -> None:
        """Periodic work: poll the table file, time out slow backends, close idle connections."""
        if self.draining:
            return
        self.loop.call_later(self.options.poll_interval, self.tick)
        self.poll()
        now = self.loop.time()
        late = now - self.options.upstream_timeout
        for exchange in [e for e in self.inflight if e.started < late]:
            exchange.timed_out()
        self.ticks += 1
        if self.ticks % 4:
            return
        for pool in self.pools.values():
            pool.close_idle(older_than=now - self.options.upstream_idle_timeout)
        limit = now - self.options.client_idle_timeout
        for client in list(self.clients):
            if not client.busy and client.last_active < limit:
                client.transport.close()  # type: ignore[union-attr]

    # -- requests ------------------------------------------------------------------------
    def dispatch(self, client: ClientConnection, req: Request) -> None:
        """Start answering one request; ``client.request_done()`` is called once it is."""
        if req.error is not None:
            client.closing = True
            client.respond_error(req, *req.error)
            client.request_done()
            return
        url = req.url
        if url.startswith(ADMIN_PREFIX):
            self.admin(client, req)
            client.request_done()
            return
        path, sep, query = url.partition(b"?")
        parts = path.split(b"/", 3)
        choice, key = None, b""
        if len(parts) >= 3 and not parts[0] and parts[1] and parts[2]:
            key = parts[1] + b"/" + parts[2]
            choice = self.state.routes.get(key)  # the one read of the table for this request
        if choice is None:
            where = repr(key.decode("latin-1")) if key else "here: use /{model}/{env}/..."
            client.respond_error(req, 404, "not_found", f"no endpoint {where}")
            client.request_done()
            return
        target = choice.pick(random.random())
        if target is None:
            client.respond_error(req, 503, "no_backend",
                                 f"endpoint {key.decode('latin-1')!r} has no backend with weight > 0")
            client.request_done()
            return
        rest = b"/" + parts[3] if len(parts) == 4 else b"/"
        if sep:
            rest += b"?" + query
        Forward(self, client, req, choice, key, rest).send(target)

    @staticmethod
    def request_headers(client: ClientConnection, req: Request, key: bytes) -> tuple[bytes, bool]:
        """The request's headers as backends get them (end-to-end ones, forwarding headers, a
        known length; no blank line) and whether they hold a Host."""
        lines = req.lines
        if req.named:  # rare: headers the client declared hop-by-hop in Connection
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in req.named]
        out = [*lines, b"x-forwarded-for: ", req.forwarded_for, client.peer_bytes, b"\r\nx-forwarded-prefix: /",
               key, b"\r\n"]
        if req.body or req.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            out.append(b"content-length: %d\r\n" % len(req.body))
        return b"".join(out), req.has_host

    # -- admin ---------------------------------------------------------------------------
    def admin(self, client: ClientConnection, req: Request) -> None:
        """/-/healthz (anyone), /-/table and /-/reload (loopback clients only)."""
        path = req.url.partition(b"?")[0]
        method = req.method
        if path == b"/-/healthz" and method in (b"GET", b"HEAD"):
            client.respond_json(req, 200, self.health())
        elif path not in (b"/-/table", b"/-/reload"):
            client.respond_error(req, 404, "not_found", f"no admin route {path.decode('latin-1')!r}")
        elif not _is_loopback(client.peer):
            client.respond_error(req, 403, "forbidden", "admin routes answer loopback clients only")
        elif path == b"/-/table" and method in (b"GET", b"HEAD"):
            client.respond(req, 200, json.dumps(self.state.table.to_dict()).encode())
        elif path == b"/-/reload" and method == b"POST":
            try:
                client.respond_json(req, 200, {"generation": self.reload()})
            except (OSError, InvalidInput) as e:
                client.respond_json(req, 400, {"error": "invalid_table", "message": str(e),
                                               "generation": self.state.table.generation})
        else:
            client.respond_error(req, 405, "method_not_allowed", f"{method.decode('latin-1')} not allowed here")

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "router": "modelcd", "generation": self.state.table.generation,
                "pid": os.getpid(), "table": str(self.options.table), "table_error": self.table_error}

    # -- lifecycle -----------------------------------------------------------------------
    async def drain(self) -> None:
        """Graceful stop: new connections are refused by the caller; idle clients are closed
        now, busy ones after their response; wait (bounded) until all are gone."""
        self.draining = True
        deadline = self.loop.time() + self.options.drain_timeout
        while self.clients and self.loop.time() < deadline:
            for client in list(self.clients):
                if client.idle():
                    client.transport.close()  # type: ignore[union-attr]
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            client.transport.abort()  # type: ignore[union-attr]
        for pool in self.pools.values():
            pool.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == ""  # a Unix socket


async def serve(options: Options) -> int:
    """Run the router until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    server = RouterServer(options, loop)
    if options.table.exists():
        try:
            server.reload()
        except (OSError, InvalidInput):
            pass  # logged; start empty (every endpoint 404) and keep polling the file
    else:
        log.warning("no table at %s yet; serving an empty table until it appears", options.table)
    try:
        listener = await loop.create_server(lambda: ClientConnection(server), options.host, options.port,
                                            backlog=1024, reuse_address=True)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", options.host, options.port, e)
        return 2
    gc.freeze()  # what exists now lives as long as the process: keep it out of GC scans
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.poll, True)
    loop.call_later(options.poll_interval, server.tick)
    log.info("router pid %d listening on %s:%d, table %s, loop %s", os.getpid(), options.host, options.port,
             options.table, type(loop).__module__)
    await stop.wait()
    log.info("stopping: draining %d connection(s)", len(server.clients))
    listener.close()
    await server.drain()
    log.info("stopped")
    return 0


def _loop_factory(name: str) -> Any:
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
            return None
        return uvloop.new_event_loop
    return None


def parse_args(argv: list[str] | None = None) -> tuple[Options, str]:
    """Options and the event-loop choice from the command line."""
    p = argparse.ArgumentParser(prog="python -m modelcd.routing.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", required=True, type=Path, help="routing table JSON file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--max-body", type=int, default=Options.max_body, help="bytes; larger bodies get 413")
    p.add_argument("--connect-timeout", type=float, default=Options.connect_timeout)
    p.add_argument("--upstream-timeout", type=float, default=Options.upstream_timeout)
    p.add_argument("--poll-interval", type=float, default=Options.poll_interval)
    p.add_argument("--drain-timeout", type=float, default=Options.drain_timeout)
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    a = p.parse_args(argv)
    options = Options(table=a.table.resolve(), host=a.host, port=a.port, max_body=a.max_body,
                      connect_timeout=a.connect_timeout, upstream_timeout=a.upstream_timeout,
                      poll_interval=a.poll_interval, drain_timeout=a.drain_timeout)
    return options, a.loop


def main(argv: list[str] | None = None) -> int:
    """Entry point of the router process."""
    options, loop_name = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s router: %(message)s")
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        return runner.run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
