"""Webhook intake: throughput and acknowledgement latency of ``POST /hooks/generic`` on a real
`modelcd serve`, with every delivery unique, signed and stored (inbox row committed before the
answer), at a fixed concurrency, while the inbox worker processes what was stored; then how fast
the worker drains the backlog once the flood stops. Every delivery announces a version referenced
only (no files to fetch, no release).

Usage: python bench/hooks_bench.py [--connections 16] [--duration 10] [--repeat 3] [--drain 20]
                                   [--baseline REF] [--tree REF] [--variant NAME=PATH/TO/service ...]

``--baseline REF`` also runs the service as it was at git commit REF (its ``service/`` tree,
exported with ``git archive`` into a temporary folder; the checkout is not touched), alternating
baseline and working tree run by run, each on a fresh home, and prints both medians: an A/B in
the same conditions on a noisy machine. ``--tree REF`` runs commit REF in place of the working
tree (exported the same way: for a checkout with unfinished edits). ``--variant`` adds any other
copy of the package (an experiment in a scratch folder) to the rotation.

Columns: deliveries/s and ack latency of the flood (wrk); *processed during the flood*: inbox
rows processed (done, ignored or dead) by the end of the ``--duration`` s of load, per second;
*processed after the flood*: rows processed per second from the end of the load until the inbox
is empty or ``--drain`` s have passed (the worker alone on the machine: its rate of processing).
Needs wrk (Debian package `wrk`). Loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from modelcd.config import load_settings
from modelcd.lifecycle import stop_data_plane
from modelcd.sources.generic import sign
from modelcd.targets.process import free_port

SECRET = "bench-generic-secret-0123456789"
TOKEN = "bench-token-0123456789abcdef"
HERE = Path(__file__).parent
REPO = HERE.parent


@dataclass(frozen=True)
class Variant:
    name: str
    pythonpath: Path


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


def inbox_counts(home: Path) -> dict[str, int]:
    """Rows stored and rows already processed, read straight from the service's SQLite file."""
    with sqlite3.connect(f"file:{home / 'modelcd.db'}?mode=ro", uri=True, timeout=30) as conn:
        rows = dict(conn.execute("SELECT state, count(*) FROM inbox GROUP BY state").fetchall())
    return {"stored": sum(rows.values()), "processed": sum(n for s, n in rows.items() if s != "pending")}


def drain_rate(home: Path, processed: float, window_s: float) -> float:
    """Inbox rows processed per second from now until none is pending or ``window_s`` passed."""
    start = time.monotonic()
    while True:
        counts = inbox_counts(home)
        elapsed = time.monotonic() - start
        if counts["processed"] >= counts["stored"] or elapsed >= window_s:
            return (counts["processed"] - processed) / max(elapsed, 1e-3)
        time.sleep(0.05)


def export_baseline(ref: str, dest: Path) -> Path:
    """The ``service/`` tree of commit ``ref`` in ``dest`` (read-only git: archive)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "service"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "service"


def one_run(variant: Variant, tmp: Path, run: int, args: argparse.Namespace) -> dict[str, float]:
    home = tmp / f"home-{run}-{re.sub(r'[^A-Za-z0-9]+', '-', variant.name)}"
    home.mkdir()
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")},
           "PYTHONPATH": str(variant.pythonpath), "MODELCD_HOME": str(home), "MODELCD_PORT": str(port),
           "MODELCD_ROUTER_PORT": str(free_port()), "MODELCD_URL": f"http://127.0.0.1:{port}", "MODELCD_TOKEN": TOKEN,
           "MODELCD_HOOKS_GENERIC_SECRET": SECRET}
    log = home / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], env=env, start_new_session=True,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.1)
        file = tmp / f"deliveries-{run}.tsv"
        if not file.exists():
            deliveries(file, 4000 * args.duration, run)  # more than wrk can send: every request is unique
        result = wrk(f"{base}/hooks/generic", args.connections, args.duration, file)
        result.update(inbox_counts(home))
        result["processed_per_s"] = result["processed"] / args.duration
        result["drain_per_s"] = drain_rate(home, result["processed"], args.drain)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        for _ in stop_data_plane(load_settings(environ=env)):
            pass


def short(ref: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drain", type=float, default=20, help="seconds to watch the backlog drain after the load")
    ap.add_argument("--baseline", help="git commit to compare with, run alternately (e.g. HEAD)")
    ap.add_argument("--tree", help="git commit to run in place of the working tree")
    ap.add_argument("--variant", action="append", default=[], help="NAME=PATH of another service/ tree to run too")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-hooks-bench-"))
    variants = [Variant("working tree", REPO / "service")]
    if args.tree:
        variants = [Variant(f"now {short(args.tree)}", export_baseline(args.tree, tmp / "tree"))]
    if args.baseline:
        old = export_baseline(args.baseline, tmp / "baseline")
        variants.insert(0, Variant(f"baseline {short(args.baseline)}", old))
    for spec in args.variant:
        name, _, path = spec.partition("=")
        variants.append(Variant(name, Path(path).resolve()))
    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for run in range(args.repeat):
        for variant in variants:
            r = one_run(variant, tmp, run, args)
            runs[variant.name].append(r)
            print(f"<!-- {variant.name} run {run}: {r} -->", flush=True)
    print("| variant | runs | deliveries/s | p50 ack | p99 ack | non-2xx | stored | processed during the flood "
          "| processed after the flood |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "processed_per_s", "drain_per_s")}
        stored = sum(int(r["stored"]) for r in rs)
        print(f"| {name} | {len(rs)} | {med['rps']:.0f} | {med['p50']:.2f} ms | {med['p99']:.2f} ms "
              f"| {sum(int(r['non2xx']) for r in rs)} | {stored} | {med['processed_per_s']:.0f}/s "
              f"| {med['drain_per_s']:.0f}/s |")


if __name__ == "__main__":
    main()
