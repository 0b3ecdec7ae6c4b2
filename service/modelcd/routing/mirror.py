"""Shadow traffic and sampled traffic, the router's side: copies of live requests for a candidate
that never answers a client, and requests kept with their answers for the production watch.

The router's event loop does as little as it can for them, because at high concurrency each
microsecond it spends there is one every other request waits behind. Once the serving backend's
response was relayed to the client, a request that is mirrored (``MirrorState.take``: the
route's ``sample_rate``) or sampled becomes one tuple of bytes appended to a list
(``MirrorWorker.add``); a batch of them goes to the **mirror worker**, a process of its own
(``routing.mirror_worker``, at a lower scheduling priority: ``mirror_worker_priority``), in one
write on a Unix socket every ``BATCH_S`` (or sooner when ``BATCH_MAX`` items are waiting). The
worker sends the copies to the candidates, reads their answers, matches each with the
champion's, and keeps the bounded rings of pairs and samples; the admin routes ``/-/mirror``,
``/-/mirror/pairs`` and ``/-/samples`` are questions the router passes on to it on the same
socket (so they see every batch sent before them) and whose JSON answer it relays as it comes
(every answer also brings each ring's counters: see ``_Handed``).

Nothing of it can hold up the client's answer: the client has it before its copy exists; a
batch is dropped (its items counted as ``dropped`` per endpoint) when more than
``mirror_handoff_bytes`` are still unsent to the worker, or the worker is down and
``BATCH_MAX`` items are waiting already; the router never waits for the worker. A worker that
dies is restarted (at most once per ``RESTART_MIN_S``); one that does not answer a question (or
the router's periodic ping) within ``mirror_worker_timeout`` is killed and restarted. A
restarted worker starts with empty rings whose sequence numbers continue above every number the
old one could have given (``handed``: the items the router passed on for that ring), so a reader
that asks for records ``after`` the last one it saw misses nothing it could still get.

A batch item (``marshal``'d; positions read by the worker):
``(endpoint, candidate id or None, sampled, method, rest, headers, has_host, request body or
None, champion status, champion body or None, champion seconds)``: the request as the serving
backend got it (``forward.backend_headers``), the worker adds the candidate's path prefix and
Host; a body of None was larger than ``mirror_body_cap`` (not kept; the request's own body is
sent whole when the request is copied).
"""

from __future__ import annotations

import asyncio
import json
import logging
import marshal
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelcd.routing.proxy import RouterServer
    from modelcd.routing.table import Mirror

log = logging.getLogger("modelcd.router")

BATCH_S = 0.005  # the first item of a batch waits at most this long for others
BATCH_MAX = 256  # items in one batch; more are sent at once (or, the worker down, dropped)
ITEM_OVERHEAD = 96  # bytes of an item's frame beyond its variable fields (marshal's tags, the small values)
RESTART_MIN_S = 1.0  # a worker that died is restarted at once, unless it started less than this ago
PING_S = 1.0  # how often an idle worker is asked whether it answers

# Frames on the socket between the router and its worker: a 4-byte length, then a marshal'd
# value. The router sends (kind, payload); the worker answers each QUERY with (status, JSON body,
# each ring's counters).
FRAME = struct.Struct("!I")
CONFIG, BATCH, QUERY = 1, 2, 3
Item = tuple[Any, ...]
Reply = Callable[[int, bytes], None]


def frame(value: Any) -> bytes:
    data = marshal.dumps(value)
    return FRAME.pack(len(data)) + data


class FrameReader:
    """Frames out of a byte stream, as they complete."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self.buf
        buf += data
        out, at = [], 0
        while len(buf) - at >= FRAME.size:
            (size,) = FRAME.unpack_from(buf, at)
            end = at + FRAME.size + size
            if len(buf) < end:
                break
            out.append(marshal.loads(memoryview(buf)[at + FRAME.size:end]))
            at = end
        if at:
            del buf[:at]
        return out


class _Handed:
    """What became of one ring's items on the router's side: ``handed`` (all, counted as they
    are made), ``dropped`` before a worker had them, ``lost`` in a worker that died before it
    had settled them (an upper bound: the items sent to it less those it had settled by its last
    answer to a ping, ``report``; ``epoch``: the items sent to the workers before it). The dead
    workers' last reported counters are ``carried`` on, so the counters the router serves add
    up across restarts. ``SETTLED``: the report's fields that count settled items."""

    __slots__ = ("carried", "dropped", "epoch", "handed", "lost", "report")
    SETTLED: tuple[int, ...] = (0,)

    def __init__(self, fields: int) -> None:
        self.handed = self.dropped = self.lost = self.epoch = 0
        self.report = [0] * fields  # the current worker's counters, as of its last ping
        self.carried = [0] * fields  # the dead workers' counters, as last reported

    def worker_gone(self, unsent: int) -> None:
        """The worker died with this ring's items; ``unsent`` of them wait for the next one."""
        sent = self.handed - self.dropped - unsent
        self.lost += max(0, sent - self.epoch - sum(self.report[i] for i in self.SETTLED))
        self.epoch = sent
        self.carried = [c + r for c, r in zip(self.carried, self.report, strict=True)]
        self.report = [0] * len(self.report)

    def extra(self) -> tuple[int, int, list[int]]:
        """What the worker adds to its own counters when it serves them."""
        return self.dropped, self.lost, self.carried


class MirrorState(_Handed):
    """One endpoint's candidate as the router sees it: the sampling, and what became of the
    copies here. Reported: mirrored, dropped, candidate_errors, truncated."""

    __slots__ = ("key", "mirror")
    SETTLED = (0, 1)

    def __init__(self, key: bytes, mirror: Mirror) -> None:
        super().__init__(4)
        self.key = key
        self.mirror = mirror

    def take(self) -> bool:
        """Whether this request is copied (the ``sample_rate``)."""
        rate = self.mirror.sample_rate
        return rate >= 1.0 or random.random() < rate


class SampleState(_Handed):
    """One endpoint's sampled live traffic (the production watch), as the router sees it.
    Reported: kept (since the worker started), truncated."""

    __slots__ = ("key", "rate")

    def __init__(self, key: bytes, rate: float) -> None:
        super().__init__(2)
        self.key = key
        self.rate = rate

    def take(self) -> bool:
        return random.random() < self.rate


class Pair:
    """A live request kept for the worker: the serving backend's status and body as they are
    relayed, then (``champion_done``) the whole as one batch item."""

    __slots__ = ("body", "body_cap", "capped", "mirror", "sample", "size", "started", "status")

    def __init__(self, mirror: MirrorState | None, sample: SampleState | None, body_cap: int) -> None:
        self.mirror = mirror  # copied to the candidate
        self.sample = sample  # sampled for the production watch
        self.body_cap = body_cap
        self.started = time.monotonic()
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0
        self.capped = False

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
        self.mirror = None
        if not mirror_only:
            self.sample = None

    def champion_done(self, server: RouterServer, method: bytes, rest: bytes, headers: bytes, has_host: bool,
                      body: bytes) -> None:
        """The serving backend answered (and the client has it): hand the request to the worker."""
        mirror, sample = self.mirror, self.sample
        if mirror is not None:
            mirror.handed += 1
            key, mid = mirror.key, mirror.mirror.id
        elif sample is not None:
            key, mid = sample.key, None
            if len(body) > self.body_cap:
                body = None  # type: ignore[assignment]  # not kept, and not sent anywhere
        else:
            return
        if sample is not None:
            sample.handed += 1
        answer = None if self.capped else b"".join(self.body)
        size = ITEM_OVERHEAD + len(key) + len(rest) + len(headers) + len(body or b"") + len(answer or b"")
        server.worker.add((key, mid, sample is not None, method, rest, headers, has_host, body, self.status,
                           answer, time.monotonic() - self.started), size)


class _Asked:
    """A question to the worker, answered in the order asked."""

    __slots__ = ("frame", "reply", "sent_at")

    def __init__(self, sent_at: float, reply: Reply, frame: bytes) -> None:
        self.sent_at = sent_at
        self.reply = reply
        self.frame: bytes | None = frame  # None once written to the worker


class _Link(asyncio.Protocol):
    """The router's end of one worker's socket."""

    def __init__(self, owner: MirrorWorker) -> None:
        self.owner = owner
        self.reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner.connected(self, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.owner.answered(self.reader.feed(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(self)


class MirrorWorker:
    """The mirror worker process as the router runs it: started with the router (so it is ready
    before the first copy), fed batches, asked the admin questions, restarted when it dies or
    hangs."""

    def __init__(self, server: RouterServer) -> None:
        self.server = server
        self.loop = server.loop
        self.options = server.options
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: _Link | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer: list[Item] = []
        self.size = 0  # request bytes in ``buffer``
        self.waiting: deque[_Asked] = deque()
        self.restarts = 0
        self.started_at = -RESTART_MIN_S
        self.restart: asyncio.TimerHandle | None = None
        self.dropped = 0  # items dropped before the worker had them (all endpoints)
        self.dead: list[subprocess.Popen[bytes]] = []  # killed or exited, not reaped yet
        self.last_ping = 0.0
        self.ready = asyncio.Event()  # the worker answered its first question

    # -- the hot path ----------------------------------------------------------------------
    def add(self, item: Item, size: int) -> None:
        """Queue ``item`` (about ``size`` bytes once framed) for the next batch; a batch is sent
        before it would pass ``mirror_handoff_bytes`` (so it never does, unless one item alone
        does) or once it holds BATCH_MAX items."""
        if self.buffer and self.size + size > self.options.mirror_handoff_bytes:
            self.flush()
        buf = self.buffer
        buf.append(item)
        self.size += size
        if len(buf) == 1:
            self.loop.call_later(BATCH_S, self.flush)
        elif len(buf) >= BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        """Send the waiting items as one batch; drop them (counted) when the worker is down and
        too many wait, or when too much is still unsent to it."""
        buf = self.buffer
        if not buf:
            return
        transport = self.transport
        if transport is None:
            if len(buf) >= BATCH_MAX or self.size > self.options.mirror_handoff_bytes:
                self._drop(buf)
            else:
                return  # the worker is starting: these go first once it is connected
        elif transport.get_write_buffer_size() > self.options.mirror_handoff_bytes:
            self._drop(buf)
        else:
            transport.write(frame((BATCH, buf)))
        self.buffer, self.size = [], 0

    def _drop(self, items: list[Item]) -> None:
        mirrors, samplers = self.server.mirrors, self.server.samplers
        self.dropped += len(items)
        for item in items:
            if item[1] is not None and (state := mirrors.get((item[0], item[1]))) is not None:
                state.dropped += 1
            if item[2] and (sampler := samplers.get(item[0])) is not None:
                sampler.dropped += 1

    # -- configuration -----------------------------------------------------------------------
    def configure(self) -> None:
        """The applied table changed: tell the worker."""
        if self.transport is not None:
            self.transport.write(frame((CONFIG, self._config())))

    def _config(self) -> dict[str, Any]:
        """What the worker keeps; ``floor``: where a ring it starts now numbers from."""
        return {"mirrors": [(s.key, s.mirror.id, s.mirror.version, s.mirror.url, s.mirror.sample_rate, s.handed)
                            for s in self.server.mirrors.values()],
                "samples": [(s.key, s.rate, s.handed) for s in self.server.samplers.values()]}

    # -- questions -----------------------------------------------------------------------------
    def ask(self, what: str, endpoint: bytes, after: int, limit: int, reply: Reply) -> None:
        """Ask the worker (after every item handed so far); ``reply(status, body)`` once it
        answers, or with 503 when it does not within ``mirror_worker_timeout``."""
        self.flush()
        server = self.server
        extra = {"mirrors": {k: s.extra() for k, s in server.mirrors.items()},
                 "samples": {k: s.extra() for k, s in server.samplers.items()},
                 "worker": self.counters()}
        asked = _Asked(self.loop.time(), reply, frame((QUERY, (what, endpoint, after, limit, extra))))
        self.waiting.append(asked)
        if self.transport is not None:
            self.transport.write(asked.frame)  # type: ignore[arg-type]
            asked.frame = None
        elif self.proc is None and self.restart is None:
            self.start()

    def answered(self, replies: list[Any]) -> None:
        for status, body, report in replies:
            self._settled(report)
            if self.waiting:
                self.waiting.popleft().reply(status, body)

    def _fail(self, asked: _Asked, why: str) -> None:
        asked.reply(503, json.dumps({"error": "mirror_worker_unavailable", "message": why}).encode())

    # -- the process -------------------------------------------------------------------------
    async def start_ready(self, timeout: float) -> bool:
        """Start the worker and wait (at most ``timeout``) until it answers: copies of the
        first requests then need not wait for it to boot."""
        self.start()
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            log.error("the mirror worker did not answer within %gs; serving without it until it does", timeout)
            return False
        return True

    def start(self) -> None:
        self.restart = None
        if self.proc is not None or self.server.draining:
            return
        options = self.options
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "modelcd.routing.mirror_worker", "--fd", str(theirs.fileno()),
               "--mirror-pending", str(options.mirror_pending), "--mirror-pairs", str(options.mirror_pairs),
               "--mirror-timeout", str(options.mirror_timeout), "--mirror-body-cap", str(options.mirror_body_cap),
               "--mirror-backlog", str(options.mirror_backlog),
               "--connect-timeout", str(options.connect_timeout), "--priority", options.mirror_worker_priority]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.started_at = self.loop.time()
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            log.error("cannot start the mirror worker: %s; trying again in %gs", e, RESTART_MIN_S)
            ours.close()
            self.restart = self.loop.call_later(RESTART_MIN_S, self.start)
            return
        finally:
            theirs.close()
        log.info("mirror worker pid %d started", self.proc.pid)
        self.loop.create_task(self._connect(ours, self.proc))

    async def _connect(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        try:
            await self.loop.create_unix_connection(lambda: _Link(self), sock=sock)
        except OSError as e:
            log.error("cannot talk to the mirror worker pid %d: %s", proc.pid, e)
            sock.close()
            if proc is self.proc:
                self._gone()

    def connected(self, link: _Link, transport: asyncio.Transport) -> None:
        self.link, self.transport = link, transport
        transport.write(frame((CONFIG, self._config())))
        self.flush()
        for asked in self.waiting:
            if asked.frame is not None:
                transport.write(asked.frame)
                asked.frame = None
        self.ask("ping", b"", 0, 0, lambda status, body: self.ready.set())

    def lost(self, link: _Link) -> None:
        """The worker's socket closed: it died (or was killed). Restart it."""
        if link is not self.link:
            return
        log.warning("mirror worker pid %d is gone (exit code %s); restarting it", self.proc.pid if self.proc else 0,
                    self.proc.poll() if self.proc else None)
        self.link = self.transport = None
        mirrors: dict[tuple[bytes, str], int] = {}
        samples: dict[bytes, int] = {}
        for item in self.buffer:
            if item[1] is not None:
                mirrors[item[0], item[1]] = mirrors.get((item[0], item[1]), 0) + 1
            if item[2]:
                samples[item[0]] = samples.get(item[0], 0) + 1
        for k, state in self.server.mirrors.items():
            state.worker_gone(mirrors.get(k, 0))
        for key, sampler in self.server.samplers.items():
            sampler.worker_gone(samples.get(key, 0))
        sent = [a for a in self.waiting if a.frame is None]
        self.waiting = deque(a for a in self.waiting if a.frame is not None)
        for asked in sent:
            self._fail(asked, "the mirror worker stopped before answering; it is being restarted, ask again")
        self._gone()

    def _gone(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            self.dead.append(proc)
        if self.server.draining:
            return
        self.restarts += 1
        wait = max(0.0, self.started_at + RESTART_MIN_S - self.loop.time())
        self.restart = self.loop.call_later(wait, self.start)

    def tick(self, now: float) -> None:
        """The router's periodic work: reap, cut a worker that does not answer, ping an idle one."""
        self.dead = [p for p in self.dead if p.poll() is None]
        if self.waiting and now - self.waiting[0].sent_at > self.options.mirror_worker_timeout:
            if self.proc is not None:
                log.error("mirror worker pid %d did not answer within %gs; killing it", self.proc.pid,
                          self.options.mirror_worker_timeout)
                self.proc.kill()  # its socket closes: ``lost`` restarts it
            else:
                while self.waiting:
                    self._fail(self.waiting.popleft(), "the mirror worker is not running; it is being restarted")
        elif self.transport is not None and not self.waiting and now - self.last_ping > PING_S:
            self.last_ping = now
            self.ask("ping", b"", 0, 0, lambda status, body: None)

    def _settled(self, report: dict[str, Any]) -> None:
        """Each ring's counters in the worker so far (with every answer)."""
        for key, mid, counts in report["mirrors"]:
            if (state := self.server.mirrors.get((key, mid))) is not None:
                state.report = counts
        for key, counts in report["samples"]:
            if (sampler := self.server.samplers.get(key)) is not None:
                sampler.report = counts

    def counters(self) -> dict[str, Any]:
        """The worker as the router sees it (``/-/healthz`` and ``/-/mirror``)."""
        return {"pid": self.proc.pid if self.proc else None, "connected": self.transport is not None,
                "restarts": self.restarts, "dropped": self.dropped, "waiting_items": len(self.buffer),
                "unsent_bytes": self.transport.get_write_buffer_size() if self.transport else 0}

    async def stop(self) -> None:
        """Stop: the worker exits when its socket closes; wait for it (bounded), then kill it."""
        if self.restart is not None:
            self.restart.cancel()
        self.flush()
        proc = self.proc
        self.link = None
        if self.transport is not None:
            self.transport.close()
        if proc is None:
            return
        deadline = self.loop.time() + 3.0
        while proc.poll() is None and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
