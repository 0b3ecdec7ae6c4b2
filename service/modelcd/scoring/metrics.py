"""Request metrics shared by all worker processes, rendered in Prometheus text format.

Each worker writes its own counters into a small memory-mapped file ``worker-<pid>.bin`` in a
directory the server creates before forking (the same scheme as prometheus_client's
multiprocess mode, without the dependency). ``/metrics``, answered by any worker, sums every
file in the directory, so the numbers cover the whole server. Files of workers that exited
stay, so counters never go backwards when a worker is replaced. One writer per file, and a
lock for servers that run requests in threads.
"""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from typing import Any

ROUTES = ("score", "healthz", "swagger", "metrics", "other")
CODES = ("200", "400", "401", "404", "405", "413", "415", "500", "other")
# Upper bounds in seconds of the request duration histogram of /score.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REQUESTS = 0
_MODEL_ERRORS = _REQUESTS + len(ROUTES) * len(CODES)
_ROWS = _MODEL_ERRORS + 1
_BUCKET0 = _ROWS + 1
_SUM = _BUCKET0 + len(BUCKETS) + 1  # one more bucket for +Inf
_COUNT = _SUM + 1
SLOTS = _COUNT + 1
_SIZE = SLOTS * 8


class Metrics:
    """This worker's counters, and the sum over all workers sharing ``directory``."""

    def __init__(self, directory: str | None = None) -> None:
        if directory is None:  # counts of this process only, removed when it exits
            directory = tempfile.mkdtemp(prefix="modelcd-scoring-metrics-")
            atexit.register(_remove_if_owner, directory, os.getpid())
        self.directory = directory
        self._lock = threading.Lock()
        self._pid = -1
        self._values: Any = None  # memoryview cast to float64 ("d"); typeshed types item assignment as int
        self._route_index = {route: i * len(CODES) for i, route in enumerate(ROUTES)}
        self._code_index = {code: i for i, code in enumerate(CODES)}

    def _slots(self) -> Any:
        """This process's counters, mapping a fresh file after a fork."""
        pid = os.getpid()
        if self._values is None or pid != self._pid:
            path = os.path.join(self.directory, f"worker-{pid}.bin")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, _SIZE)
                area = mmap.mmap(fd, _SIZE)
            finally:
                os.close(fd)
            self._values = memoryview(area).cast("d")
            self._pid = pid
        return self._values

    def open(self) -> None:
        """Create this worker's file now, so ``/metrics`` counts it before its first request."""
        with self._lock:
            self._slots()

    def observe(self, route: str, status: int, seconds: float | None = None, rows: int = 0) -> None:
        """Count one answered request; ``seconds`` feeds the /score latency histogram."""
        code = str(status)
        index = self._route_index.get(route, self._route_index["other"]) + self._code_index.get(
            code, self._code_index["other"]
        )
        with self._lock:
            values = self._slots()
            values[index] += 1.0
            if status == 500 and route == "score":
                values[_MODEL_ERRORS] += 1.0
            if rows:
                values[_ROWS] += rows
            if seconds is not None:
                bucket = len(BUCKETS)
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        bucket = i
                        break
                values[_BUCKET0 + bucket] += 1.0
                values[_SUM] += seconds
                values[_COUNT] += 1.0

    def totals(self) -> list[float]:
        """The element-wise sum of every worker file in the directory."""
        total = [0.0] * SLOTS
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith("worker-") and name.endswith(".bin")):
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    data = f.read(_SIZE)
            except OSError:
                continue
            if len(data) != _SIZE:
                continue
            for i, value in enumerate(memoryview(data).cast("d")):
                total[i] += value
        return total

    def render(self, labels: Mapping[str, str]) -> str:
        """The Prometheus text exposition of the summed counters; ``labels`` go on the info metric."""
        return render_text(self.totals(), labels)


def _remove_if_owner(directory: str, owner: int) -> None:
    """Remove a private metrics directory at exit, but not from a forked child."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def render_text(values: list[float], labels: Mapping[str, str]) -> str:
    """Format counter slots as Prometheus text (version 0.0.4)."""
    lines = [
        "# HELP modelcd_scoring_info The model version this service scores.",
        "# TYPE modelcd_scoring_info gauge",
        f"modelcd_scoring_info{{{_labels(labels.items())}}} 1",
        "# HELP modelcd_scoring_requests_total HTTP requests answered, by route and status code.",
        "# TYPE modelcd_scoring_requests_total counter",
    ]
    for r, route in enumerate(ROUTES):
        for c, code in enumerate(CODES):
            value = values[_REQUESTS + r * len(CODES) + c]
            if value or (route == "score" and code == "200"):
                lines.append(
                    f"modelcd_scoring_requests_total{{{_labels([('route', route), ('code', code)])}}} {_num(value)}"
                )
    lines += [
        "# HELP modelcd_scoring_model_errors_total Scoring requests whose model raised an exception (500).",
        "# TYPE modelcd_scoring_model_errors_total counter",
        f"modelcd_scoring_model_errors_total {_num(values[_MODEL_ERRORS])}",
        "# HELP modelcd_scoring_rows_total Input rows predicted by successful /score requests.",
        "# TYPE modelcd_scoring_rows_total counter",
        f"modelcd_scoring_rows_total {_num(values[_ROWS])}",
        "# HELP modelcd_scoring_request_duration_seconds Time to answer POST /score inside the server.",
        "# TYPE modelcd_scoring_request_duration_seconds histogram",
    ]
    cumulative = 0.0
    for i, bound in enumerate((*BUCKETS, float("inf"))):
        cumulative += values[_BUCKET0 + i]
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'modelcd_scoring_request_duration_seconds_bucket{{le="{le}"}} {_num(cumulative)}')
    lines.append(f"modelcd_scoring_request_duration_seconds_sum {values[_SUM]!r}")
    lines.append(f"modelcd_scoring_request_duration_seconds_count {_num(values[_COUNT])}")
    return "\n".join(lines) + "\n"


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    """Prometheus label pairs with escaped values."""
    return ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)


def _escape(value: str) -> str:
    """Escape a label value: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    """A counter value without a trailing ``.0``."""
    return str(int(value)) if value.is_integer() else repr(value)
