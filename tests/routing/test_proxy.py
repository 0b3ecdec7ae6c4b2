"""The router process with real backends on 127.0.0.1: routing, weights, headers, bodies,
errors, failover, table reloads and atomic switches under load."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from modelcd.routing.base import Backend
from modelcd.routing.builtin import BuiltinRouter

from .conftest import Client, EchoBackend, ProxyProcess, call, dead_url, table

Make = Callable[[str], EchoBackend]


def _names(port: int, n: int, path: str = "/iris/production/score") -> Counter[str]:
    client = Client(port)
    try:
        return Counter(client.request("POST", path, b"{}").json()["name"] for _ in range(n))
    finally:
        client.close()


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the router closes (bounded by timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_forwards_path_query_method_and_marks_response(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100, version=3, id="d12")]}))
    r = call(router.port, "PUT", "/iris/production/v1/score?x=1&y=2", b'{"data": [1]}')
    assert r.status == 200
    assert r.headers["X-Modelcd-Version"] == "3"
    assert r.headers["X-Modelcd-Deployment"] == "d12"
    assert r.headers["X-Backend"] == "a"
    body = r.json()
    assert (body["method"], body["path"], body["body_len"]) == ("PUT", "/v1/score?x=1&y=2", 13)
    assert call(router.port, "GET", "/iris/production").json()["path"] == "/"


def test_passes_headers_through_including_authorization(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    r = call(router.port, "POST", "/iris/production/score", b"{}", headers={
        "Authorization": "Bearer s3cret", "X-Request-Id": "abc", "Content-Type": "application/json",
        "Connection": "keep-alive, X-Hop", "X-Hop": "dropped", "X-Modelcd-Version": "spoofed"})
    sent = {k.lower(): v for k, v in r.json()["headers"]}
    assert sent["authorization"] == "Bearer s3cret"
    assert sent["x-request-id"] == "abc"
    assert sent["content-type"] == "application/json"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-prefix"] == "/iris/production"
    assert "x-hop" not in sent and "connection" not in sent
    assert r.headers.get_all("X-Modelcd-Version") == ["1"]


def test_chunked_request_body_arrives_whole(router: BuiltinRouter, make_backend: Make) -> None:
    import hashlib

    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    pieces = [b'{"data": [', *(b"[%d, 2.5]," % i for i in range(5000)), b"[0, 0]]}"]
    r = call(router.port, "POST", "/iris/production/score", iter(pieces), encode_chunked=True,
             headers={"Transfer-Encoding": "chunked"})
    whole = b"".join(pieces)
    assert r.status == 200
    assert (r.json()["body_len"], r.json()["body_sha256"]) == (len(whole), hashlib.sha256(whole).hexdigest())


def test_chunked_and_close_delimited_responses_are_relayed(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    client = Client(router.port)
    try:
        for path in ("/iris/production/chunked", "/iris/production/close", "/iris/production/x"):
            r = client.request("GET", path)
            assert r.status == 200 and r.json()["path"] == path.removeprefix("/iris/production")
    finally:
        client.close()


def test_keep_alive_connection_close_head_and_http10(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    client = Client(router.port)
    try:
        for _ in range(20):  # one connection, many requests
            assert client.request("POST", "/iris/production/score", b"{}").status == 200
        r = client.request("HEAD", "/iris/production/score")
        assert r.status == 200 and r.body == b"" and int(r.headers["Content-Length"]) > 0
        assert client.request("GET", "/iris/production/score").status == 200
    finally:
        client.close()
    raw = _raw(router.port, b"GET /iris/production/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"connection: close" in raw.lower() and raw.endswith(b"}")
    raw = _raw(router.port, b"GET /iris/production/chunked HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"}") and b"chunked" not in raw.split(b"\r\n\r\n")[0]


def test_pipelined_requests_are_answered_in_order(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    reqs = b"".join(b"GET /iris/production/slow?s=0.0%d HTTP/1.1\r\nHost: x\r\n\r\n" % (5 - i) for i in range(5))
    raw = _raw(router.port, reqs + b"GET /iris/production/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200") == 6
    paths = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
             for part in raw.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert paths == [f"/slow?s=0.0{5 - i}" for i in range(5)] + ["/last"]


def test_weighted_split_90_10(router: BuiltinRouter, make_backend: Make) -> None:
    a, b, standby = make_backend("a"), make_backend("b"), make_backend("standby")
    router.apply(table(1, {"iris/production": [a.backend(90), b.backend(10), standby.backend(0)]}))
    counts = _names(router.port, 1000)
    assert counts["standby"] == 0
    assert 55 <= counts["b"] <= 145, counts  # 100 expected, sd 9.5: a 4.7-sd band
    assert counts["a"] + counts["b"] == 1000


def test_unknown_endpoint_404_no_weight_503(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(0)]}))
    for path in ("/nope/production/score", "/", "/iris"):
        r = call(router.port, "POST", path, b"{}")
        assert r.status == 404 and r.json()["error"] == "not_found"
    r = call(router.port, "POST", "/iris/production/score", b"{}")
    assert r.status == 503 and r.json()["error"] == "no_backend"
    assert "weight" in r.json()["message"]


def test_dead_backend_502_and_retry_on_live_one(router: BuiltinRouter, make_backend: Make) -> None:
    router.apply(table(1, {"iris/production": [Backend("dead", 1, dead_url(), 100)]}))
    r = call(router.port, "POST", "/iris/production/score", b"{}")
    assert r.status == 502 and r.json()["error"] == "bad_gateway"
    a = make_backend("a")
    router.apply(table(2, {"iris/production": [Backend("dead", 1, dead_url(), 50), a.backend(50)]}))
    client = Client(router.port)
    try:
        for _ in range(100):
            r = client.request("POST", "/iris/production/score", b"{}")
            assert (r.status, r.headers["X-Modelcd-Deployment"]) == (200, "a")
    finally:
        client.close()


def test_backend_that_dies_is_failed_over(router: BuiltinRouter, make_backend: Make) -> None:
    a, b = make_backend("a"), make_backend("b")
    router.apply(table(1, {"iris/production": [a.backend(50), b.backend(50)]}))
    assert set(_names(router.port, 50)) == {"a", "b"}  # pooled connections to both now
    a.close()
    assert _names(router.port, 100) == Counter({"b": 100})


def test_invalid_table_keeps_the_old_one(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> None:
    a, b = make_backend("a"), make_backend("b")
    p = start_proxy(table(1, {"iris/production": [a.backend(100)]}))
    p.write_table('{"generation": 2, "endpoints": {"iris/production": {"backends": [{"id": "x", "weight": -1}]}}}')
    r = call(p.port, "POST", "/-/reload")
    assert r.status == 400 and r.json()["error"] == "invalid_table" and "weight" in r.json()["message"]
    assert call(p.port, "GET", "/-/table").json()["generation"] == 1
    time.sleep(1.2)  # the poller saw the same bad file: still the old table
    health = call(p.port, "GET", "/-/healthz").json()
    assert health["generation"] == 1 and "weight" in health["table_error"]
    assert _names(p.port, 5) == Counter({"a": 5})
    p.write_table("{truncated")
    assert call(p.port, "POST", "/-/reload").status == 400
    p.write_table(table(3, {"iris/production": [b.backend(100)]}))  # no reload call: the poller applies it
    deadline = time.monotonic() + 5
    while call(p.port, "GET", "/-/healthz").json()["generation"] != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    health = call(p.port, "GET", "/-/healthz").json()
    assert health.pop("mirror_worker")["connected"] is True
    assert health | {"pid": 0} == {
        "status": "ok", "router": "modelcd", "generation": 3, "pid": 0, "table": str(p.table_path),
        "table_error": None, "open_endpoints": "served"}
    assert _names(p.port, 5) == Counter({"b": 5})


def test_body_cap_413_and_expect_continue(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> None:
    a = make_backend("a")
    p = start_proxy(table(1, {"iris/production": [a.backend(100)]}), "--max-body", "1024")
    r = call(p.port, "POST", "/iris/production/score", b"x" * 1025)
    assert r.status == 413 and r.json()["error"] == "payload_too_large"
    r = call(p.port, "POST", "/iris/production/score", iter([b"x" * 600, b"y" * 600]), encode_chunked=True,
             headers={"Transfer-Encoding": "chunked"})
    assert r.status == 413
    raw = _raw(p.port, b"POST /iris/production/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                       b"Expect: 100-continue\r\nConnection: close\r\n\r\nabcd")
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert b'"body_len": 4' in raw
    assert call(p.port, "POST", "/iris/production/score", b"x" * 1024).status == 200


def test_admin_routes(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    t = table(4, {"iris/production": [a.backend(100)]})
    router.apply(t)
    assert call(router.port, "GET", "/-/table").json() == t.to_dict()
    assert call(router.port, "POST", "/-/reload").json() == {"generation": 4}
    assert call(router.port, "GET", "/-/nope").status == 404
    assert call(router.port, "DELETE", "/-/table").status == 405
    assert call(router.port, "GET", "/-/healthz").json()["generation"] == 4


def test_malformed_request_gets_400(router: BuiltinRouter) -> None:
    raw = _raw(router.port, b"GET /iris/production HTTP/1.1\r\nHost x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")


def test_atomic_switch_under_load_drops_nothing(router: BuiltinRouter, make_backend: Make) -> None:
    """8 threads hammer the endpoint for 2 s while the table flips between backends: every
    request succeeds, and its marks come from the backend that answered it."""
    backends = [make_backend(n) for n in ("a", "b", "c")]
    splits = [[100, 0, 0], [0, 100, 0], [50, 50, 0], [0, 0, 100], [10, 0, 90]]
    router.apply(table(1, {"iris/production": [b.backend(w) for b, w in zip(backends, splits[0], strict=True)]}))
    stop = threading.Event()
    results: list[tuple[int, str, str]] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        client = Client(router.port)
        try:
            for _ in range(20000):
                if stop.is_set():
                    break
                r = client.request("POST", "/iris/production/score", b'{"data": [[1, 2]]}')
                results.append((r.status, r.headers["X-Modelcd-Deployment"], r.json()["name"]))
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    generation, deadline, checked = 1, time.monotonic() + 2.0, 0
    while time.monotonic() < deadline:
        generation += 1
        split = splits[generation % len(splits)]
        router.apply(table(generation, {"iris/production": [
            b.backend(w) for b, w in zip(backends, split, strict=True)]}))
        live = {b.name for b, w in zip(backends, split, strict=True) if w}
        assert call(router.port, "POST", "/iris/production/score", b"{}").json()["name"] in live
        checked += 1
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    assert checked >= 10 and len(results) > 200
    assert all(status == 200 for status, _, _ in results)
    assert all(mark == name for _, mark, name in results)


def test_sigterm_finishes_in_flight_requests(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> None:
    a = make_backend("a")
    p = start_proxy(table(1, {"iris/production": [a.backend(100)]}))
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(call(p.port, "POST", "/iris/production/slow?s=1", b"{}").status))
    t.start()
    assert a.server.slow_started.wait(10)  # the request is in flight at the backend
    p.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert got == [200]
    assert p.proc.wait(10) == 0
    with pytest.raises(ConnectionRefusedError):
        call(p.port, "GET", "/-/healthz")


def test_upgrade_offer_is_ignored_and_upgrade_with_body_refused(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    raw = _raw(router.port, b"GET /iris/production/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                            b"GET /iris/production/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and b'"/b"' in raw
    assert b"h2c" not in raw.lower() and b"http2-settings" not in raw.lower()
    raw = _raw(router.port, b"POST /iris/production/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                            b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc")
    assert raw.startswith(b"HTTP/1.1 501")


def test_large_bodies_both_ways(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(table(1, {"iris/production": [a.backend(100)]}))
    client = Client(router.port, timeout=30)
    try:
        r = client.request("GET", "/iris/production/big?n=20000000")
        assert (r.status, len(r.body), r.body[-1:]) == (200, 20_000_000, b"x")
        r = client.request("POST", "/iris/production/score", b"y" * 5_000_000)
        assert r.json()["body_len"] == 5_000_000
        for status in (201, 204, 404, 500):
            assert client.request("GET", f"/iris/production/status/{status}").status == status
    finally:
        client.close()


def test_slow_backend_gets_504(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> None:
    a = make_backend("a")
    p = start_proxy(table(1, {"iris/production": [a.backend(100)]}), "--upstream-timeout", "0.5")
    t0 = time.monotonic()
    r = call(p.port, "POST", "/iris/production/slow?s=3", b"{}")
    assert r.status == 504 and r.json()["error"] == "gateway_timeout"
    assert time.monotonic() - t0 < 2.5
    assert call(p.port, "POST", "/iris/production/score", b"{}").status == 200
