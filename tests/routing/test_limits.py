"""Hostile clients against the real router process on 127.0.0.1: oversize request lines and
headers, too many headers, slow and silent clients, malformed framing. Each gets its 4xx (or
a clean close), the router's memory stays flat, and a well-behaved client on another
connection keeps getting fast 200s throughout."""

from __future__ import annotations

import contextlib
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from .conftest import Client, EchoBackend, ProxyProcess, table

Make = Callable[[str], EchoBackend]
HEADER_TIMEOUT = 1.0
HEAD = b"POST /iris/production/score HTTP/1.1\r\nHost: x\r\n"


class GoodClient:
    """Scores on one keep-alive connection in a thread until stopped (bounded), recording
    each status and latency, and sampling the router's RSS as it goes."""

    def __init__(self, port: int, router_pid: int) -> None:
        self.port = port
        self.router = psutil.Process(router_pid)
        self.statuses: list[int] = []
        self.latencies: list[float] = []
        self.peak_rss = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = Client(self.port, timeout=5)
        try:
            for _ in range(20000):
                if self.stop.is_set():
                    break
                t0 = time.perf_counter()
                self.statuses.append(client.request("POST", "/iris/production/score", b'{"data": [[1]]}').status)
                self.latencies.append(time.perf_counter() - t0)
                self.peak_rss = max(self.peak_rss, self.router.memory_info().rss)
                time.sleep(0.005)
        except BaseException as e:  # reported by the test
            self.errors.append(e)
        finally:
            client.close()


@pytest.fixture
def hostile_setup(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> Iterator[tuple[ProxyProcess,
                                                                                                 GoodClient]]:
    a = make_backend("a")
    p = start_proxy(table(1, {"iris/production": [a.backend(100)]}),
                    "--header-timeout", str(HEADER_TIMEOUT), "--poll-interval", "0.1")
    good = GoodClient(p.port, p.proc.pid)
    good.thread.start()
    time.sleep(0.3)  # warmed up: pools, allocator
    yield p, good
    good.stop.set()
    good.thread.join(10)


def _read_all(s: socket.socket, deadline: float) -> bytes:
    """Read until the router closes (or resets) the connection, bounded by ``deadline``."""
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_all(s, time.monotonic() + timeout)


def _flood(port: int, head: bytes, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """Send ``head`` then up to ``total`` bytes of one endless header value, in chunks,
    watching for an answer between chunks; returns (answer, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        answer = b""
        piece = b"a" * chunk
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not answer:
                s.sendall(piece)
                sent += chunk
                if select.select([s], [], [], 0.002)[0]:
                    answer = s.recv(65536)
        return answer + _read_all(s, time.monotonic() + 5), sent


def _assert_refused(raw: bytes, status: int) -> None:
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert raw.startswith(b"HTTP/1.1 %d" % status), raw[:200]
    assert b"connection: close" in head


def test_hostile_clients_get_4xx_while_others_are_served(hostile_setup: tuple[ProxyProcess, GoodClient]) -> None:
    p, good = hostile_setup
    port = p.port
    rss_before = psutil.Process(p.proc.pid).memory_info().rss

    _assert_refused(_exchange(port, b"GET /iris/production/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414)
    answer, sent = _flood(port, HEAD + b"X-Big: ", 8 * 1024 * 1024)
    _assert_refused(answer, 431)
    assert sent < 8 * 1024 * 1024, sent  # answered before the flood ended
    many = b"".join(b"X-H-%d: v\r\n" % i for i in range(150))
    _assert_refused(_exchange(port, HEAD + many + b"Content-Length: 0\r\n\r\n"), 431)
    wide = b"".join(b"X-W-%d: %s\r\n" % (i, b"w" * 1000) for i in range(40))  # each fine, 40 KB in all
    _assert_refused(_exchange(port, HEAD + wide + b"Content-Length: 0\r\n\r\n"), 431)
    _assert_refused(_exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4), 400)
    _assert_refused(_exchange(port, HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"), 400)
    _assert_refused(_exchange(port, HEAD + b"Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc"), 400)
    _assert_refused(_exchange(port, HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400)
    _assert_refused(_exchange(port, HEAD + b"Content-Length: -1\r\n\r\n"), 400)
    # a flood of garbage never parsed as HTTP: answered 400 and dropped, not buffered
    answer, _ = _flood(port, b"\x00\xff", 4 * 1024 * 1024)
    _assert_refused(answer, 400)

    good.stop.set()
    good.thread.join(10)
    assert not good.errors, good.errors[:3]
    assert len(good.statuses) >= 20 and set(good.statuses) == {200}
    assert statistics.median(good.latencies) < 0.05 and max(good.latencies) < 1.0, (
        statistics.median(good.latencies), max(good.latencies))
    grown = max(good.peak_rss, psutil.Process(p.proc.pid).memory_info().rss) - rss_before
    assert grown < 24 * 1024 * 1024, f"router RSS grew by {grown / 2**20:.1f} MiB"
    assert p.proc.poll() is None


def test_slow_and_silent_clients_are_cut_after_the_header_timeout(
        hostile_setup: tuple[ProxyProcess, GoodClient]) -> None:
    p, good = hostile_setup
    results: dict[str, tuple[bytes, float]] = {}

    def slowloris() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(b"GET /iris/production/score HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(40):  # one byte per 0.1 s: never a whole head, always active
                    if select.select([s], [], [], 0.1)[0]:
                        break
                    s.sendall(b"z")
            results["slowloris"] = (_read_all(s, time.monotonic() + 3), time.monotonic() - t0)

    def silent() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            results["silent"] = (_read_all(s, time.monotonic() + 4 * HEADER_TIMEOUT), time.monotonic() - t0)

    def idle_keep_alive() -> None:
        """A connection idle between two complete requests is not a slow head: kept."""
        client = Client(p.port)
        try:
            first = client.request("GET", "/iris/production/a").status
            time.sleep(2 * HEADER_TIMEOUT)
            results["idle"] = (b"%d %d" % (first, client.request("GET", "/iris/production/b").status), 0.0)
        finally:
            client.close()

    threads = [threading.Thread(target=f) for f in (slowloris, silent, idle_keep_alive)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    raw, took = results["slowloris"]
    _assert_refused(raw, 408)
    assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 1.5, took
    raw, took = results["silent"]
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408"), raw[:100]
    assert took < HEADER_TIMEOUT + 1.5, took
    assert results["idle"][0] == b"200 200"
    good.stop.set()
    good.thread.join(10)
    assert not good.errors and set(good.statuses) == {200}
