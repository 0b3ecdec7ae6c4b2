"""A real HTTP server on 127.0.0.1 that plays a CI system's REST API by its documented
contract (``reference/integrations.md`` §5-6), for the GitHub and Azure DevOps client tests.

Program it with expected requests (method, raw path, query, required and forbidden
headers, a body check) and canned answers (status, JSON or raw body, headers, a delay),
either queued in order (``expect``) or by route (``route``, answered every time). It
records every request; whatever breaks the contract is collected in ``failures`` (and
answered 418, which the clients never retry), and ``unmet`` lists queued expectations no
request reached. The ``contract_server`` fixture asserts both are empty after the test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

BodyCheck = Callable[[Any], object]


@dataclass(frozen=True)
class Canned:
    """One answer: ``json`` (serialised) or ``raw`` bytes, with ``headers``; ``delay``
    seconds of silence first (to make a client time out; cut short when the server closes)."""

    status: int = 200
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    delay: float = 0.0
    content_type: str = "application/json; charset=utf-8"


@dataclass
class Recorded:
    """A request as it arrived: raw path (still percent-encoded), decoded query, headers
    (lower-case names), body bytes and the body parsed as JSON (None when empty or not JSON)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    json: Any


@dataclass
class Expect:
    """A request the contract allows, and what to answer. ``query`` (when not None) must be
    exactly the decoded query (one value per key); ``headers`` must be present with exactly
    these values; ``absent`` headers must not be sent; ``body`` is either the exact JSON
    expected or a callable given the parsed JSON (``raw_body`` the bytes) that raises
    AssertionError or returns False or a message when the body is wrong. Several answers are
    given out in order, the last one repeating."""

    method: str
    path: str
    answers: list[Canned]
    query: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    absent: Sequence[str] = ()
    body: Any = None
    raw_body: Callable[[bytes], object] | None = None
    served: int = 0

    def next_answer(self) -> Canned:
        answer = self.answers[min(self.served, len(self.answers) - 1)]
        self.served += 1
        return answer


def _check_result(result: object) -> str | None:
    if result is None or result is True:
        return None
    if result is False:
        return "check returned False"
    return str(result)


class ContractServer:
    """The server; ``url`` is its base address. ``common_headers`` are required on every
    request (e.g. the auth, Accept and API version headers); a request with a body must
    say ``Content-Type: application/json``."""

    def __init__(self, common_headers: Mapping[str, str] | None = None) -> None:
        self.common_headers: dict[str, str] = dict(common_headers or {})
        self.requests: list[Recorded] = []
        self.failures: list[str] = []
        self._queue: list[Expect] = []
        self._routes: list[Expect] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # cuts delayed answers short on close
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = False  # server_close() joins every handler thread: none is left behind
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ----------------------------------------------------------------------- programming

    def expect(self, method: str, path: str, *answers: Canned, **checks: Any) -> Expect:
        """Queue the next expected request (in order) and its answer(s)."""
        exp = Expect(method.upper(), path, list(answers) or [Canned()], **checks)
        with self._lock:
            self._queue.append(exp)
        return exp

    def route(self, method: str, path: str, *answers: Canned, **checks: Any) -> Expect:
        """Answer every ``method path`` request (when no queued expectation is waiting)."""
        exp = Expect(method.upper(), path, list(answers) or [Canned()], **checks)
        with self._lock:
            self._routes.append(exp)
        return exp

    @property
    def unmet(self) -> list[str]:
        with self._lock:
            return [f"{e.method} {e.path}" for e in self._queue]

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------------- serving

    def _match(self, req: Recorded) -> tuple[Expect | None, list[str]]:
        with self._lock:
            if self._queue:
                exp = self._queue[0]
                if exp.method == req.method and exp.path == req.path:
                    if exp.served + 1 >= len(exp.answers):  # this request takes its last answer
                        self._queue.pop(0)
                    return exp, []
                problems = [f"{req.method} {req.path}: expected {exp.method} {exp.path} next"]
            else:
                problems = [f"{req.method} {req.path}: no request was expected"]
            route = next((r for r in self._routes if r.method == req.method and r.path == req.path), None)
            if route is not None:
                return route, []
            return None, problems

    def _check(self, exp: Expect, req: Recorded) -> list[str]:
        where = f"{req.method} {req.path}"
        problems: list[str] = []
        single = {k: v[0] if len(v) == 1 else v for k, v in req.query.items()}
        if exp.query is not None and single != dict(exp.query):
            problems.append(f"{where}: query {single} != expected {dict(exp.query)}")
        for name, value in {**self.common_headers, **exp.headers}.items():
            got = req.headers.get(name.lower())
            if got != value:
                problems.append(f"{where}: header {name}: {got!r} != expected {value!r}")
        problems += [f"{where}: header {name} must not be sent" for name in exp.absent if name.lower() in req.headers]
        if req.body and not req.headers.get("content-type", "").startswith("application/json"):
            problems.append(f"{where}: a body without Content-Type: application/json")
        if req.body and req.json is None and exp.raw_body is None:
            problems.append(f"{where}: the body is not JSON: {req.body[:200]!r}")
        checks: list[tuple[object, Any]] = [(exp.raw_body, req.body), (exp.body, req.json)]
        for check, value in checks:
            if check is None:
                continue
            if callable(check):
                try:
                    problem = _check_result(check(value))
                except AssertionError as e:
                    problem = str(e) or "assertion failed"
                if problem:
                    problems.append(f"{where}: body: {problem}")
            elif value != check:
                problems.append(f"{where}: body {value!r} != expected {check!r}")
        return problems

    def handle(self, req: Recorded) -> Canned:
        with self._lock:
            self.requests.append(req)
        exp, problems = self._match(req)
        if exp is not None:
            problems = self._check(exp, req)
        if problems:
            with self._lock:
                self.failures.extend(problems)
            return Canned(418, {"message": "contract violation: " + "; ".join(problems)})
        assert exp is not None
        with self._lock:
            return exp.next_answer()


def _handler_class(server: ContractServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive surprises

        def _serve(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                req = Recorded(method=self.command, path=parts.path,
                               query=parse_qs(parts.query, keep_blank_values=True),
                               headers={k.lower(): v for k, v in self.headers.items()}, body=body, json=parsed)
                answer = server.handle(req)
                if answer.delay:
                    server._closing.wait(answer.delay)
                payload = answer.raw if answer.raw is not None else (
                    b"" if answer.json is None else json.dumps(answer.json).encode())
                self.send_response(answer.status)
                if payload:
                    self.send_header("Content-Type", answer.content_type)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if payload:
                    self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client gave up waiting (a timeout test)
            except Exception as e:  # never let a handler thread die with a traceback
                server.failures.append(f"contract server error: {type(e).__name__}: {e}")

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(common_headers: Mapping[str, str] | None = None) -> Iterator[ContractServer]:
    """Run a ContractServer for one test and check, after it, that every request kept to the
    contract and every queued expectation was met (use as a fixture body)."""
    srv = ContractServer(common_headers)
    try:
        yield srv
    finally:
        srv.close()
    assert srv.failures == [], "requests broke the contract:\n" + "\n".join(srv.failures)
    assert srv.unmet == [], f"expected requests never came: {srv.unmet}"
