"""A deployment's live figures for the endpoint page: whether it answers, and from its own
``/metrics`` the scoring requests, failures, p95 latency and requests per second (the rate
between this reading and the one before, kept in memory for a few minutes)."""

from __future__ import annotations

import threading
import time
from typing import Any

from modelcd.analysis.canary import score_counts
from modelcd.errors import ModelcdError

TIMEOUT_S = 0.3
RATE_WINDOW_S = 300.0
_last: dict[str, tuple[float, int]] = {}
_lock = threading.Lock()


def deployment_figures(deployment: dict[str, Any]) -> dict[str, Any]:
    """{health, requests, errors, p95_ms, rps} of one deployment row (None: not measured)."""
    out: dict[str, Any] = {"health": "unknown", "requests": None, "errors": None, "p95_ms": None, "rps": None}
    if deployment.get("sleeping"):  # scaled to zero: nothing to ask, and asking must not wake it
        out["health"] = "asleep: the next request wakes it"
        return out
    url = deployment.get("url")
    if not url:
        return out
    try:
        counts = score_counts(url, timeout_s=TIMEOUT_S)
    except ModelcdError:
        out["health"] = "not answering"
        return out
    t = time.monotonic()
    out.update(health="answering", requests=counts.total, errors=counts.errors, p95_ms=counts.p95_ms())
    with _lock:
        before = _last.get(deployment["id"])
        _last[deployment["id"]] = (t, counts.total)
        for key in [k for k, (at, _) in _last.items() if t - at > RATE_WINDOW_S]:
            del _last[key]
    if before is not None and t - before[0] > 0.5 and counts.total >= before[1]:
        out["rps"] = (counts.total - before[1]) / (t - before[0])
    return out
