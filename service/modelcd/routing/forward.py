"""A client request on its way to a backend: ``Forward`` (pick, retry on a fresh connection,
fail over to another backend, settle) and ``Exchange`` (one attempt over one upstream
connection, the response relayed to the client as it comes)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import httptools

from modelcd.routing.http1 import HOP_BY_HOP, reason
from modelcd.routing.mirror import Pair

if TYPE_CHECKING:
    from modelcd.routing.applied import Route, Target
    from modelcd.routing.client import ClientConnection, Request
    from modelcd.routing.proxy import RouterServer
    from modelcd.routing.upstream import UpstreamConnection

log = logging.getLogger("modelcd.router")

RESPONSE_DROP = HOP_BY_HOP | {b"x-modelcd-version", b"x-modelcd-deployment"}

# Outcomes of one attempt to forward a request.
OK = "ok"  # a response was relayed to the client
RETRY = "retry"  # the backend failed before sending a byte: safe to send elsewhere
ABORT = "abort"  # the backend failed after sending something (cut or malformed response)
TIMEOUT = "timeout"  # no complete response in time


class Forward:
    """One client request on its way to a backend. When an attempt fails before any response
    byte it tries a fresh connection (a pooled one may have gone stale), then marks the
    backend down and goes on with the next candidate of the endpoint (``next_candidate``:
    other weighted backends, then standbys). Answers the client with 502/504 when all that
    fails."""

    __slots__ = ("client", "fresh_tried", "has_host", "headers", "pair", "req", "rest", "route", "server", "target",
                 "tried")

    def __init__(self, server: RouterServer, client: ClientConnection, req: Request, route: Route,
                 rest: bytes) -> None:
        self.server = server
        self.client = client
        self.req = req
        self.route = route
        self.rest = rest
        self.headers, self.has_host = backend_headers(client, req, route)
        self.fresh_tried = False
        self.tried: list[Target] = []
        self.target: Target | None = None
        self.pair: Pair | None = None  # shadow traffic: the copy for the candidate (``mirror_to``)

    def keep(self, target: Target) -> Forward:
        """Shadow traffic and the production watch: once ``target`` answered, copy this request
        to the route's candidate (unless ``target`` is the candidate; when sampled and there is
        room) and keep it with its answer (when sampled)."""
        route = self.route
        state = route.mirror
        copy = state is not None and target.backend.id != state.mirror.id and state.take()
        sample = route.sampler is not None and route.sampler.take()
        if copy or sample:
            self.pair = Pair(state if copy else None, route.sampler if sample else None,
                             self.server.options.mirror_body_cap)
        return self

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
            if self.pair is not None:
                client.request_done()
                self.pair.champion_done(self.server, req.method, self.rest, self.headers, self.has_host, req.body)
                return
        elif exchange is not None and exchange.flushed:
            log.warning("backend %s: response %s midway; closing the client connection",
                        target.backend.id, "timed out" if outcome == TIMEOUT else "cut")
            client.closing = True
        elif outcome == TIMEOUT:
            client.respond_error(req, 504, "gateway_timeout", "the backend did not answer in time")
        elif outcome == ABORT:
            client.respond_error(req, 502, "bad_gateway", "the backend's response was cut or malformed")
        if self.pair is not None:
            self.pair.abandon()
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
            pair = self.pair
            if pair is not None and pair.mirror is not None and other.backend.id == pair.mirror.mirror.id:
                pair.abandon(mirror_only=True)  # the candidate answers this one itself: nothing to compare
            log.warning("backend %s of %s unreachable (skipped for %gs); retrying on %s", target.backend.id,
                        self.route.name, server.options.backend_down_time, other.backend.id)
            self.fresh_tried = False
            self.send(other)
            return
        log.warning("no backend of %s reachable", self.route.name)
        if self.pair is not None:
            self.pair.abandon()
        self.client.respond_error(self.req, 502, "bad_gateway", f"no backend of {self.route.name!r} answered")
        self.client.request_done()


class Exchange:
    """One attempt: the request sent to one backend over one connection, and the response
    relayed to the client as it comes. Also the callback target of the response parser."""

    __slots__ = ("capture", "chunked", "chunked_in", "client", "complete", "conn", "flushed", "forward", "framed",
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
        self.capture = forward.pair  # shadow traffic: the answer is kept for comparison (None: not)

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
        if self.capture is not None:
            self.capture.status = status
        lines, self.out = self.out, []
        self.out.append(self._head(status, lines))
        if self.req.method == b"HEAD":
            self._mark_complete(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self.no_body:
            return
        if self.capture is not None:
            self.capture.add(body)
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
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status)), *headers]
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


def backend_headers(client: ClientConnection, req: Request, route: Route) -> tuple[bytes, bool]:
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
