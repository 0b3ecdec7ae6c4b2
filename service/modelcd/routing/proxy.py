"""The built-in router process: a small HTTP/1.1 reverse proxy in front of the scoring
deployments, run as its own process so it keeps serving while the control plane is down.

    python -m modelcd.routing.proxy --table PATH --host 127.0.0.1 --port 8700

``ANY /{model}/{env}/{rest}`` goes to ``{backend.url}/{rest}`` of a backend picked by weight;
``/-/healthz``, ``/-/table`` and ``POST /-/reload`` are the admin routes (model names cannot
start with '-'). The table comes from a JSON file that the control plane replaces atomically;
it is re-read on ``/-/reload``, on SIGHUP and when the file changes (polled), and an invalid
file leaves the old table serving. One table is one immutable ``_State``: a request takes the
reference once, so it sees the old or the new table, never a mix.

A keyed endpoint (``auth: key``) answers 401 unless ``Authorization: Bearer <key>`` hashes to
one of its digests, and its backends never see the key; a router that other machines may
reach answers 403 for open endpoints unless ``--allow-open-endpoints``. Request heads are
bounded (URL, header bytes and count, a header timeout) and answered 414/431/408 without
buffering the rest. A backend that refuses a connection is skipped for a second (passive
health) and the request goes to another backend of the endpoint, standbys last.

Implementation: asyncio protocols with ``httptools`` (llhttp) parsing both sides, uvloop when
installed, keep-alive connection pools to the backends; chosen by measurement (see
docs/benchmarks-router.md). Standard library + httptools (+ uvloop) only: it starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import hmac
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
from modelcd.routing.table import (
    Backend,
    EndpointRoute,
    RoutingTable,
    WeightedChoice,
    listen_is_loopback,
    next_candidate,
)

log = logging.getLogger("modelcd.router")

ADMIN_PREFIX = b"/-/"
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# Request headers the router reads or rewrites; all others pass through as they came.
_REQUEST_SPECIAL = HOP_BY_HOP | {b"authorization", b"content-length", b"expect", b"host", b"x-forwarded-for"}
OPEN_SETTING = "MODELCD_ROUTER_ALLOW_OPEN_ENDPOINTS"
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
    # Request heads are bounded so a hostile client cannot make the router grow or stall.
    max_request_line: int = 8 * 1024  # bytes of URL; longer gets 414
    max_header_bytes: int = 32 * 1024  # all header lines together; more gets 431
    max_headers: int = 100  # header lines; more gets 431
    header_timeout: float = 10.0  # a request head (or a new connection's first) not complete by then gets 408
    backend_down_time: float = 1.0  # a backend that refused a connection is skipped this long (passive health)
    allow_open_endpoints: bool = False  # serve auth "none" endpoints even when exposed (see ``exposed``)
    # Whether clients beyond this machine can reach the router; None: computed from ``host``.
    # Exposed routers refuse open endpoints unless allowed. Set it for a loopback listener
    # that is reachable from outside anyway (a port forward), and in tests.
    exposed: bool | None = None


class _Refused(Exception):
    """A request passed a limit while being parsed: answer ``status`` and close."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.answer = (status, code, message)


class Request:
    """One parsed client request, body fully read (scoring bodies are small and idempotent,
    so buffering makes a retry on another backend possible)."""

    __slots__ = ("auth_lines", "authorization", "body", "error", "forwarded_for", "has_host", "http10", "keep_alive",
                 "lines", "method", "named", "url")

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
        # The Authorization value, b"" when sent more than once (ambiguous: never a valid key);
        # its lines go to the backends of open endpoints only.
        self.authorization: bytes | None = None
        self.auth_lines = b""


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


class Route:
    """One endpoint of the applied table: its backends, the weighted choice among them, and
    what a request needs to be let through."""

    __slots__ = ("choice", "digests", "key", "keyed", "name", "targets", "weights")

    def __init__(self, key: bytes, route: EndpointRoute, targets: list[Target]) -> None:
        self.key = key  # b"model/env"
        self.name = key.decode("latin-1")  # the same, for messages
        self.targets = targets
        self.weights = [b.weight for b in route.backends]
        self.choice = WeightedChoice(targets, self.weights)
        self.keyed = route.auth == "key"
        self.digests = tuple(bytes.fromhex(h) for h in route.key_hashes)


class _State:
    """One applied table: the table itself and its routes keyed by b"model/env"."""

    __slots__ = ("routes", "table")

    def __init__(self, table: RoutingTable, routes: dict[bytes, Route]) -> None:
        self.table = table
        self.routes = routes


def key_accepted(authorization: bytes | None, digests: tuple[bytes, ...]) -> bool:
    """Whether an Authorization value is ``Bearer <key>`` with sha256(key) among ``digests``.
    The key is taken as sent (no trimming, no decoding). Every digest is compared, each in
    constant time, whatever matched before: the timing tells nothing about which key matched
    or how close a guess came."""
    if authorization is None or not authorization.startswith(b"Bearer "):
        return False
    presented = hashlib.sha256(authorization[7:]).digest()
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(presented, digest)
    return accepted


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
    """One client request on its way to a backend. When an attempt fails before any response
    byte it tries a fresh connection (a pooled one may have gone stale), then marks the
    backend down and goes on with the next candidate of the endpoint (``next_candidate``:
    other weighted backends, then standbys). Answers the client with 502/504 when all that
    fails."""

    __slots__ = ("client", "fresh_tried", "has_host", "headers", "req", "rest", "route", "server", "target", "tried")

    def __init__(self, server: RouterServer, client: ClientConnection, req: Request, route: Route,
                 rest: bytes) -> None:
        self.server = server
        self.client = client
        self.req = req
        self.route = route
        self.rest = rest
        self.headers, self.has_host = server.request_headers(client, req, route)
        self.fresh_tried = False
        self.tried: list[Target] = []
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
        target, client, req = self.target, self.client, self.req
        assert target is not None
        if outcome == RETRY:
            self._fail_over(exchange, target)
            return
        if outcome == OK:
            if target.pool.down_until:
                self.server.mark_up(target.pool)
        elif exchange is not None and exchange.flushed:
            log.warning("backend %s: response %s midway; closing the client connection",
                        target.backend.id, "timed out" if outcome == TIMEOUT else "cut")
            client.closing = True
        elif outcome == TIMEOUT:
            client.respond_error(req, 504, "gateway_timeout", "the backend did not answer in time")
        elif outcome == ABORT:
            client.respond_error(req, 502, "bad_gateway", "the backend's response was cut or malformed")
        client.request_done()

    def _fail_over(self, exchange: Exchange | None, target: Target) -> None:
        """The attempt on ``target`` failed before any response byte: safe to send elsewhere."""
        server = self.server
        stale = exchange is not None and exchange.reused and not self.fresh_tried
        if stale and target.pool.down_until <= server.loop.time():
            self.fresh_tried = True  # a stale keep-alive connection; its siblings likely too
            target.pool.close_idle()
            self.send(target, fresh=True)
            return
        server.mark_down(target.pool)
        self.tried.append(target)
        other = server.next_target(self.route, self.tried)
        if other is not None:
            log.warning("backend %s of %s unreachable (skipped for %gs); retrying on %s", target.backend.id,
                        self.route.name, server.options.backend_down_time, other.backend.id)
            self.fresh_tried = False
            self.send(other)
            return
        log.warning("no backend of %s reachable", self.route.name)
        self.client.respond_error(self.req, 502, "bad_gateway", f"no backend of {self.route.name!r} answered")
        self.client.request_done()


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
        self._in_head = False  # a request head has begun and is not complete
        self._head_bytes = 0  # bytes of that head received so far (see _count_head)
        self._headers_left = 0  # header lines it may still have ...
        self._header_room = 0  # ... and bytes of them
        self._begun = 0  # requests begun on this connection
        self.head_deadline = 0.0  # loop time by which the awaited head must be complete (0: none awaited)
        self.options = server.options  # read per request and per header: kept at hand

    # -- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.peer_bytes = self.peer.encode()
        self.last_active = self.server.loop.time()
        self.head_deadline = self.last_active + self.server.options.header_timeout  # a silent client is cut too
        self.server.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.clients.discard(self)
        if self.exchange is not None:
            self.exchange.conn.resume()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.loop.time()
        size, carried, idle, begun = len(data), self._in_head, not self.in_message, self._begun
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
                if isinstance(e.__context__, _Refused):
                    self._reject(*e.__context__.answer)
                else:
                    log.error("internal error parsing a request", exc_info=e.__context__)
                    self._reject(500, "internal_error", "the router failed; see its log")
            except httptools.HttpParserError as e:
                self._reject(400, "bad_request", f"malformed HTTP request: {e}")
        if self._in_head and not self.discarding:
            self._count_head(size, (carried and self._begun == begun) or (idle and self._begun == begun + 1))
        if self.in_message and not self.discarding:
            _quickack(self.transport)
        self._next()

    def _count_head(self, size: int, whole: bool) -> None:
        """Bound a head still incomplete after a read. httptools buffers a header line until
        it ends, unseen by us, so its growth is counted here by reads: a read that began
        inside this head (``whole``) counts in full; one where it began after another
        request counts 0, so a head may overshoot the limit by one read (<= 256 KiB) at most."""
        if whole:
            self._head_bytes += size
        options = self.server.options
        if self._head_bytes > options.max_request_line + options.max_header_bytes:
            self._reject(431, "headers_too_large",
                         f"request head is larger than {options.max_request_line + options.max_header_bytes} bytes")

    def head_timed_out(self) -> None:
        """The awaited request head did not arrive in time (a slow or silent client)."""
        self.head_deadline = 0.0
        self._reject(408, "request_timeout",
                     f"the request head was not complete within {self.server.options.header_timeout:g}s")
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
        self._in_head = True
        options = self.options
        self._head_bytes = 0
        self._headers_left = options.max_headers
        self._header_room = options.max_header_bytes
        self._begun += 1
        self.head_deadline = self.last_active + options.header_timeout
        self._url = b""
        self._req = Request(b"", b"", b"", False, False)
        self._body = []
        self._size = 0
        self._has_body = self._expect = False
        self._error = None

    def on_url(self, url: bytes) -> None:
        self._url += url  # httptools passes the URL in pieces as they arrive: checked as it grows
        if len(self._url) > self.options.max_request_line:
            raise _Refused(414, "uri_too_long", f"request URL is longer than {self.options.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_left -= 1
        self._header_room -= len(name) + len(value) + 4
        if self._headers_left < 0 or self._header_room < 0:
            raise _Refused(431, "headers_too_large", f"request has more than {self.options.max_headers} headers or "
                           f"more than {self.options.max_header_bytes} bytes of them")
        lname = name.lower()
        if lname not in _REQUEST_SPECIAL:
            self._req.lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"authorization":
            req = self._req
            req.authorization = value if req.authorization is None else b""
            req.auth_lines += b"%s: %s\r\n" % (name, value)
        elif lname == b"host":
            self._req.has_host = True
            self._req.lines.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"content-length":
            if value.strip().isdigit() and int(value) > self.server.options.max_body:
                raise self._too_large()
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
        self._in_head = False
        self.head_deadline = 0.0
        if self.parser.should_upgrade() and (self._has_body or self.parser.get_method() == b"CONNECT"):
            # llhttp skips the body of an upgrade request, so we could not forward it whole;
            # a bodiless one (curl's h2c offer) is served as plain HTTP/1.1 instead.
            self._error = (501, "not_implemented", "protocol upgrades are not supported")
        elif self._expect and not self.busy and not self.queue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.options.max_body:
            raise self._too_large()
        self._body.append(body)

    def _too_large(self) -> _Refused:
        return _Refused(413, "payload_too_large", f"request body is larger than {self.server.options.max_body} bytes")

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
        self.in_message = self._in_head = False
        self.discarding = True
        self.head_deadline = 0.0
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

    def respond(self, req: Request, status: int, body: bytes, extra: bytes = b"") -> None:
        """Write a complete response generated by the router itself; ``extra``: more header lines."""
        self.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n%s" % (
            status, _reason(status), len(body), extra, self.connection_header(req),
            b"" if req.method == b"HEAD" else body))

    def respond_json(self, req: Request, status: int, payload: dict[str, Any], extra: bytes = b"") -> None:
        self.respond(req, status, json.dumps(payload).encode(), extra)

    def respond_error(self, req: Request, status: int, code: str, message: str, extra: bytes = b"") -> None:
        self.respond_json(req, status, {"error": code, "message": message}, extra)


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
        self.down_pools: set[UpstreamPool] = set()  # backends marked down; empty: every pick takes the fast path
        exposed = options.exposed if options.exposed is not None else not listen_is_loopback(options.host)
        self.refuse_open = exposed and not options.allow_open_endpoints

    # -- table ---------------------------------------------------------------------------
    def apply(self, table: RoutingTable) -> None:
        """Swap in ``table`` (one reference assignment), then drop pools nobody routes to."""
        routes: dict[bytes, Route] = {}
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
            routes[key.encode()] = Route(key.encode(), route, targets)
        old = self.state.table.generation
        self.state = _State(table, routes)
        for addr in set(self.pools) - used:
            pool = self.pools.pop(addr)
            pool.close()
            self.down_pools.discard(pool)
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
        self._tick_clients(now)
        self.ticks += 1
        if self.ticks % 4:
            return
        for pool in self.pools.values():
            pool.close_idle(older_than=now - self.options.upstream_idle_timeout)
        limit = now - self.options.client_idle_timeout
        for client in list(self.clients):
            if not client.busy and client.last_active < limit:
                client.transport.close()  # type: ignore[union-attr]

    def _tick_clients(self, now: float) -> None:
        """Cut clients whose request head is late; forget down marks that ran out."""
        for client in [c for c in self.clients if c.head_deadline and c.head_deadline < now]:
            client.head_timed_out()
        for pool in [p for p in self.down_pools if p.down_until <= now]:
            self.mark_up(pool)

    # -- backend health (passive: learned from failed connections) ------------------------
    def mark_down(self, pool: UpstreamPool) -> None:
        """Skip this backend for ``backend_down_time``; then it is tried again."""
        pool.down_until = self.loop.time() + self.options.backend_down_time
        self.down_pools.add(pool)

    def mark_up(self, pool: UpstreamPool) -> None:
        pool.down_until = 0.0
        self.down_pools.discard(pool)

    def next_target(self, route: Route, tried: list[Target]) -> Target | None:
        """The backend for a request's next attempt (see ``next_candidate``)."""
        if not self.down_pools and not tried:
            return route.choice.pick(random.random())  # the common case: nothing is down
        now = self.loop.time()
        down = [t for t in route.targets if t.pool.down_until > now]
        if not down and not tried:
            return route.choice.pick(random.random())
        return next_candidate(route.targets, route.weights, tried, down, random.random())

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
        route, key = None, b""
        if len(parts) >= 3 and not parts[0] and parts[1] and parts[2]:
            key = parts[1] + b"/" + parts[2]
            route = self.state.routes.get(key)  # the one read of the table for this request
        if route is None:
            where = repr(key.decode("latin-1")) if key else "here: use /{model}/{env}/..."
            client.respond_error(req, 404, "not_found", f"no endpoint {where}")
            client.request_done()
            return
        if (route.keyed or self.refuse_open) and self.refused(client, req, route):
            client.request_done()
            return
        if not self.down_pools:  # the common case, inlined: every backend is up
            target = route.choice.pick(random.random())
        else:
            target = self.next_target(route, []) if route.choice else None
        if target is None:
            client.respond_error(req, 503, "no_backend", f"endpoint {route.name!r} has no backend with weight > 0")
            client.request_done()
            return
        rest = b"/" + parts[3] if len(parts) == 4 else b"/"
        if sep:
            rest += b"?" + query
        Forward(self, client, req, route, rest).send(target)

    def refused(self, client: ClientConnection, req: Request, route: Route) -> bool:
        """The access check, the only one: answer 401 (keyed endpoint, no valid key) or 403
        (open endpoint on an exposed router) and return True, or return False to go on."""
        if route.keyed:
            if key_accepted(req.authorization, route.digests):
                return False
            model, _, env = route.name.partition("/")
            client.respond_error(req, 401, "unauthorized", (
                f"endpoint {route.name!r} needs a key: send Authorization: Bearer <endpoint key>; "
                f"get the keys with `modelcd endpoints keys {model} --env {env}`"),
                b'www-authenticate: Bearer realm="modelcd"\r\n')
            return True
        if self.refuse_open:
            client.respond_error(req, 403, "open_endpoint_refused", (
                f"endpoint {route.name!r} has no key (auth none) and this router listens on {self.options.host!r}, "
                f"which other machines may reach: give the endpoint a key (auth: key), or set "
                f"{OPEN_SETTING}=true to serve open endpoints there anyway"))
            return True
        return False

    @staticmethod
    def request_headers(client: ClientConnection, req: Request, route: Route) -> tuple[bytes, bool]:
        """The request's headers as backends get them (end-to-end ones, forwarding headers, a
        known length; no blank line) and whether they hold a Host. The key of a keyed endpoint
        stays here: its backends never see it."""
        lines = req.lines
        if req.auth_lines and not route.keyed:
            lines = [*lines, req.auth_lines]
        if req.named:  # rare: headers the client declared hop-by-hop in Connection
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in req.named]
        out = [*lines, b"x-forwarded-for: ", req.forwarded_for, client.peer_bytes, b"\r\nx-forwarded-prefix: /",
               route.key, b"\r\n"]
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
                "pid": os.getpid(), "table": str(self.options.table), "table_error": self.table_error,
                "open_endpoints": "refused" if self.refuse_open else "served"}

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
    if server.refuse_open:
        log.warning("other machines may reach %s: endpoints without a key (auth none) answer 403; "
                    "set %s=true to serve them", options.host, OPEN_SETTING)
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
    p.add_argument("--max-request-line", type=int, default=Options.max_request_line, help="URL bytes; longer: 414")
    p.add_argument("--max-header-bytes", type=int, default=Options.max_header_bytes, help="more: 431")
    p.add_argument("--max-headers", type=int, default=Options.max_headers, help="more header lines: 431")
    p.add_argument("--header-timeout", type=float, default=Options.header_timeout, help="seconds; then 408")
    p.add_argument("--backend-down-time", type=float, default=Options.backend_down_time,
                   help="seconds a backend that refused a connection is skipped")
    p.add_argument("--allow-open-endpoints", action="store_true",
                   help=f"serve endpoints without a key on a non-loopback address too ({OPEN_SETTING})")
    p.add_argument("--exposed", choices=("auto", "yes", "no"), default="auto",
                   help="whether other machines reach this router; auto: from --host (loopback or not)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    a = p.parse_args(argv)
    options = Options(table=a.table.resolve(), host=a.host, port=a.port, max_body=a.max_body,
                      connect_timeout=a.connect_timeout, upstream_timeout=a.upstream_timeout,
                      poll_interval=a.poll_interval, drain_timeout=a.drain_timeout,
                      max_request_line=a.max_request_line, max_header_bytes=a.max_header_bytes,
                      max_headers=a.max_headers, header_timeout=a.header_timeout,
                      backend_down_time=a.backend_down_time, allow_open_endpoints=a.allow_open_endpoints,
                      exposed={"auto": None, "yes": True, "no": False}[a.exposed])
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
