"""Release timings on the embedded default, end to end through a real `modelcd serve`:

- register → serving: from the register call returning to the endpoint URI answering with
  the new version (warm requirements cache: every version shares one environment);
- traffic switch: from a rollback (or promote of a warm version) API call to the endpoint
  answering with the other version, and the API call's own duration.

Usage: python bench/release_bench.py [--versions 6] [--switches 30]
Prints a markdown table. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from modelcd.client import Client
from modelcd.config import load_settings
from modelcd.quickstart import make_model
from modelcd.targets.process import free_port

TOKEN = "bench-token-0123456789abcdef"




OPEN_POLICY = """\
name: bench
match: {models: ["bench*"]}
environments:
  - name: production
    auth: none  # the bench times releases, not keys (loopback only)
"""


def wait_version(url: str, body: dict[str, Any], version: int, timeout_s: float = 120) -> float:
    """Poll the endpoint until it answers with ``version``; return the monotonic time it did."""
    session = requests.Session()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = session.post(url, json=body, timeout=5)
            if r.status_code == 200 and r.headers.get("X-Modelcd-Version") == str(version):
                return time.monotonic()
        except requests.RequestException:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"endpoint never served v{version}")


def iso_seconds(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def row(name: str, values: list[float], unit: str = "ms", scale: float = 1000) -> str:
    v = [x * scale for x in values]
    return (f"| {name} | {len(v)} | {statistics.median(v):.1f} {unit} | {pct(v, 90):.1f} {unit} | "
            f"{pct(v, 99):.1f} {unit} | {min(v):.1f} {unit} | {max(v):.1f} {unit} |")


def stop_service(proc: subprocess.Popen[bytes], env: dict[str, str], timeout_s: float = 30) -> None:
    """Stop the service ``start_service`` started, then its data plane (router, deployments)."""
    from modelcd.lifecycle import stop_data_plane

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=timeout_s)
    for _ in stop_data_plane(load_settings(environ=env)):
        pass


def start_service(tmp: Path, **extra_env: str) -> tuple[subprocess.Popen[bytes], dict[str, str], Client]:
    """A `modelcd serve` on free loopback ports with its home in ``tmp``, once it answers."""
    port, rport = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")},
           "MODELCD_HOME": str(tmp / "home"), "MODELCD_PORT": str(port), "MODELCD_ROUTER_PORT": str(rport),
           "MODELCD_URL": f"http://127.0.0.1:{port}", "MODELCD_TOKEN": TOKEN, **extra_env}
    (tmp / "home").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], env=env, start_new_session=True,
                            stdout=open(tmp / "serve.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    client = Client(load_settings(environ=env))
    deadline = time.monotonic() + 60
    while not client.healthy():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError((tmp / "serve.log").read_text())
        time.sleep(0.1)
    return proc, env, client


def first_release(client: Client, tmp: Path) -> dict[str, Any]:
    """Store the open policy and release v1 of ``bench`` (it builds the environment, so it is not
    measured); return v1's metadata."""
    client.request("PUT", "/api/v1/policies", data=OPEN_POLICY.encode(), headers={"Content-Type": "application/yaml"})
    meta = make_model(tmp / "v1", 1.0)
    client.register("bench", tmp / "v1", meta)
    rel = client.find_release("bench", 1)
    assert rel and client.wait_release(rel["id"])["phase"] == "succeeded"
    return meta


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--switches", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-bench-"))
    proc, env, client = start_service(tmp)
    try:
        meta = first_release(client, tmp)
        uri = client.get("/api/v1/endpoints/bench/production")["scoring_uri"]
        reg_to_serving, promote_job = [], []
        for i in range(2, args.versions + 2):
            m = make_model(tmp / f"v{i}", 1.0 / i)
            client.register("bench", tmp / f"v{i}", m)
            t0 = time.monotonic()
            reg_to_serving.append(wait_version(uri, meta["sample"], i) - t0)
            rel = client.find_release("bench", i)
            assert rel
            rel = client.wait_release(rel["id"])
            job = next(j for j in client.get(f"/api/v1/releases/{rel['id']}")["jobs"] if j["type"] == "promote")
            logs = client.get(f"/api/v1/jobs/{job['id']}/logs")["logs"]
            applied = next(e["ts"] for e in logs if e["line"].startswith("router applied generation"))
            promote_job.append(iso_seconds(applied) - iso_seconds(job["started_at"]))
        last = args.versions + 1
        switch, call = [], []
        current = last
        for _ in range(args.switches):
            t0 = time.monotonic()
            result = client.post("/api/v1/endpoints/bench/production/rollback")
            t1 = time.monotonic()
            assert result["release_id"] is None, result
            target = last - 1 if current == last else last
            switch.append(wait_version(uri, meta["sample"], target) - t0)
            call.append(t1 - t0)
            current = target
        print("| measurement | n | median | p90 | p99 | min | max |")
        print("|---|---|---|---|---|---|---|")
        print(row("register → serving (warm env)", reg_to_serving, "s", 1))
        print(row("promote stage: start → router applied and read back", promote_job))
        print(row("rollback: API call returns (router read back)", call))
        print(row("rollback: call start → endpoint answers other version", switch))
    finally:
        stop_service(proc, env)


if __name__ == "__main__":
    main()
