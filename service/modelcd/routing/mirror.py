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


class _Ring:
    """Records kept for the control plane: a bounded ring, each record numbered (``seq``)."""

    __slots__ = ("pairs", "seq")

    def __init__(self, capacity: int) -> None:
        self.pairs: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.seq = 0

    def add(self, record: dict[str, Any]) -> None:
        self.seq += 1
        record["seq"] = self.seq
        self.pairs.append(record)

    def since(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Records with ``seq`` above ``after``, oldest first, at most ``limit``."""
        if not self.pairs or self.pairs[-1]["seq"] <= after:
            return []
        first = self.pairs[0]["seq"]
        start = max(after + 1 - first, 0)
        return [self.pairs[i] for i in range(start, min(start + limit, len(self.pairs)))]


class MirrorState(_Ring):
    """One endpoint's candidate: the sampling, the pairs in progress and the ring of pairs."""

    __slots__ = ("candidate_errors", "dropped", "key", "mirror", "mirrored", "pending", "pending_max", "target",
                 "truncated")

    def __init__(self, key: bytes, mirror: Mirror, target: Target, capacity: int, pending_max: int) -> None:
        super().__init__(capacity)
        self.key = key
        self.mirror = mirror
        self.target = target
        self.pending = 0  # pairs started (the serving backend's answer awaited or the candidate's)
        self.pending_max = pending_max
        self.mirrored = 0  # pairs completed (the candidate answered, failed or timed out)
        self.dropped = 0  # requests not copied because ``pending_max`` pairs were in progress
        self.candidate_errors = 0  # copies the candidate failed (no answer, cut, timeout)
        self.truncated = 0  # pairs whose bodies exceeded ``body_cap`` (kept without bodies)

    def take(self) -> bool:
        """Whether this request is copied (sampled, and there is room); counts it as pending."""
        rate = self.mirror.sample_rate
        if rate < 1.0 and random.random() >= rate:
            return False
        if self.pending >= self.pending_max:
            self.dropped += 1
            return False
        self.pending += 1
        return True

    def add(self, record: dict[str, Any]) -> None:
        super().add(record)
        self.mirrored += 1

    def counters(self) -> dict[str, Any]:
        return {"endpoint": self.key.decode("latin-1"), "id": self.mirror.id, "version": self.mirror.version,
                "sample_rate": self.mirror.sample_rate, "mirrored": self.mirrored, "dropped": self.dropped,
                "candidate_errors": self.candidate_errors, "truncated": self.truncated, "pending": self.pending,
                "seq": self.seq, "kept": len(self.pairs)}


class SampleState(_Ring):
    """One endpoint's sampled live traffic (the production watch): a share of its requests with
    the answers they got, in a bounded ring; nothing is sent anywhere."""

    __slots__ = ("key", "pending", "rate", "truncated")

    def __init__(self, key: bytes, rate: float, capacity: int) -> None:
        super().__init__(capacity)
        self.key = key
        self.rate = rate
        self.pending = 0
        self.truncated = 0

    def take(self) -> bool:
        if random.random() >= self.rate:
            return False
        self.pending += 1
        return True

    def counters(self) -> dict[str, Any]:
        return {"endpoint": self.key.decode("latin-1"), "sample_rate": self.rate, "seq": self.seq,
                "kept": len(self.pairs), "truncated": self.truncated}


class Pair:
    """A live request kept for the control plane: the serving backend's answer, then (when
    mirrored) the candidate's, and (when sampled) the request with its answer alone."""

    __slots__ = ("body", "body_cap", "capped", "champion", "sample", "size", "started", "state", "status")

    def __init__(self, state: MirrorState | None, sample: SampleState | None, body_cap: int) -> None:
        self.state = state  # mirrored: the candidate's side
        self.sample = sample  # sampled for the production watch
        self.body_cap = body_cap
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
        if self.size > self.body_cap:
            self.capped = True
            self.body = []
            return
        self.body.append(chunk)

    def abandon(self, mirror_only: bool = False) -> None:
        """The serving backend did not answer (or the candidate itself did): nothing to keep."""
        if self.state is not None:
            self.state.pending -= 1
            self.state = None
        if self.sample is not None and not mirror_only:
            self.sample.pending -= 1
            self.sample = None

    def champion_done(self, server: RouterServer, method: bytes, rest: bytes, headers: bytes, has_host: bool,
                      body: bytes) -> None:
        """The serving backend answered (and the client has it): keep the sample, send the copy."""
        self.champion = {"status": self.status, "ms": round((time.monotonic() - self.started) * 1000, 3),
                         "body": None if self.capped else b"".join(self.body).decode("utf-8", "replace")}
        self.body = []
        if len(body) > self.body_cap:
            self.capped = True
        sample = self.sample
        if sample is not None:
            sample.pending -= 1
            if self.capped:
                sample.truncated += 1
            request = None if self.capped else body.decode("utf-8", "replace")
            sample.add({"ts": round(time.time(), 3), "request": request, "truncated": self.capped,
                        "answer": self.champion if not self.capped else {**self.champion, "body": None}})
        state = self.state
        if state is None:
            return
        target = state.target
        payload = b"".join((method, b" ", target.prefix, rest, b" HTTP/1.1\r\n", headers,
                            b"" if has_host else target.host_line, b"\r\n", body))
        request = None if self.capped else body.decode("utf-8", "replace")
        MirrorCall(server, self, state, request).start(payload)


class MirrorCall:
    """The copy's one attempt on the candidate; the same shape as a forwarding ``Exchange`` for
    the connection (``feed``, ``upstream_lost``) and the server's timeout sweep."""

    __slots__ = ("body", "conn", "done", "pair", "parser", "request", "server", "size", "started", "state", "status")

    def __init__(self, server: RouterServer, pair: Pair, state: MirrorState, request: str | None) -> None:
        self.server = server
        self.pair = pair
        self.state = state
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
        conn = self.state.target.pool.take()
        if conn is not None:
            self._send(conn, payload)
        else:
            self.server.loop.create_task(self._connect(payload))

    async def _connect(self, payload: bytes) -> None:
        try:
            conn = await self.state.target.pool.connect()
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
        if self.size <= self.pair.body_cap:
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
        server, pair, state = self.server, self.pair, self.state
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
        capped = pair.capped or self.size > pair.body_cap
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
