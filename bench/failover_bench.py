"""Failover when a scoring process dies, end to end through a real `modelcd serve` and its
router: two versions (v2 serving, v1 its warm standby), a bounded client load through the
endpoint URI (with the endpoint's key), then `kill -9` of the serving deployment's process
group. Per round: requests, failed requests, when the last failure came after the kill,
which version answered meanwhile, and how long until the killed deployment served again
(the supervisor restarts it).

Usage: python bench/failover_bench.py [--rounds 5] [--threads 4]
Prints a markdown table. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelcd.client import Client
from modelcd.quickstart import make_model
from release_bench import start_service, stop_service


class Load:
    """``threads`` clients scoring until stopped (at most ``max_s``); each answer's time,
    status and version are kept."""

    def __init__(self, url: str, key: str, body: dict[str, Any], threads: int, max_s: float = 60) -> None:
        self.url, self.body, self.max_s = url, body, max_s
        self.headers = {"Authorization": f"Bearer {key}"}
        self.answers: list[tuple[float, bool, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = session.post(self.url, json=self.body, headers=self.headers, timeout=10)
                answer = (time.monotonic(), r.status_code == 200, r.headers.get("X-Modelcd-Version", "?"))
            except requests.RequestException:
                answer = (time.monotonic(), False, "-")
            with self._lock:
                self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def serving(client: Client) -> dict[str, Any]:
    deps = client.get("/api/v1/deployments", params={"model": "fo", "live": "1"})["deployments"]
    return next(d for d in deps if d["state"] == "serving")


def round_(client: Client, url: str, key: str, body: dict[str, Any], threads: int) -> dict[str, float]:
    victim = serving(client)
    with Load(url, key, body, threads) as load:
        time.sleep(1.0)
        killed = time.monotonic()
        os.killpg(victim["pid"], signal.SIGKILL)
        time.sleep(2.0)
        deadline = time.monotonic() + 30
        while (serving(client)["pid"] == victim["pid"] or not load.answers
               or load.answers[-1][2] != str(victim["version"])):
            if time.monotonic() > deadline:
                raise RuntimeError("the killed deployment did not serve again within 30 s")
            time.sleep(0.05)
        back = time.monotonic() - killed
    after = [a for a in load.answers if a[0] >= killed]
    failed = [a for a in load.answers if not a[1]]
    standby = [a for a in after if a[1] and a[2] != str(victim["version"])]
    return {"requests": len(load.answers), "failed": len(failed),
            "last_failure_ms": max(((a[0] - killed) * 1000 for a in failed), default=0.0),
            "standby_answers": len(standby), "back_s": back}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-failover-bench-"))
    proc, env, client = start_service(tmp)
    try:
        for version, c in ((1, 1.0), (2, 0.5)):
            meta = make_model(tmp / f"v{version}", c)
            client.register("fo", tmp / f"v{version}", meta)
            rel = client.find_release("fo", version)
            assert rel and client.wait_release(rel["id"])["phase"] == "succeeded"
        key = client.post("/api/v1/endpoints/fo/production/keys", json={})["primary"]
        url = client.get("/api/v1/endpoints/fo/production")["scoring_uri"]
        body = {"data": meta["sample"]["data"][:1]}
        rounds = [round_(client, url, key, body, args.threads) for _ in range(args.rounds)]
        print("| round | requests | failed | failed % | last failure after the kill | answered by the standby "
              "| killed deployment serves again after |")
        print("|---|---|---|---|---|---|---|")
        for i, r in enumerate(rounds, 1):
            print(f"| {i} | {r['requests']:.0f} | {r['failed']:.0f} | {100 * r['failed'] / r['requests']:.2f} % | "
                  f"{r['last_failure_ms']:.0f} ms | {r['standby_answers']:.0f} | {r['back_s']:.2f} s |")
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"| median | {med['requests']:.0f} | {med['failed']:.0f} | "
              f"{100 * med['failed'] / med['requests']:.2f} % | {med['last_failure_ms']:.0f} ms | "
              f"{med['standby_answers']:.0f} | {med['back_s']:.2f} s |")
    finally:
        stop_service(proc, env)


if __name__ == "__main__":
    main()
