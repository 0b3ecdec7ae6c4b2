"""Server time of each console page on a big store (issue 12's goal: p95 <= 50 ms with 1,000
models, 10,000 versions, 100,000 jobs and 100,000 events), next to the /api/v1 JSON route that
reads the same thing; and the first byte of a live log (goal: within 200 ms of the line).

A fresh home gets a SQLite store seeded directly through SQLAlchemy (releases, deployments, job
logs and inbox rows in proportion: 2.5 releases per version, 4 jobs and 4 events per release, 5
log lines per job, one delivery per version of which 1 % dead, one production endpoint per
model). Pages: the service's Flask app on that store, signed in through /ui/login, N GETs per
page through its test client in this thread: the wall time and this thread's CPU time of each
(on a busy machine the wall time waits for a CPU; the CPU time is the work the page costs).
Live log: a real ``modelcd serve`` on the store, a running job added, its page's event stream
opened over loopback, and a line appended to its log as the service's job log writer does (an
INSERT into job_logs, here from this process); the time until the stream delivers the line, over
50 lines written at irregular moments.

    python bench/console_bench.py [--requests 100] [--lines 50] [--models 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, insert, select

from modelcd.store import schema
from modelcd.store.db import Database, now
from modelcd.targets.process import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import TOKEN, make_service  # the tests' service: its own home, ports and token

CHUNK = 5000
JOB_TYPES = ("build", "deploy", "smoke", "promote")
TEAMS = ("fraud", "churn", "search", "ads", "risk")
SOURCES = ("native", "mlflow", "azureml", "sagemaker")
POLICY = """\
name: {name}
match:
  models: ["{glob}"]
auto: false
environments:
  - name: production
    strategy: {strategy}
smoke: {{requests: 5}}
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), CHUNK):
        yield rows[i:i + CHUNK]


class Seeder:
    """Rows in proportion to ``models``: 10 versions each, 2.5 releases per version, 4 jobs
    and 4 events per release, 5 log lines per job, one inbox row per version."""

    def __init__(self, db: Database, models: int) -> None:
        self.db, self.models = db, models
        self.rng = random.Random(12)
        self.t0 = datetime(2026, 1, 1, tzinfo=UTC)
        self.tick = 0

    def ts(self) -> str:
        self.tick += 1
        return (self.t0 + timedelta(seconds=30 * self.tick)).isoformat(timespec="milliseconds")

    def put(self, table: Any, rows: list[dict[str, Any]]) -> None:
        with self.db.write() as conn:
            for chunk in _chunks(rows):
                conn.execute(insert(table), chunk)

    def seed(self) -> dict[str, int]:
        names = [f"m-{i:04d}" for i in range(self.models)]
        self.put(schema.models, [{"name": n, "description": f"model {n} of team {TEAMS[i % 5]}",
                                  "created_at": self.ts()} for i, n in enumerate(names)])
        versions = [(n, v) for n in names for v in range(1, 11)]
        self.put(schema.versions, [self._version(n, v) for n, v in versions])
        releases, jobs, events, logs, deployments = self._releases(versions)
        self.put(schema.releases, releases)
        self.put(schema.deployments, deployments)
        self.put(schema.jobs, jobs)
        self.put(schema.events, events)
        self.put(schema.job_logs, logs)
        self.put(schema.endpoints, self._endpoints(names, deployments))
        self.put(schema.inbox, [self._delivery(i, n, v) for i, (n, v) in enumerate(versions)])
        self.put(schema.policies, [{"name": f"p-{t}", "revision": 1, "updated_at": self.ts(),
                                    "text": POLICY.format(name=f"p-{t}", glob=f"{t}-*", strategy="blue-green")}
                                   for t in TEAMS])
        return {"models": len(names), "versions": len(versions), "releases": len(releases), "jobs": len(jobs),
                "events": len(events), "job log lines": len(logs), "deployments": len(deployments),
                "inbox rows": len(versions)}

    def _version(self, model: str, v: int) -> dict[str, Any]:
        i = int(model[2:])
        return {"model": model, "version": v, "digest": f"{i:08x}{v:04x}".ljust(64, "0"), "flavor": "sklearn",
                "model_file": "model.pkl", "requirements": ["scikit-learn==1.5.2", "numpy"],
                "sample": {"data": [[5.1, 3.5, 1.4, 0.2]]}, "expected": [0],
                "metrics": {"accuracy": round(0.8 + self.rng.random() / 10, 4)},
                "tags": {"team": TEAMS[i % 5], "stage": "prod" if v % 3 == 0 else "dev"},
                "description": "", "source": SOURCES[i % 4], "external_ref": f"{SOURCES[i % 4]}:{model}/{v}",
                "artifact_uri": f"s3://models/{model}/{v}/", "size_bytes": 4096, "status": "ready",
                "created_at": self.ts()}

    def _releases(self, versions: list[tuple[str, int]]) -> tuple[list[dict[str, Any]], ...]:
        releases: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        logs: list[dict[str, Any]] = []
        deployments: list[dict[str, Any]] = []
        for k in range(len(versions) * 5 // 2):
            model, v = versions[k % len(versions)]
            rid, did, t = f"r-{k:012x}", f"d-{k:012x}", self.ts()
            phase = "failed" if k % 17 == 0 else "succeeded"
            releases.append({"id": rid, "model": model, "version": v, "environment": "production",
                             "policy_name": "default", "policy": {"name": "default"}, "env_index": 0,
                             "trigger": "auto", "phase": phase, "cancel_requested": False,
                             "error": "smoke: 3 of 5 requests failed" if phase == "failed" else None,
                             "deployment_id": did, "created_at": t, "updated_at": t, "finished_at": t})
            deployments.append({"id": did, "model": model, "version": v, "environment": "production",
                                "target": "process", "state": "stopped", "url": None,
                                "spec": {"started_by": "runner"}, "release_id": rid, "created_at": t,
                                "updated_at": t})
            for j, jt in enumerate(JOB_TYPES):
                jid = f"j-{k:010x}{j:02x}"
                state = "failed" if phase == "failed" and jt == "smoke" else "succeeded"
                jobs.append({"id": jid, "release_id": rid, "type": jt, "state": state, "model": model, "version": v,
                             "environment": "production", "cancel_requested": False, "created_at": t,
                             "started_at": t, "finished_at": t})
                events.append({"release_id": rid, "job_id": jid, "ts": t, "kind": f"job.{state}", "message": "",
                               "actor": None})
                logs += [{"job_id": jid, "ts": t, "line": f"{jt} step {n}: ok"} for n in range(5)]
        # serving: the latest release of each model (url None: the router has nothing to call)
        for d in {d["model"]: d for d in deployments}.values():
            d["state"] = "serving"
        return releases, jobs, events, logs, deployments

    def _endpoints(self, names: list[str], deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        serving = {d["model"]: d["id"] for d in deployments if d["state"] == "serving"}
        return [{"model": n, "environment": "production", "traffic": {serving[n]: 100}, "auth": "key",
                 "updated_at": self.ts()} for n in names]

    def _delivery(self, i: int, model: str, v: int) -> dict[str, Any]:
        dead = i % 100 == 0
        return {"source": "generic", "delivery_id": f"d-{i}", "received_at": self.ts(), "headers": {},
                "body": json.dumps({"model": model, "version": str(v)}).encode(), "state": "dead" if dead else "done",
                "attempts": 5 if dead else 1, "next_attempt_at": 0.0,
                "last_error": "no objects under s3://models/late/" if dead else None,
                "result": None if dead else [{"model": model, "version": v}], "processed_at": self.ts()}


class InProcess:
    """The service's Flask app on the seeded store, called in this thread (no socket): the time a
    page takes on the wall and on this thread's CPU (which a busy machine inflates far less)."""

    def __init__(self, home: Path) -> None:
        from modelcd.app import create_app
        from modelcd.config import load_settings
        from modelcd.context import build_context

        settings = load_settings(environ={"MODELCD_HOME": str(home), "MODELCD_TOKEN": TOKEN,
                                          "MODELCD_ROUTER_PORT": str(free_port())})
        self.ctx = build_context(settings)
        self.client = create_app(self.ctx, TOKEN).test_client()
        r = self.client.post("/ui/login", data={"token": TOKEN})
        if r.status_code not in (302, 303):
            raise SystemExit(f"sign-in refused: {r.status_code} {r.get_data(as_text=True)[:300]}")

    def time_get(self, path: str, n: int, headers: dict[str, str] | None = None) -> dict[str, float]:
        """p50/p95 of wall and thread CPU ms over ``n`` GETs after 3 warm-up ones; the answer's KiB."""
        for _ in range(3):
            r = self.client.get(path, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"GET {path}: {r.status_code} {r.get_data(as_text=True)[:300]}")
        wall, cpu = [], []
        for _ in range(n):
            t, c = time.perf_counter(), time.thread_time()
            r = self.client.get(path, headers=headers)
            body = r.get_data()
            cpu.append((time.thread_time() - c) * 1000)
            wall.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, (path, r.status_code)
        return {"p50": statistics.median(wall), "p95": pct(wall, 95), "cpu50": statistics.median(cpu),
                "cpu95": pct(cpu, 95), "kb": len(body) / 1024}

    def close(self) -> None:
        self.ctx.db.dispose()


def sign_in(url: str) -> requests.Session:
    """A console session on the real service: the sign-in form posts the token."""
    s = requests.Session()
    r = s.post(f"{url}/ui/login", data={"token": TOKEN}, timeout=10, allow_redirects=False)
    if r.status_code not in (302, 303) or not s.cookies:
        raise SystemExit(f"sign-in refused: {r.status_code} {r.text[:300]}")
    return s


def pages(models: int) -> list[tuple[str, str, str]]:
    """(label, console path, /api/v1 peer path)."""
    m = f"m-{models // 2:04d}"
    rel, job = "r-000000000010", "j-000000001002"
    return [
        ("models", "/ui/models", "/api/v1/models"),
        ("models search", f"/ui/models?q={m[:-1]}", "/api/v1/models"),
        ("models by tag", "/ui/models?tag=team%3Dfraud", "/api/v1/models"),
        ("model", f"/ui/models/{m}", f"/api/v1/models/{m}/versions"),
        ("version", f"/ui/models/{m}/versions/7", f"/api/v1/models/{m}/versions/7"),
        ("deploy plan", f"/ui/models/{m}/versions/7/deploy?environment=production",
         f"/api/v1/models/{m}/versions/7/plan?environment=production"),
        ("releases", "/ui/releases", "/api/v1/releases"),
        ("release", f"/ui/releases/{rel}", f"/api/v1/releases/{rel}"),
        ("endpoints", "/ui/endpoints", "/api/v1/endpoints"),
        ("jobs", "/ui/jobs", "/api/v1/jobs"),
        ("jobs failed", "/ui/jobs?state=failed", "/api/v1/jobs?state=failed"),
        ("jobs smoke+failed", "/ui/jobs?type=smoke&state=failed", "/api/v1/jobs?state=failed"),
        ("job", f"/ui/jobs/{job}", f"/api/v1/jobs/{job}/logs"),
        ("inbox", "/ui/inbox", "/api/v1/inbox"),
        ("inbox dead", "/ui/inbox?state=dead", "/api/v1/inbox?state=dead"),
        ("policies", "/ui/policies", "/api/v1/policies"),
    ]


def page_table(app: InProcess, models: int, n: int) -> list[dict[str, Any]]:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    rows = []
    for label, page, peer in pages(models):
        ui, api = app.time_get(page, n), app.time_get(peer, n, bearer)
        rows.append({"page": label, "path": page, "api": peer, **ui, **{f"api_{k}": v for k, v in api.items()}})
        print(f"  {label:18} p95 {ui['p95']:6.1f} ms (cpu {ui['cpu95']:5.1f}) | api p95 {api['p95']:6.1f} "
              f"(cpu {api['cpu95']:5.1f})", file=sys.stderr, flush=True)
    return rows


def _stream_path(s: requests.Session, url: str, job_id: str) -> str:
    """The job page's live log stream (its EventSource URL, from the page itself)."""
    page = s.get(f"{url}/ui/jobs/{job_id}", timeout=10).text
    found = re.search(r'data-stream="([^"]+)"', page) or re.search(r'EventSource\(\s*["\']([^"\']+)', page)
    if not found:
        raise SystemExit(f"no event stream on /ui/jobs/{job_id}; page starts:\n{page[:600]}")
    return found.group(1).replace("&amp;", "&")


def live_log(url: str, s: requests.Session, db: Database, lines: int) -> list[float]:
    """Milliseconds from a log line's commit to its arrival on the job page's event stream."""
    jid, t = f"j-feed{random.randrange(16**8):08x}", now()
    with db.write() as conn:
        conn.execute(insert(schema.jobs).values(id=jid, release_id=None, type="batch_prediction", state="running",
                                                 model="m-0001", version=1, cancel_requested=False, created_at=t,
                                                 started_at=t))
    path = _stream_path(s, url, jid)
    arrived: dict[str, float] = {}
    got = threading.Event()
    stop = threading.Event()

    def read() -> None:
        with s.get(url + path, stream=True, timeout=(5, 60), headers={"Accept": "text/event-stream"}) as r:
            for raw in r.iter_lines(chunk_size=1, decode_unicode=True):
                found = re.search(r"bench-line-(\d+)", raw or "")
                if found:
                    arrived.setdefault(found.group(1), time.perf_counter())
                    got.set()
                if stop.is_set():
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.0)  # the stream is open and has sent what was there
    times = []
    for i in range(lines):
        got.clear()
        with db.write() as conn:
            conn.execute(insert(schema.job_logs).values(job_id=jid, ts=now(), line=f"bench-line-{i}"))
            t = time.perf_counter()
        if not got.wait(10):
            raise SystemExit(f"line {i} did not arrive within 10 s")
        times.append((arrived[str(i)] - t) * 1000)
        time.sleep(random.uniform(0.05, 0.25))  # lines at irregular moments, not in step with a poll
    stop.set()
    with db.write() as conn:  # end the job, which ends the stream
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == jid).values(state="succeeded", finished_at=now()))
    reader.join(timeout=15)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=100, help="timed requests per page")
    ap.add_argument("--lines", type=int, default=50, help="log lines timed on the live stream")
    ap.add_argument("--home", type=Path,
                    help="keep the seeded home in DIR/home, or reuse one seeded there (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        root = args.home or Path(tmp)  # the service's home is root/home
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        db = Database(f"sqlite:///{home.resolve() / 'modelcd.db'}")
        with db.read() as conn:
            seeded = conn.execute(select(func.count()).select_from(schema.models)).scalar()
        if seeded:
            print(f"reusing the store in {home} ({seeded:,} models)", flush=True)
        else:
            t = time.monotonic()
            counts = Seeder(db, args.models).seed()
            print(f"seeded in {time.monotonic() - t:.1f} s: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()),
                  flush=True)
        app = InProcess(home)
        try:
            rows = page_table(app, args.models, args.requests)
        finally:
            app.close()
        svc = make_service(root)
        svc.start()
        try:
            lags = live_log(svc.url, sign_in(svc.url), db, args.lines)
        finally:
            svc.stop()
            svc.shutdown_data_plane()  # the router too
            db.dispose()
    print(f"\n{args.requests} GETs per page, in process (the app's test client, one thread), after 3 warm-up; "
          f"ms on the wall and on the thread's CPU; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'page':18} {'p50':>6} {'p95':>6} {'cpu50':>6} {'cpu95':>6} {'KiB':>5}   {'/api/v1 peer':40} "
          f"{'p50':>6} {'p95':>6} {'cpu50':>6} {'cpu95':>6} {'KiB':>5}")
    for r in rows:
        print(f"{r['page']:18} {r['p50']:6.1f} {r['p95']:6.1f} {r['cpu50']:6.1f} {r['cpu95']:6.1f} {r['kb']:5.0f}   "
              f"{r['api'][7:]:40} {r['api_p50']:6.1f} {r['api_p95']:6.1f} {r['api_cpu50']:6.1f} "
              f"{r['api_cpu95']:6.1f} {r['api_kb']:5.0f}")
    worst = max(rows, key=lambda r: r["p95"])
    print(f"\nslowest page p95: {worst['page']} {worst['p95']:.1f} ms wall, {worst['cpu95']:.1f} ms CPU "
          "(goal <= 50 ms)")
    print(f"live log, line written -> delivered on the job page's stream ({len(lags)} lines): "
          f"median {statistics.median(lags):.0f} ms, p95 {pct(lags, 95):.0f} ms, max {max(lags):.0f} ms "
          "(goal <= 200 ms)")


if __name__ == "__main__":
    main()
