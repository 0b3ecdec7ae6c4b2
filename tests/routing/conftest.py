"""Fixtures for router tests: real backend HTTP servers on 127.0.0.1, the real router
process (through ``BuiltinRouter`` or started directly), and a small HTTP client."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from modelcd.routing.base import Backend, EndpointRoute, RoutingTable
from modelcd.routing.builtin import BuiltinRouter
from modelcd.targets.process import free_port


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with JSON describing it and naming the server. Paths:
    ``/slow?s=X`` sleeps first, ``/chunked`` answers chunked, ``/close`` answers without a
    length and closes, ``/status/N`` answers status N, ``/big?n=N`` answers N bytes."""

    protocol_version = "HTTP/1.1"
    server: _EchoServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.endswith("/slow"):
            self.server.slow_started.set()
            time.sleep(float(query.get("s", ["0.5"])[0]))
        payload = json.dumps({
            "name": self.server.name, "method": self.command, "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
        }).encode()
        if url.path.endswith("/big"):
            payload = b"x" * int(query["n"][0])
        status = int(url.path.rsplit("/", 1)[1]) if "/status/" in url.path else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Backend", self.server.name)
        if url.path.endswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 7):
                piece = payload[i:i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path.endswith("/close"):
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    name = ""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.connections: set[socket.socket] = set()
        self.slow_started = threading.Event()  # a /slow request is being answered

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients (the router) closing mid-answer are expected in these tests


class EchoBackend:
    """A named backend running in a thread of the test process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
        self.server.name = name
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def backend(self, weight: int, version: int = 1, id: str | None = None) -> Backend:
        return Backend(id or self.name, version, self.url, weight)

    def close(self) -> None:
        """Stop like a killed process: stop listening and cut open keep-alive connections."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.server.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def make_backend() -> Iterator[Callable[[str], EchoBackend]]:
    made: list[EchoBackend] = []

    def make(name: str) -> EchoBackend:
        made.append(EchoBackend(name))
        return made[-1]

    yield make
    for b in made:
        b.close()


PROCESS_BACKEND = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, name = int(sys.argv[1]), sys.argv[2]
answer = json.dumps({"name": name}).encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

Server(("127.0.0.1", port), Handler).serve_forever()
"""


class ProcessBackend:
    """A named backend in its own process (so it can die by SIGKILL like a deployment);
    answers every GET/POST with ``{"name": name}``. Restartable on the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROCESS_BACKEND, str(self.port), self.name])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            assert self.proc.poll() is None, f"backend {self.name} exited with {self.proc.returncode}"
            time.sleep(0.02)
        raise AssertionError(f"backend {self.name} did not listen on {self.port}")

    def backend(self, weight: int, version: int = 1) -> Backend:
        return Backend(self.name, version, self.url, weight)

    def kill(self) -> None:
        """kill -9, then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def spawn_backend() -> Iterator[Callable[[str], ProcessBackend]]:
    made: list[ProcessBackend] = []

    def spawn(name: str) -> ProcessBackend:
        made.append(ProcessBackend(name))
        return made[-1]

    yield spawn
    for b in made:
        b.kill()


def table(generation: int, routes: dict[str, list[Backend]]) -> RoutingTable:
    """A routing table from ``{"model/env": [Backend, ...]}``."""
    return RoutingTable(generation, {k: EndpointRoute(tuple(v)) for k, v in routes.items()})


def dead_url() -> str:
    """The URL of a port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A keep-alive HTTP/1.1 client to one port (http.client, reconnecting when closed)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                **kw: Any) -> Response:
        self.conn.request(method, path, body=body, headers=headers or {}, **kw)
        resp = self.conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())

    def close(self) -> None:
        self.conn.close()


def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         **kw: Any) -> Response:
    """One request on a fresh connection."""
    client = Client(port)
    try:
        return client.request(method, path, body, headers, **kw)
    finally:
        client.close()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[BuiltinRouter]:
    """A running built-in router (real process) with its home in tmp_path."""
    r = BuiltinRouter(tmp_path / "home", "127.0.0.1", free_port())
    r.ensure_running()
    yield r
    r.stop()


class ProxyProcess:
    """The router process started directly (for options BuiltinRouter does not pass)."""

    def __init__(self, table_path: Path, *args: str) -> None:
        self.table_path = table_path
        self.port = free_port()
        self.log = table_path.with_name("proxy.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "modelcd.routing.proxy", "--table", str(table_path),
                                          "--port", str(self.port), *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if call(self.port, "GET", "/-/healthz").status == 200:
                    return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"router did not start: {self.log.read_text()}")

    def write_table(self, t: RoutingTable | str) -> None:
        tmp = self.table_path.with_suffix(".tmp")
        tmp.write_text(t if isinstance(t, str) else t.to_json())
        tmp.replace(self.table_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(t: RoutingTable, *args: str) -> ProxyProcess:
        path = tmp_path / f"table{len(started)}.json"
        path.write_text(t.to_json())
        started.append(ProxyProcess(path, *args))
        return started[-1]

    yield start
    for p in started:
        p.stop()
