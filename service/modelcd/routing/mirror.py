"""Shadow traffic in the router: copies of live requests sent to a candidate that never answers
a client, and the pairs of answers (serving backend, candidate) kept for the control plane.

The client's request is never delayed by its copy: the copy is made only once the serving
backend's response was relayed, it goes out on the candidate's own connections, at most
``mirror_pending`` pairs per endpoint are in progress (beyond that a copy is dropped and
counted, never waited for), and a candidate that hangs is cut after ``mirror_timeout``. The
pairs live in a bounded ring per endpoint (``mirror_pairs``); the control plane reads them
with ``GET /-/mirror/pairs?endpoint=model/env&after=SEQ`` (loopback only) while a release
judges the candidate.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from modelcd.routing.applied import Target
    from modelcd.routing.proxy import RouterServer
    from modelcd.routing.table import Mirror
    from modelcd.routing.upstream import UpstreamConnection


class MirrorState:
    """One endpoint's candidate: the sampling, the pairs in progress and the ring of pairs."""

    __slots__ = ("body_cap", "candidate_errors", "dropped", "key", "mirror", "mirrored", "pairs", "pending",
                 "pending_max", "seq", "target", "truncated")

    def __init__(self, key: bytes, mirror: Mirror, target: Target, capacity: int, pending_max: int,
                 body_cap: int) -> None:
        self.key = key
        self.mirror = mirror
        self.target = target
        self.pairs: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.pending = 0  # pairs started (the serving backend's answer awaited or the candidate's)
        self.pending_max = pending_max
        self.body_cap = body_cap
        self.seq = 0
        self.mirrored = 0  # pairs completed (the candidate answered, failed or timed out)
        self.dropped = 0  # requests not copied because ``pending_max`` pairs were in progress
        self.candidate_errors = 0  # copies the candidate failed (no answer, cut, timeout)
        self.truncated = 0  # pairs whose bodies exceeded ``body_cap`` (kept without bodies)

    def take(self) -> Pair | None:
        """A pair for this request when it is sampled and there is room; None otherwise."""
        rate = self.mirror.sample_rate
        if rate < 1.0 and random.random() >= rate:
            return None
        if self.pending >= self.pending_max:
            self.dropped += 1
            return None
        self.pending += 1
        return Pair(self)

    def add(self, record: dict[str, Any]) -> None:
        self.seq += 1
        record["seq"] = self.seq
        self.pairs.append(record)
        self.mirrored += 1

    def counters(self) -> dict[str, Any]:
        return {"endpoint": self.key.decode("latin-1"), "id": self.mirror.id, "version": self.mirror.version,
                "sample_rate": self.mirror.sample_rate, "mirrored": self.mirrored, "dropped": self.dropped,
                "candidate_errors": self.candidate_errors, "truncated": self.truncated, "pending": self.pending,
                "seq": self.seq, "kept": len(self.pairs)}

    def since(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Pairs with ``seq`` above ``after``, oldest first, at most ``limit``."""
        if not self.pairs or self.pairs[-1]["seq"] <= after:
            return []
        first = self.pairs[0]["seq"]
        start = max(after + 1 - first, 0)
        return [self.pairs[i] for i in range(start, min(start + limit, len(self.pairs)))]


class Pair:
    """A request copied to the candidate: the serving backend's answer, then the candidate's."""

    __slots__ = ("body", "capped", "champion", "size", "started", "state", "status")

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self.started = time.monotonic()
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0
        self.capped = False
        self.champion: dict[str, Any] | None = None

    def add(self, chunk: bytes) -> None:
        """A piece of the serving backend's response body (kept up to the cap)."""
        if self.capped:
            return
        self.size += len(chunk)
        if self.size > self.state.body_cap:
            self.capped = True
            self.body = []
            return
        self.body.append(chunk)

    def abandon(self) -> None:
        """The serving backend did not answer: nothing to compare."""
        self.state.pending -= 1

    def champion_done(self, server: RouterServer, method: bytes, rest: bytes, headers: bytes, has_host: bool,
                      body: bytes) -> None:
        """The serving backend answered (and the client has it): send the copy now."""
        state = self.state
        self.champion = {"status": self.status, "ms": round((time.monotonic() - self.started) * 1000, 3),
                         "body": None if self.capped else b"".join(self.body).decode("utf-8", "replace")}
        self.body = []
        if len(body) > state.body_cap:
            self.capped = True
        target = state.target
        payload = b"".join((method, b" ", target.prefix, rest, b" HTTP/1.1\r\n", headers,
                            b"" if has_host else target.host_line, b"\r\n", body))
        request = None if self.capped else body.decode("utf-8", "replace")
        MirrorCall(server, self, request).start(payload)


class MirrorCall:
    """The copy's one attempt on the candidate; the same shape as a forwarding ``Exchange`` for
    the connection (``feed``, ``upstream_lost``) and the server's timeout sweep."""

    __slots__ = ("body", "conn", "done", "pair", "parser", "request", "server", "size", "started", "status")

    def __init__(self, server: RouterServer, pair: Pair, request: str | None) -> None:
        self.server = server
        self.pair = pair
        self.request = request
        self.conn: UpstreamConnection | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.size = 0
        self.status = 0
        self.done = False
        self.started = server.loop.time()

    def start(self, payload: bytes) -> None:
        self.server.mirror_calls.add(self)
        conn = self.pair.state.target.pool.take()
        if conn is not None:
            self._send(conn, payload)
        else:
            self.server.loop.create_task(self._connect(payload))

    async def _connect(self, payload: bytes) -> None:
        try:
            conn = await self.pair.state.target.pool.connect()
        except (OSError, TimeoutError) as e:
            self.finish(f"cannot connect: {e}")
            return
        self._send(conn, payload)

    def _send(self, conn: UpstreamConnection, payload: bytes) -> None:
        if self.done:
            conn.close()
            return
        self.conn = conn
        conn.exchange = self  # type: ignore[assignment]
        if conn.open:
            conn.transport.write(payload)  # type: ignore[union-attr]
        else:
            self.finish("connection closed")

    # -- connection callbacks (as UpstreamConnection calls an Exchange) -----------------
    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.finish(f"bad response: {e}")

    def upstream_lost(self) -> None:
        self.finish("connection lost")

    def timed_out(self) -> None:
        self.finish("timed out")

    # -- parser callbacks ------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= self.pair.state.body_cap:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self.status = 0
            return
        self.finish(None, reusable=self.parser.should_keep_alive())

    # ----------------------------------------------------------------------------------------
    def finish(self, error: str | None, reusable: bool = False) -> None:
        """Settle once: the connection back to its pool (or closed), the pair into the ring."""
        if self.done:
            return
        self.done = True
        server, pair, state = self.server, self.pair, self.pair.state
        server.mirror_calls.discard(self)
        conn = self.conn
        if conn is not None and conn.exchange is self:  # type: ignore[comparison-overlap]
            conn.exchange = None
            if error is None and reusable:
                conn.pool.release(conn, server.loop.time())
            else:
                conn.close()
        state.pending -= 1
        ms = round((server.loop.time() - self.started) * 1000, 3)
        capped = pair.capped or self.size > state.body_cap
        if error is not None:
            state.candidate_errors += 1
            candidate: dict[str, Any] = {"status": None, "ms": ms, "body": None, "error": error}
        else:
            if self.status >= 500:
                state.candidate_errors += 1
            candidate = {"status": self.status, "ms": ms, "error": None,
                         "body": None if capped else b"".join(self.body).decode("utf-8", "replace")}
        if capped:
            state.truncated += 1
        champion = pair.champion or {}
        state.add({"ts": round(time.time(), 3), "request": None if capped else self.request,
                   "champion": {**champion, "body": None if capped else champion.get("body")},
                   "candidate": candidate, "truncated": capped})
        del self.parser  # it holds bound methods: break the cycle
