"""Waking a sleeping backend, router side (scale to zero: ``releases.idle`` puts deployments to
sleep and wakes them; the table marks a sleeping backend ``sleeping``).

A request whose pick is a sleeping backend is held (at most ``MAX_HELD`` per backend; more get
503) while one wake per backend is in flight: a POST to the control plane's loopback wake route
(``WAKE_FILE`` next to the table says where, with the secret that route checks; mode 0600, written
by the service). The control plane warm-starts the deployment, waits for its health and applies a
table where it is awake before it answers; then the table is re-read and the held requests are
dispatched again, in order. A wake that fails, or that does not finish within the backend's
``wake_timeout_s`` (counted from the first held request), answers every held request 503 with
``Retry-After``; so does a control plane that is down (nobody may start a deployment then).

Standard library only, like the rest of the router."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from modelcd.routing.applied import Target
    from modelcd.routing.client import ClientConnection, Request

log = logging.getLogger("modelcd.router")

WAKE_FILE = "wake.json"  # {"url": "http://127.0.0.1:PORT/-/wake", "secret": "..."}, beside the table
MAX_HELD = 1024  # requests held per sleeping backend; more are answered 503 at once
RETRY_AFTER_S = 5  # what a 503 for a backend that could not wake asks clients to wait (at least)


class _Wake:
    """One wake in flight: the backend, when it gives up, and the requests it holds."""

    __slots__ = ("backend_id", "deadline", "held", "retry_after")

    def __init__(self, backend_id: str, deadline: float, retry_after: int) -> None:
        self.backend_id = backend_id
        self.deadline = deadline
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
        self.woken = 0  # wakes that succeeded, for /-/activity
        self.failed = 0

    def hold(self, client: ClientConnection, req: Request, target: Target) -> None:
        """Hold ``req`` until ``target``'s backend is awake (starting its wake if none is in flight)."""
        backend = target.backend
        wake = self.waking.get(backend.id)
        if wake is None:
            timeout = backend.wake_timeout_s
            wake = self.waking[backend.id] = _Wake(backend.id, self.loop.time() + timeout,
                                                   max(RETRY_AFTER_S, math.ceil(timeout)))
            self.loop.create_task(self._wake(wake, timeout))
        if len(wake.held) >= MAX_HELD:
            _unavailable(client, req, wake, f"{MAX_HELD} requests already wait for deployment {backend.id} to wake")
            return
        wake.held.append((client, req))

    def counters(self) -> dict[str, Any]:
        return {"waking": {w.backend_id: len(w.held) for w in self.waking.values()}, "woken": self.woken,
                "failed": self.failed}

    async def _wake(self, wake: _Wake, timeout: float) -> None:
        try:
            why = await asyncio.wait_for(self._ask(wake.backend_id, timeout), timeout)
        except TimeoutError:
            why = f"deployment {wake.backend_id} did not wake within {timeout:g}s"
        except Exception as e:  # never leave requests held: whatever went wrong, answer them
            log.exception("waking %s", wake.backend_id)
            why = f"waking deployment {wake.backend_id} failed ({type(e).__name__})"
        del self.waking[wake.backend_id]
        if why is None:
            self.reload()
            if self.sleeping(wake.backend_id):
                why = f"deployment {wake.backend_id} woke but the routing table still has it asleep"
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

    async def _ask(self, backend_id: str, timeout: float) -> str | None:
        """POST the wake to the control plane; None once it answered 200, else why not."""
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
        try:
            writer.write(head + body)
            answer = await reader.read(1 << 20)  # the service closes after its answer (connection: close)
            while (more := await reader.read(1 << 20)) and len(answer) < (1 << 20):
                answer += more
        finally:
            writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        status = status_line.split(b" ", 2)[1:2]
        if status == [b"200"]:
            return None
        try:
            message = json.loads(rest.partition(b"\r\n\r\n")[2]).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        code = status[0].decode("latin-1") if status else "no answer"
        log.warning("the control plane could not wake %s (%s): %s", backend_id, code, str(message)[:2000])
        return f"the control plane could not wake deployment {backend_id} ({code}; see the deployment's log)"


def _unavailable(client: ClientConnection, req: Request, wake: _Wake, why: str) -> None:
    client.respond_error(req, 503, "waking", f"{why}; retry in {wake.retry_after}s",
                         b"retry-after: %d\r\n" % wake.retry_after)
    client.request_done()
