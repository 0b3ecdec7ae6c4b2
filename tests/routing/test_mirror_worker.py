"""The router's mirror worker (``routing.mirror_worker``), a real process next to the real router:
killed or frozen, it costs clients nothing (every request answered by the champion, as fast),
the copies it could not take are counted, and the router restarts it; what the router hands it
waiting to be taken is bounded, beyond which copies are dropped and counted, never waited for."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelcd.routing.base import EndpointRoute, Mirror, RoutingTable
from modelcd.routing.builtin import BuiltinRouter
from tests.routing.conftest import Client, EchoBackend, ProxyProcess, call, free_port

Make = Callable[[str], EchoBackend]


@pytest.fixture
def shadowed(start_proxy: Callable[..., ProxyProcess], make_backend: Make) -> Callable[..., ProxyProcess]:
    champion, candidate = make_backend("A"), make_backend("B")

    def start(*args: str) -> ProxyProcess:
        return start_proxy(RoutingTable(1, {"iris/prod": EndpointRoute(
            (champion.backend(100, id="d-champion"),), sample_rate=1.0,
            mirror=Mirror("d-candidate", 2, candidate.url))}), *args)

    return start


def health(proxy: ProxyProcess) -> dict[str, Any]:
    return call(proxy.port, "GET", "/-/healthz").json()["mirror_worker"]  # type: ignore[no-any-return]


def pairs(proxy: ProxyProcess, what: str = "/-/mirror/pairs") -> dict[str, Any]:
    r = call(proxy.port, "GET", f"{what}?endpoint=iris/prod&limit=10000")
    assert r.status == 200, r.body
    return r.json()  # type: ignore[no-any-return]


def serve(proxy: ProxyProcess, n: int, body: bytes = b"{}") -> list[float]:
    """``n`` requests on one connection: each answered 200 by the champion; their durations."""
    client, took = Client(proxy.port), []
    for _ in range(n):
        t = time.perf_counter()
        r = client.request("POST", "/iris/prod/score", body)
        took.append(time.perf_counter() - t)
        assert r.status == 200 and r.headers["X-Backend"] == "A"
    client.close()
    return took


def wait_for(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


def gone(pid: int) -> bool:
    """Not running: exited and reaped (a zombie still counts as there)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"X"
    except OSError:
        return True


@pytest.fixture
def frozen() -> Iterator[list[int]]:
    """Pids a test stopped with SIGSTOP: continued at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_killed_worker_costs_clients_nothing_its_copies_are_counted_and_it_is_restarted(
        shadowed: Callable[..., ProxyProcess]) -> None:
    proxy = shadowed()
    before = serve(proxy, 100)
    got = wait_for(lambda: (p := pairs(proxy))["mirrored"] == 100 and p)
    assert [p["seq"] for p in got["pairs"]] == list(range(1, 101))
    worker = health(proxy)["pid"]
    os.kill(worker, signal.SIGKILL)
    during = serve(proxy, 300)  # while the router sees it die and starts another
    # every client answered by the champion, as fast as before the kill (within a millisecond)
    assert statistics.median(during) < statistics.median(before) + 0.001, (statistics.median(before),
                                                                            statistics.median(during))
    now = wait_for(lambda: (h := health(proxy))["connected"] and h["pid"] != worker and h)
    assert now["restarts"] == 1 and wait_for(lambda: gone(worker), 5)
    serve(proxy, 20)
    after = wait_for(lambda: (p := pairs(proxy))["mirrored"] + p["dropped"] >= 420 and not p["pending"] and p)
    # the new worker's pairs number on above the old one's; copies it never got are counted
    assert after["pairs"] and after["pairs"][0]["seq"] > 100, {k: v for k, v in after.items() if k != "pairs"}
    # each request's copy is a pair or a drop (by the router, lost with the dead worker, or beyond
    # --mirror-pending when the new one got the backlog at once), the old worker's pairs included
    assert after["mirrored"] + after["dropped"] == 420 and after["mirrored"] >= 120, after
    samples = pairs(proxy, "/-/samples")
    assert samples["pairs"][0]["seq"] > 100 and samples["seq"] - samples["pairs"][0]["seq"] + 1 == samples["kept"]
    pair = after["pairs"][-1]
    assert json.loads(pair["champion"]["body"])["name"] == "A" and json.loads(pair["candidate"]["body"])["name"] == "B"


def test_a_frozen_worker_is_bounded_then_replaced(shadowed: Callable[..., ProxyProcess], frozen: list[int]) -> None:
    bound = 64 * 1024
    proxy = shadowed("--mirror-handoff-bytes", str(bound), "--mirror-worker-timeout", "2")
    serve(proxy, 5)
    worker = health(proxy)["pid"]
    os.kill(worker, signal.SIGSTOP)
    frozen.append(worker)
    body = json.dumps({"data": [[1.5] * 1500]}).encode()  # ~7 kB: 300 of them are ~2 MB to hand over
    took = serve(proxy, 300, body)
    seen = health(proxy)
    if seen["pid"] == worker:  # still the frozen one (not yet timed out): what waits for it is bounded
        assert seen["unsent_bytes"] <= 2 * bound and seen["waiting_items"] <= 256, seen
    assert seen["dropped"] > 0, seen  # the socket's buffer and ``bound`` are full: the rest was dropped
    assert statistics.median(took) < 0.05, statistics.median(took)
    # it never answers the router's pings: killed after --mirror-worker-timeout, then restarted
    wait_for(lambda: (h := health(proxy))["connected"] and h["pid"] != worker)
    assert wait_for(lambda: gone(worker), 5)
    serve(proxy, 10)
    got = wait_for(lambda: (p := pairs(proxy))["mirrored"] >= 10 and p)
    assert got["dropped_handoff"] > 0 and got["mirrored"] + got["dropped"] == 315, got
    assert got["pairs"][0]["seq"] > 5


@pytest.mark.parametrize(("args", "policy", "nice"), [
    ((), os.SCHED_IDLE, 0),  # the default: only CPU time serving does not want
    (("--mirror-worker-priority", "low"), os.SCHED_OTHER, 5),
    (("--mirror-worker-priority", "normal"), os.SCHED_OTHER, 0),
])
def test_the_worker_runs_below_the_router(shadowed: Callable[..., ProxyProcess], args: tuple[str, ...], policy: int,
                                          nice: int) -> None:
    proxy = shadowed(*args)
    serve(proxy, 20)
    assert wait_for(lambda: pairs(proxy)["mirrored"] == 20)  # copies flow at every priority on an idle machine
    worker = health(proxy)["pid"]
    assert os.sched_getscheduler(worker) == policy
    assert os.getpriority(os.PRIO_PROCESS, worker) - os.getpriority(os.PRIO_PROCESS, proxy.proc.pid) == nice
    assert os.sched_getscheduler(proxy.proc.pid) == os.SCHED_OTHER


def test_the_service_s_router_takes_the_setting(tmp_path: Path) -> None:
    """MODELCD_ROUTER_MIRROR_WORKER_PRIORITY reaches the worker of the router the service starts."""
    router = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port(), mirror_worker_priority="low")
    router.ensure_running()
    try:
        pid = router.pid()
        assert pid is not None
        worker = wait_for(lambda: call(router.port, "GET", "/-/healthz").json()["mirror_worker"]["pid"])
        assert os.sched_getscheduler(worker) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, worker) - os.getpriority(os.PRIO_PROCESS, pid) == 5
    finally:
        router.stop()
