"""The built-in router process: a small HTTP/1.1 reverse proxy in front of the scoring
deployments, run as its own process so it keeps serving while the control plane is down.

    python -m modelcd.routing.proxy --table PATH --host 127.0.0.1 --port 8700

``ANY /{model}/{env}/{rest}`` goes to ``{backend.url}/{rest}`` of a backend picked by weight;
``/-/healthz``, ``/-/table``, ``POST /-/reload``, ``/-/mirror[/pairs]`` and ``/-/samples``
(shadow and sampled traffic, kept by the mirror worker process: ``routing.mirror``) and
``/-/activity`` (seconds since each backend's last request, for scale to zero) are the admin
routes (model names cannot start with '-'). A request for a backend the table marks sleeping
is held while the control plane wakes it (``routing.wake``). The table comes from a JSON file that the
control plane replaces atomically; it is re-read on ``/-/reload``, on SIGHUP and when the file
changes (polled), and an invalid file leaves the old table serving. One table is one immutable
``AppliedTable``: a request takes the reference once, so it sees the old or the new table,
never a mix.

A keyed endpoint (``auth: key``) answers 401 unless ``Authorization: Bearer <key>`` hashes to
one of its digests, and its backends never see the key; a router that other machines may
reach answers 403 for open endpoints unless ``--allow-open-endpoints``. Request heads are
bounded (URL, header bytes and count, a header timeout) and answered 414/431/408 without
buffering the rest. A backend that refuses a connection is skipped for a second (passive
health) and the request goes to another backend of the endpoint, standbys last.

Implementation: asyncio protocols with ``httptools`` (llhttp) parsing both sides, uvloop when
installed, keep-alive connection pools to the backends; chosen by measurement (see
docs/benchmarks-router.md). Standard library + httptools (+ uvloop) only: it starts fast.

Modules: this one holds the server (table apply and reload, dispatch, access check, admin
routes), the command line and ``main``; ``options`` its settings; ``client`` the client
connections (parsing, limits, the key check); ``forward`` a request's way to a backend
(attempts, failover); ``upstream`` the backend connection pools; ``applied`` the table as
served; ``http1`` what both sides share; ``table`` the table's values.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from modelcd.errors import InvalidInput
from modelcd.routing.applied import AppliedTable, Route, Target
from modelcd.routing.client import ClientConnection, Request, key_accepted
from modelcd.routing.forward import Exchange, Forward
from modelcd.routing.mirror import MirrorState, MirrorWorker, SampleState
from modelcd.routing.options import MIRROR_WORKER_PRIORITIES, OPEN_SETTING, Options
from modelcd.routing.table import Backend, RoutingTable, listen_is_loopback, next_candidate
from modelcd.routing.upstream import UpstreamPool
from modelcd.routing.wake import Waker

__all__ = ["Options", "RouterServer", "key_accepted", "main", "parse_args", "serve"]

log = logging.getLogger("modelcd.router")

ADMIN_PREFIX = b"/-/"


class RouterServer:
    """The router: applied table, client connections, backend pools, admin routes."""

    def __init__(self, options: Options, loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.loop = loop
        self.clients: set[ClientConnection] = set()
        self.inflight: set[Exchange] = set()
        self.pools: dict[tuple[str, int], UpstreamPool] = {}
        self.state = AppliedTable(RoutingTable(0, {}), {})
        self.table_error: str | None = None
        self.file_id: tuple[int, int, int] | None = None
        self.draining = False
        self.ticks = 0
        self.down_pools: set[UpstreamPool] = set()  # backends marked down; empty: every pick takes the fast path
        self.mirrors: dict[tuple[bytes, str], MirrorState] = {}  # shadow traffic per (endpoint, candidate)
        self.samplers: dict[bytes, SampleState] = {}  # sampled live traffic per endpoint (production watch)
        self.worker = MirrorWorker(self)  # the process that sends the copies and keeps the pairs and samples
        self.seen: dict[str, float] = {}  # backend id → when a request last went to it (/-/activity)
        self.waker = Waker(loop, options.table, self.dispatch, lambda: self.poll(True), self.asleep)
        exposed = options.exposed if options.exposed is not None else not listen_is_loopback(options.host)
        self.refuse_open = exposed and not options.allow_open_endpoints

    # -- table ---------------------------------------------------------------------------
    def apply(self, table: RoutingTable) -> None:
        """Swap in ``table`` (one reference assignment), then drop pools nobody routes to."""
        routes: dict[bytes, Route] = {}
        used: set[tuple[str, int]] = set()
        mirrors: dict[tuple[bytes, str], MirrorState] = {}
        samplers: dict[bytes, SampleState] = {}

        def target_of(backend: Backend) -> Target:
            parts = urlsplit(backend.url)
            addr = (parts.hostname or "127.0.0.1", parts.port or 80)
            used.add(addr)
            pool = self.pools.get(addr)
            if pool is None:
                pool = self.pools[addr] = UpstreamPool(addr[0], addr[1], self.options)
            return Target(backend, pool)

        for key, route in table.endpoints.items():
            bkey = key.encode()
            targets = [target_of(backend) for backend in route.backends]
            state = None
            if route.mirror is not None:
                m = route.mirror
                state = self.mirrors.get((bkey, m.id))
                if state is None:  # a new candidate; the same one keeps its pairs across tables (in the worker)
                    state = MirrorState(bkey, m)
                state.mirror = m
                mirrors[(bkey, m.id)] = state
            sampler = None
            if route.sample_rate > 0:
                sampler = self.samplers.get(bkey)
                if sampler is None:  # a new watch; an endpoint sampled already keeps its samples
                    sampler = SampleState(bkey, route.sample_rate)
                sampler.rate = route.sample_rate
                samplers[bkey] = sampler
            routes[bkey] = Route(bkey, route, targets, state, sampler)
        old = self.state.table.generation
        now, ids = self.loop.time(), {b.id for r in table.endpoints.values() for b in r.backends}
        self.seen = {i: self.seen.get(i, now) for i in ids}  # idle since it was first routed, at worst
        self.state = AppliedTable(table, routes)
        self.waker.awake.clear()  # the table says again who sleeps
        self.mirrors, self.samplers = mirrors, samplers
        self.worker.configure()
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
        self.worker.tick(now)
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
            if self.admin(client, req):
                client.request_done()
            return
        path, sep, query = url.partition(b"?")
        parts = path.split(b"/", 3)
        route, key = None, b""
        if len(parts) >= 3 and not parts[0] and parts[1] and parts[2]:
            key = parts[1] + b"/" + parts[2]
            route = self.state.routes.get(key)  # the one read of the table for this request
        if route is None:
            retired = self.state.table.retired.get(key.decode("latin-1")) if key else None
            if retired is not None:  # on purpose: say so, and how it comes back
                model, _, env = key.decode("latin-1").partition("/")
                client.respond_error(req, 410, "endpoint_retired", (
                    f"endpoint {model}/{env} was retired at {retired} and serves nothing; a new release brings "
                    f"it back: `modelcd promote {model} VERSION --env {env}`"))
            else:
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
        self.seen[target.backend.id] = self.loop.time()
        if target.backend.sleeping and target.backend.id not in self.waker.awake:  # scaled to zero: wake it
            self.waker.hold(client, req, target, route.name.partition("/")[0])
            return
        rest = b"/" + parts[3] if len(parts) == 4 else b"/"
        if sep:
            rest += b"?" + query
        forward = Forward(self, client, req, route, rest)
        if route.mirror is not None or route.sampler is not None:
            forward.keep(target)
        forward.send(target)

    def asleep(self, backend_id: str) -> bool:
        """Whether the applied table marks this backend sleeping (scaled to zero)."""
        return any(t.backend.sleeping and t.backend.id == backend_id
                   for r in self.state.routes.values() for t in r.targets)

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

    # -- admin ---------------------------------------------------------------------------
    def admin(self, client: ClientConnection, req: Request) -> bool:
        """/-/healthz (anyone), /-/table, /-/reload and the shadow routes (loopback clients only).
        Returns False when the answer comes later (the mirror worker answers it)."""
        path = req.url.partition(b"?")[0]
        method = req.method
        if path == b"/-/healthz" and method in (b"GET", b"HEAD"):
            client.respond_json(req, 200, self.health())
        elif path not in (b"/-/table", b"/-/reload", b"/-/mirror", b"/-/mirror/pairs", b"/-/samples", b"/-/activity"):
            client.respond_error(req, 404, "not_found", f"no admin route {path.decode('latin-1')!r}")
        elif not _is_loopback(client.peer):
            client.respond_error(req, 403, "forbidden", "admin routes answer loopback clients only")
        elif path == b"/-/table" and method in (b"GET", b"HEAD"):
            client.respond(req, 200, json.dumps(self.state.table.to_dict()).encode())
        elif path == b"/-/activity" and method == b"GET":
            now = self.loop.time()
            client.respond_json(req, 200, {"idle_s": {i: round(now - t, 3) for i, t in self.seen.items()},
                                           **self.waker.counters()})
        elif path == b"/-/mirror" and method == b"GET":
            if not self.mirrors:
                client.respond_json(req, 200, {"mirrors": [], "worker": self.worker.counters()})
                return True
            return self.kept(client, req, "mirror")
        elif path == b"/-/mirror/pairs" and method == b"GET":
            return self.kept(client, req, "pairs")
        elif path == b"/-/samples" and method == b"GET":
            return self.kept(client, req, "samples")
        elif path == b"/-/reload" and method == b"POST":
            try:
                client.respond_json(req, 200, {"generation": self.reload()})
            except (OSError, InvalidInput) as e:
                client.respond_json(req, 400, {"error": "invalid_table", "message": str(e),
                                               "generation": self.state.table.generation})
        else:
            client.respond_error(req, 405, "method_not_allowed", f"{method.decode('latin-1')} not allowed here")
        return True

    def kept(self, client: ClientConnection, req: Request, what: str) -> bool:
        """``?endpoint=model/env&after=SEQ&limit=N``: the counters and the records kept after
        ``SEQ`` (oldest first) of an endpoint's candidate (``/-/mirror/pairs``) or of its sampled
        traffic (``/-/samples``), or every candidate's counters (``/-/mirror``); 404 when it keeps
        none. The mirror worker keeps them: it is asked, and its answer relayed when it comes."""
        query = parse_qs(req.url.partition(b"?")[2].decode("latin-1"))
        endpoint = (query.get("endpoint") or [""])[0].encode("latin-1")
        try:
            after = int((query.get("after") or ["0"])[0])
            limit = min(max(int((query.get("limit") or ["1000"])[0]), 1), 10_000)
        except ValueError:
            client.respond_error(req, 400, "bad_request", "after and limit must be whole numbers")
            return True
        kept = {key for key, _ in self.mirrors} if what == "pairs" else self.samplers
        if what != "mirror" and endpoint not in kept:
            client.respond_error(req, 404, "not_found", f"endpoint {endpoint.decode('latin-1')!r} "
                                 f"{'mirrors' if what == 'pairs' else 'samples'} nothing")
            return True

        def reply(status: int, body: bytes) -> None:
            client.respond(req, status, body)
            client.request_done()

        self.worker.ask(what, endpoint, after, limit, reply)
        return False

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "router": "modelcd", "generation": self.state.table.generation,
                "pid": os.getpid(), "table": str(self.options.table), "table_error": self.table_error,
                "open_endpoints": "refused" if self.refuse_open else "served",
                "mirror_worker": self.worker.counters()}

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
    await server.worker.start_ready(options.mirror_worker_timeout)
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
    await server.worker.stop()
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
    p.add_argument("--mirror-pending", type=int, default=Options.mirror_pending,
                   help="shadow copies in progress per endpoint; more are dropped")
    p.add_argument("--mirror-pairs", type=int, default=Options.mirror_pairs, help="pairs of answers kept per endpoint")
    p.add_argument("--mirror-timeout", type=float, default=Options.mirror_timeout,
                   help="seconds a candidate may take to answer a copy")
    p.add_argument("--mirror-body-cap", type=int, default=Options.mirror_body_cap,
                   help="bytes of a request or answer kept in a pair")
    p.add_argument("--mirror-backlog", type=int, default=Options.mirror_backlog,
                   help="shadow copies waiting per endpoint while --mirror-pending are in progress; more are dropped")
    p.add_argument("--mirror-handoff-bytes", type=int, default=Options.mirror_handoff_bytes,
                   help="bytes of copies (requests and answers) not yet taken by the mirror worker; beyond, "
                        "copies are dropped")
    p.add_argument("--mirror-worker-timeout", type=float, default=Options.mirror_worker_timeout,
                   help="seconds the mirror worker may take to answer; then it is restarted")
    p.add_argument("--mirror-worker-priority", choices=MIRROR_WORKER_PRIORITIES,
                   default=Options.mirror_worker_priority,
                   help="the mirror worker's scheduling priority: idle (SCHED_IDLE, the default: copies use only "
                        "CPU time serving does not want), low (nice 5) or normal")
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
                      mirror_pending=a.mirror_pending, mirror_pairs=a.mirror_pairs, mirror_timeout=a.mirror_timeout,
                      mirror_body_cap=a.mirror_body_cap, mirror_handoff_bytes=a.mirror_handoff_bytes,
                      mirror_backlog=a.mirror_backlog,
                      mirror_worker_timeout=a.mirror_worker_timeout, mirror_worker_priority=a.mirror_worker_priority,
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
