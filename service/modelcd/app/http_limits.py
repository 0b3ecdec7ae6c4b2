"""Limits on what a client may send before its request is even parsed, for the control
plane's port: uvicorn's httptools protocol has none (an 80 MB header is buffered whole), and
an idle or trickling connection is never cut before its headers are complete.

``limited_protocol(...)`` returns a subclass of uvicorn's ``HttpToolsProtocol`` (same parser,
same speed) that answers, and closes:

- 414 when the request line's target is longer than ``max_line_bytes``;
- 431 when the headers exceed ``max_header_bytes`` in all, or ``max_headers`` in number;
- 408 when a connection has not completed a request's headers ``header_timeout_s`` after it
  opened (or after that request began): slowloris clients are cut, keep-alive idling between
  requests stays governed by uvicorn's keep-alive timeout.

Bytes are counted as they arrive, before llhttp accumulates them, so memory per connection
stays under the limit plus one read."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_LINE_BYTES = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 10.0

_REASONS = {408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _Refused(Exception):
    """Raised inside a parser callback; the parser wraps it, uvicorn calls send_400_response."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request line, header and header-time limits."""

    max_line_bytes = MAX_LINE_BYTES
    max_header_bytes = MAX_HEADER_BYTES
    max_headers = MAX_HEADERS
    header_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True  # no request's headers in progress or complete: bytes count as head
        self._completed_in_read = False  # some request's headers completed during the current read
        self._head_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; then, if this whole read belonged to headers still incomplete, count
        it (a read in which a request's headers completed is not counted: bounded by its size)."""
        all_head = self._awaiting_head
        self._completed_in_read = False
        super().data_received(data)
        if self.transport.is_closing() or not all_head or self._completed_in_read or not self._awaiting_head:
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_line_bytes + self.max_header_bytes:
            url = getattr(self, "url", b"")
            status = 414 if self._header_count == 0 and len(url) > self.max_line_bytes else 431
            self._send_refusal(status, self._head_message(status))

    # -- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._header_bytes = self._header_count = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_line_bytes:
            self._refuse(414, self._head_message(414))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.max_headers or self._header_bytes > self.max_header_bytes:
            self._refuse(431, self._head_message(431))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._completed_in_read = True
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    # -- refusing -----------------------------------------------------------------------------
    def _head_message(self, status: int) -> str:
        if status == 414:
            return f"request target over {self.max_line_bytes} bytes"
        return f"request headers over {self.max_header_bytes} bytes or {self.max_headers} fields"

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise _Refused(message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: ours when a limit raised it."""
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._send_refusal(*self._refusal)

    def _send_refusal(self, status: int, message: str) -> None:
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        body = message.encode("ascii") + b"\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and (self.cycle is None or self.cycle.response_complete):
            self._send_refusal(408, f"request headers not complete within {self.header_timeout_s:g} s")


def limited_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn should use (``Config(http=...)``) with this header timeout."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"header_timeout_s": header_timeout_s})
