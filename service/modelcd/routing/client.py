"""The router's side toward its clients: ``ClientConnection`` parses requests (keep-alive,
pipelining, chunked bodies) within the head and body limits, answers them in order, one at a
time, and writes the router's own answers; ``key_accepted`` is a keyed endpoint's check."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from modelcd.routing.http1 import HOP_BY_HOP, quickack, reason

if TYPE_CHECKING:
    from modelcd.routing.forward import Exchange
    from modelcd.routing.proxy import RouterServer

log = logging.getLogger("modelcd.router")

# Request headers the router reads or rewrites; all others pass through as they came.
_REQUEST_SPECIAL = HOP_BY_HOP | {b"authorization", b"content-length", b"expect", b"host", b"x-forwarded-for"}
MAX_PIPELINED = 16  # requests queued on one client connection before we stop reading it


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
            quickack(self.transport)
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
            status, reason(status), len(body), extra, self.connection_header(req),
            b"" if req.method == b"HEAD" else body))

    def respond_json(self, req: Request, status: int, payload: dict[str, Any], extra: bytes = b"") -> None:
        self.respond(req, status, json.dumps(payload).encode(), extra)

    def respond_error(self, req: Request, status: int, code: str, message: str, extra: bytes = b"") -> None:
        self.respond_json(req, status, {"error": code, "message": message}, extra)
