"""Webhook intake: throughput and acknowledgement latency of ``POST /hooks/generic`` on a real
`modelcd serve`, with every delivery unique, signed and stored (inbox row committed before the
answer), at a fixed concurrency. Also the MLflow-registration → production time when an MLflow
tracking server is available (``--mlflow``).

Usage: python bench/hooks_bench.py [--connections 16] [--duration 10] [--repeat 3]
Needs wrk (Debian package `wrk`). Loopback only; wrk runs are bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from modelcd.sources.generic import sign
from modelcd.targets.process import free_port

SECRET = "bench-generic-secret-0123456789"
TOKEN = "bench-token-0123456789abcdef"
HERE = Path(__file__).parent




def deliveries(path: Path, n: int, run: int) -> None:
    t = int(time.time())
    with path.open("w") as f:
        for i in range(n):
            body = json.dumps({"model": "bench", "version": str(i), "artifact_uri": None, "release": False,
                               "external_ref": f"bench:{run}:{i}"}, separators=(",", ":")).encode()
            f.write(f"r{run}-{i}\tt={t},v1={sign(SECRET, t, body)}\t{body.decode()}\n")


def wrk(url: str, connections: int, duration: int, file: Path) -> dict[str, float]:
    threads = 2 if connections > 1 else 1
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
                          str(HERE / "hooks_post.lua"), url], capture_output=True, text=True, timeout=duration + 60,
                         env={**os.environ, "DELIVERIES_FILE": str(file), "WRK_THREADS": str(threads)}).stdout
    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "total": total, "non2xx": int(bad.group(1)) if bad else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-hooks-bench-"))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")},
           "MODELCD_HOME": str(tmp / "home"), "MODELCD_PORT": str(port), "MODELCD_ROUTER_PORT": str(free_port()),
           "MODELCD_URL": f"http://127.0.0.1:{port}", "MODELCD_TOKEN": TOKEN, "MODELCD_HOOKS_GENERIC_SECRET": SECRET}
    (tmp / "home").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], env=env, start_new_session=True,
                            stdout=open(tmp / "serve.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError((tmp / "serve.log").read_text())
            time.sleep(0.1)
        runs = []
        for run in range(args.repeat):
            file = tmp / f"deliveries-{run}.tsv"
            deliveries(file, 2000 * args.duration, run)  # more than wrk can send: every request is unique
            runs.append(wrk(f"{base}/hooks/generic", args.connections, args.duration, file))
        stored = len(requests.get(f"{base}/api/v1/inbox", params={"limit": 1000}).json()["deliveries"])
        print("| connections | runs | deliveries/s (median) | p50 ack | p99 ack | non-2xx | stored (last 1000 shown) |")
        print("|---|---|---|---|---|---|---|")
        med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
        print(f"| {args.connections} | {len(runs)} | {med['rps']:.0f} | {med['p50']:.2f} ms | {med['p99']:.2f} ms "
              f"| {sum(r['non2xx'] for r in runs)} | {stored} |")
        for r in runs:
            print(f"<!-- run: {r} -->")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
