"""Start times of scikit-learn deployments on the process target, warm (forked from the
environment's parent) against cold (a fresh interpreter), interleaved in one run; and, with
--scoring, the scoring bench's load (wrk) against a warm deployment, a cold one and
``mlflow models serve`` of the same model in the same run.

start → healthy is ``ProcessTarget.create()`` from the call to its return (the deployment
answered /healthz for its model and listens with all its processes), the parent already
running; the parent's own start is printed once.

    python bench/start_bench.py [--starts 20] [--workers 2] [--scoring --duration 10 --repeat 3] [--releases 6]

--releases N also times register → serving (smoke and switch included) through two real
`modelcd serve` (warm starts on; MODELCD_WARM_STARTS=false), N versions each after a first
one that builds the environment (see bench/release_bench.py), alternating between them.

Uses the environment of bench/density_bench.py's --home (built there on first use).
Loopback only; every start is bounded by its health timeout, every load run by --duration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from density_bench import DEFAULT_HOME, bench_bundle, spec
from modelcd.domain import Bundle
from modelcd.targets.base import RunningDeployment
from modelcd.targets.process import ProcessTarget, inherited_env
from scoring_bench import SCENARIOS, Server, measure, mlflow_server, run_matrix, start, stop, table, train


class _Root:
    """What scoring_bench.measure needs of a server's process: the root pid of its tree."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_times(warm: ProcessTarget, cold: ProcessTarget, bundle: Bundle, workers: int,
                starts: int) -> dict[str, list[float]]:
    """create() → healthy, then delete, alternating warm and cold; seconds per start."""
    times: dict[str, list[float]] = {"warm": [], "cold": []}
    for i in range(starts):
        for kind, target in (("warm", warm), ("cold", cold)) if i % 2 == 0 else (("cold", cold), ("warm", warm)):
            lines: list[str] = []
            began = time.monotonic()
            rd = target.create(spec(bundle, workers), lines.append, threading.Event())
            times[kind].append(time.monotonic() - began)
            if kind == "warm" and not lines[0].endswith("(warm)"):
                raise RuntimeError(f"not a warm start: {lines}")
            target.delete(rd)
        print(f"  start {i + 1}/{starts}: warm {times['warm'][-1] * 1000:.0f} ms, "
              f"cold {times['cold'][-1] * 1000:.0f} ms", file=sys.stderr, flush=True)
    return times


def as_server(name: str, rd: RunningDeployment, command: list[str]) -> Server:
    server = Server(name, command, f"{rd.url}/score", f"{rd.url}/healthz")
    server.process = cast(Any, _Root(rd.pid))
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--starts", type=int, default=20, help="starts of each kind (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="workers per deployment (default 2)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"modelcd home (default {DEFAULT_HOME})")
    parser.add_argument("--scoring", action="store_true", help="also load warm, cold and mlflow with wrk")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per cell (default 3)")
    parser.add_argument("--releases", type=int, default=0, help="versions released per service (default 0: skip)")
    args = parser.parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="start-bench-"))
    warm, cold = ProcessTarget(args.home), ProcessTarget(args.home, warm_starts=False)
    assert warm.warm is not None
    try:
        files = train(workdir)
        bundle = bench_bundle(args.home, files)
        warm.warm.stop_all()
        began = time.monotonic()
        hello = warm.warm.ensure(str(bundle.python.absolute()), bundle.path, inherited_env(os.environ))
        parent_s = time.monotonic() - began
        times = start_times(warm, cold, bundle, args.workers, args.starts)
        if args.starts:
            report_starts(times, args.workers, args.starts, hello, parent_s)
        if args.scoring:
            scoring(warm, cold, bundle, files, workdir, args)
        if args.releases:
            releases(args.releases, workdir)
    finally:
        if warm.warm is not None:
            warm.warm.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report_starts(times: dict[str, list[float]], workers: int, starts: int, hello: dict[str, Any],
                  parent_s: float) -> None:
    print(f"start → healthy, {workers} workers per deployment, {starts} starts each, interleaved; "
          f"the parent (pid {hello['pid']}, {len(hello['modules'])} modules) started once in {parent_s:.2f} s")
    print()
    print("| start | p50 ms | p95 ms | min ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for kind, values in times.items():
        print(f"| {kind} | {statistics.median(values) * 1000:.0f} | {percentile(values, 0.95) * 1000:.0f} | "
              f"{min(values) * 1000:.0f} | {max(values) * 1000:.0f} |")
    print()
    print(f"cold/warm p50 = {statistics.median(times['cold']) / statistics.median(times['warm']):.1f}x")


def scoring(warm: ProcessTarget, cold: ProcessTarget, bundle: Bundle, files: Any, workdir: Path,
            args: argparse.Namespace) -> None:
    """scoring_bench's matrix against a warm deployment, a cold one and mlflow models serve."""
    made: list[tuple[ProcessTarget, RunningDeployment]] = []
    mlflow = mlflow_server(files, args.workers)
    try:
        servers = []
        for name, target in (("modelcd warm", warm), ("modelcd cold", cold)):
            rd = target.create(spec(bundle, args.workers), lambda _: None, threading.Event())
            made.append((target, rd))
            servers.append(as_server(name, rd, [f"ProcessTarget(warm_starts={target is warm}).create"]))
        start(mlflow, workdir)
        servers.append(mlflow)
        results = run_matrix(servers, files.bodies, SCENARIOS, args.duration, args.repeat)
        pairs = alternate(servers[0], servers[1], files.bodies, args.duration, args.repeat * 2)
    finally:
        stop(mlflow)
        for target, rd in made:
            target.delete(rd)
    print()
    print(table(results))
    print()
    for batch, connections in SCENARIOS:
        w, c, m = (results[(n, batch, connections)] for n in ("modelcd warm", "modelcd cold", "mlflow"))
        print(f"- batch {batch}, {connections} connections: warm/cold = {w.rps / c.rps:.2f}x requests/s, "
              f"{w.cpu_ms / c.cpu_ms:.2f}x CPU/request; warm/mlflow = {w.rps / m.rps:.1f}x requests/s")
    print()
    print(f"warm and cold alternating run by run ({args.repeat * 2} runs each, medians), c=16:")
    print()
    print("| batch | warm req/s | cold req/s | warm CPU ms/request | cold CPU ms/request | warm/cold CPU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, (w_runs, c_runs) in pairs.items():
        wr, cr = statistics.median(x.rps for x in w_runs), statistics.median(x.rps for x in c_runs)
        wc, cc = statistics.median(x.cpu_ms for x in w_runs), statistics.median(x.cpu_ms for x in c_runs)
        print(f"| {batch} | {wr:.0f} | {cr:.0f} | {wc:.3f} | {cc:.3f} | {wc / cc:.2f}x |")


def alternate(warm: Server, cold: Server, bodies: dict[int, Path], duration: float,
              runs: int) -> dict[int, tuple[list[Any], list[Any]]]:
    """wrk at c=16 against warm and cold in turns (which goes first alternates), per batch size:
    load on a shared machine drifts over minutes, so side by side means run by run."""
    out: dict[int, tuple[list[Any], list[Any]]] = {}
    for batch in sorted(bodies):
        w_runs: list[Any] = []
        c_runs: list[Any] = []
        for i in range(runs):
            for server, into in ((warm, w_runs), (cold, c_runs)) if i % 2 == 0 else ((cold, c_runs), (warm, w_runs)):
                into.append(measure(server, bodies[batch], 16, duration))
        out[batch] = (w_runs, c_runs)
    return out


def releases(versions: int, workdir: Path) -> None:
    """register → serving on a warm-start service and a cold-start one, versions alternating."""
    from modelcd.quickstart import make_model
    from release_bench import first_release, start_service, stop_service, wait_version

    services = {}
    try:
        for kind, extra in (("warm", {}), ("cold", {"MODELCD_WARM_STARTS": "false"})):
            tmp = workdir / f"release-{kind}"
            tmp.mkdir()
            proc, env, client = start_service(tmp, **extra)
            services[kind] = (proc, env, client, tmp)
            first_release(client, tmp)
        times: dict[str, list[float]] = {"warm": [], "cold": []}
        for i in range(2, versions + 2):
            for kind, (_, _, client, tmp) in services.items():
                meta = make_model(tmp / f"v{i}", 1.0 / i)
                uri = client.get("/api/v1/endpoints/bench/production")["scoring_uri"]
                client.register("bench", tmp / f"v{i}", meta)
                began = time.monotonic()
                times[kind].append(wait_version(uri, meta["sample"], i) - began)
                rel = client.find_release("bench", i)
                assert rel and client.wait_release(rel["id"])["phase"] == "succeeded"
            print(f"  v{i}: warm {times['warm'][-1]:.2f} s, cold {times['cold'][-1]:.2f} s", file=sys.stderr)
    finally:
        for proc, env, _, _ in services.values():
            stop_service(proc, env)
    print()
    print(f"register → serving (smoke and switch included), {versions} versions per service, same run")
    print()
    print("| service | p50 s | p95 s | min s | max s |")
    print("|---|---:|---:|---:|---:|")
    for kind, values in times.items():
        print(f"| {kind} starts | {statistics.median(values):.2f} | {percentile(values, 0.95):.2f} | "
              f"{min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
