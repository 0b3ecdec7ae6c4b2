"""BuiltinRouter lifecycle with the real router process: start, adopt, survive the death
of the control plane, supervise, refuse a taken port, apply/verify/read, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcd.config import Settings
from modelcd.errors import RouterError
from modelcd.routing.base import get_router
from modelcd.routing.builtin import BuiltinRouter

from .conftest import Client, EchoBackend, call, free_port, table

Make = Callable[[str], EchoBackend]

STARTER = """
import sys, time
from pathlib import Path
from modelcd.routing.base import RoutingTable
from modelcd.routing.builtin import BuiltinRouter
r = BuiltinRouter(Path(sys.argv[1]), "127.0.0.1", int(sys.argv[2]))
r.ensure_running()
r.apply(RoutingTable.from_json(sys.argv[3]))
print(r.pid(), flush=True)
time.sleep(120)
"""


def test_ensure_running_adopts_instead_of_starting_twice(router: BuiltinRouter, tmp_path: Path) -> None:
    pid = router.pid()
    assert pid is not None and router.pid_path.read_text().strip() == str(pid)
    router.ensure_running()
    assert router.pid() == pid
    again = get_router("builtin", Settings(home=tmp_path / "home", router_host="127.0.0.1", router_port=router.port))
    assert isinstance(again, BuiltinRouter)
    again.ensure_running()  # a restarted control plane: same home, same port
    assert again.pid() == pid
    router.pid_path.unlink()  # pid file lost: still adopted by asking the router itself
    again.ensure_running()
    assert again.pid() == pid and router.pid_path.exists()


def test_router_outlives_a_kill_9_of_its_starter(tmp_path: Path, make_backend: Make) -> None:
    a = make_backend("a")
    home, port = tmp_path / "home", free_port()
    t = table(5, {"iris/production": [a.backend(100, version=2, id="d5")]})
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(home), str(port), t.to_json()],
                               stdout=subprocess.PIPE, text=True)
    router = BuiltinRouter(home, "127.0.0.1", port)
    try:
        router_pid = int(starter.stdout.readline())  # type: ignore[union-attr]
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            client = Client(port)
            try:
                for _ in range(5000):
                    if stop.is_set():
                        break
                    statuses.append(client.request("POST", "/iris/production/score", b"{}").status)
            finally:
                client.close()

        worker = threading.Thread(target=hammer)
        worker.start()
        time.sleep(0.3)
        starter.send_signal(signal.SIGKILL)
        assert starter.wait(10) == -signal.SIGKILL
        time.sleep(0.7)
        stop.set()
        worker.join(10)
        assert len(statuses) > 20 and set(statuses) == {200}
        r = call(port, "POST", "/iris/production/score", b"{}")
        assert (r.status, r.headers["X-Modelcd-Deployment"]) == (200, "d5")
        router.ensure_running()  # the next control plane adopts it
        assert router.pid() == router_pid
        assert router.read() == t
    finally:
        starter.kill()
        starter.wait(5)
        if starter.stdout is not None:
            starter.stdout.close()
        router.stop()


def test_supervise_restarts_a_killed_router_with_its_table(router: BuiltinRouter, make_backend: Make) -> None:
    a = make_backend("a")
    t = table(9, {"iris/production": [a.backend(100)]})
    router.apply(t)
    assert router.supervise() is False
    old = router.pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        try:
            call(router.port, "GET", "/-/healthz")
        except OSError:
            break
        time.sleep(0.01)
    assert router.supervise() is True
    assert router.pid() not in (None, old)
    assert router.read() == t
    assert call(router.port, "POST", "/iris/production/score", b"{}").status == 200
    assert router.supervise() is False
    router.stop()
    assert router.supervise() is False and router.pid() is None


def test_port_taken_by_a_stranger_names_the_port_and_setting(tmp_path: Path, make_backend: Make) -> None:
    stranger = make_backend("stranger")
    r = BuiltinRouter(tmp_path / "home", "127.0.0.1", stranger.port)
    with pytest.raises(RouterError, match=rf"port {stranger.port}.*MODELCD_ROUTER_PORT"):
        r.ensure_running()
    assert r.pid() is None


def test_port_taken_by_the_router_of_another_home(router: BuiltinRouter, tmp_path: Path) -> None:
    other = BuiltinRouter(tmp_path / "other-home", "127.0.0.1", router.port)
    with pytest.raises(RouterError, match="another home"):
        other.ensure_running()


def test_apply_verifies_rejects_stale_and_is_idempotent(router: BuiltinRouter, make_backend: Make) -> None:
    a, b = make_backend("a"), make_backend("b")
    t3 = table(3, {"iris/production": [a.backend(100)]})
    assert router.apply(t3) == 3
    assert router.apply(t3) == 3  # same table again: nothing to do
    assert router.read() == t3
    with pytest.raises(RouterError, match="older than the live generation 3"):
        router.apply(table(2, {"iris/production": [b.backend(100)]}))
    with pytest.raises(RouterError, match="different table"):
        router.apply(table(3, {"iris/production": [b.backend(100)]}))
    assert router.read() == t3
    t4 = t3.with_route("iris", "production", table(0, {"x/y": [b.backend(100)]}).endpoints["x/y"])
    assert router.apply(t4) == 4
    assert call(router.port, "GET", "/iris/production/").json()["name"] == "b"


def test_apply_and_read_fail_clearly_when_the_router_is_down(tmp_path: Path) -> None:
    r = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port())
    with pytest.raises(RouterError, match="not running.*ensure_running"):
        r.apply(table(1, {}))
    assert not r.table_path.exists()
    with pytest.raises(RouterError, match="did not answer"):
        r.read()
    r.stop()  # stopping what never ran is fine


def test_endpoint_uri_and_stop(router: BuiltinRouter) -> None:
    assert router.endpoint_uri("iris", "production") == f"http://127.0.0.1:{router.port}/iris/production"
    pid = router.pid()
    router.stop()
    router.stop()
    assert router.pid() is None and not router.pid_path.exists()
    with pytest.raises(ConnectionRefusedError):
        call(router.port, "GET", "/-/healthz")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_supervise_replaces_a_hung_router(tmp_path: Path, make_backend: Make) -> None:
    a = make_backend("a")
    router = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port(), probe_timeout=0.3)
    router.ensure_running()
    try:
        t = table(2, {"iris/production": [a.backend(100)]})
        router.apply(t)
        hung = router.pid()
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive, port open, answers nothing
        assert [router.supervise() for _ in range(3)] == [False, False, True]
        assert router.pid() not in (None, hung)
        assert router.read() == t
        assert call(router.port, "POST", "/iris/production/score", b"{}").status == 200
    finally:
        router.stop()
