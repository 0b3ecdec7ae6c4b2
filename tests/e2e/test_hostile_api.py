"""A real `modelcd serve` against hostile clients on 127.0.0.1, every test bounded in bytes and
time: floods without a token, bodies over the cap, oversize request lines and headers,
slowloris, broken framing, a token file left empty, the files of the home, path tricks
through the CLI, and `modelcd shutdown` while the service runs."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import TOKEN, Service, free_port, iris_model, make_service, running_service

FLOOD_MAX = 64 * 1024 * 1024  # the most a flood sends before the test gives up on an answer
PIECE = 1024 * 1024


def _connect(svc: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=10)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """What the server sends until it closes the connection (or ``timeout_s`` of silence)."""
    got = b""
    sock.settimeout(timeout_s)
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while data := sock.recv(65536):
            got += data
    return got


def _flood(sock: socket.socket, head: bytes, piece: bytes, max_bytes: int = FLOOD_MAX) -> tuple[int, bytes]:
    """Send ``head``, then ``piece`` again and again until the server answers, breaks the
    connection or ``max_bytes`` went out. Returns (bytes sent after the head, the answer)."""
    sock.sendall(head)
    sock.setblocking(False)
    sent, got, pending = 0, b"", memoryview(piece)
    try:
        while sent < max_bytes and b"\r\n\r\n" not in got:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
            elif writable:
                n = sock.send(pending)
                sent += n
                pending = pending[n:] if n < len(pending) else memoryview(piece)
            else:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    return sent, got + _read_until_closed(sock, 3)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _json_body(raw: bytes) -> dict[str, object]:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0])


def _healthy(svc: Service) -> bool:
    return requests.get(f"{svc.url}/healthz", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service with a small artifact cap and a short header timeout."""
    with running_service(tmp_path_factory.mktemp("hostile"), MODELCD_MAX_ARTIFACT_BYTES="1000000",
                         MODELCD_HTTP_HEADER_TIMEOUT_S="2") as service:
        yield service


# -- bodies: the token before any byte; the cap on chunked bodies ----------------------------------

def test_an_unauthenticated_chunked_flood_is_refused_before_its_body(svc: Service) -> None:
    head = (b"POST /api/v1/models/flood/versions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    t0 = time.monotonic()
    with _connect(svc) as sock:
        sent, answer = _flood(sock, head, _chunk(bytes(PIECE)))
    assert _status(answer) == 401, answer[:300]
    assert sent < FLOOD_MAX / 2 and time.monotonic() - t0 < 10, (sent, time.monotonic() - t0)
    assert b"connection: close" in answer.lower()
    assert svc.api("GET", "/models/flood").status_code == 404
    assert not any((svc.home / "tmp").rglob("*")) and not (svc.home / "artifacts").exists()
    assert _healthy(svc)


def test_unauthenticated_writes_with_declared_bodies_are_refused_at_once(svc: Service) -> None:
    for path in (b"/api/v1/releases", b"/api/v1/policies", b"/api/v1/releases/r-0123456789ab/report",
                 b"/api/v1/nowhere", b"/hooks/generic/extra", b"/api/v1//releases", b"//api/v1/policies"):
        with _connect(svc) as sock:
            method = b"PUT" if path.endswith(b"policies") else b"POST"
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xa0\r\nContent-Length: 10000000000\r\n"
                         b"\r\n" % (method, path))
            answer = _read_until_closed(sock)
        assert _status(answer) in (401, 404, 405), (path, answer[:300])
        assert answer.endswith(b"\n"), answer  # the whole answer, then the server closed the connection


def test_an_authenticated_chunked_body_over_the_cap_is_413(svc: Service) -> None:
    head = (b"POST /api/v1/models/big/versions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n" % TOKEN.encode())
    with _connect(svc) as sock:
        sent, answer = _flood(sock, head, _chunk(bytes(PIECE)))
    assert _status(answer) == 413, answer[:300]
    assert "MODELCD_MAX_ARTIFACT_BYTES" in str(_json_body(answer)["message"])
    assert sent < FLOOD_MAX / 2, sent
    with _connect(svc) as sock:
        sock.sendall(head.replace(b"Transfer-Encoding: chunked", b"Content-Length: 10000000000"))
        answer = _read_until_closed(sock)
    assert _status(answer) == 413 and b"MODELCD_MAX_ARTIFACT_BYTES" in answer
    assert svc.api("GET", "/models/big").status_code == 404
    assert _healthy(svc)


# -- request line and headers ---------------------------------------------------------------------

def test_an_oversize_request_line_is_414(svc: Service) -> None:
    with _connect(svc) as sock:
        sock.sendall(b"GET /api/v1/models?q=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_read_until_closed(sock)) == 414
    assert _healthy(svc)


def test_an_80_mb_header_is_431_after_a_bounded_read(svc: Service) -> None:
    with _connect(svc) as sock:
        sent, answer = _flood(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * PIECE, 80 * PIECE)
    assert _status(answer) == 431, answer[:300]
    assert sent < 16 * PIECE, sent
    assert _healthy(svc)


def test_too_many_headers_is_431(svc: Service) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
    with _connect(svc) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert _status(_read_until_closed(sock)) == 431
    assert requests.get(f"{svc.url}/healthz", headers={f"X-H{i}": "v" for i in range(50)}, timeout=5).ok


@pytest.mark.parametrize("raw", [
    b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
])
def test_malformed_framing_is_4xx_or_a_clean_close(svc: Service, raw: bytes) -> None:
    with _connect(svc) as sock:
        sock.sendall(raw)
        answer = _read_until_closed(sock)
    assert answer == b"" or 400 <= _status(answer) < 500, answer[:300]
    assert _healthy(svc)


def test_slowloris_clients_are_cut_while_others_get_answers(svc: Service) -> None:
    """Four clients trickle a header byte every 0.3 s and one sends nothing: each is answered
    408 and closed after the 2 s header timeout; meanwhile another client keeps being served."""
    latencies: list[float] = []
    stop = threading.Event()

    def other_client() -> None:
        session = requests.Session()
        while not stop.is_set():
            t = time.monotonic()
            assert session.get(f"{svc.url}/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)

    socks = [_connect(svc) for _ in range(5)]
    for s in socks[:4]:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    watcher = threading.Thread(target=other_client, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    cut: dict[int, float] = {}
    answers: dict[int, bytes] = {i: b"" for i in range(5)}
    while len(cut) < 5 and time.monotonic() - t0 < 8:
        for i, s in enumerate(socks):
            if i in cut:
                continue
            try:
                if i < 4:
                    s.sendall(b"a")
                s.settimeout(0.01)
                data = s.recv(4096)
                answers[i] += data
                if not data:
                    cut[i] = time.monotonic() - t0
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                cut[i] = time.monotonic() - t0
        time.sleep(0.3)
    stop.set()
    watcher.join(10)
    for s in socks:
        s.close()
    assert sorted(cut) == [0, 1, 2, 3, 4], (cut, answers)
    assert all(1.5 < t < 5 for t in cut.values()), cut
    assert all(_status(a) == 408 for a in answers.values() if a), answers
    assert len(latencies) >= 10 and max(latencies) < 1.0, latencies


# -- the token ------------------------------------------------------------------------------------

def test_a_service_with_an_empty_token_file_does_not_start(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    env = {k: v for k, v in svc.env.items() if k != "MODELCD_TOKEN"}
    svc.home.mkdir(parents=True)
    (svc.home / "token").write_text("")
    r = subprocess.run([sys.executable, "-m", "modelcd", "serve"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r.stdout
    assert str(svc.home / "token") in r.stderr and "delete the file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "modelcd", "serve"], env={**env, "MODELCD_TOKEN": ""},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "MODELCD_TOKEN" in r.stderr, r.stderr


# -- the home's files -----------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_home_and_everything_modelcd_makes_in_it_are_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    for name, text in (("token", "older-token-0123456789\n"), ("settings.yaml", "{}\n")):
        (home / name).write_text(text)
        os.chmod(home / name, 0o644)
    sqlite3.connect(home / "modelcd.db").close()  # a database an older version left readable
    os.chmod(home / "modelcd.db", 0o644)
    svc = make_service(tmp_path)
    svc.env.pop("MODELCD_TOKEN")
    svc.start()
    try:
        headers = {"Authorization": "Bearer older-token-0123456789"}
        assert svc.api("PUT", "/policies", data="name: p\n", headers=headers).status_code == 200
        assert _mode(home) == 0o700
        for name in ("modelcd.db", "token", "settings.yaml"):
            assert _mode(home / name) == 0o600, name
        made = [p for p in home.rglob("*") if not p.name.startswith("serve-")]  # serve-N.log: the test's own
        assert any(p.is_dir() for p in made) and len(made) > 4, made
        loose = {str(p.relative_to(home)): oct(_mode(p)) for p in made if _mode(p) & 0o077}
        assert loose == {}, loose
    finally:
        svc.stop()
        svc.shutdown_data_plane()


# -- the CLI: names and ids stay one path segment ---------------------------------------------------

POLICY = """name: trick
match:
  models: ["trick*"]
environments:
  - name: production
    env: {MY_VAR: "s3cr3t-value-never-shown"}
smoke: {requests: 3}
"""


def _cli(svc: Service, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
    return result.exit_code, result.output


def test_a_release_id_cannot_walk_to_another_route(tmp_path: Path) -> None:
    """`releases stop 'x/../../endpoints/NAME/production/rollback?'` once rolled NAME back;
    the id is now one encoded segment, which the API refuses. Policy env values stay hidden
    in the CLI's output of releases and policies."""
    with running_service(tmp_path / "s", policy=POLICY) as svc:
        meta = iris_model(tmp_path / "m")
        for _ in range(2):
            assert svc.wait_release_for("trick", svc.register("trick", tmp_path / "m", meta)["version"])[
                "phase"] == "succeeded"
        assert svc.endpoint("trick")["traffic"] == {"2": 100}
        for command in (["releases", "stop"], ["releases", "show"], ["jobs", "stop"], ["releases", "approve"]):
            code, out = _cli(svc, *command, "x/../../endpoints/trick/production/rollback?")
            assert code != 0, (command, out)
        code, out = _cli(svc, "releases", "stop", "..")
        assert code != 0 and "not a valid" in out, out
        assert svc.endpoint("trick")["traffic"] == {"2": 100}

        rel = json.loads(_cli(svc, "releases", "list", "--model", "trick", "--json")[1])["releases"][0]
        for args in (["releases", "show", rel["id"], "--json"], ["releases", "list", "--json"],
                     ["policies", "show", "trick"]):
            code, out = _cli(svc, *args)
            assert code == 0 and "s3cr3t" not in out and "(set)" in out, (args, out)


# -- modelcd shutdown while the service runs ------------------------------------------------------

def test_shutdown_asks_the_running_service_and_the_router_stays_down(tmp_path: Path) -> None:
    with running_service(tmp_path / "s") as svc:
        router = f"{svc.router_url}/-/healthz"
        assert requests.get(router, timeout=5).ok
        wrong = CliRunner().invoke(main, ["shutdown"], env={**svc.env, "MODELCD_TOKEN": "wrong-token-0123"})
        assert wrong.exit_code != 0 and "token" in wrong.output.lower(), wrong.output
        elsewhere = CliRunner().invoke(main, ["shutdown"], env={**svc.env, "MODELCD_URL": f"http://127.0.0.1:{free_port()}"})
        assert elsewhere.exit_code != 0 and "does not answer" in elsewhere.output, elsewhere.output
        assert requests.get(router, timeout=5).ok
        other_port = str(free_port())  # this shell's settings name another router port
        result = CliRunner().invoke(main, ["shutdown"], env={**svc.env, "MODELCD_ROUTER_PORT": other_port})
        assert result.exit_code == 0, result.output
        assert f"stopped router on http://127.0.0.1:{svc.router_port}" in result.output, result.output
        assert other_port not in result.output
        time.sleep(3)  # the supervisor ticks every second: it must not bring the router back
        with pytest.raises(requests.ConnectionError):
            requests.get(router, timeout=5)
        assert _healthy(svc)
        svc.stop()
        svc.start()  # a restart supervises the data plane again
        assert requests.get(router, timeout=5).ok
