"""Shadow traffic in the real router process: a candidate gets copies of live requests, never a
client; every client answer comes from the serving backend, whatever the candidate does
(answers, refuses connections, hangs); the pairs of answers are kept, bounded, for the control
plane, and copies beyond the in-progress bound are dropped and counted, never waited for."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from modelcd.errors import InvalidInput, RouterError
from modelcd.routing.base import EndpointRoute, Mirror, RoutingTable
from modelcd.routing.builtin import BuiltinRouter
from tests.routing.conftest import Client, EchoBackend, ProxyProcess, call, dead_url

Make = Callable[[str], EchoBackend]


def mirrored(champion: EchoBackend, candidate_url: str, rate: float = 1.0, generation: int = 1) -> RoutingTable:
    return RoutingTable(generation, {"iris/prod": EndpointRoute(
        (champion.backend(100, version=1, id="d-champion"),),
        mirror=Mirror("d-candidate", 2, candidate_url, rate))})


def pairs_of(router: BuiltinRouter, want: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = router.mirror_pairs("iris", "prod", limit=10_000)
        if got["mirrored"] >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_the_candidate_gets_copies_and_clients_only_the_champion(router: BuiltinRouter, make_backend: Make) -> None:
    champion, candidate = make_backend("A"), make_backend("B")
    router.apply(mirrored(champion, candidate.url))
    client = Client(router.port)
    for i in range(20):
        r = client.request("POST", f"/iris/prod/score?i={i}", json.dumps({"data": [[i, 1.0]]}).encode(),
                           {"Content-Type": "application/json"})
        assert r.status == 200 and r.headers["X-Backend"] == "A"
        assert r.headers["X-Modelcd-Deployment"] == "d-champion" and r.headers["X-Modelcd-Version"] == "1"
    client.close()
    got = pairs_of(router, 20)
    assert (got["mirrored"], got["dropped"], got["candidate_errors"], got["id"]) == (20, 0, 0, "d-candidate")
    assert [p["seq"] for p in got["pairs"]] == list(range(1, 21))
    # copies complete in any order; each pair matches one request with both answers to it
    by_request = {json.loads(p["request"])["data"][0][0]: p for p in got["pairs"]}
    assert sorted(by_request) == list(range(20))
    for i, pair in by_request.items():
        champion_answer, candidate_answer = json.loads(pair["champion"]["body"]), json.loads(pair["candidate"]["body"])
        assert champion_answer["path"] == f"/score?i={i}"
        assert champion_answer["name"] == "A" and candidate_answer["name"] == "B"
        assert candidate_answer["path"] == f"/score?i={i}" and candidate_answer["method"] == "POST"
        assert pair["champion"]["status"] == pair["candidate"]["status"] == 200 and not pair["truncated"]
    # paging: after a sequence number, at most `limit`
    page = router.mirror_pairs("iris", "prod", after=15, limit=3)
    assert [p["seq"] for p in page["pairs"]] == [16, 17, 18]
    # the endpoint stops mirroring with the next table: the pairs are gone with it
    router.apply(RoutingTable(2, {"iris/prod": EndpointRoute((champion.backend(100, id="d-champion"),))}))
    with pytest.raises(RouterError) as e:
        router.mirror_pairs("iris", "prod")
    assert "mirrors nothing" in e.value.message


def test_a_candidate_that_refuses_connections_costs_clients_nothing(router: BuiltinRouter, make_backend: Make) -> None:
    champion = make_backend("A")
    router.apply(mirrored(champion, dead_url()))
    for _ in range(10):
        assert call(router.port, "POST", "/iris/prod/score", b"{}").status == 200
    got = pairs_of(router, 10)
    assert got["mirrored"] == 10 and got["candidate_errors"] == 10
    assert all(p["candidate"]["status"] is None and "connect" in p["candidate"]["error"] for p in got["pairs"])


@pytest.fixture
def silent_backend() -> Iterator[str]:
    """Accepts connections, reads, never answers (a hung candidate)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_candidate_neither_slows_nor_fails_clients_and_extra_copies_are_dropped(
        start_proxy: Callable[..., ProxyProcess], make_backend: Make, silent_backend: str) -> None:
    champion = make_backend("A")
    plain = start_proxy(RoutingTable(1, {"iris/prod": EndpointRoute((champion.backend(100, id="d-champion"),))}))
    shadowed = start_proxy(mirrored(champion, silent_backend), "--mirror-pending", "4", "--mirror-backlog", "8",
                           "--mirror-timeout", "1")

    def timings(port: int, n: int) -> list[float]:
        client, out = Client(port), []
        for _ in range(n):
            t = time.perf_counter()
            assert client.request("POST", "/iris/prod/score", b"{}").status == 200
            out.append(time.perf_counter() - t)
        client.close()
        return out

    timings(plain.port, 20), timings(shadowed.port, 20)  # warm both
    base, shadow = timings(plain.port, 200), timings(shadowed.port, 200)
    # side by side on a shared machine: the median of the shadowed router stays within a
    # millisecond of the plain one (the copies hang; the clients never wait for them)
    assert statistics.median(shadow) < statistics.median(base) + 0.001, (statistics.median(base),
                                                                          statistics.median(shadow))
    counters = json.loads(call(shadowed.port, "GET", "/-/mirror").body)["mirrors"][0]
    assert counters["pending"] <= 4 and counters["queued"] <= 8 and counters["dropped"] >= 200 - 12
    deadline = time.monotonic() + 10  # the hung copies time out and count as the candidate's errors
    while (got := call(shadowed.port, "GET", "/-/mirror/pairs?endpoint=iris/prod").json())["pending"] \
            or got["queued"]:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
    assert got["mirrored"] >= 4
    assert all(p["candidate"]["error"] == "timed out" for p in got["pairs"])


def test_sample_rate_copies_a_share_of_requests(router: BuiltinRouter, make_backend: Make) -> None:
    champion, candidate = make_backend("A"), make_backend("B")
    router.apply(mirrored(champion, candidate.url, rate=0.3))
    client = Client(router.port)
    for _ in range(300):
        assert client.request("POST", "/iris/prod/score", b"{}").status == 200
    client.close()
    time.sleep(0.5)
    got = router.mirror_pairs("iris", "prod")
    assert 45 <= got["mirrored"] <= 135, got["mirrored"]  # 90 expected; far outside is a broken sampler


def test_a_mirrored_canary_copies_only_what_the_champion_answers(router: BuiltinRouter, make_backend: Make) -> None:
    champion, candidate = make_backend("A"), make_backend("B")
    router.apply(RoutingTable(1, {"iris/prod": EndpointRoute(
        (champion.backend(50, id="d-champion"), candidate.backend(50, version=2, id="d-candidate")),
        mirror=Mirror("d-candidate", 2, candidate.url))}))
    client = Client(router.port)
    served = [client.request("POST", "/iris/prod/score", b"{}").headers["X-Backend"] for _ in range(200)]
    client.close()
    got = pairs_of(router, served.count("A"))
    assert 40 < served.count("B") < 160  # the candidate takes its share of clients...
    assert got["mirrored"] == served.count("A")  # ...and only the champion's requests are copied to it
    assert all(json.loads(p["champion"]["body"])["name"] == "A" for p in got["pairs"])


def test_a_mirror_rate_is_checked(make_backend: Make) -> None:
    champion = make_backend("A")
    for rate in (0, 1.5, True, "1"):
        with pytest.raises(InvalidInput) as e:
            Mirror("d2", 2, champion.url, rate)  # type: ignore[arg-type]
        assert "sample_rate" in e.value.message
    raw = mirrored(champion, champion.url).to_dict()
    assert RoutingTable.from_dict(raw) == mirrored(champion, champion.url)
    raw["endpoints"]["iris/prod"]["mirror"]["extra"] = 1
    with pytest.raises(InvalidInput) as e:
        RoutingTable.from_dict(raw)
    assert "unknown field(s) extra" in e.value.message


def test_sampled_traffic_keeps_requests_with_their_answers(router: BuiltinRouter, make_backend: Make) -> None:
    champion = make_backend("A")
    route = EndpointRoute((champion.backend(100, id="d-champion"),), sample_rate=1.0)
    router.apply(RoutingTable(1, {"iris/prod": route}))
    client = Client(router.port)
    for i in range(30):
        assert client.request("POST", "/iris/prod/score", json.dumps({"data": [[i]]}).encode()).status == 200
    client.close()
    got = router.samples("iris", "prod", after=10)
    assert got["seq"] == 30 and [s["seq"] for s in got["pairs"]] == list(range(11, 31))
    assert all(json.loads(s["answer"]["body"])["name"] == "A" and s["answer"]["status"] == 200 for s in got["pairs"])
    assert sorted(json.loads(s["request"])["data"][0][0] for s in got["pairs"]) == list(range(10, 30))
    # samples survive a table change that keeps sampling, and go with one that stops
    router.apply(RoutingTable(2, {"iris/prod": EndpointRoute(route.backends, sample_rate=0.5)}))
    assert router.samples("iris", "prod")["seq"] == 30
    router.apply(RoutingTable(3, {"iris/prod": EndpointRoute(route.backends)}))
    with pytest.raises(RouterError):
        router.samples("iris", "prod")
