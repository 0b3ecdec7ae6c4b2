"""Smoke checks: pure assessments with literal inputs, and `run_smoke` against a real local HTTP
server scripted to answer right, wrong, slowly, with errors, or not at all."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from modelcd.analysis.smoke import (
    CheckResult,
    Outcome,
    SmokeChecks,
    SmokeReport,
    assess_health,
    assess_latency,
    assess_sample,
    differences,
    excerpt,
    is_worse,
    nearest_rank,
    run_smoke,
    worst,
)
from modelcd.errors import Cancelled, InvalidInput, SmokeFailed
from modelcd.releases.policy import DEFAULT_POLICY, parse_policy

P, F, E, INC = Outcome.PASSED, Outcome.FAILED, Outcome.ERROR, Outcome.INCONCLUSIVE


# --- outcomes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcomes", "expected"), [
    ([], INC),
    ([P], P),
    ([P, P], P),
    ([P, INC], INC),
    ([INC, E], E),
    ([E, P], E),
    ([P, F, E], F),
    ([F, INC], F),
])
def test_worst(outcomes: list[Outcome], expected: Outcome):
    assert worst(outcomes) is expected


@pytest.mark.parametrize(("current", "new", "worse"), [
    (P, INC, True), (INC, E, True), (E, F, True), (P, F, True),
    (F, P, False), (E, INC, False), (P, P, False), (F, F, False),
])
def test_is_worse(current: Outcome, new: Outcome, worse: bool):
    assert is_worse(current, new) is worse


# --- health -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "exc", "outcome", "message"), [
    (200, None, P, "healthy (200)"),
    (204, None, P, "healthy (204)"),
    (None, "connection refused", E, "could not reach /healthz: connection refused"),
    (None, None, E, "/healthz gave no answer"),
    (503, None, E, "not ready: /healthz answered 503"),
    (502, None, E, "not ready: /healthz answered 502"),
    (404, None, F, "/healthz answered 404"),
    (500, None, F, "/healthz answered 500"),
])
def test_assess_health(status: int | None, exc: str | None, outcome: Outcome, message: str):
    result = assess_health(status, exc)
    assert (result.name, result.outcome, result.message) == ("health", outcome, message)
    assert result.evidence["status"] == status


# --- sample -----------------------------------------------------------------------------------------


def body(predictions: Any) -> bytes:
    return json.dumps({"predictions": predictions}).encode()


@pytest.mark.parametrize(("status", "raw", "expected", "tolerance", "outcome", "message"), [
    (200, body([0, 1, 2]), [0, 1, 2], 0.0, P, "predictions match the expected output (tolerance 0)"),
    (200, body([0.1000001]), [0.1], 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, body([1000000.5]), [1000000.0], 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, body([0.2]), [0.1], 1e-6, F, "predictions differ from the expected output: predictions[0]: "
                                       "expected 0.1, got 0.2"),
    (200, body([0, 1]), [0, 1, 2], 1e-6, F, "predictions differ from the expected output: predictions: "
                                            "expected 3 items, got 2"),
    (200, body([[1.0, 2.0], [3.0, 4.0]]), [[1, 2], [3, 5]], 1e-6, F,
     "predictions differ from the expected output: predictions[1][1]: expected 5, got 4.0"),
    (200, body([[1.0, 2.0], [3.0, 4.0]]), [[1, 2], [3, 4]], 1e-6, P,
     "predictions match the expected output (tolerance 1e-06)"),
    (200, body(["setosa", "virginica"]), ["setosa", "versicolor"], 1e-6, F,
     'predictions differ from the expected output: predictions[1]: expected "versicolor", got "virginica"'),
    (200, body([True]), [True], 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, body([1]), [True], 1e-6, F, "predictions differ from the expected output: predictions[0]: "
                                      "expected true, got 1"),
    (200, body(["1"]), [1], 1e-6, F, 'predictions differ from the expected output: predictions[0]: '
                                     'expected 1, got "1"'),
    (200, body([None]), [None], 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, b'{"predictions": [NaN]}', [float("nan")], 1e-6, P,
     "predictions match the expected output (tolerance 1e-06)"),
    (200, body([{"label": "a", "p": 0.5}]), [{"label": "a", "p": 0.5000001}], 1e-6, P,
     "predictions match the expected output (tolerance 1e-06)"),
    (200, body([{"label": "a"}]), [{"label": "a", "p": 0.5}], 1e-6, F,
     "predictions differ from the expected output: predictions[0]: expected keys ['label', 'p'], got ['label']"),
    (200, body(7), [7], 1e-6, F, "predictions differ from the expected output: predictions: expected [7], got 7"),
    (200, body([0, 1]), None, 1e-6, P, "answered with JSON; the version has no expected output to compare"),
    # a custom entry script answers without the envelope: the whole answer is compared
    (200, b'{"result": [0]}', [0], 1e-6, F,
     'predictions differ from the expected output: answer: expected [0], got {"result": [0]}'),
    (200, b'{"result": [0]}', {"result": [0]}, 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, b"[0, 1]", [0, 1], 1e-6, P, "predictions match the expected output (tolerance 1e-06)"),
    (200, b"<html>oops</html>", [0], 1e-6, F, "/score answered with something that is not JSON"),
    (500, b'{"error": "boom"}', [0], 1e-6, F, "/score answered 500 to the version's sample"),
    (400, b'{"error": "bad input"}', None, 1e-6, F, "/score answered 400 to the version's sample"),
    (503, b"", [0], 1e-6, E, "not ready: /score answered 503"),
    (None, b"", [0], 1e-6, E, "/score gave no answer"),
])
def test_assess_sample(status: int | None, raw: bytes, expected: Any, tolerance: float, outcome: Outcome,
                       message: str):
    result = assess_sample(status, raw, expected, tolerance)
    assert (result.name, result.outcome, result.message) == ("sample", outcome, message)
    assert result.evidence["status"] == status
    assert result.evidence["body"] == raw.decode()


def test_assess_sample_keeps_evidence_of_a_wrong_answer():
    result = assess_sample(200, body([0, 9, 2, 9]), [0, 1, 2, 3], 1e-6)
    assert result.outcome is F
    assert result.message == ("predictions differ from the expected output: predictions[1]: expected 1, got 9 "
                              "and 1 more")
    assert result.evidence == {
        "status": 200,
        "body": '{"predictions": [0, 9, 2, 9]}',
        "mismatches": ["predictions[1]: expected 1, got 9", "predictions[3]: expected 3, got 9"],
        "mismatch_count": 2,
    }


def test_assess_sample_shows_five_mismatches_counts_all_and_cuts_the_body():
    raw = body(list(range(1000, 1200)))
    result = assess_sample(200, raw, list(range(200)), 1e-6)
    assert result.outcome is F
    assert result.evidence["mismatch_count"] == 200
    assert len(result.evidence["mismatches"]) == 5
    assert len(result.evidence["body"]) == 500
    assert result.evidence["body"].endswith("…")
    assert result.message.endswith("and 199 more")


def test_differences_and_excerpt():
    assert list(differences([1, [2, 3]], [1, [2, 3.0000001]], "p", 1e-6)) == []
    assert list(differences([1, [2, 3]], [1, [2, 4]], "p", 1e-6)) == ["p[1][1]: expected 3, got 4"]
    assert list(differences(1.0, 1.0 + 1e-9, "p", 0.0)) == ["p: expected 1.0, got 1.000000001"]
    assert excerpt(b"abc") == "abc"
    assert excerpt("x" * 600) == "x" * 499 + "…"
    assert excerpt(b"\xff\xfe") == "\ufffd\ufffd"


# --- latency ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "percent", "expected"), [
    ([float(v) for v in range(1, 21)], 95, 19.0),
    ([float(v) for v in range(1, 11)], 95, 10.0),
    ([float(v) for v in range(1, 101)], 95, 95.0),
    ([5.0], 95, 5.0),
    ([3.0, 1.0, 2.0], 50, 2.0),
])
def test_nearest_rank(values: list[float], percent: float, expected: float):
    assert nearest_rank(values, percent) == expected


@pytest.mark.parametrize(("latencies", "budget", "errors", "outcome", "message"), [
    ([float(v) for v in range(1, 21)], 19.0, 0, P, "p95 19.0 ms within the 19 ms budget"),
    ([float(v) for v in range(1, 21)], 18.5, 0, F, "p95 19.0 ms is over the 18.5 ms budget"),
    ([1.0, 1.0, 1.0], 500.0, 1, F, "1 of 3 requests answered non-2xx"),
    ([], 500.0, 0, INC, "no requests measured"),
    ([], 500.0, 2, F, "2 requests answered non-2xx"),
])
def test_assess_latency(latencies: list[float], budget: float, errors: int, outcome: Outcome, message: str):
    result = assess_latency(latencies, budget, errors)
    assert (result.name, result.outcome, result.message) == ("latency", outcome, message)


def test_assess_latency_evidence():
    result = assess_latency([12.34, 10.0, 50.06, 11.0], 500.0, 0)
    assert result.evidence == {"requests": 4, "errors": 0, "p50_ms": 11.0, "p95_ms": 50.1, "max_ms": 50.1,
                               "budget_ms": 500.0}


# --- report and settings ----------------------------------------------------------------------------


def test_report_raises_naming_the_failing_check_and_evidence():
    report = SmokeReport(F, (
        CheckResult("health", P, "healthy (200)", {"status": 200}),
        CheckResult("sample", F, "/score answered 500 to the version's sample", {"status": 500, "body": "boom"}),
    ))
    assert report.failing is report.checks[1]
    with pytest.raises(SmokeFailed) as info:
        report.raise_for_outcome()
    assert info.value.message == ("smoke check 'sample' failed: /score answered 500 to the version's sample; "
                                  'evidence: {"body": "boom", "status": 500}')
    assert info.value.code == "smoke_failed"


def test_report_passed_does_not_raise_and_serialises():
    report = SmokeReport(P, (CheckResult("health", P, "healthy (200)", {"status": 200}),))
    report.raise_for_outcome()
    assert report.failing is None
    assert report.to_dict() == {"outcome": "passed", "checks": [
        {"name": "health", "outcome": "passed", "message": "healthy (200)", "evidence": {"status": 200}}]}


def test_inconclusive_report_raises_too():
    with pytest.raises(SmokeFailed, match="smoke check 'latency' inconclusive: no requests measured"):
        SmokeReport(INC, (CheckResult("latency", INC, "no requests measured"),)).raise_for_outcome()


def test_checks_from_policy():
    assert SmokeChecks.from_policy(DEFAULT_POLICY.smoke) == SmokeChecks(20, 500.0, 1e-6, 10.0)
    smoke = parse_policy("name: a\nsmoke: {requests: 3, p95_ms: 50, tolerance: 0.01, timeout_s: 2}\n").smoke
    assert SmokeChecks.from_policy(smoke) == SmokeChecks(requests=3, p95_ms=50.0, tolerance=0.01, timeout_s=2.0)


# --- run_smoke against a real HTTP server -----------------------------------------------------------

SAMPLE = {"data": [[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]]}
KEY = "sk-test-0123456789abcdef"


class Scoring(ThreadingHTTPServer):
    """A scoring service on 127.0.0.1 whose answers each test scripts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.health: list[int] = [200]  # successive /healthz statuses; the last one repeats
        self.score: Callable[[int, dict[str, Any], dict[str, str]], tuple[int, bytes]] = (
            lambda n, req, headers: (200, body([0, 2])))
        self.delay_s = 0.0  # before answering /score
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (the timeout test) breaks the pipe; anything else is a test bug."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.seen if p == path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server: Scoring

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.seen.append(("GET", self.path, dict(self.headers)))
            n = sum(1 for _, p, _ in self.server.seen if p == "/healthz")
        statuses = self.server.health
        self._answer(statuses[min(n, len(statuses)) - 1], b'{"status": "ok"}')

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.seen.append(("POST", self.path, dict(self.headers)))
            n = sum(1 for _, p, _ in self.server.seen if p == "/score")
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        status, payload = self.server.score(n, json.loads(raw), dict(self.headers))
        self._answer(status, payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Scoring]:
    srv = Scoring()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def refused_url() -> str:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


FAST = SmokeChecks(requests=5, p95_ms=2000.0, tolerance=1e-6, timeout_s=5.0)


def smoke(url: str, *, sample: Any = SAMPLE, expected: Any = None, checks: SmokeChecks = FAST,
          key: str | None = None, cancel: threading.Event | None = None, retries: int = 3,
          ) -> tuple[SmokeReport, list[str]]:
    lines: list[str] = []
    report = run_smoke(url, sample, expected, checks, key, lines.append, cancel or threading.Event(),
                       retries=retries, backoff_s=0.01)
    return report, lines


def test_passes_health_sample_and_latency(server: Scoring):
    report, lines = smoke(server.url, expected=[0, 2.0000000001])
    assert report.outcome is P
    assert [(c.name, c.outcome) for c in report.checks] == [("health", P), ("sample", P), ("latency", P)]
    assert report.checks[2].evidence["requests"] == 5
    assert report.checks[2].evidence["errors"] == 0
    assert (server.count("/healthz"), server.count("/score")) == (1, 6)
    report.raise_for_outcome()
    assert len(lines) == 4
    assert lines[0].startswith(f"smoke: GET {server.url}/healthz -> 200 (")
    assert lines[0].endswith("health passed: healthy (200)")
    assert lines[1].startswith(f"smoke: POST {server.url}/score with the version's sample -> 200 (")
    assert lines[2].startswith(f"smoke: 5 x POST {server.url}/score: latency passed: p95 ")
    assert lines[3] == "smoke: passed (health passed, sample passed, latency passed)"


def test_sample_is_sent_as_json(server: Scoring):
    received: list[dict[str, Any]] = []

    def score(n: int, req: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        received.append(req)
        return 200, body([0, 2])

    server.score = score
    smoke(server.url, checks=SmokeChecks(requests=1))
    assert received == [SAMPLE, SAMPLE]
    assert all(h["Content-Type"] == "application/json" for m, _, h in server.seen if m == "POST")


def test_wrong_output_fails_and_keeps_the_evidence(server: Scoring):
    report, lines = smoke(server.url, expected=[0, 1])
    assert report.outcome is F
    assert [(c.name, c.outcome) for c in report.checks] == [("health", P), ("sample", F)]
    sample = report.checks[1]
    assert sample.message == "predictions differ from the expected output: predictions[1]: expected 1, got 2"
    assert sample.evidence == {
        "status": 200,
        "body": '{"predictions": [0, 2]}',
        "mismatches": ["predictions[1]: expected 1, got 2"],
        "mismatch_count": 1,
        "request": f"POST {server.url}/score",
        "request_body": json.dumps(SAMPLE),
    }
    assert server.count("/score") == 1  # a wrong model is not retried, nor timed
    with pytest.raises(SmokeFailed) as info:
        report.raise_for_outcome()
    assert info.value.message.startswith("smoke check 'sample' failed: predictions differ from the expected "
                                         "output: predictions[1]: expected 1, got 2; evidence: {")
    assert '"status": 200' in info.value.message
    assert '"body": "{\\"predictions\\": [0, 2]}"' in info.value.message
    assert lines[-1] == "smoke: failed (health passed, sample failed)"


def test_server_error_on_sample_fails_without_retry(server: Scoring):
    server.score = lambda n, req, headers: (500, b'{"error": "model crashed"}')
    report, _ = smoke(server.url)
    assert report.outcome is F
    assert report.checks[1].message == "/score answered 500 to the version's sample"
    assert report.checks[1].evidence["body"] == '{"error": "model crashed"}'
    assert server.count("/score") == 1


def test_slow_model_fails_latency(server: Scoring):
    server.delay_s = 0.05
    report, _ = smoke(server.url, checks=SmokeChecks(requests=4, p95_ms=20.0, timeout_s=5.0))
    assert report.outcome is F
    latency = report.checks[-1]
    assert (latency.name, latency.outcome) == ("latency", F)
    assert latency.evidence["p95_ms"] >= 50
    assert latency.evidence["budget_ms"] == 20.0
    assert latency.message.endswith("is over the 20 ms budget")
    assert server.count("/score") == 5  # sample + 4 timed, no retry of a measured failure
    with pytest.raises(SmokeFailed, match="smoke check 'latency' failed: p95 "):
        report.raise_for_outcome()


def test_non_2xx_during_latency_run_fails(server: Scoring):
    server.score = lambda n, req, headers: (200, body([0, 2])) if n != 3 else (500, b"{}")
    report, _ = smoke(server.url)
    assert report.checks[-1].outcome is F
    assert report.checks[-1].message == "1 of 5 requests answered non-2xx"


def test_connection_refused_is_an_error_after_retries(refused_url: str):
    report, lines = smoke(refused_url, retries=3)
    assert report.outcome is E
    (health,) = report.checks
    assert health.message == "could not reach /healthz: connection refused"
    assert health.evidence == {"status": None, "error": "connection refused"}
    attempts = [line for line in lines if "/healthz ->" in line]
    retries = [line for line in lines if "could not measure; retry" in line]
    assert len(attempts) == 4
    assert [r.split("; ")[1].split(" in ")[0] for r in retries] == ["retry 1 of 3", "retry 2 of 3", "retry 3 of 3"]
    assert lines[-1] == "smoke: error (health error)"
    with pytest.raises(SmokeFailed, match="smoke check 'health' error: could not reach /healthz: connection refused"):
        report.raise_for_outcome()


def test_not_ready_then_healthy_is_retried_and_passes(server: Scoring):
    server.health = [503, 503, 200]
    report, lines = smoke(server.url, checks=SmokeChecks(requests=1))
    assert report.outcome is P
    assert server.count("/healthz") == 3
    assert sum("could not measure; retry" in line for line in lines) == 2


def test_timeout_is_an_error(server: Scoring):
    server.delay_s = 0.5
    report, _ = smoke(server.url, checks=SmokeChecks(requests=1, timeout_s=0.1), retries=1)
    assert report.outcome is E
    assert report.checks[-1].message == "could not reach /score: no answer within 0.1 s"
    assert report.checks[-1].evidence["request"] == f"POST {server.url}/score"


def test_no_sample_checks_health_only(server: Scoring):
    report, lines = smoke(server.url, sample=None, expected=[0, 1])
    assert report.outcome is P
    assert [c.name for c in report.checks] == ["health"]
    assert server.count("/score") == 0
    assert "smoke: sample and latency checks skipped: the version has no sample" in lines


def test_zero_requests_skips_latency(server: Scoring):
    report, lines = smoke(server.url, checks=SmokeChecks(requests=0))
    assert [c.name for c in report.checks] == ["health", "sample"]
    assert "smoke: latency check skipped: the policy asks for 0 requests" in lines


def test_cancel_midway_stops_between_requests(server: Scoring):
    cancel = threading.Event()

    def score(n: int, req: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        if n == 3:
            cancel.set()
        return 200, body([0, 2])

    server.score = score
    with pytest.raises(Cancelled, match="smoke test stopped by request; no traffic moved"):
        smoke(server.url, checks=SmokeChecks(requests=20), cancel=cancel)
    assert server.count("/score") == 3


def test_cancel_before_start_sends_nothing(server: Scoring):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        smoke(server.url, cancel=cancel)
    assert server.seen == []


def test_cancel_during_retry_backoff(refused_url: str):
    cancel = threading.Event()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "retry 1 of" in line:
            cancel.set()

    with pytest.raises(Cancelled):
        run_smoke(refused_url, SAMPLE, None, FAST, None, log, cancel, retries=3, backoff_s=5.0)
    assert sum("/healthz ->" in line for line in lines) == 1


def test_key_is_sent_as_bearer_and_never_logged(server: Scoring):
    report, lines = smoke(server.url, key=KEY, expected=[0, 2])
    assert report.outcome is P
    assert {h.get("Authorization") for _, _, h in server.seen} == {f"Bearer {KEY}"}
    assert lines and not any(KEY in line for line in lines)
    assert KEY not in json.dumps(report.to_dict())


def test_no_key_no_authorization_header(server: Scoring):
    smoke(server.url, checks=SmokeChecks(requests=1))
    assert all("Authorization" not in h for _, _, h in server.seen)


def test_key_echoed_by_server_is_masked_in_evidence_and_error(server: Scoring):
    server.score = lambda n, req, headers: (401, json.dumps({"error": f"bad {headers['Authorization']}"}).encode())
    report, lines = smoke(server.url, key=KEY)
    assert report.outcome is F
    assert report.checks[-1].evidence["body"] == '{"error": "bad Bearer ***"}'
    with pytest.raises(SmokeFailed) as info:
        report.raise_for_outcome()
    assert KEY not in info.value.message
    assert not any(KEY in line for line in lines)


def test_sample_that_is_not_json_is_invalid_input(server: Scoring):
    with pytest.raises(InvalidInput) as info:
        smoke(server.url, sample={"data": {1, 2}})
    assert info.value.field == "sample"
    assert server.seen == []
