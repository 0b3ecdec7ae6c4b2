"""Canary analysis: while a step of a canary release holds, watch what the new deployment
answers to real traffic and stop the release when too much of it fails.

`step_traffic` (the weights of one step) and `assess_step` (the verdict on what was counted:
5xx share, and p95 latency when the policy sets ``max_p95_ms``) are plain functions;
`score_counts` reads a scoring service's own Prometheus metrics
(``modelcd_scoring_requests_total{route="score",code=...}`` and the
``modelcd_scoring_request_duration_seconds`` histogram, summed over its workers), and
`hold_step` is the thin loop that samples them until the step's time is up.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from modelcd.errors import Cancelled, StageFailed

SAMPLE_EVERY_S = 1.0  # how often the counters are read while a step holds
MIN_LATENCY_SAMPLES = 20  # a step's p95 is judged once it has seen this many scoring requests
_COUNTER = re.compile(r'^modelcd_scoring_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)\s*$', re.M)
_BUCKET = re.compile(r'^modelcd_scoring_request_duration_seconds_bucket\{le="(?P<le>[^"]+)"\}\s+(?P<value>\S+)\s*$',
                     re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Counts:
    """Scoring requests a deployment answered, how many of them with a 5xx, and the
    cumulative latency histogram of its answers (``(upper bound s, count)``, as exposed)."""

    total: int = 0
    errors: int = 0
    latency: tuple[tuple[float, float], ...] = ()

    def __sub__(self, other: Counts) -> Counts:
        before = dict(other.latency)
        latency = tuple((le, n - before.get(le, 0.0)) for le, n in self.latency)
        return Counts(self.total - other.total, self.errors - other.errors, latency)

    def p95_ms(self) -> float | None:
        """The 95th percentile latency in ms, interpolated within its bucket as Prometheus'
        ``histogram_quantile`` does; None without answers (or beyond the last finite bucket:
        then the largest finite bound)."""
        if not self.latency or self.latency[-1][1] <= 0:
            return None
        rank = 0.95 * self.latency[-1][1]
        lower, below = 0.0, 0.0
        for le, cumulative in self.latency:
            if cumulative >= rank:
                if le == float("inf"):
                    return lower * 1000
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return (lower + (le - lower) * share) * 1000
            lower, below = le, cumulative
        return lower * 1000


def step_traffic(new_id: str, percent: int, previous: dict[str, int]) -> dict[str, int]:
    """The weights of a step: ``percent`` to ``new_id``, the rest to what served before in
    the proportions it had (integers summing to 100)."""
    old = {d: w for d, w in previous.items() if w > 0 and d != new_id}
    rest, total = 100 - percent, sum(old.values())
    traffic = {new_id: percent}
    shares = {d: rest * w // total for d, w in old.items()} if total else {}
    if shares:
        first = next(iter(shares))
        shares[first] += rest - sum(shares.values())  # rounding left-overs go to the first
    traffic.update({d: w for d, w in shares.items() if w > 0})
    return traffic


def assess_step(seen: Counts, max_error_rate: float, max_p95_ms: float | None = None) -> str | None:
    """Why the step fails (None: it holds). Any 5xx fails a step whose limit is 0; the p95
    latency counts once the step saw ``MIN_LATENCY_SAMPLES`` answers."""
    if seen.total > 0 and seen.errors > 0:
        rate = seen.errors / seen.total
        if rate > max_error_rate:
            return (f"{seen.errors} of {seen.total} scoring requests failed ({rate:.1%}), over max_error_rate "
                    f"{max_error_rate:.1%}")
    if max_p95_ms is not None and seen.total >= MIN_LATENCY_SAMPLES:
        p95 = seen.p95_ms()
        if p95 is not None and p95 > max_p95_ms:
            return f"p95 latency {p95:.1f} ms over {seen.total} scoring requests, over max_p95_ms {max_p95_ms:g}"
    return None


def parse_counts(metrics: str) -> Counts:
    """Score requests, 5xx answers and the latency histogram from a scoring service's
    ``/metrics`` text."""
    total = errors = 0
    for m in _COUNTER.finditer(metrics):
        labels = dict(_LABEL.findall(m["labels"]))
        if labels.get("route") != "score":
            continue
        value = int(float(m["value"]))
        total += value
        if labels.get("code", "").startswith("5"):
            errors += value
    latency = tuple(sorted((float(m["le"]), float(m["value"])) for m in _BUCKET.finditer(metrics)))
    return Counts(total, errors, latency)


def score_counts(url: str, timeout_s: float = 5.0) -> Counts:
    """The counters of the scoring service at ``url``; StageFailed when it does not answer."""
    try:
        r = requests.get(f"{url}/metrics", timeout=timeout_s)
        r.raise_for_status()
    except requests.RequestException as e:
        raise StageFailed(f"canary: cannot read the new deployment's metrics at {url}/metrics ({type(e).__name__})"
                          ) from e
    return parse_counts(r.text)


def hold_step(url: str, hold_s: float, max_error_rate: float, stopped: Callable[[], bool],
              log: Callable[[str], None], read: Callable[[str], Counts] = score_counts,
              max_p95_ms: float | None = None) -> Counts:
    """Hold one step for ``hold_s`` seconds, reading the new deployment's counters every
    second; StageFailed as soon as its error rate (or p95 latency) since the step began is
    over the limit, Cancelled when a person stops the release. Returns what the step counted."""
    start = read(url)
    deadline = time.monotonic() + hold_s
    seen = Counts()
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(SAMPLE_EVERY_S, deadline - now))
        if stopped():
            raise Cancelled("stopped by a person during a canary step")
        seen = read(url) - start
        why = assess_step(seen, max_error_rate, max_p95_ms)
        if why is not None:
            raise StageFailed(f"canary: {why}")
    p95 = seen.p95_ms()
    latency = f", p95 {p95:.1f} ms" if p95 is not None else ""
    log(f"step held {hold_s:g}s: {seen.total} scoring requests, {seen.errors} failed{latency}")
    return seen
