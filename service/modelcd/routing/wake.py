"""Waking a sleeping backend, router side (scale to zero: ``releases.idle`` puts deployments to
sleep and wakes them; the table marks a sleeping backend ``sleeping``).

A request whose pick is a sleeping backend is held (at most ``MAX_HELD`` per backend; more get
503) while one wake per backend is in flight: a POST to the control plane's loopback wake route
(``WAKE_FILE`` next to the table says where, with the secret that route checks; mode 0600, written
by the service). The control plane warm-starts the deployment on its own port, waits for its
health and applies a table where it is awake before it answers. Meanwhile the router polls the
backend's ``/healthz`` itself (every ``HEALTH_POLL_S``): as soon as it answers for the route's
model and the backend's version, the backend counts as awake here (``awake``, until the next
table is applied) and the held requests are dispatched again, in order, without waiting for the
table; otherwise they go once the control plane answered and the re-read table has it awake. A
wake that fails, or that does not finish within the backend's ``wake_timeout_s`` (counted from
the first held request), answers every held request 503 with ``Retry-After``; so does a control
plane that is down (nobody may start a deployment then).

Standard library only, like the rest of the router."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from modelcd.routing.applied import Target
    from modelcd.routing.client import ClientConnection, Request

log = logging.getLogger("modelcd.router")

WAKE_FILE = "wake.json"  # {"url": "http://127.0.0.1:PORT/-/wake", "secret": "..."}, beside the table
MAX_HELD = 1024  # requests held per sleeping backend; more are answered 503 at once
T = TypeVar("T")
RETRY_AFTER_S = 5  # what a 503 for a backend that could not wake asks clients to wait (at least)
HEALTH_POLL_S = 0.005  # between failed health probes of a waking backend (a refused connection is cheap)
HEALTH_PROBE_TIMEOUT_S = 1.0


class _Wake:
    """One wake in flight: the backend, the Retry-After its failure answers, the requests it holds."""

    __slots__ = ("backend_id", "held", "retry_after")

    def __init__(self, backend_id: str, retry_after: int) -> None:
        self.backend_id = backend_id
        self.retry_after = retry_after
        self.held: list[tuple[ClientConnection, Request]] = []


class Waker:
    """Held requests and wakes in flight, per sleeping backend, of one router.

    ``dispatch`` answers a request again from the top (the table it reads then is the one the
    wake left); ``reload`` re-reads the table file; ``sleeping`` says whether the applied table
    still marks a backend sleeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: Path, dispatch: Callable[[Any, Any], None],
                 reload: Callable[[], None], sleeping: Callable[[str], bool]) -> None:
        self.loop = loop
        self.wake_file = table.parent / WAKE_FILE
        self.dispatch = dispatch
        self.reload = reload
        self.sleeping = sleeping
        self.waking: dict[str, _Wake] = {}
        self.tasks: set[asyncio.Task[Any]] = set()  # the loop keeps only weak references to tasks
        self.awake: set[str] = set()  # sleeping in the applied table, but seen healthy since (cleared by apply)
        self.woken = 0  # wakes that succeeded, for /-/activity
        self.failed = 0

    def hold(self, client: ClientConnection, req: Request, target: Target, model: str) -> None:
        """Hold ``req`` until ``target``'s backend (of ``model``) is awake, starting its wake if
        none is in flight."""
        backend = target.backend
        wake = self.waking.get(backend.id)
        if wake is None:
            timeout = backend.wake_timeout_s
            wake = self.waking[backend.id] = _Wake(backend.id, max(RETRY_AFTER_S, math.ceil(timeout)))
            self._task(self._wake(wake, timeout, target, model))
        if len(wake.held) >= MAX_HELD:
            _unavailable(client, req, wake, f"{MAX_HELD} requests already wait for deployment {backend.id} to wake")
            return
        wake.held.append((client, req))

    def _task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def counters(self) -> dict[str, Any]:
        return {"waking": {w.backend_id: len(w.held) for w in self.waking.values()}, "woken": self.woken,
                "failed": self.failed}

    async def _wake(self, wake: _Wake, timeout: float, target: Target, model: str) -> None:
        started = asyncio.Event()  # the control plane says no sleep is stopping the old process any more
        ask = self._task(self._ask(wake.backend_id, timeout, started))
        health = self._task(self._healthy(target, model, started))
        why: str | None = f"waking deployment {wake.backend_id} was interrupted"
        try:
            why = await self._race(wake.backend_id, timeout, ask, health)
        except Exception as e:  # never leave requests held: whatever went wrong, answer them
            log.exception("waking %s", wake.backend_id)
            why = f"waking deployment {wake.backend_id} failed ({type(e).__name__})"
        finally:
            health.cancel()
            if not ask.done() and why is not None:
                ask.cancel()
            del self.waking[wake.backend_id]
        if why is None:
            self.woken += 1
        else:
            self.failed += 1
            log.warning("%s; answering %d held request(s) 503", why, len(wake.held))
        for client, req in wake.held:
            if client.lost:
                client.request_done()
            elif why is None:
                self.dispatch(client, req)
            else:
                _unavailable(client, req, wake, why)

    async def _race(self, backend_id: str, timeout: float, ask: asyncio.Task[str | None],
                    health: asyncio.Task[None]) -> str | None:
        """None once the backend is awake: healthy on its port after the control plane said it
        starts it (then the control plane's answer is only logged), or the control plane said it
        is awake and the re-read table agrees."""
        done, _ = await asyncio.wait({ask, health}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return f"deployment {backend_id} did not wake within {timeout:g}s"
        if health in done:
            self.awake.add(backend_id)
            ask.add_done_callback(lambda t: _log_late(backend_id, t))
            return None
        why = ask.result()
        if why is None:
            self.reload()
            if self.sleeping(backend_id):
                why = f"deployment {backend_id} woke but the routing table still has it asleep"
        return why

    async def _healthy(self, target: Target, model: str, started: asyncio.Event) -> None:
        """Return once the backend answers ``/healthz`` for ``model`` and its version, polled
        from the moment ``started`` is set (before, its old process may still be stopping)."""
        backend = target.backend
        parts = urlsplit(backend.url)
        head = (b"GET " + target.prefix + b"/healthz HTTP/1.1\r\n" + target.host_line
                + b"connection: close\r\n\r\n")
        await started.wait()
        while True:
            try:
                answer = await asyncio.wait_for(_exchange(parts.hostname or "127.0.0.1", parts.port or 80, head),
                                                HEALTH_PROBE_TIMEOUT_S)
                status, body = _parse(answer)
                doc = json.loads(body) if status == b"200" else {}
                if doc.get("model") == model and str(doc.get("version")) == str(backend.version):
                    return
            except (OSError, TimeoutError, ValueError, AttributeError):
                pass
            await asyncio.sleep(HEALTH_POLL_S)

    async def _ask(self, backend_id: str, timeout: float, started: asyncio.Event) -> str | None:
        """POST the wake to the control plane and follow its steps (server-sent events, see
        ``app.wake``): set ``started`` at ``starting``; None at ``awake``, else why not."""
        try:
            doc = json.loads(self.wake_file.read_text())
            url, secret = str(doc["url"]), str(doc["secret"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"no control plane to wake deployment {backend_id} ({self.wake_file} is missing or unreadable)"
        parts = urlsplit(url)
        body = json.dumps({"timeout_s": timeout}).encode()
        head = (f"POST {parts.path.rstrip('/')}/{quote(backend_id, safe='')} HTTP/1.1\r\n"
                f"host: {parts.netloc}\r\nauthorization: Bearer {secret}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        try:
            reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 80)
        except OSError as e:
            return f"the control plane is down ({e.strerror or e}); deployment {backend_id} cannot wake"
        answer = b""
        try:
            writer.write(head + body)
            while (more := await reader.read(65536)) and len(answer) < (1 << 20):
                answer += more
                if b"event: starting\n" in answer:
                    started.set()
                if b"event: awake\n" in answer:
                    return None
                if b"event: failed\n" in answer:
                    break
        finally:
            writer.close()
        status, rest = _parse(answer)
        message = rest.partition(b"event: failed\n")[2].partition(b"\n\n")[0].removeprefix(b"data: ")
        try:
            message = json.loads(message or rest).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        log.warning("the control plane could not wake %s (%s): %s", backend_id, status.decode("latin-1") or "no answer",
                    str(message)[:2000])
        return f"the control plane could not wake deployment {backend_id} (see the deployment's log)"


async def _exchange(host: str, port: int, request: bytes) -> bytes:
    """Send ``request`` (``connection: close``) and read the answer to its end (at most 1 MiB)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        answer = b""
        while (more := await reader.read(1 << 20)) and len(answer) < (1 << 20):
            answer += more
        return answer
    finally:
        writer.close()


def _parse(answer: bytes) -> tuple[bytes, bytes]:
    """The status code and the body of a whole HTTP/1.1 answer (b"" when it is not one)."""
    status_line, _, rest = answer.partition(b"\r\n")
    status = status_line.split(b" ", 2)[1:2]
    return (status[0] if status else b""), rest.partition(b"\r\n\r\n")[2]


def _log_late(backend_id: str, task: asyncio.Task[str | None]) -> None:
    """The control plane's answer to a wake the router saw succeed already (by health)."""
    if task.cancelled():
        return
    why = task.exception() or task.result()
    if why is not None:
        log.warning("deployment %s answered its health check, but the control plane's wake failed: %s",
                    backend_id, why)


def _unavailable(client: ClientConnection, req: Request, wake: _Wake, why: str) -> None:
    client.respond_error(req, 503, "waking", f"{why}; retry in {wake.retry_after}s",
                         b"retry-after: %d\r\n" % wake.retry_after)
    client.request_done()
