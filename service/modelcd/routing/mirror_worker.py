"""The mirror worker: the router's process for shadow traffic and sampled traffic, so that the
router's own event loop only hands requests over (``routing.mirror``).

    python -m modelcd.routing.mirror_worker --fd N [--mirror-pending 64 ...]

Started by the router with its end of a Unix socket pair on ``--fd``; it exits when that socket
closes (the router stopped or died). From the router it reads, in order: the endpoints to keep
(CONFIG), batches of live requests with the champion's answers (BATCH) and the admin questions
(QUERY), each answered with ``(status, JSON body, each ring's counters)``: the router relays
the body as it is.

For every mirrored request it sends the copy to the endpoint's candidate over keep-alive
connections (at most ``--mirror-pending`` copies in progress per endpoint; more wait, at most
``--mirror-backlog`` of them and for ``--mirror-timeout`` at most, else they are dropped and
counted — a batch brings many at once; a copy not answered within ``--mirror-timeout`` counts as
the candidate's error) and
keeps the pair (champion's answer, candidate's answer) in a bounded ring per endpoint; every
sampled request is kept with its answer in another. Records stay raw bytes in the rings: their
JSON is made only when they are read. It runs at a lower scheduling priority than the router
(``--priority``): by default ``idle`` (Linux ``SCHED_IDLE``: it runs on CPU time nothing else
wants, so on saturated CPUs serving clients goes first and the copies that wait too long are
dropped and counted, and the candidate only works on what the worker found time to send);
``low`` is nice 5 (the worker gets a share of busy CPUs; more copies, more cost to the live
path); ``normal`` leaves it as the router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools

from modelcd.routing.applied import Target
from modelcd.routing.mirror import BATCH, CONFIG, QUERY, FrameReader, frame
from modelcd.routing.options import MIRROR_WORKER_PRIORITIES, Options
from modelcd.routing.table import Backend
from modelcd.routing.upstream import UpstreamConnection, UpstreamPool

SWEEP_S = 0.25  # how often copies are checked for the timeout
LOW_NICE = 5  # ``low``: added to the worker's nice value
NOTHING = (0, 0, [0, 0, 0, 0])  # what the router adds to a candidate's counters when it has nothing to add
CONNECTING_MAX = 4  # new connections being opened to one candidate at once; more copies wait for one


def _text(body: bytes | None) -> str | None:
    return None if body is None else body.decode("utf-8", "replace")


class Ring:
    """Records kept for the control plane: a bounded ring of tuples, the first field of each its
    number (``seq``), counting on from ``floor``."""

    __slots__ = ("records", "seq")

    def __init__(self, capacity: int, floor: int) -> None:
        self.records: deque[tuple[Any, ...]] = deque(maxlen=capacity)
        self.seq = floor

    def add(self, *fields: Any) -> None:
        self.seq += 1
        self.records.append((self.seq, *fields))

    def since(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Records numbered above ``after``, oldest first, at most ``limit``."""
        records = self.records
        if not records or records[-1][0] <= after:
            return []
        start = max(after + 1 - records[0][0], 0)
        return [records[i] for i in range(start, min(start + limit, len(records)))]


class Candidate(Ring):
    """One endpoint's candidate: its connections, the copies in progress, the ring of pairs."""

    __slots__ = ("candidate_errors", "connecting", "dropped", "id", "key", "mirrored", "pending", "queue", "rate",
                 "target", "truncated", "version")

    def __init__(self, key: bytes, id: str, version: int, target: Target, capacity: int, floor: int) -> None:
        super().__init__(capacity, floor)
        self.key, self.id, self.version, self.target = key, id, version, target
        self.rate = 1.0
        self.pending = 0  # copies in progress: sent (or their connection opening), the answer awaited
        self.connecting = 0  # connections being opened
        self.queue: deque[tuple[Copy, bytes]] = deque()  # copies waiting for a slot or a connection
        self.mirrored = 0  # pairs completed (the candidate answered, failed or timed out)
        self.dropped = 0  # copies not sent because ``mirror_pending`` were in progress
        self.candidate_errors = 0  # copies the candidate failed (no answer, cut, timeout, 5xx)
        self.truncated = 0  # pairs whose bodies exceeded the cap (kept without bodies)

    def pair(self, r: tuple[Any, ...]) -> dict[str, Any]:
        seq, ts, request, status, seconds, body, c_status, c_ms, c_body, c_error, truncated = r
        return {"seq": seq, "ts": round(ts, 3), "request": _text(request), "truncated": truncated,
                "champion": {"status": status, "ms": round(seconds * 1000, 3), "body": _text(body)},
                "candidate": {"status": c_status, "ms": c_ms, "body": _text(c_body), "error": c_error}}

    def report(self) -> list[int]:
        return [self.mirrored, self.dropped, self.candidate_errors, self.truncated]

    def pump(self, pending_max: int) -> None:
        """Start waiting copies while fewer than ``pending_max`` are in progress: each on an idle
        connection, or a new one (at most ``CONNECTING_MAX`` opening at once; beyond, it waits for
        a connection another copy is done with)."""
        queue = self.queue
        while queue and self.pending < pending_max:
            conn = self.target.pool.take()
            if conn is None and self.connecting >= CONNECTING_MAX:
                return
            copy, payload = queue.popleft()
            self.pending += 1
            copy.start(conn, payload)

    def expire(self, late: float) -> None:
        """Copies that waited since before ``late`` are dropped (the candidate is too slow for them)."""
        queue = self.queue
        while queue and queue[0][0].started < late:
            queue.popleft()
            self.dropped += 1

    def counters(self, router: tuple[int, int, list[int]]) -> dict[str, Any]:
        """``router``: the copies the router dropped (handoff), lost (in a worker that died), and
        the counters of the workers before this one (``report``'s fields)."""
        handoff, lost, (mirrored, dropped, errors, truncated) = router
        return {"endpoint": self.key.decode("latin-1"), "id": self.id, "version": self.version,
                "sample_rate": self.rate, "mirrored": self.mirrored + mirrored,
                "dropped": self.dropped + dropped + handoff + lost, "dropped_handoff": handoff, "lost_in_worker": lost,
                "candidate_errors": self.candidate_errors + errors, "truncated": self.truncated + truncated,
                "pending": self.pending, "queued": len(self.queue), "seq": self.seq, "kept": len(self.records)}


class Sampled(Ring):
    """One endpoint's sampled live traffic: requests with the answers they got."""

    __slots__ = ("floor", "key", "rate", "truncated")

    def __init__(self, key: bytes, capacity: int, floor: int) -> None:
        super().__init__(capacity, floor)
        self.key = key
        self.floor = floor
        self.rate = 0.0
        self.truncated = 0

    @staticmethod
    def pair(r: tuple[Any, ...]) -> dict[str, Any]:
        seq, ts, request, status, seconds, body, truncated = r
        return {"seq": seq, "ts": round(ts, 3), "request": _text(request), "truncated": truncated,
                "answer": {"status": status, "ms": round(seconds * 1000, 3), "body": _text(body)}}

    def report(self) -> list[int]:
        return [self.seq - self.floor, self.truncated]

    def counters(self, router: tuple[int, int, list[int]]) -> dict[str, Any]:
        handoff, lost, (_, truncated) = router
        return {"endpoint": self.key.decode("latin-1"), "sample_rate": self.rate, "seq": self.seq,
                "kept": len(self.records), "truncated": self.truncated + truncated, "dropped": handoff + lost,
                "dropped_handoff": handoff, "lost_in_worker": lost}


class Copy:
    """A copy's one attempt on the candidate; the same shape as the router's forwarding
    ``Exchange`` for the connection (``feed``, ``upstream_lost``)."""

    __slots__ = ("body", "capped", "champion", "conn", "done", "parser", "request", "size", "started", "state",
                 "status", "worker")

    def __init__(self, worker: Worker, state: Candidate, request: bytes | None, champion: tuple[Any, ...],
                 capped: bool) -> None:
        self.worker = worker
        self.state = state
        self.request = request
        self.champion = champion  # (status, seconds, body)
        self.capped = capped
        self.conn: UpstreamConnection | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.size = 0
        self.status = 0
        self.done = False
        self.started = worker.loop.time()  # when it came; once started, when it was sent

    def start(self, conn: UpstreamConnection | None, payload: bytes) -> None:
        """Send on ``conn``, or on a new connection (``Candidate.pump`` decides)."""
        self.worker.copies.add(self)
        self.started = self.worker.loop.time()
        if conn is not None:
            self._send(conn, payload)
        else:
            self.state.connecting += 1
            self.worker.loop.create_task(self._connect(payload))

    async def _connect(self, payload: bytes) -> None:
        try:
            conn = await self.state.target.pool.connect()
        except (OSError, TimeoutError) as e:
            self.finish(f"cannot connect: {e}")
            return
        finally:
            self.state.connecting -= 1
        self._send(conn, payload)
        self.state.pump(self.worker.options.mirror_pending)  # another connection may open now

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

    # -- connection callbacks ----------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.finish(f"bad response: {e}")

    def upstream_lost(self) -> None:
        self.finish("connection lost")

    # -- parser callbacks ----------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= self.worker.body_cap:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self.status = 0
            return
        self.finish(None, reusable=self.parser.should_keep_alive())

    # ------------------------------------------------------------------------------------------
    def finish(self, error: str | None, reusable: bool = False) -> None:
        """Settle once: the connection back to its pool (or closed), the pair into the ring."""
        if self.done:
            return
        self.done = True
        worker, state = self.worker, self.state
        worker.copies.discard(self)
        conn = self.conn
        if conn is not None and conn.exchange is self:  # type: ignore[comparison-overlap]
            conn.exchange = None
            if error is None and reusable:
                conn.pool.release(conn, worker.loop.time())
            else:
                conn.close()
        state.pending -= 1
        state.mirrored += 1
        ms = round((worker.loop.time() - self.started) * 1000, 3)
        capped = self.capped or self.size > worker.body_cap
        if capped:
            state.truncated += 1
        if error is not None or self.status >= 500:
            state.candidate_errors += 1
        status, seconds, body = self.champion
        state.add(time.time(), None if capped else self.request, status, seconds, None if capped else body,
                  None if error is not None else self.status, ms,
                  None if capped or error is not None else b"".join(self.body), error, capped)
        del self.parser  # it holds bound methods: break the cycle
        state.pump(worker.options.mirror_pending)  # the next waiting copy takes this one's place


class Worker(asyncio.Protocol):
    """The worker's end of the router's socket, and all it keeps."""

    def __init__(self, options: Options, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        self.options = options
        self.loop = loop
        self.done = done
        self.body_cap = options.mirror_body_cap
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.mirrors: dict[bytes, Candidate] = {}  # by endpoint (one candidate each)
        self.samplers: dict[bytes, Sampled] = {}
        self.pools: dict[tuple[str, int], UpstreamPool] = {}
        self.copies: set[Copy] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            if kind == BATCH:
                self.batch(payload)
            elif kind == QUERY:
                status, body = self.query(*payload)
                self.transport.write(frame((status, body, self.report())))  # type: ignore[union-attr]
            elif kind == CONFIG:
                self.configure(payload)

    # -- what the router sends ---------------------------------------------------------------
    def configure(self, config: dict[str, Any]) -> None:
        """The endpoints that mirror and sample now; a candidate (or sampled endpoint) kept
        before keeps its ring, the others' rings go."""
        mirrors: dict[bytes, Candidate] = {}
        used: set[tuple[str, int]] = set()
        for key, id, version, url, rate, floor in config["mirrors"]:
            parts = urlsplit(url)
            addr = (parts.hostname or "127.0.0.1", parts.port or 80)
            used.add(addr)
            pool = self.pools.get(addr)
            if pool is None:
                pool = self.pools[addr] = UpstreamPool(addr[0], addr[1], self.options)
            target = Target(Backend(id, version, url, 0), pool)
            state = self.mirrors.get(key)
            if state is None or state.id != id:  # a new candidate; the same one keeps its ring
                state = Candidate(key, id, version, target, self.options.mirror_pairs, floor)
            state.version, state.rate, state.target = version, rate, target
            mirrors[key] = state
        samplers: dict[bytes, Sampled] = {}
        for key, rate, floor in config["samples"]:
            sampler = self.samplers.get(key) or Sampled(key, self.options.mirror_pairs, floor)
            sampler.rate = rate
            samplers[key] = sampler
        self.mirrors, self.samplers = mirrors, samplers
        for addr in set(self.pools) - used:
            self.pools.pop(addr).close()

    def batch(self, items: list[tuple[Any, ...]]) -> None:
        """Live requests answered by the champion: keep the sampled ones, copy the mirrored ones."""
        now, cap = time.time(), self.body_cap
        mirrors, samplers = self.mirrors, self.samplers
        for key, mid, sampled, method, rest, headers, has_host, body, status, answer, seconds in items:
            capped = answer is None or body is None or len(body) > cap
            if sampled and (sampler := samplers.get(key)) is not None:
                if capped:
                    sampler.truncated += 1
                    sampler.add(now, None, status, seconds, None, True)
                else:
                    sampler.add(now, body, status, seconds, answer, False)
            if mid is None or (state := mirrors.get(key)) is None or state.id != mid:
                continue
            if len(state.queue) >= self.options.mirror_backlog:
                state.dropped += 1
                continue
            target = state.target
            payload = b"".join((method, b" ", target.prefix, rest, b" HTTP/1.1\r\n", headers,
                                b"" if has_host else target.host_line, b"\r\n", body))
            state.queue.append((Copy(self, state, None if capped else body,
                                     (status, seconds, None if capped else answer), capped), payload))
        pending_max = self.options.mirror_pending
        for state in mirrors.values():
            state.pump(pending_max)

    def query(self, what: str, endpoint: bytes, after: int, limit: int, extra: dict[str, Any]) -> tuple[int, bytes]:
        """An admin question: ``mirror`` (every candidate's counters), ``pairs`` or ``samples``
        (an endpoint's counters and records after ``after``), ``ping``."""
        if what == "ping":
            return 200, b"{}"
        if what == "mirror":
            worker = {**extra["worker"], "pid": os.getpid()}
            mirrors = [m.counters(extra["mirrors"].get((m.key, m.id), NOTHING)) for m in self.mirrors.values()]
            return 200, json.dumps({"mirrors": mirrors, "worker": worker}).encode()
        states: dict[bytes, Any] = self.mirrors if what == "pairs" else self.samplers
        state = states.get(endpoint)
        if state is None:
            return 404, json.dumps({"error": "not_found", "message": f"endpoint {endpoint.decode('latin-1')!r} "
                                    f"{'mirrors' if what == 'pairs' else 'samples'} nothing"}).encode()
        here = (extra["mirrors"].get((state.key, state.id), NOTHING) if what == "pairs"
                else extra["samples"].get(state.key, (0, 0, [0, 0])))
        return 200, json.dumps({**state.counters(here),
                                "pairs": [state.pair(r) for r in state.since(after, limit)]}).encode()

    def report(self) -> dict[str, Any]:
        """Each ring's counters, sent with every answer: the router carries them on if this worker dies."""
        return {"mirrors": [(m.key, m.id, m.report()) for m in self.mirrors.values()],
                "samples": [(s.key, s.report()) for s in self.samplers.values()]}

    # -- periodic ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Drop copies that waited too long, cut those the candidate did not answer in time; close
        idle connections."""
        self.loop.call_later(SWEEP_S, self.tick)
        now = self.loop.time()
        late = now - self.options.mirror_timeout
        for state in self.mirrors.values():
            state.expire(late)
        for copy in [c for c in self.copies if c.started < late]:
            copy.finish("timed out")
        for pool in self.pools.values():
            pool.close_idle(older_than=now - self.options.upstream_idle_timeout)


async def serve(fd: int, options: Options) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    worker = Worker(options, loop, done)
    await loop.create_unix_connection(lambda: worker, sock=socket.socket(fileno=fd))
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(None))
    loop.call_later(SWEEP_S, worker.tick)
    await done
    for pool in worker.pools.values():
        pool.close()
    return 0


def set_priority(priority: str) -> None:
    """Lower this process's scheduling priority below the router's (``idle`` falls back to
    ``low`` where ``SCHED_IDLE`` is not available)."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError):
            priority = "low"
    if priority == "low":
        os.nice(LOW_NICE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelcd.routing.mirror_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--fd", type=int, required=True, help="this process's end of the router's socket")
    p.add_argument("--mirror-pending", type=int, default=Options.mirror_pending)
    p.add_argument("--mirror-pairs", type=int, default=Options.mirror_pairs)
    p.add_argument("--mirror-timeout", type=float, default=Options.mirror_timeout)
    p.add_argument("--mirror-body-cap", type=int, default=Options.mirror_body_cap)
    p.add_argument("--mirror-backlog", type=int, default=Options.mirror_backlog)
    p.add_argument("--connect-timeout", type=float, default=Options.connect_timeout)
    p.add_argument("--priority", choices=MIRROR_WORKER_PRIORITIES, default=Options.mirror_worker_priority,
                   help="scheduling priority: idle (SCHED_IDLE), low (nice 5) or normal (the router's)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C stops the router; the router stops us
    set_priority(a.priority)  # the copies are best effort: on a busy machine serving gets the CPU first
    options = Options(table=Path(os.devnull), mirror_pending=a.mirror_pending, mirror_pairs=a.mirror_pairs,
                      mirror_timeout=a.mirror_timeout, mirror_body_cap=a.mirror_body_cap,
                      mirror_backlog=a.mirror_backlog, connect_timeout=a.connect_timeout)
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(a.fd, options))


if __name__ == "__main__":
    sys.exit(main())
