"""Smoke checks: test a new deployment on its own URI before any traffic moves to it.

Decisions are plain functions (`assess_health`, `assess_sample`, `assess_latency`, `worst`) that
take values and return a `CheckResult`; `run_smoke` is the thin HTTP layer that measures and
calls them. Four outcomes, as in argo-rollouts' analysis: passed, failed (the model answered
wrong: roll back), error (could not measure: retry up to a limit, then roll back) and
inconclusive (wait at the gate for a person). The worst outcome of all checks wins.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import islice
from typing import Any

import requests

from modelcd.errors import Cancelled, InvalidInput, SmokeFailed
from modelcd.releases.policy import SmokePolicy

HEALTH, SAMPLE, LATENCY = "health", "sample", "latency"  # check names
EXCERPT_CHARS = 500  # longest body excerpt kept as evidence
MAX_BODY_BYTES = 8 * 1024 * 1024  # longest answer read from a scoring service
MAX_MISMATCHES_SHOWN = 5
RETRIES = 3  # an `error` outcome is measured again this many times before it stands
BACKOFF_S = 0.25  # first pause between retries; doubles each time
_TRANSIENT = frozenset({429, 502, 503, 504})  # "not now" answers: could not measure, so `error`


class Outcome(StrEnum):
    """Verdict of one check, or of all of them (the worst wins)."""

    PASSED = "passed"  # measured, and the deployment did what it should
    INCONCLUSIVE = "inconclusive"  # measured too little to decide: wait at the gate for a person
    ERROR = "error"  # could not measure (unreachable, timeout, 503): retry, then roll back
    FAILED = "failed"  # the model answered wrong, with an error status, or too slowly: roll back


_SEVERITY = {Outcome.PASSED: 0, Outcome.INCONCLUSIVE: 1, Outcome.ERROR: 2, Outcome.FAILED: 3}


def is_worse(current: Outcome, new: Outcome) -> bool:
    """True when ``new`` is a worse verdict than ``current`` (argo's ``IsWorse``)."""
    return _SEVERITY[new] > _SEVERITY[current]


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """The worst of ``outcomes``; nothing measured proves nothing, so none is inconclusive."""
    found = list(outcomes)
    return max(found, key=_SEVERITY.__getitem__) if found else Outcome.INCONCLUSIVE


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict with the evidence behind it (status, body excerpt, numbers)."""

    name: str
    outcome: Outcome
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "outcome": str(self.outcome), "message": self.message,
                "evidence": self.evidence}


@dataclass(frozen=True)
class SmokeChecks:
    """What to check and how hard: the smoke section of a release policy."""

    requests: int = 20  # N scoring requests for the latency check; 0 skips it
    p95_ms: float = 500.0  # latency budget at the 95th percentile
    tolerance: float = 1e-6  # numbers match when within this, absolute or relative
    timeout_s: float = 10.0  # per request

    @classmethod
    def from_policy(cls, smoke: SmokePolicy) -> SmokeChecks:
        return cls(requests=smoke.requests, p95_ms=smoke.p95_ms, tolerance=smoke.tolerance,
                   timeout_s=smoke.timeout_s)


@dataclass(frozen=True)
class SmokeReport:
    """All checks run against one deployment, and their combined outcome."""

    outcome: Outcome
    checks: tuple[CheckResult, ...]

    @property
    def failing(self) -> CheckResult | None:
        """The first check that decided a non-passed outcome."""
        if self.outcome is Outcome.PASSED:
            return None
        return next((c for c in self.checks if c.outcome is self.outcome), None)

    def raise_for_outcome(self) -> None:
        """Raise `SmokeFailed` naming the failing check and its evidence unless all passed."""
        check = self.failing
        if check is None and self.outcome is Outcome.PASSED:
            return
        if check is None:
            raise SmokeFailed(f"smoke checks {self.outcome}: no check could decide")
        evidence = json.dumps(check.evidence, default=str, sort_keys=True)
        raise SmokeFailed(f"smoke check {check.name!r} {check.outcome}: {check.message}; evidence: {evidence}")

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), "checks": [c.to_dict() for c in self.checks]}


# ---------------------------------------------------------------------------------------------
# pure assessments


def excerpt(body: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of a body, marked with … when cut."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_2xx(status: int) -> bool:
    return 200 <= status < 300


def assess_health(status: int | None, exc: str | None) -> CheckResult:
    """Judge ``GET /healthz``: 2xx passes; unreachable or 429/502/503/504 is an error; else failed."""
    evidence: dict[str, Any] = {"status": status}
    if exc is not None:
        return CheckResult(HEALTH, Outcome.ERROR, f"could not reach /healthz: {exc}", {**evidence, "error": exc})
    if status is None:
        return CheckResult(HEALTH, Outcome.ERROR, "/healthz gave no answer", evidence)
    if _is_2xx(status):
        return CheckResult(HEALTH, Outcome.PASSED, f"healthy ({status})", evidence)
    if status in _TRANSIENT:
        return CheckResult(HEALTH, Outcome.ERROR, f"not ready: /healthz answered {status}", evidence)
    return CheckResult(HEALTH, Outcome.FAILED, f"/healthz answered {status}", evidence)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _close(expected: float, actual: float, tolerance: float) -> bool:
    if isinstance(expected, float) and isinstance(actual, float) and math.isnan(expected) and math.isnan(actual):
        return True
    return math.isclose(expected, actual, rel_tol=tolerance, abs_tol=tolerance)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(expected: Any, actual: Any, path: str, tolerance: float) -> Iterator[str]:
    """Yield each place where ``actual`` differs from ``expected``: numbers within ``tolerance``
    (absolute or relative), strings, bools and nulls exactly, lists and mappings recursively."""
    if _is_number(expected) and _is_number(actual):
        if not _close(expected, actual, tolerance):
            yield f"{path}: expected {_short(expected)}, got {_short(actual)}"
    elif isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        if len(expected) != len(actual):
            yield f"{path}: expected {len(expected)} items, got {len(actual)}"
            return
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            yield from differences(e, a, f"{path}[{i}]", tolerance)
    elif isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            yield f"{path}: expected keys {sorted(map(str, expected))}, got {sorted(map(str, actual))}"
            return
        for k in expected:
            yield from differences(expected[k], actual[k], f"{path}.{k}", tolerance)
    elif type(expected) is not type(actual) or expected != actual:
        yield f"{path}: expected {_short(expected)}, got {_short(actual)}"


def assess_sample(status: int | None, body_bytes: bytes, expected: Any | None, tolerance: float) -> CheckResult:
    """Judge the answer to ``POST /score`` with the version's sample: 2xx, JSON, and (when
    ``expected`` is known) the same ``predictions`` (or, for a custom entry script that answers
    without that envelope, the same answer) within ``tolerance``."""
    evidence: dict[str, Any] = {"status": status, "body": excerpt(body_bytes)}
    if status is None:
        return CheckResult(SAMPLE, Outcome.ERROR, "/score gave no answer", evidence)
    if status in _TRANSIENT:
        return CheckResult(SAMPLE, Outcome.ERROR, f"not ready: /score answered {status}", evidence)
    if not _is_2xx(status):
        return CheckResult(SAMPLE, Outcome.FAILED, f"/score answered {status} to the version's sample", evidence)
    try:
        answer = json.loads(body_bytes)
    except ValueError:
        return CheckResult(SAMPLE, Outcome.FAILED, "/score answered with something that is not JSON", evidence)
    # sklearn/onnx answer {"predictions": [...]}; a custom entry script's run() answers whatever it returns
    wrapped = isinstance(answer, dict) and "predictions" in answer
    predictions = answer["predictions"] if wrapped else answer
    if expected is None:
        return CheckResult(SAMPLE, Outcome.PASSED, "answered with JSON; the version has no expected "
                           "output to compare", evidence)
    found = differences(expected, predictions, "predictions" if wrapped else "answer", tolerance)
    shown = list(islice(found, MAX_MISMATCHES_SHOWN))
    if not shown:
        return CheckResult(SAMPLE, Outcome.PASSED, f"predictions match the expected output (tolerance "
                           f"{tolerance:g})", evidence)
    count = len(shown) + sum(1 for _ in islice(found, 10_000))
    evidence.update(mismatches=shown, mismatch_count=count)
    more = f" and {count - 1} more" if count > 1 else ""
    return CheckResult(SAMPLE, Outcome.FAILED, f"predictions differ from the expected output: {shown[0]}{more}",
                       evidence)


def nearest_rank(values: Iterable[float], percent: float) -> float:
    """The ``percent`` percentile by nearest rank (an observed value, never interpolated)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def assess_latency(latencies_ms: list[float], p95_budget_ms: float, errors: int) -> CheckResult:
    """Judge N scoring requests: failed when any answered non-2xx or p95 (nearest rank) is over
    budget; inconclusive when nothing was measured."""
    if not latencies_ms:
        if errors:
            return CheckResult(LATENCY, Outcome.FAILED, f"{errors} requests answered non-2xx", {"errors": errors})
        return CheckResult(LATENCY, Outcome.INCONCLUSIVE, "no requests measured", {"requests": 0})
    p95 = nearest_rank(latencies_ms, 95)
    evidence = {
        "requests": len(latencies_ms), "errors": errors, "p50_ms": round(nearest_rank(latencies_ms, 50), 1),
        "p95_ms": round(p95, 1), "max_ms": round(max(latencies_ms), 1), "budget_ms": p95_budget_ms,
    }
    if errors:
        return CheckResult(LATENCY, Outcome.FAILED,
                           f"{errors} of {len(latencies_ms)} requests answered non-2xx", evidence)
    if p95 > p95_budget_ms:
        return CheckResult(LATENCY, Outcome.FAILED,
                           f"p95 {p95:.1f} ms is over the {p95_budget_ms:g} ms budget", evidence)
    return CheckResult(LATENCY, Outcome.PASSED, f"p95 {p95:.1f} ms within the {p95_budget_ms:g} ms budget",
                       evidence)


# ---------------------------------------------------------------------------------------------
# I/O: measure against a real scoring URI


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("smoke test stopped by request; no traffic moved")


def _explain(exc: requests.RequestException, timeout_s: float) -> str:
    """A short reason for a failed request (requests' own messages run to several lines)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, requests.ConnectionError):
        return "connection refused" if "refused" in str(exc).lower() else "cannot connect"
    return f"{type(exc).__name__}: {excerpt(str(exc), 200)}"


def _read(resp: requests.Response) -> bytes:
    """The body, at most MAX_BODY_BYTES (+1, so an oversized answer fails to parse)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            break
    return b"".join(chunks)[: MAX_BODY_BYTES + 1]


class _Probe:
    """Sends the requests of one smoke run; every step logs one line."""

    def __init__(self, session: requests.Session, base: str, checks: SmokeChecks,
                 log: Callable[[str], None], cancel: threading.Event) -> None:
        self.session, self.base, self.checks, self.log, self.cancel = session, base, checks, log, cancel

    def _send(self, method: str, path: str, body: bytes | None) -> tuple[int | None, bytes, float, str | None]:
        _check_cancel(self.cancel)
        start = time.perf_counter()
        try:
            with self.session.request(method, self.base + path, data=body, timeout=self.checks.timeout_s,
                                      stream=True) as resp:
                content = _read(resp)
                return resp.status_code, content, (time.perf_counter() - start) * 1000, None
        except requests.RequestException as e:
            return None, b"", (time.perf_counter() - start) * 1000, _explain(e, self.checks.timeout_s)

    def health(self) -> CheckResult:
        status, _, ms, exc = self._send("GET", "/healthz", None)
        result = assess_health(status, exc)
        self.log(f"smoke: GET {self.base}/healthz -> {status or exc} ({ms:.0f} ms): {result.name} "
                 f"{result.outcome}: {result.message}")
        return result

    def sample(self, body: bytes, expected: Any | None) -> CheckResult:
        status, content, ms, exc = self._send("POST", "/score", body)
        result = assess_sample(status, content, expected, self.checks.tolerance)
        if exc is not None:
            result = CheckResult(SAMPLE, Outcome.ERROR, f"could not reach /score: {exc}",
                                 {**result.evidence, "error": exc})
        result = replace(result, evidence={**result.evidence, "request": f"POST {self.base}/score",
                                           "request_body": excerpt(body)})
        self.log(f"smoke: POST {self.base}/score with the version's sample -> {status or exc} ({ms:.0f} ms): "
                 f"{result.name} {result.outcome}: {result.message}")
        return result

    def latency(self, body: bytes) -> CheckResult:
        n = self.checks.requests
        latencies: list[float] = []
        errors = 0
        for i in range(n):
            status, _, ms, exc = self._send("POST", "/score", body)
            if exc is not None:
                result = CheckResult(LATENCY, Outcome.ERROR, f"request {i + 1} of {n} failed: {exc}",
                                     {"requests": i, "error": exc})
                self.log(f"smoke: {n} x POST {self.base}/score: {result.name} {result.outcome}: {result.message}")
                return result
            latencies.append(ms)
            errors += 0 if status is not None and _is_2xx(status) else 1
        result = assess_latency(latencies, self.checks.p95_ms, errors)
        self.log(f"smoke: {n} x POST {self.base}/score: {result.name} {result.outcome}: {result.message}")
        return result


def _retrying(step: Callable[[], CheckResult], retries: int, backoff_s: float,
              log: Callable[[str], None], cancel: threading.Event) -> CheckResult:
    """Run ``step``; while it could not measure (`error`), pause and run it again, ``retries`` times."""
    result = step()
    for attempt in range(1, retries + 1):
        if result.outcome is not Outcome.ERROR:
            break
        delay = backoff_s * 2 ** (attempt - 1)
        log(f"smoke: {result.name} could not measure; retry {attempt} of {retries} in {delay:.2f} s")
        if cancel.wait(delay):
            _check_cancel(cancel)
        result = step()
    return result


def _scrub(result: CheckResult, key: str | None) -> CheckResult:
    """Mask the key wherever a server echoed it back into a message or evidence."""
    if not key:
        return result

    def clean(value: Any) -> Any:
        return value.replace(key, "***") if isinstance(value, str) else value

    return replace(result, message=clean(result.message), evidence={k: clean(v) for k, v in result.evidence.items()})


def _report(results: list[CheckResult], log: Callable[[str], None], key: str | None) -> SmokeReport:
    report = SmokeReport(worst(r.outcome for r in results), tuple(_scrub(r, key) for r in results))
    log(f"smoke: {report.outcome} ({', '.join(f'{r.name} {r.outcome}' for r in results)})")
    return report


def run_smoke(url: str, sample: Any, expected: Any | None, checks: SmokeChecks, key: str | None,
              log: Callable[[str], None], cancel: threading.Event, *, retries: int = RETRIES,
              backoff_s: float = BACKOFF_S) -> SmokeReport:
    """Smoke-test the deployment at ``url``: health, then the version's sample (compared with
    ``expected`` when known), then ``checks.requests`` timed requests. Stops at the first check
    that does not pass. Blocks; raises `Cancelled` as soon as ``cancel`` is set between requests.
    The key is sent as a bearer token and never logged."""
    def say(line: str) -> None:
        log(line.replace(key, "***") if key else line)

    base = url.rstrip("/")
    body: bytes | None = None
    if sample is not None:
        try:
            body = json.dumps(sample).encode()
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"the version's sample is not JSON: {e}", field="sample") from e
    results: list[CheckResult] = []
    with requests.Session() as session:
        session.trust_env = False  # a scoring URI is ours: never through a proxy from the environment
        session.headers["Content-Type"] = "application/json"
        if key:
            session.headers["Authorization"] = f"Bearer {key}"
        probe = _Probe(session, base, checks, say, cancel)
        results.append(_retrying(probe.health, retries, backoff_s, say, cancel))
        if results[-1].outcome is not Outcome.PASSED:
            return _report(results, say, key)
        if body is None:
            say("smoke: sample and latency checks skipped: the version has no sample")
            return _report(results, say, key)
        payload: bytes = body
        results.append(_retrying(lambda: probe.sample(payload, expected), retries, backoff_s, say, cancel))
        if results[-1].outcome is not Outcome.PASSED:
            return _report(results, say, key)
        if checks.requests == 0:
            say("smoke: latency check skipped: the policy asks for 0 requests")
            return _report(results, say, key)
        results.append(_retrying(lambda: probe.latency(payload), retries, backoff_s, say, cancel))
    return _report(results, say, key)
