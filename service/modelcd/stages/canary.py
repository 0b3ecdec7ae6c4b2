"""Canary analysis: while a step of a canary release holds, watch what the new deployment
answers to real traffic and stop the release when too much of it fails.

`step_traffic` (the weights of one step) and `assess_step` (the verdict on what was counted)
are plain functions; `score_counts` reads a scoring service's own Prometheus counters
(``modelcd_scoring_requests_total{route="score",code=...}``, summed over its workers), and
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
_COUNTER = re.compile(r'^modelcd_scoring_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)\s*$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Counts:
    """Scoring requests a deployment answered, and how many of them with a 5xx."""

    total: int = 0
    errors: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.total - other.total, self.errors - other.errors)


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


def assess_step(seen: Counts, max_error_rate: float) -> str | None:
    """Why the step fails (None: it holds). Any 5xx fails a step whose limit is 0."""
    if seen.total <= 0 or seen.errors <= 0:
        return None
    rate = seen.errors / seen.total
    if rate > max_error_rate:
        return (f"{seen.errors} of {seen.total} scoring requests failed ({rate:.1%}), over max_error_rate "
                f"{max_error_rate:.1%}")
    return None


def parse_counts(metrics: str) -> Counts:
    """Score requests and 5xx answers from a scoring service's ``/metrics`` text."""
    total = errors = 0
    for m in _COUNTER.finditer(metrics):
        labels = dict(_LABEL.findall(m["labels"]))
        if labels.get("route") != "score":
            continue
        value = int(float(m["value"]))
        total += value
        if labels.get("code", "").startswith("5"):
            errors += value
    return Counts(total, errors)


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
              log: Callable[[str], None], read: Callable[[str], Counts] = score_counts) -> Counts:
    """Hold one step for ``hold_s`` seconds, reading the new deployment's counters every
    second; StageFailed as soon as its error rate since the step began is over the limit,
    Cancelled when a person stops the release. Returns what the step counted."""
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
        why = assess_step(seen, max_error_rate)
        if why is not None:
            raise StageFailed(f"canary: {why}")
    log(f"step held {hold_s:g}s: {seen.total} scoring requests, {seen.errors} failed")
    return seen
