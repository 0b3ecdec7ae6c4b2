"""HTTP/1.1 details both sides of the router process share: hop-by-hop header names, reason
phrases and the quick ACK."""

from __future__ import annotations

import asyncio
import contextlib
import socket

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def quickack(transport: asyncio.BaseTransport | None) -> None:
    """ACK now. A peer that sends one message in two writes with Nagle on (Python's
    http.server writes head and body apart) would otherwise wait for our delayed ACK, about
    40 ms per message. Called only while a message is incomplete."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def reason(status: int) -> bytes:
    """The reason phrase of ``status`` for a status line (b"Unknown" for an unlisted one)."""
    return _REASONS.get(status, b"Unknown")


def _build_reasons() -> dict[int, bytes]:
    from http import HTTPStatus

    return {s.value: s.phrase.encode() for s in HTTPStatus}


_REASONS = _build_reasons()
