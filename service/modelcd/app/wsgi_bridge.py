"""Running the Flask (WSGI) app under an ASGI server: the request body is read on the event
loop into a spooled file (memory up to 1 MiB, then disk, as waitress does), the app runs on a
pool of threads, and its response goes back to the loop chunk by chunk (each ``send`` waited
for, so a slow client slows the thread, not the memory).

Before a byte of the body is read, ``admit`` may refuse the request (no token, no such route),
and a body over ``max_body`` (declared, or chunked and counted as it arrives) is refused with
413 as soon as it passes the cap. A refusal closes the connection: the rest is never read."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's non-empty chunks, until its end or the client's disconnect."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        more = message.get("more_body", False)
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Refusal:
    """An answer given instead of running the app, before the body is read; the connection closes."""

    status: int
    doc: dict[str, Any]


Admit = Callable[[Scope], Awaitable[Refusal | None]]


class BodyTooLarge(Exception):
    """The body passed the cap while it was being read."""


async def refuse(send: Send, refusal: Refusal) -> None:
    """Answer ``refusal`` as JSON with ``connection: close`` (uvicorn then closes the
    connection instead of reading, and discarding, the rest of the body)."""
    body = json.dumps(refusal.doc, separators=(",", ":")).encode() + b"\n"
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

SPOOL_BYTES = 1024 * 1024
DISCONNECTED = "modelcd.disconnected"  # environ key: a threading.Event set when the client goes away
FLUSH_BYTES = 64 * 1024
RELAY_TIMEOUT_S = 120.0


def _environ(scope: Scope, body: IO[bytes], length: int | None) -> dict[str, Any]:
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"], "SCRIPT_NAME": "",
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]), "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"), "wsgi.input": body,
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "content-length":
            continue
        key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if length is not None:
        environ["CONTENT_LENGTH"] = str(length)
    return environ


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Server-sent events: each chunk goes out as the app yields it, not gathered to FLUSH_BYTES."""
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


async def _watch_disconnect(receive: Receive, gone: threading.Event) -> None:
    """Set ``gone`` when the client disconnects (the body was read: what comes next is that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class WSGIBridge:
    """An ASGI app that runs ``app`` (WSGI) on ``threads`` threads, after ``admit`` let the
    request in. Bodies over ``max_body`` get 413 with ``too_large`` as the message."""

    def __init__(self, app: WSGIApp, threads: int = 8, max_body: int | None = None, admit: Admit | None = None,
                 too_large: str = "request body too large") -> None:
        self.app = app
        self.max_body = max_body
        self.admit = admit
        self.too_large = Refusal(413, {"code": "payload_too_large", "message": too_large, "field": "body"})
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="api")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = await self.admit(scope) if self.admit is not None else None
        declared = _content_length(scope)
        if refusal is None and self.max_body is not None and declared is not None and declared > self.max_body:
            refusal = self.too_large
        if refusal is not None:
            await refuse(send, refusal)
            return
        body: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed below
        try:
            try:
                length = await self._read_body(receive, body, self.max_body)
            except BodyTooLarge:
                await refuse(send, self.too_large)
                return
            environ = _environ(scope, body, length)
            gone = threading.Event()  # the client hung up: a long-lived stream reads it and ends
            environ[DISCONNECTED] = gone
            watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.executor, self._run, environ, send, loop)
            finally:
                watcher.cancel()
        finally:
            body.close()

    @staticmethod
    async def _read_body(receive: Receive, body: IO[bytes], limit: int | None) -> int:
        """Spool the body; BodyTooLarge the moment it passes ``limit`` (the rest stays unread)."""
        size = 0
        async for chunk in body_chunks(receive):
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyTooLarge
            body.write(chunk)
        body.seek(0)
        return size

    def _run(self, environ: dict[str, Any], send: Send, loop: asyncio.AbstractEventLoop) -> None:
        """On a pool thread: call the app, relay its response to the loop."""
        started: list[Message] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            if exc_info is not None and started and started[0].get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [{"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
                           "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}]

        def relay(message: Message) -> None:  # bounded: a stopped loop must not strand this thread
            asyncio.run_coroutine_threadsafe(send(message), loop).result(RELAY_TIMEOUT_S)

        try:
            result = self.app(environ, start_response)
        except Exception:
            log.exception("WSGI app failed")
            relay({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            relay({"type": "http.response.body", "body": b"internal error"})
            return
        try:
            pending: list[bytes] = []
            size = 0
            streaming = bool(started) and _is_event_stream(started[0]["headers"])
            for chunk in result:
                if not chunk:
                    continue
                pending.append(chunk)
                size += len(chunk)
                if size >= FLUSH_BYTES or streaming:
                    self._flush(relay, started, pending, more=True)
                    pending, size = [], 0
            self._flush(relay, started, pending, more=False)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _flush(relay: Callable[[Message], None], started: list[Message], pending: list[bytes], more: bool) -> None:
        if started and not started[0].get("sent"):
            head = started[0]
            relay({k: v for k, v in head.items() if k != "sent"})
            head["sent"] = True
        relay({"type": "http.response.body", "body": b"".join(pending), "more_body": more})
