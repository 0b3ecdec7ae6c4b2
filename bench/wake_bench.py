"""Scale to zero: how long the first request to a sleeping deployment takes (router hold, wake
through the control plane, warm start, health, table applied, the request answered), next to a
request to the same deployment once awake, in the same run.

A real `modelcd serve` (process target, warm starts, built-in router) with a policy
`idle: {scale_to_zero_after_s: 1}`; the quickstart's scikit-learn model is released once, then
each cycle waits until the deployment is asleep (its `deployment.slept` event: the process is
gone), sends one request through the endpoint URI (timed: wake from zero) and one more right
after (timed: awake). Every answer must be 200 from the released version.

Usage: python bench/wake_bench.py [--cycles 30]
Prints a markdown table. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelcd.client import Client
from modelcd.quickstart import make_model
from release_bench import pct, row, start_service, stop_service  # bench/ is on sys.path when run as a script

POLICY = """\
name: wake-bench
match: {models: ["wake*"]}
environments:
  - name: production
    auth: none  # the bench times wakes, not keys (loopback only)
    idle: {scale_to_zero_after_s: 1, wake_timeout_s: 10}
smoke: {requests: 2}
"""
WOKE = re.compile(r"woke on a request in (\d+) ms .*\(start → healthy (\d+) ms, routing table (\d+) ms\)")


def events(client: Client, release_id: str, kind: str) -> list[str]:
    return [e["message"] for e in client.get(f"/api/v1/releases/{release_id}")["events"] if e["kind"] == kind]


def wait_asleep(client: Client, release_id: str, slept_before: int, timeout_s: float = 30) -> None:
    """Until a new `deployment.slept` event says the deployment went to sleep (process stopped)."""
    deadline = time.monotonic() + timeout_s
    while len(events(client, release_id, "deployment.slept")) <= slept_before:
        if time.monotonic() > deadline:
            raise RuntimeError("the deployment never went to sleep")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-wake-bench-"))
    proc, env, client = start_service(tmp)
    try:
        client.request("PUT", "/api/v1/policies", data=POLICY.encode(), headers={"Content-Type": "application/yaml"})
        meta = make_model(tmp / "v1", 1.0)
        client.register("wake", tmp / "v1", meta)
        rel = client.find_release("wake", 1)
        assert rel and client.wait_release(rel["id"])["phase"] == "succeeded", rel
        uri = client.get("/api/v1/endpoints/wake/production")["scoring_uri"]
        session = requests.Session()
        wake, awake, failed = [], [], 0
        for cycle in range(args.cycles):
            wait_asleep(client, rel["id"], cycle)
            session.close()  # a fresh connection, as a client arriving after a quiet spell
            for bucket in (wake, awake):
                t0 = time.perf_counter()
                r = session.post(uri, json=meta["sample"], timeout=30)
                bucket.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.headers.get("X-Modelcd-Version") != "1":
                    failed += 1
        deadline = time.monotonic() + 10  # the router forwards on health; the service records the wake just after
        while len(events(client, rel["id"], "deployment.woke")) < args.cycles and time.monotonic() < deadline:
            time.sleep(0.05)
        woke = [m.groups() for m in map(WOKE.search, events(client, rel["id"], "deployment.woke")) if m]
        parts = [[int(w[i]) / 1000 for w in woke] for i in range(3)]
        dep = client.get("/api/v1/deployments", params={"model": "wake"})["deployments"][0]
        log = (Path(env["MODELCD_HOME"]) / "deployments" / f"{dep['id']}.log").read_text()
        starts = re.findall(r"--- modelcd: starting .*\n(?:--- modelcd: warm start unavailable.*\n)?", log)
        cold = sum("warm start unavailable" in s for s in starts[1:])  # the release's own start is not a wake
        print(f"{args.cycles} sleep/wake cycles; failed requests: {failed}; wakes that started cold: {cold}\n")
        print("| measurement | n | median | p90 | p99 | min | max |")
        print("|---|---|---|---|---|---|---|")
        print(row("first request to a sleeping deployment (router hold + wake + answer)", wake))
        print(row("  of which: the service's wake (asked → healthy → table applied)", parts[0]))
        print(row("  of which: warm start → healthy", parts[1]))
        print(row("  of which: routing table changed (store + router applied and read back)", parts[2]))
        print(row("request to the same deployment, awake", awake))
        print(f"\nwake from zero p99 / awake p99: {pct(wake, 99) / pct(awake, 99):.0f}x")
    finally:
        stop_service(proc, env)


if __name__ == "__main__":
    main()
