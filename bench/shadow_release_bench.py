"""Shadow releases end to end (issue 11): how soon a disagreeing candidate is failed and rolled
back once the router has recorded ``analysis.min_samples`` pairs, under load.

    python bench/shadow_release_bench.py [--runs 5] [--min-samples 200] [--threads 4]

A real ``modelcd serve`` (embedded default: SQLite, local folders, process target, built-in
router) with a policy of ``strategy: shadow`` and ``analysis: {min_samples, min_agreement:
0.95}``; v1 is a custom entry-script model (``score.py``: the sum of each row) released first.
Then, for each run, while ``--threads`` clients post varied requests to the endpoint (first
values 0..9, second 0..4; one row each), a new version that disagrees on a fifth of the inputs
(first value 8 or 9) is registered. During its shadow a poller reads the router every 10 ms
(``GET /-/mirror``, ``GET /-/mirror/pairs?after=N-1&limit=1``) and keeps the router's ``ts`` of
the pair with seq N (N = min_samples) and when the copies stopped. After the release,
``GET /api/v1/releases/ID`` gives when the verdict was recorded and when the release moved to
rolling_back (its events), and when it failed (``finished_at``: rolled back, production as
before; in a shadow no client is ever sent to the candidate). Every client request must succeed
and be answered by v1. Loopback only; the load and the polling are bounded. Prints markdown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from release_bench import start_service, stop_service  # bench/ is on sys.path when run as a script

MODEL = "shbench"
POLICY = """\
name: shadow-bench
match: {{models: ["{model}"]}}
environments:
  - name: production
    auth: none  # the bench times releases, not keys (loopback only)
    strategy: shadow
    shadow_s: 60
    analysis: {{min_samples: {n}, min_agreement: 0.95}}
smoke: {{requests: 3}}
"""
SCORES = """\
def init():
    pass

def run(raw_data):
    import json
    return [sum(r) for r in json.loads(raw_data)["data"]]
"""
# the same answers, except where the first value is 8 or 9 (a fifth of the load below)
DISAGREES = SCORES.replace("[sum(r) for r in", "[sum(r) + (1 if r[0] >= 8 else 0) for r in")
BODIES = [json.dumps({"data": [[float(i), float(j)]]}).encode() for i in range(10) for j in range(5)]
POLL_S = 0.01


def custom_model(folder: Path, body: str) -> dict[str, Any]:
    """An entry-script model (score.py with init/run), as tests/conftest.py makes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.py").write_text(body)
    (folder / "requirements.txt").write_text("")
    return {"flavor": "custom", "sample": {"data": [[1.0, 2.0]]}}


def iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


class Load:
    """``threads`` keep-alive clients posting the bodies in turn until stopped (at most ``max_s``)."""

    def __init__(self, url: str, threads: int, max_s: float) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.max_s = max_s
        self.ok = 0
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, offset: int) -> None:
        versions: dict[str, int]
        failures: list[str]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        deadline = time.monotonic() + self.max_s
        turn = offset * 13
        ok, versions, failures = 0, {}, []  # this thread's counts, added up at the end
        while not self._stop.is_set() and time.monotonic() < deadline:
            turn += 1
            try:
                conn.request("POST", self.path, BODIES[turn % len(BODIES)], headers)
                r = conn.getresponse()
                body = r.read()
                if r.status == 200:
                    ok += 1
                    v = r.getheader("X-Modelcd-Version", "?")
                    versions[v] = versions.get(v, 0) + 1
                else:
                    failures.append(f"{r.status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.close()
        with self._lock:
            self.ok += ok
            self.failures += failures
            for v, n in versions.items():
                self.versions[v] = self.versions.get(v, 0) + n

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


class RouterPoller:
    """Reads the router during a shadow: when the copies started and stopped, and the pair with
    seq ``n`` (its ``ts``: when the router recorded it)."""

    def __init__(self, router: str, endpoint: str, n: int, max_s: float) -> None:
        self.router, self.endpoint, self.n, self.max_s = router, endpoint, n, max_s
        self.mirror_on: float | None = None  # wall clock of the first poll that saw the mirror
        self.mirror_off: float | None = None  # ... of the first poll that no longer saw it
        self.pair_n: dict[str, Any] | None = None
        self.counters: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline and self.mirror_off is None:
            try:
                mirrors = session.get(f"{self.router}/-/mirror", timeout=5).json()["mirrors"]
            except requests.RequestException:
                time.sleep(POLL_S)
                continue
            now = time.time()
            mine = [m for m in mirrors if m["endpoint"] == self.endpoint]
            if mine:
                self.mirror_on = self.mirror_on or now
                self.counters = mine[0]
                if self.pair_n is None and mine[0]["seq"] >= self.n:
                    r = session.get(f"{self.router}/-/mirror/pairs", timeout=5,
                                    params={"endpoint": self.endpoint, "after": self.n - 1, "limit": 1})
                    pairs = r.json().get("pairs") if r.status_code == 200 else None
                    if pairs and pairs[0]["seq"] == self.n:
                        self.pair_n = pairs[0]
            elif self.mirror_on is not None:
                self.mirror_off = now
            time.sleep(POLL_S)

    def __enter__(self) -> RouterPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def one_run(client: Any, tmp: Path, router: str, version: int, n: int) -> dict[str, Any]:
    """Register a disagreeing version and time its shadow's failure (the load is already on)."""
    meta = custom_model(tmp / f"v{version}", DISAGREES + f"\n# bench run, version {version}\n")
    with RouterPoller(router, f"{MODEL}/production", n, max_s=180) as poller:
        client.register(MODEL, tmp / f"v{version}", meta)
        rel = client.find_release(MODEL, version)
        assert rel is not None, f"no release for v{version}"
        rel = client.wait_release(rel["id"], timeout_s=180)
        deadline = time.monotonic() + 5  # the poller sees the copies stop (bounded)
        while poller.mirror_off is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    detail = client.get(f"/api/v1/releases/{rel['id']}")
    assert detail["phase"] == "failed", (detail["phase"], detail.get("error"))
    assert poller.pair_n is not None, "the poller never saw the pair with seq min_samples"
    events = detail["events"]
    t_n = float(poller.pair_n["ts"])

    def first(kind: str, contains: str = "") -> float:
        return next(iso(e["ts"]) for e in events if e["kind"] == kind and contains in e["message"])

    shadow = next(s for s in detail["analysis"] if s["step"] == "shadow")
    rollback_log = [(iso(e["ts"]) - t_n, e["line"].splitlines()[0])
                    for job in detail["jobs"] if job["type"] == "rollback"
                    for e in client.get(f"/api/v1/jobs/{job['id']}/logs")["logs"]]
    mirror_on = poller.mirror_on or t_n
    return {
        "version": version,
        "pairs_at_verdict": shadow["figures"]["rows"],
        "skipped": shadow["figures"]["skipped"],
        "agreement": shadow["figures"]["agreement"],
        "counters": poller.counters,
        "rollback_log": rollback_log,
        "fill_s": t_n - mirror_on,  # copies on → pair N recorded
        "verdict_s": first("analysis.step", "shadow: failed") - t_n,
        "rolling_back_s": first("release.rolling_back") - t_n,
        "mirror_off_s": (poller.mirror_off - t_n) if poller.mirror_off else float("nan"),
        "failed_s": iso(detail["finished_at"]) - t_n,  # the release failed: rolled back, production as before
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="disagreeing versions released, one after the other")
    ap.add_argument("--min-samples", type=int, default=200, help="the policy's analysis.min_samples")
    ap.add_argument("--threads", type=int, default=4, help="clients putting load on the endpoint")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-shadow-bench-"))
    proc, env, client = start_service(tmp)
    try:
        client.request("PUT", "/api/v1/policies", data=POLICY.format(model=MODEL, n=args.min_samples).encode(),
                       headers={"Content-Type": "application/yaml"})
        client.register(MODEL, tmp / "v1", custom_model(tmp / "v1", SCORES))
        rel = client.find_release(MODEL, 1)
        assert rel and client.wait_release(rel["id"], timeout_s=300)["phase"] == "succeeded"
        uri = client.get(f"/api/v1/endpoints/{MODEL}/production")["scoring_uri"]
        router = f"http://127.0.0.1:{env['MODELCD_ROUTER_PORT']}"
        results = []
        with Load(uri, args.threads, max_s=120 * args.runs) as load:
            time.sleep(0.5)
            started = time.monotonic()
            for i in range(args.runs):
                results.append(one_run(client, tmp, router, i + 2, args.min_samples))
                print(f"run {i + 1} of {args.runs} done", file=sys.stderr, flush=True)
            elapsed = time.monotonic() - started
        report(results, load, args, elapsed)
    finally:
        stop_service(proc, env)
    return 0


def report(results: list[dict[str, Any]], load: Load, args: argparse.Namespace, elapsed: float) -> None:
    cols = [("fill_s", "copies on → pair N recorded"), ("verdict_s", "pair N → verdict recorded"),
            ("rolling_back_s", "pair N → rolling_back"), ("mirror_off_s", "pair N → copies stopped (router)"),
            ("failed_s", "pair N → release failed (finished_at)")]
    print(f"# Shadow release: a disagreeing candidate failed after min_samples pairs, under load\n\n"
          f"min_samples {args.min_samples}, min_agreement 0.95, {args.threads} clients posting one-row requests "
          f"through the router the whole time ({load.ok / elapsed:.0f} req/s on average), {args.runs} runs.\n")
    print("| run | version | " + " | ".join(label for _, label in cols)
          + " | pairs judged at the verdict | skipped | agreement | dropped | candidate_errors |")
    print("|---" * (len(cols) + 7) + "|")
    for i, r in enumerate(results, 1):
        c = r["counters"]
        print(f"| {i} | v{r['version']} | " + " | ".join(f"{r[k] * 1000:.0f} ms" for k, _ in cols)
              + f" | {r['pairs_at_verdict']} | {r['skipped']} | {r['agreement']:.1%} | {c.get('dropped', '?')} "
              f"| {c.get('candidate_errors', '?')} |")
    for name, agg in (("median", statistics.median), ("max", max)):
        print(f"| {name} | | " + " | ".join(f"**{agg(r[k] for r in results) * 1000:.0f} ms**" for k, _ in cols)
              + " | | | | | |")
    worst = max(r["failed_s"] for r in results)
    print(f"\nClient requests: {load.ok} answered, **{len(load.failures)} failed**, answered by version(s) "
          f"{dict(sorted(load.versions.items()))}. Goal (rolled back within 1 s of min_samples pairs): "
          f"{'met' if worst <= 1.0 else 'missed'} (max {worst * 1000:.0f} ms).")
    print("\nThe last run's rollback job, its log lines after pair N:\n")
    for at, line in results[-1]["rollback_log"]:
        print(f"- +{at * 1000:.0f} ms: {line}")
    if load.failures:
        print("\nFirst failures: " + "; ".join(load.failures[:5]))


if __name__ == "__main__":
    sys.exit(main())
