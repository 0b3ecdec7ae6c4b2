"""Canary analysis: step weights, the verdict on counted answers, the metrics parser, and the
hold loop against a real scoring service's /metrics."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import requests

from modelcd.analysis.canary import Counts, assess_step, hold_step, parse_counts, score_counts, step_traffic
from modelcd.errors import Cancelled, StageFailed
from tests.scoring.conftest import Launcher


@pytest.mark.parametrize(("percent", "previous", "expected"), [
    (10, {"old": 100}, {"new": 10, "old": 90}),
    (50, {"old": 100, "gone": 0}, {"new": 50, "old": 50}),
    (25, {"a": 50, "b": 50}, {"new": 25, "a": 38, "b": 37}),  # rounding left-over to the first
    (99, {"a": 1, "b": 1, "c": 1}, {"new": 99, "a": 1}),  # no zero weights kept
    (30, {"new": 100}, {"new": 30}),  # nothing else served: weights are relative
])
def test_step_traffic_keeps_the_proportions_of_what_served(percent: int, previous: dict[str, int],
                                                           expected: dict[str, int]) -> None:
    got = step_traffic("new", percent, previous)
    assert got == expected
    if len(got) > 1:
        assert sum(got.values()) == 100


@pytest.mark.parametrize(("seen", "limit", "fails"), [
    (Counts(0, 0), 0.0, False),
    (Counts(100, 0), 0.0, False),
    (Counts(100, 1), 0.0, True),
    (Counts(100, 1), 0.01, False),  # exactly at the limit holds
    (Counts(100, 2), 0.01, True),
    (Counts(3, 3), 1.0, False),
])
def test_assess_step(seen: Counts, limit: float, fails: bool) -> None:
    why = assess_step(seen, limit)
    assert (why is not None) == fails
    if why:
        assert f"{seen.errors} of {seen.total} scoring requests failed" in why and "max_error_rate" in why


def test_parse_counts_sums_score_routes_and_counts_5xx() -> None:
    text = """\
# HELP modelcd_scoring_requests_total HTTP requests answered, by route and status code.
# TYPE modelcd_scoring_requests_total counter
modelcd_scoring_requests_total{route="score",code="200"} 40
modelcd_scoring_requests_total{route="score",code="400"} 3
modelcd_scoring_requests_total{route="score",code="500"} 2
modelcd_scoring_requests_total{route="score",code="503"} 1
modelcd_scoring_requests_total{route="health",code="500"} 9
modelcd_scoring_rows_total 123
"""
    assert parse_counts(text) == Counts(total=46, errors=3)
    assert parse_counts("") == Counts(0, 0)


def _histogram(*counts: float) -> tuple[tuple[float, float], ...]:
    """A cumulative latency histogram over 10/50/100 ms and +Inf from per-bucket counts."""
    bounds, running, out = (0.01, 0.05, 0.1, float("inf")), 0.0, []
    for le, n in zip(bounds, counts, strict=True):
        running += n
        out.append((le, running))
    return tuple(out)


def test_p95_interpolates_within_its_bucket_like_histogram_quantile() -> None:
    assert Counts(100, 0, _histogram(100, 0, 0, 0)).p95_ms() == pytest.approx(9.5)  # 95th of 100 in (0, 10]
    assert Counts(100, 0, _histogram(50, 50, 0, 0)).p95_ms() == pytest.approx(10 + 40 * 0.9)  # 45 of 50 in (10, 50]
    assert Counts(100, 0, _histogram(0, 0, 0, 100)).p95_ms() == pytest.approx(100)  # +Inf: the last finite bound
    assert Counts(0, 0, _histogram(0, 0, 0, 0)).p95_ms() is None and Counts().p95_ms() is None
    later = Counts(300, 1, _histogram(100, 150, 50, 0))
    earlier = Counts(100, 1, _histogram(100, 0, 0, 0))
    assert (later - earlier) == Counts(200, 0, _histogram(0, 150, 50, 0))


def test_assess_step_judges_latency_once_enough_requests_were_seen() -> None:
    slow = Counts(100, 0, _histogram(0, 0, 100, 0))  # p95 97.5 ms
    assert assess_step(slow, 0.01) is None  # no latency limit set
    assert assess_step(slow, 0.01, max_p95_ms=100) is None
    why = assess_step(slow, 0.01, max_p95_ms=50)
    assert why == "p95 latency 97.5 ms over 100 scoring requests, over max_p95_ms 50"
    assert assess_step(Counts(5, 0, _histogram(0, 0, 5, 0)), 0.01, max_p95_ms=50) is None  # too few to judge


def test_hold_step_fails_as_soon_as_the_error_rate_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelcd.analysis.canary.SAMPLE_EVERY_S", 0.01)
    readings = iter([Counts(10, 0), Counts(20, 0), Counts(30, 5)])
    with pytest.raises(StageFailed, match=r"canary: 5 of 20 scoring requests failed \(25.0%\)"):
        hold_step("http://unused", 30, 0.1, lambda: False, lambda _: None, read=lambda _: next(readings))


def test_hold_step_stops_when_a_person_stops_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelcd.analysis.canary.SAMPLE_EVERY_S", 0.01)
    with pytest.raises(Cancelled):
        hold_step("http://unused", 30, 0.1, lambda: True, lambda _: None, read=lambda _: Counts())


def test_hold_step_on_a_real_scoring_service(start_server: Launcher, tmp_path: Path) -> None:
    """The counters the hold reads are the service's own, summed over its workers."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "score.py").write_text(
        "def init():\n    pass\n\n"
        "def run(raw):\n    if 'boom' in raw:\n        raise ValueError('boom')\n    return [1]\n")
    server = start_server(model, {"model": "m", "version": 1, "flavor": "custom", "entry_script": "score.py"})
    fresh = score_counts(server.url)
    assert (fresh.total, fresh.errors, fresh.p95_ms()) == (0, 0, None) and fresh.latency[-1] == (float("inf"), 0)
    lines: list[str] = []
    for _ in range(4):
        assert requests.post(f"{server.url}/score", json={"data": [1]}, timeout=10).status_code == 200
    held = hold_step(server.url, 0.3, 0.0, lambda: False, lines.append)
    assert (held.total, held.errors) == (0, 0) and lines == ["step held 0.3s: 0 scoring requests, 0 failed"]

    calls = itertools.count()

    def read(url: str) -> Counts:
        if next(calls) == 1:  # between the first and second reading, real traffic: 3 fine, 1 failing
            for body in ({"data": [1]}, {"data": [2]}, {"data": [3]}, {"data": ["boom"]}):
                requests.post(f"{url}/score", json=body, timeout=10)
        return score_counts(url)

    with pytest.raises(StageFailed, match=r"1 of 4 scoring requests failed \(25.0%\), over max_error_rate 20.0%"):
        hold_step(server.url, 30, 0.2, lambda: False, lines.append, read=read)
    with pytest.raises(StageFailed, match="cannot read the new deployment's metrics"):
        score_counts("http://127.0.0.1:9")


def test_hold_step_fails_a_slow_version_on_its_measured_p95(start_server: Launcher, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "score.py").write_text(
        "import time\n\ndef init():\n    pass\n\ndef run(raw):\n    time.sleep(0.06)\n    return [1]\n")
    server = start_server(model, {"model": "m", "version": 1, "flavor": "custom", "entry_script": "score.py"})
    calls = itertools.count()

    def read(url: str) -> Counts:
        if next(calls) == 1:
            for _ in range(25):
                requests.post(f"{url}/score", json={"data": [1]}, timeout=10)
        return score_counts(url)

    with pytest.raises(StageFailed, match=r"canary: p95 latency \d+\.\d ms over 25 scoring requests, over "
                                          r"max_p95_ms 40"):
        hold_step(server.url, 30, 0.0, lambda: False, lambda _: None, read=read, max_p95_ms=40)
    held = hold_step(server.url, 0.2, 0.0, lambda: False, lambda _: None, max_p95_ms=40)
    assert held.total == 0  # nothing new in this step: nothing to judge
