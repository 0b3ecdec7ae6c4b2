"""Failover with backends in their own processes: a serving backend killed with SIGKILL
under load hands its traffic to the warm standby at once, is skipped while down (passive
health), and gets its traffic back when it returns."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelcd.routing.builtin import BuiltinRouter

from .conftest import Client, ProcessBackend, call, table

Spawn = Callable[[str], ProcessBackend]
SCORE = "/iris/production/score"


@dataclass(frozen=True)
class Result:
    started: float
    ended: float
    status: int  # 0: the request failed at the socket
    name: str  # the backend that answered ("" when none did)


def _load(port: int, threads: int, duration: float, max_requests: int,
          midway: Callable[[], None], at: float) -> list[Result]:
    """``threads`` keep-alive clients post for ``duration`` seconds (at most ``max_requests``
    in all); ``midway`` runs ``at`` seconds in."""
    results: list[Result] = []
    stop = threading.Event()

    def client_loop() -> None:
        client = Client(port, timeout=5)
        try:
            while not stop.is_set() and len(results) < max_requests:
                t0 = time.monotonic()
                try:
                    r = client.request("POST", SCORE, b'{"data": [[1, 2]]}')
                    name = r.json().get("name", "") if r.status == 200 else ""
                    results.append(Result(t0, time.monotonic(), r.status, name))
                except (OSError, http.client.HTTPException):
                    results.append(Result(t0, time.monotonic(), 0, ""))
                    client.close()
                    client = Client(port, timeout=5)
        finally:
            client.close()

    workers = [threading.Thread(target=client_loop) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(at)
    midway()
    time.sleep(max(0.0, duration - at))
    stop.set()
    for w in workers:
        w.join(10)
    return results


def test_killed_backend_fails_over_to_the_standby_at_once(router: BuiltinRouter, spawn_backend: Spawn) -> None:
    a, b = spawn_backend("a"), spawn_backend("b")
    router.apply(table(1, {"iris/production": [a.backend(100), b.backend(0)]}))
    assert call(router.port, "POST", SCORE, b"{}").json()["name"] == "a"
    killed: list[float] = []

    def kill_a() -> None:
        killed.append(time.monotonic())
        a.kill()
        killed.append(time.monotonic())  # a is dead and reaped: its sockets are closed

    results = _load(router.port, threads=4, duration=4.0, max_requests=20000, midway=kill_a, at=1.5)
    t_kill, t_dead = killed
    failed = [r for r in results if r.status != 200]
    before = [r for r in results if r.ended < t_kill]
    after = [r for r in results if r.started > t_dead]
    assert len(before) > 50 and len(after) > 50, (len(before), len(after))
    assert {r.name for r in before if r.status == 200} == {"a"}
    assert {r.name for r in after if r.status == 200} == {"b"}
    # only requests in flight at the kill may fail (4 clients), and at most 1 % of the run
    assert len(failed) <= 4 and len(failed) <= 0.01 * len(results), (len(failed), len(results), failed[:4])
    assert all(r.started <= t_dead and r.ended >= t_kill for r in failed), failed
    first_b = min(r.ended for r in after if r.status == 200)
    assert first_b - t_kill < 1.0, first_b - t_kill
    # passive health: the dead backend is tried again once per down time (1 s) by at most the 4
    # clients, not by each of the thousands of requests after the kill
    tries = router.log_path.read_text().count("backend a of iris/production unreachable")
    assert tries <= 4 * (1 + 3), tries


def test_recovered_backend_gets_its_traffic_back(router: BuiltinRouter, spawn_backend: Spawn) -> None:
    a, b = spawn_backend("a"), spawn_backend("b")
    router.apply(table(1, {"iris/production": [a.backend(100), b.backend(0)]}))
    client = Client(router.port)
    try:
        assert client.request("POST", SCORE, b"{}").json()["name"] == "a"
        a.kill()
        assert [client.request("POST", SCORE, b"{}").json()["name"] for _ in range(20)] == ["b"] * 20
        a.start()  # the same port: the deployment came back
        restarted = time.monotonic()
        names: list[str] = []
        while time.monotonic() - restarted < 5 and names[-1:] != ["a"]:
            r = client.request("POST", SCORE, b"{}")
            assert r.status == 200
            names.append(r.json()["name"])
            time.sleep(0.02)
        assert names[-1] == "a" and time.monotonic() - restarted < 2.0, (names, time.monotonic() - restarted)
        assert [client.request("POST", SCORE, b"{}").json()["name"] for _ in range(20)] == ["a"] * 20
    finally:
        client.close()


def test_weighted_backends_are_tried_before_standbys(router: BuiltinRouter, spawn_backend: Spawn) -> None:
    a, b, standby = spawn_backend("a"), spawn_backend("b"), spawn_backend("standby")
    router.apply(table(1, {"iris/production": [a.backend(50), b.backend(50), standby.backend(0)]}))
    client = Client(router.port)
    try:
        assert {client.request("POST", SCORE, b"{}").json()["name"] for _ in range(40)} == {"a", "b"}
        a.kill()
        assert {client.request("POST", SCORE, b"{}").json()["name"] for _ in range(40)} == {"b"}
        b.kill()
        assert {client.request("POST", SCORE, b"{}").json()["name"] for _ in range(40)} == {"standby"}
        standby.kill()
        r = client.request("POST", SCORE, b"{}")  # every backend down: 502 as before
        assert r.status == 502 and r.json()["error"] == "bad_gateway"
    finally:
        client.close()
