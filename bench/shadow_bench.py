"""Shadow traffic in the router (issue 11): what mirroring an endpoint's requests to a candidate
costs the live request.

    python bench/shadow_bench.py [--duration 3] [--rounds 5] [--endpoints mirrored,hung,sampled]
                                 [--concurrency 1,16]

One fast backend (``router_bench.py``'s asyncio + httptools stub, fixed answer) serves every
endpoint of one router process, started directly (``python -m modelcd.routing.proxy --table
... --mirror-pending 64 --mirror-timeout 2``) with these endpoints in its one table:

- ``plain``: the backend alone (the peer every other endpoint is compared with);
- ``mirrored``: the same backend, every request copied (``sample_rate`` 1.0) to a fast
  candidate (a second stub process);
- ``hung``: the same, copied to a candidate that accepts connections and reads requests but never
  answers: 64 copies are pending at once, the rest are dropped, each pending copy is cut after
  2 s (the router's timeout sweep runs every 0.5 s);
- ``sampled``: every request kept with its answer (route ``sample_rate`` 1.0, the production
  watch), nothing sent anywhere.

``wrk`` (bounded by ``--duration``) posts a small scoring body at concurrency 1 and 16. Each
round runs every endpoint measured (``--endpoints``, plain always; all are in the table) once
per concurrency, the order rotating from round to round, so drift
in the machine's load hits all alike; medians over ``--rounds``. Between runs the router's
``/-/mirror`` counters are read (the deltas are reported) and the hung candidate's pending
copies are let expire, so one run's leftovers do not land in the next. Loopback only; every loop
is bounded. Prints markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelcd.targets.process import free_port
from router_bench import BODY, WRK, _run, fmt, process, wait_http, wrk  # bench/ is on sys.path when run as a script

ROUTER_BENCH = str(Path(__file__).resolve().parent / "router_bench.py")
GOAL_P50_MS, GOAL_P99_MS = 0.1, 0.5
MIRROR_PENDING, MIRROR_TIMEOUT_S = 64, 2.0


def serve_hung(port: int) -> None:
    """A candidate that accepts connections and reads what comes, and never answers."""

    class Proto(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    _run(main())


def wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def admin(router_port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{router_port}{path}", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def mirror_counters(router_port: int) -> dict[str, dict[str, int]]:
    """``/-/mirror`` counters by endpoint name (``bench/NAME`` → ``NAME``)."""
    return {m["endpoint"].split("/", 1)[1]: m for m in admin(router_port, "/-/mirror")["mirrors"]}


def wait_no_pending(router_port: int, timeout_s: float) -> float:
    """Wait (bounded) until no copy is pending on any endpoint; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if all(m["pending"] == 0 for m in mirror_counters(router_port).values()):
            break
        time.sleep(0.05)
    return time.monotonic() - t0


def per_round(runs: list[dict[str, float]], plain: list[dict[str, float]], key: str) -> str:
    """The smallest and largest difference to plain among the rounds (same round, same concurrency)."""
    diffs = [a[key] - b[key] for a, b in zip(runs, plain, strict=True)]
    return f"{fmt(min(diffs))} … {fmt(max(diffs))}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=5, help="rounds (each endpoint once per concurrency); medians")
    p.add_argument("--endpoints", default="mirrored,hung,sampled",
                   help="the endpoints measured against plain (comma-separated; plain always runs)")
    p.add_argument("--concurrency", default="1,16", help="wrk connections, comma-separated")
    p.add_argument("--serve-hung", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_hung:
        serve_hung(args.serve_hung)
        return 0
    if not os.path.exists(WRK):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        run(Path(tmp), stack, args)
    return 0


def run(tmp: Path, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
    backend, candidate, hung, rport = free_port(), free_port(), free_port(), free_port()
    stack.enter_context(process(ROUTER_BENCH, "--serve-backend", str(backend)))
    stack.enter_context(process(ROUTER_BENCH, "--serve-backend", str(candidate)))
    stack.enter_context(process(__file__, "--serve-hung", str(hung)))
    wait_http(backend, "/score")
    wait_http(candidate, "/score")
    wait_listening(hung)

    def route(id: str, **extra: Any) -> dict[str, Any]:
        return {"backends": [{"id": id, "version": 1, "url": f"http://127.0.0.1:{backend}", "weight": 100}], **extra}

    endpoints = {
        "bench/plain": route("p1"),
        "bench/mirrored": route("m1", mirror={"id": "c1", "version": 2, "url": f"http://127.0.0.1:{candidate}",
                                              "sample_rate": 1.0}),
        "bench/hung": route("h1", mirror={"id": "c2", "version": 2, "url": f"http://127.0.0.1:{hung}",
                                          "sample_rate": 1.0}),
        "bench/sampled": route("s1", sample_rate=1.0),
    }
    table = tmp / "table.json"
    table.write_text(json.dumps({"generation": 1, "endpoints": endpoints}))
    router = stack.enter_context(process("-m", "modelcd.routing.proxy", "--table", str(table), "--port", str(rport),
                                         "--mirror-pending", str(MIRROR_PENDING),
                                         "--mirror-timeout", f"{MIRROR_TIMEOUT_S:g}"))
    known = [key.split("/", 1)[1] for key in endpoints]
    chosen = [n.strip() for n in args.endpoints.split(",") if n.strip() and n.strip() != "plain"]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown endpoint(s) {', '.join(unknown)}: choose among {', '.join(known[1:])}")
    names = ["plain", *chosen]  # every endpoint is in the table; these are measured
    levels = [int(c) for c in args.concurrency.split(",")]
    for name in known:
        wait_http(rport, f"/bench/{name}/score")
    wait_no_pending(rport, 5)
    script = tmp / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{BODY.decode()}'\nwrk.headers['Content-Type'] = 'application/json'\n")
    load = os.getloadavg()
    print(f"# Shadow traffic: the live request's latency with and without a mirror\n\n"
          f"{os.cpu_count()} cores (load average at start: {' '.join(f'{x:.2f}' for x in load)}), wrk -t1, "
          f"{args.duration:g} s per run, {args.rounds} rounds (each endpoint once per concurrency, order rotating), "
          f"median over rounds; router `--mirror-pending {MIRROR_PENDING} --mirror-timeout {MIRROR_TIMEOUT_S:g}`. "
          "Router CPU/req: the router process's user+system CPU time over the requests it answered.\n", flush=True)

    runs: dict[tuple[str, int], list[dict[str, float]]] = {(n, c): [] for n in names for c in levels}
    deltas: dict[tuple[str, int], dict[str, float]] = {
        (n, c): {"requests": 0, "mirrored": 0, "dropped": 0, "candidate_errors": 0} for n in names for c in levels}
    settle: list[float] = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for c in levels:
            for name in order:
                before = mirror_counters(rport).get(name, {})
                result = wrk(f"http://127.0.0.1:{rport}/bench/{name}/score", c, args.duration, script, router.pid)
                # the copies still pending settle (the hung candidate's are cut) before the next run
                waited = wait_no_pending(rport, MIRROR_TIMEOUT_S + 3)
                if name == "hung":
                    settle.append(waited)
                after = mirror_counters(rport).get(name, {})
                runs[name, c].append(result)
                d = deltas[name, c]
                d["requests"] += result["rps"] * args.duration
                for k in ("mirrored", "dropped", "candidate_errors"):
                    d[k] += after.get(k, 0) - before.get(k, 0)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    med = {key: {k: statistics.median(x[k] for x in v) for k in v[0]} for key, v in runs.items()}
    print("| endpoint | concurrency | p50 | p99 | req/s | added p50 vs plain (goal ≤ 0.1 ms) "
          "| added p99 vs plain (goal ≤ 0.5 ms) | added p50, per round (min … max) | added p99, per round "
          "| router CPU/req | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        base = med["plain", c]
        for name in names:
            m = med[name, c]
            failed = int(sum(x["failed"] for x in runs[name, c]))
            if name == "plain":
                added50 = added99 = spread = spread99 = "—"
            else:
                d50, d99 = m["p50"] - base["p50"], m["p99"] - base["p99"]
                added50 = f"**{fmt(d50)}** {'met' if d50 <= GOAL_P50_MS else 'missed'}"
                added99 = f"**{fmt(d99)}** {'met' if d99 <= GOAL_P99_MS else 'missed'}"
                spread, spread99 = (per_round(runs[name, c], runs["plain", c], k) for k in ("p50", "p99"))
            print(f"| {name} | {c} | {fmt(m['p50'])} | {fmt(m['p99'])} | {m['rps']:.0f} | {added50} | {added99} "
                  f"| {spread} | {spread99} | {m['cpu_us']:.0f} µs | {failed} |")
    print("\nRouter counters (`GET /-/mirror`), summed over the runs of each cell:\n")
    print("| endpoint | concurrency | requests answered (about req/s x duration) | mirrored | dropped "
          "| candidate_errors |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        for name in [n for n in ("mirrored", "hung") if n in names]:
            d = deltas[name, c]
            print(f"| {name} | {c} | {d['requests']:.0f} | {d['mirrored']:.0f} | {d['dropped']:.0f} "
                  f"| {d['candidate_errors']:.0f} |")
    final = mirror_counters(rport)
    print(f"\nAfter the last run: pending copies {sum(m['pending'] for m in final.values())}; a hung run's pending "
          f"copies were all cut {statistics.median(settle):.2f} s (median; max {max(settle):.2f} s) after it ended. "
          f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    if "sampled" in names:
        samples = admin(rport, "/-/samples?endpoint=bench/sampled&limit=1")
        print(f"Sampled endpoint: {samples['seq']} requests kept (ring of {samples['kept']}).")


if __name__ == "__main__":
    sys.exit(main())
