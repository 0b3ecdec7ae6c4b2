"""Keyed endpoints and the open-endpoint guard, through the real router process with real
backends on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from pathlib import Path

from modelcd.routing.base import Backend, EndpointRoute, RoutingTable
from modelcd.routing.builtin import BuiltinRouter

from .conftest import Client, EchoBackend, ProxyProcess, call, free_port, table

Make = Callable[[str], EchoBackend]
KEY1, KEY2 = "k1-Zx9!s3cret", "second key/7Q=="
KEY_UTF8 = "clé-ü"  # http.client sends header values as latin-1: raw sockets only
SCORE = "/iris/production/score"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _keyed(generation: int, a: EchoBackend, *keys: str, open_too: bool = True) -> RoutingTable:
    """iris/production keyed with ``keys``; iris/staging open on the same backend."""
    endpoints = {"iris/production": EndpointRoute((a.backend(100),), "key", tuple(_digest(k) for k in keys))}
    if open_too:
        endpoints["iris/staging"] = EndpointRoute((a.backend(100),))
    return RoutingTable(generation, endpoints)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + key}


def _raw_answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_keyed_endpoint_refuses_without_a_valid_key(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(_keyed(1, a, KEY1, KEY2))
    for headers in ({}, _bearer("wrong"), {"Authorization": KEY1}, {"Authorization": "bearer " + KEY1},
                    {"Authorization": "Bearer  " + KEY1}, {"Authorization": "Bearer " + KEY1 + " "},
                    {"Authorization": "Basic " + KEY1}, {"X-Api-Key": KEY1}):
        r = call(router.port, "POST", SCORE, b'{"data": [[1]]}', headers=headers)
        assert r.status == 401, headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthorized"
        message = r.json()["message"]
        assert "Authorization: Bearer <endpoint key>" in message
        assert "modelcd endpoints keys iris --env production" in message
        assert KEY1 not in r.body.decode()
    head = call(router.port, "HEAD", SCORE)
    assert (head.status, head.body) == (401, b"")


def test_keyed_endpoint_serves_each_valid_key_and_keeps_the_key_from_the_backend(
        router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(_keyed(1, a, KEY1, KEY2))
    client = Client(router.port)
    try:
        for key in (KEY1, KEY2, KEY1):
            r = client.request("POST", SCORE, b'{"data": [[1]]}', headers={
                "Authorization": "Bearer " + key, "X-Request-Id": "r1"})
            assert r.status == 200 and r.headers["X-Modelcd-Deployment"] == "a"
            sent = {k.lower(): v for k, v in r.json()["headers"]}
            assert "authorization" not in sent and sent["x-request-id"] == "r1"
        assert client.request("POST", SCORE, b"{}").status == 401  # same keep-alive connection
        assert client.request("POST", SCORE, b"{}", headers=_bearer(KEY2)).status == 200
        # the open endpoint on the same router still passes Authorization through to its backend
        r = client.request("POST", "/iris/staging/score", b"{}", headers=_bearer("backend-token"))
        assert r.status == 200 and ["Authorization", "Bearer backend-token"] in r.json()["headers"]
    finally:
        client.close()
    log = router.log_path.read_text()
    assert KEY1 not in log and KEY2 not in log


def test_key_bytes_are_taken_as_sent(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(_keyed(1, a, KEY_UTF8))  # non-ASCII: the digest is of its UTF-8 bytes
    ok = b"POST " + SCORE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: Bearer "
    assert _raw_answer(router.port, ok + KEY_UTF8.encode() + b"\r\nConnection: close\r\n\r\n{}").startswith(
        b"HTTP/1.1 200")
    assert _raw_answer(router.port, ok + KEY_UTF8.encode("latin-1") + b"\r\nConnection: close\r\n\r\n{}"
                       ).startswith(b"HTTP/1.1 401")
    twice = (ok + KEY_UTF8.encode() + b"\r\nAuthorization: Bearer " + KEY_UTF8.encode()
             + b"\r\nConnection: close\r\n\r\n{}")
    assert _raw_answer(router.port, twice).startswith(b"HTTP/1.1 401")  # two Authorization headers: ambiguous


def test_keyed_endpoint_without_keys_refuses_everything(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    router.apply(_keyed(1, a))
    for headers in ({}, _bearer(""), _bearer(KEY1)):
        assert call(router.port, "POST", SCORE, b"{}", headers=headers).status == 401
    router.apply(_keyed(2, a, KEY1))  # a key added: served from the next request on
    assert call(router.port, "POST", SCORE, b"{}", headers=_bearer(KEY1)).status == 200
    router.apply(_keyed(3, a, KEY2))  # rotated: the old key stops working at once
    assert call(router.port, "POST", SCORE, b"{}", headers=_bearer(KEY1)).status == 401
    assert call(router.port, "GET", "/-/table").json()["endpoints"]["iris/production"]["key_hashes"] == [
        _digest(KEY2)]


def test_exposed_router_refuses_open_endpoints(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> None:
    """--exposed yes stands for a non-loopback listen address, which this machine cannot bind
    in tests: the request path is the same."""
    a = make_backend("a")
    p = start_proxy(_keyed(1, a, KEY1), "--exposed", "yes")
    r = call(p.port, "POST", "/iris/staging/score", b"{}")
    assert r.status == 403 and r.json()["error"] == "open_endpoint_refused"
    assert "MODELCD_ROUTER_ALLOW_OPEN_ENDPOINTS=true" in r.json()["message"]
    assert "auth: key" in r.json()["message"]
    assert call(p.port, "POST", SCORE, b"{}", headers=_bearer(KEY1)).status == 200
    assert call(p.port, "POST", SCORE, b"{}").status == 401
    assert call(p.port, "GET", "/-/healthz").json()["open_endpoints"] == "refused"
    assert "answer 403" in p.log.read_text()


def test_allow_open_endpoints_serves_them_when_exposed(start_proxy: Callable[..., ProxyProcess],
                                                        make_backend: Make) -> None:
    a = make_backend("a")
    p = start_proxy(_keyed(1, a, KEY1), "--exposed", "yes", "--allow-open-endpoints")
    assert call(p.port, "POST", "/iris/staging/score", b"{}").status == 200
    assert call(p.port, "POST", SCORE, b"{}").status == 401  # keys are still checked
    assert call(p.port, "GET", "/-/healthz").json()["open_endpoints"] == "served"
    loopback = start_proxy(table(1, {"iris/staging": [a.backend(100)]}))  # --exposed auto on 127.0.0.1
    assert call(loopback.port, "POST", "/iris/staging/score", b"{}").status == 200


def test_builtin_router_passes_allow_open_endpoints(tmp_path: Path, make_backend: Make) -> None:
    r = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port(), allow_open_endpoints=True)
    r.ensure_running()
    try:
        pid = r.pid()
        assert pid is not None
        assert b"--allow-open-endpoints" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        a = make_backend("a")
        r.apply(RoutingTable(1, {"iris/production": EndpointRoute((Backend("a", 1, a.url, 100),))}))
        assert call(r.port, "POST", SCORE, b"{}").status == 200
    finally:
        r.stop()
    default = BuiltinRouter(tmp_path / "home2", "127.0.0.1", free_port())
    default.ensure_running()
    try:
        pid = default.pid()
        assert pid is not None
        assert b"--allow-open-endpoints" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    finally:
        default.stop()

