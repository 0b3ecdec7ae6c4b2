"""Shadow traffic in the router (issue 11): what mirroring an endpoint's requests to a candidate
costs the live request.

    python bench/shadow_bench.py [--duration 3] [--rounds 5] [--endpoints mirrored,hung,sampled]
                                 [--concurrency 1,16] [--pin [only|both]] [--perf DIR]
                                 [--profile-router FILE] [--baseline DIR] [--pace-ms N]

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

The router hands the copies and samples to its mirror worker process (``routing.mirror_worker``),
which sends them to the candidates and keeps the pairs. Each run also reports the CPU time per
live request of the router, its mirror worker, the backend and the candidate (user + system,
from ``/proc``), and how busy the router was (its CPU seconds per second of the run). ``--pin``
runs the router alone on one CPU and everything else (wrk, the backend, the candidates, the
mirror worker, this script) on the other CPUs (``sched_setaffinity`` on every thread; at least 2
CPUs are needed), so the candidate's CPU no longer competes with the router's; the table then
also gives how busy each side's CPUs were (``/proc/stat``, whatever ran there, other load
included). ``--pin both`` runs every endpoint both ways in each round (shared CPUs, then pinned,
the order alternating), so the two layouts are compared within one run. ``--perf DIR`` records
the router with ``perf record -g`` during each wrk run (one file per run); ``--profile-router
FILE`` runs the router under ``cProfile`` (written when it stops). Both slow the router: use
them for where its time goes, not for the latency figures.

``--baseline DIR`` runs a second router from another source tree side by side (``DIR/service``
on its ``PYTHONPATH``, e.g. ``git archive COMMIT service | tar -x -C DIR``), with the same table,
backend and candidates: every run of this router is followed or preceded by the same run on
the baseline (the order alternating), so the two are compared within one run; its rows are
labelled ``baseline``. A baseline router without a mirror worker has no worker to pin or
measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelcd.targets.process import free_port
from router_bench import (  # bench/ is on sys.path when run as a script
    BODY,
    WRK,
    _run,
    cpu_seconds,
    fmt,
    process,
    wait_http,
    wrk,
)

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


def worker_pid(router_port: int) -> int | None:
    """The router's mirror worker process (it may have been restarted: asked each run); None for
    a router without one (a baseline from before it)."""
    worker = admin(router_port, "/-/mirror").get("worker") or {}
    return int(worker["pid"]) if worker.get("pid") else None


def baseline_env(src: Path) -> dict[str, str]:
    """The environment of a router from another source tree (``src/service`` first on its path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(src / "service"),
                                                                    os.environ.get("PYTHONPATH")) if p)}


def mirror_counters(router_port: int) -> dict[str, dict[str, int]]:
    """``/-/mirror`` counters by endpoint name (``bench/NAME`` → ``NAME``)."""
    return {m["endpoint"].split("/", 1)[1]: m for m in admin(router_port, "/-/mirror")["mirrors"]}


def wait_no_pending(router_port: int, timeout_s: float) -> float:
    """Wait (bounded) until no copy is pending on any endpoint; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if all(m["pending"] == 0 and not m.get("queued") for m in mirror_counters(router_port).values()):
            break
        time.sleep(0.05)
    return time.monotonic() - t0


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus`` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def cpu_busy() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks so far (``/proc/stat``; idle and iowait are not busy)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(x) for x in rest[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]) -> float:
    """How busy ``cpus`` were between two ``cpu_busy()`` readings, as a share of their time."""
    busy = sum(after[c][0] - before[c][0] for c in cpus)
    total = sum(after[c][1] - before[c][1] for c in cpus)
    return busy / total if total else 0.0


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
    p.add_argument("--pin", nargs="?", const="only", choices=("only", "both"),
                   help="router alone on one CPU, the rest on the others; 'both': every run also on shared CPUs")
    p.add_argument("--perf", metavar="DIR", help="record the router with perf during each wrk run, into DIR")
    p.add_argument("--profile-router", metavar="FILE", help="run the router under cProfile, stats into FILE")
    p.add_argument("--baseline", metavar="DIR", help="also run the router of this source tree, side by side")
    p.add_argument("--pace-ms", type=int, default=0,
                   help="each wrk connection waits this long between its requests (an offered load below "
                        "saturation, instead of a closed loop as fast as the router goes)")
    p.add_argument("--serve-hung", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_hung:
        serve_hung(args.serve_hung)
        return 0
    if not os.path.exists(WRK):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        print(f"--pin needs at least 2 CPUs; this process may use {len(os.sched_getaffinity(0))}", file=sys.stderr)
        return 2
    if args.perf and not shutil.which("perf"):
        print("perf is needed for --perf: apt-get install -y linux-perf", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        run(Path(tmp), stack, args)
    return 0


def run(tmp: Path, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
    backend, candidate, hung, rport, bport = free_port(), free_port(), free_port(), free_port(), free_port()
    backend_proc = stack.enter_context(process(ROUTER_BENCH, "--serve-backend", str(backend)))
    candidate_proc = stack.enter_context(process(ROUTER_BENCH, "--serve-backend", str(candidate)))
    hung_proc = stack.enter_context(process(__file__, "--serve-hung", str(hung)))
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
    profile = ("-m", "cProfile", "-o", str(Path(args.profile_router).resolve())) if args.profile_router else ()
    settings = ("--table", str(table), "--mirror-pending", str(MIRROR_PENDING), "--mirror-timeout",
                f"{MIRROR_TIMEOUT_S:g}")
    router = stack.enter_context(process(*profile, "-m", "modelcd.routing.proxy", "--port", str(rport), *settings))
    routers = {"": (router, rport)}  # by the label's suffix: this router, and the baseline's
    if args.baseline:
        baseline = process("-m", "modelcd.routing.proxy", "--port", str(bport), *settings,
                           env=baseline_env(Path(args.baseline).resolve()))
        routers[" baseline"] = (stack.enter_context(baseline), bport)
    known = [key.split("/", 1)[1] for key in endpoints]
    chosen = [n.strip() for n in args.endpoints.split(",") if n.strip() and n.strip() != "plain"]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown endpoint(s) {', '.join(unknown)}: choose among {', '.join(known[1:])}")
    names = ["plain", *chosen]  # every endpoint is in the table; these are measured
    levels = [int(c) for c in args.concurrency.split(",")]
    for name in known:
        for _, port in routers.values():
            wait_http(port, f"/bench/{name}/score")
    allowed = sorted(os.sched_getaffinity(0))
    router_cpus, other_cpus = {allowed[0]}, set(allowed[1:])
    pins = {None: ["shared"], "only": ["pinned"], "both": ["shared", "pinned"]}[args.pin]
    layouts = [pin + suffix for pin in pins for suffix in routers]  # e.g. "pinned", "pinned baseline"

    def port_of(layout: str) -> int:
        return routers[" baseline" if layout.endswith(" baseline") else ""][1]

    def apply(layout: str) -> None:
        """Pinned: the measured router alone on ``router_cpus``; everything else, wrk and the
        other router included, on ``other_cpus``. Shared: all on every CPU this process may use."""
        pinned, measured = layout.startswith("pinned"), port_of(layout)
        for proc, port in routers.values():
            worker = worker_pid(port)
            if worker:
                set_affinity(worker, other_cpus if pinned else set(allowed))
            set_affinity(proc.pid, (router_cpus if port == measured else other_cpus) if pinned else set(allowed))
        for pid in (backend_proc.pid, candidate_proc.pid, hung_proc.pid, os.getpid()):
            set_affinity(pid, other_cpus if pinned else set(allowed))

    servers = {"plain": None, "mirrored": candidate_proc.pid, "hung": hung_proc.pid, "sampled": None}
    perf_dir = Path(args.perf).resolve() if args.perf else None
    if perf_dir:
        perf_dir.mkdir(parents=True, exist_ok=True)
    wait_no_pending(rport, 5)
    script = tmp / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{BODY.decode()}'\nwrk.headers['Content-Type'] = 'application/json'\n"
        + (f"function delay()\n  return {args.pace_ms}\nend\n" if args.pace_ms else ""))
    load = os.getloadavg()
    print(f"# Shadow traffic: the live request's latency with and without a mirror\n\n"
          f"{os.cpu_count()} cores (load average at start: {' '.join(f'{x:.2f}' for x in load)}), wrk -t1, "
          f"{args.duration:g} s per run"
          + (f", each connection pausing {args.pace_ms} ms between its requests" if args.pace_ms else "")
          + f", {args.rounds} rounds (each endpoint once per concurrency, order rotating), "
          f"median over rounds; router `--mirror-pending {MIRROR_PENDING} --mirror-timeout {MIRROR_TIMEOUT_S:g}`. "
          "Router CPU/req: the router process's user+system CPU time over the requests it answered "
          "(its mirror worker, the backend and the candidate likewise); router busy: its CPU seconds per "
          "second of the run."
          + (f" Pinned: the router alone on CPU {', '.join(map(str, sorted(router_cpus)))}; wrk, the backend, the "
             f"candidates, the mirror worker and this script on CPU {', '.join(map(str, sorted(other_cpus)))} "
             "(other load on the machine is not pinned); CPU busy: each side's CPUs over the run, whatever ran there."
             if "pinned" in pins else "")
          + (" Each endpoint runs shared then pinned, or pinned then shared, alternating." if len(pins) > 1
             else "")
          + (f" Baseline: the router of {args.baseline}, run side by side (same table, backend, candidates)."
             if args.baseline else "") + "\n", flush=True)

    Key = tuple[str, str, int]  # layout, endpoint, concurrency
    runs: dict[Key, list[dict[str, float]]] = {(lay, n, c): [] for lay in layouts for n in names for c in levels}
    deltas: dict[Key, dict[str, float]] = {
        key: {"requests": 0, "mirrored": 0, "dropped": 0, "candidate_errors": 0} for key in runs}
    settle: list[float] = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for c in levels:
            for i, name in enumerate(order):
                for layout in layouts if (r + i) % 2 == 0 else layouts[::-1]:
                    apply(layout)
                    port = port_of(layout)
                    rpid = next(proc.pid for proc, p in routers.values() if p == port)
                    before = mirror_counters(port).get(name, {})
                    pids = {"backend": backend_proc.pid, "candidate": servers[name], "worker": worker_pid(port)}
                    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items() if pid}
                    busy0, wall0, router0 = cpu_busy(), time.monotonic(), cpu_seconds(rpid)
                    recorder = None
                    if perf_dir:
                        recorder = subprocess.Popen(
                            ["perf", "record", "-q", "-F", "999", "-g", "-p", str(rpid), "-o",
                             str(perf_dir / f"{layout}-{name}-c{c}-r{r + 1}.data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    result = wrk(f"http://127.0.0.1:{port}/bench/{name}/score", c, args.duration, script, rpid)
                    if recorder:
                        recorder.send_signal(signal.SIGINT)
                        recorder.wait(30)
                    total = result["rps"] * args.duration
                    result["router_busy"] = (cpu_seconds(rpid) - router0) / (time.monotonic() - wall0)
                    busy1 = cpu_busy()
                    result["busy_router_cpu"] = busy_share(busy0, busy1, router_cpus)
                    result["busy_other_cpus"] = busy_share(busy0, busy1, other_cpus)
                    for k in ("backend", "candidate", "worker"):
                        result[f"{k}_us"] = (cpu_seconds(pids[k]) - cpu0[k]) * 1e6 / max(total, 1) if k in cpu0 \
                            else 0.0
                    # the copies still pending settle (the hung candidate's are cut) before the next run
                    waited = wait_no_pending(port, MIRROR_TIMEOUT_S + 3)
                    if name == "hung":
                        settle.append(waited)
                    after = mirror_counters(port).get(name, {})
                    runs[layout, name, c].append(result)
                    d = deltas[layout, name, c]
                    d["requests"] += total
                    for k in ("mirrored", "dropped", "candidate_errors"):
                        d[k] += after.get(k, 0) - before.get(k, 0)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    apply("shared")

    med = {key: {k: statistics.median(x[k] for x in v) for k in v[0]} for key, v in runs.items()}
    pinned_cols = "pinned" in pins
    print(("| layout " if len(layouts) > 1 else "")
          + "| endpoint | concurrency | p50 | p99 | req/s | added p50 vs plain (goal ≤ 0.1 ms) "
          "| added p99 vs plain (goal ≤ 0.5 ms) | added p50, per round (min … max) | added p99, per round "
          "| router CPU/req | mirror worker CPU/req | backend CPU/req | candidate CPU/req | router busy "
          + ("| CPU busy: router's / others' " if pinned_cols else "") + "| failed |")
    print("|---" * (15 + (len(layouts) > 1) + pinned_cols) + "|")
    for lay in layouts:
        for c in levels:
            base = med[lay, "plain", c]
            for name in names:
                m = med[lay, name, c]
                failed = int(sum(x["failed"] for x in runs[lay, name, c]))
                if name == "plain":
                    added50 = added99 = spread = spread99 = "—"
                else:
                    d50, d99 = m["p50"] - base["p50"], m["p99"] - base["p99"]
                    added50 = f"**{fmt(d50)}** {'met' if d50 <= GOAL_P50_MS else 'missed'}"
                    added99 = f"**{fmt(d99)}** {'met' if d99 <= GOAL_P99_MS else 'missed'}"
                    spread, spread99 = (per_round(runs[lay, name, c], runs[lay, "plain", c], k)
                                        for k in ("p50", "p99"))
                candidate_us = f"{m['candidate_us']:.0f} µs" if servers[name] else "—"
                busy = (f"| {m['busy_router_cpu']:.0%} / {m['busy_other_cpus']:.0%} "
                        if pinned_cols and lay.startswith("pinned") else "| — " if pinned_cols else "")
                print((f"| {lay} " if len(layouts) > 1 else "")
                      + f"| {name} | {c} | {fmt(m['p50'])} | {fmt(m['p99'])} | {m['rps']:.0f} | {added50} "
                      f"| {added99} | {spread} | {spread99} | {m['cpu_us']:.0f} µs | {m['worker_us']:.0f} µs "
                      f"| {m['backend_us']:.0f} µs "
                      f"| {candidate_us} | {m['router_busy']:.0%} {busy}| {failed} |")
    if args.baseline:
        print("\nThis router against the baseline, in the same rounds (medians; added: against plain of the same "
              "router and layout):\n")
        print("| layout | endpoint | concurrency | added p50: this / baseline | added p99: this / baseline "
              "| router CPU/req: this / baseline | router + mirror worker CPU/req: this / baseline |")
        print("|---" * 7 + "|")
        for pin in pins:
            for c in levels:
                for name in names[1:]:
                    this, old = med[pin, name, c], med[f"{pin} baseline", name, c]
                    this0, old0 = med[pin, "plain", c], med[f"{pin} baseline", "plain", c]
                    print(f"| {pin} | {name} | {c} | {fmt(this['p50'] - this0['p50'])} / "
                          f"{fmt(old['p50'] - old0['p50'])} "
                          f"| {fmt(this['p99'] - this0['p99'])} / {fmt(old['p99'] - old0['p99'])} "
                          f"| {this['cpu_us']:.0f} / {old['cpu_us']:.0f} µs "
                          f"| {this['cpu_us'] + this['worker_us']:.0f} / {old['cpu_us'] + old['worker_us']:.0f} µs |")
    print("\nRouter counters (`GET /-/mirror`), summed over the runs of each cell:\n")
    print(("| layout " if len(layouts) > 1 else "")
          + "| endpoint | concurrency | requests answered (about req/s x duration) | mirrored | dropped "
          "| candidate_errors |")
    print("|---" * (6 + (len(layouts) > 1)) + "|")
    for lay in layouts:
        for c in levels:
            for name in [n for n in ("mirrored", "hung") if n in names]:
                d = deltas[lay, name, c]
                print((f"| {lay} " if len(layouts) > 1 else "")
                      + f"| {name} | {c} | {d['requests']:.0f} | {d['mirrored']:.0f} | {d['dropped']:.0f} "
                      f"| {d['candidate_errors']:.0f} |")
    final = mirror_counters(rport)
    cut = (f"; a hung run's pending copies were all cut {statistics.median(settle):.2f} s (median; max "
           f"{max(settle):.2f} s) after it ended" if settle else "")
    print(f"\nAfter the last run: pending copies {sum(m['pending'] for m in final.values())}{cut}. "
          f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    if "sampled" in names:
        samples = admin(rport, "/-/samples?endpoint=bench/sampled&limit=1")
        print(f"Sampled endpoint: {samples['seq']} requests kept (ring of {samples['kept']}).")


if __name__ == "__main__":
    sys.exit(main())
