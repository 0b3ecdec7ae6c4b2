"""Memory density of scikit-learn deployments on the process target: warm starts (forked from
the environment's parent) side by side with cold starts (a fresh interpreter each) and with
``mlflow models serve`` processes of the same model, in one run.

For N = 1, 10, 50 live deployments of one model (same bundle, same environment; 2 workers each
unless --workers), sums the PSS (``/proc/<pid>/smaps_rollup``) of every process of every
deployment -- and of the warm-start parent, which is part of the warm total -- so shared pages
are counted once overall. Marginal = (total(N) - total(1)) / (N - 1). Also prints how many
endpoints with a blue-green standby (2 deployments each) fit in --budget-gb.

    python bench/density_bench.py [--counts 1,10,50] [--cold-counts 1,10,50] [--mlflow-counts 1,10] [--workers 2]

The bundle's environment is built in --home (kept, so a second run reuses it). Loopback only;
every start is bounded by its health timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import sklearn

from modelcd.builders.bundle import build_bundle
from modelcd.domain import Bundle, Flavor, ModelVersion
from modelcd.targets.base import DeploySpec, RunningDeployment
from modelcd.targets.process import ProcessTarget, inherited_env
from scoring_bench import ModelFiles, Server, mlflow_server, start, stop, train

DEFAULT_HOME = Path(tempfile.gettempdir()) / "modelcd-density-bench"


def pss_kb(pid: int) -> int:
    """PSS of one process in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kb(pid: int) -> int:
    """PSS of a process and its descendants, in KiB."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    return sum(pss_kb(p.pid) for p in procs)


def bench_bundle(home: Path, files: ModelFiles) -> Bundle:
    """The scoring bench's model (LogisticRegression on a DataFrame) as a process-target bundle."""
    import pandas

    version = ModelVersion(model="density", version=1, digest=hashlib.sha256(b"density-bench-1").hexdigest(),
                           flavor=Flavor.SKLEARN, model_file="model.pkl", entry_script=None,
                           requirements=(f"scikit-learn=={sklearn.__version__}", f"pandas=={pandas.__version__}"),
                           sample=None, expected=None)
    return build_bundle(home, version, files.model_dir, lambda line: print(f"  build: {line}", file=sys.stderr),
                        threading.Event())


def spec(bundle: Bundle, workers: int, model: str = "density") -> DeploySpec:
    return DeploySpec(deployment_id=f"bench-{os.urandom(6).hex()}", model=model, version=1, environment="bench",
                      bundle=bundle, workers=workers, health_timeout_s=120.0)


def measure_fleet(counts: Sequence[int], add: Callable[[], int], parent_pid: Callable[[], int | None],
                  label: str) -> dict[int, int]:
    """Grow a fleet one member at a time (``add`` returns the new member's root pid) and
    total the PSS (KiB) of all members (and of the parent, if any) at each count."""
    pids: list[int] = []
    totals: dict[int, int] = {}
    for n in sorted(counts):
        while len(pids) < n:
            pids.append(add())
        time.sleep(1.0)  # let the workers finish loading and answering their first requests
        parent = parent_pid()
        totals[n] = sum(tree_pss_kb(pid) for pid in pids) + (pss_kb(parent) if parent else 0)
        print(f"  {label}: {n} deployments, {totals[n] / 1024:.0f} MiB PSS", file=sys.stderr, flush=True)
    return totals


def process_fleet(target: ProcessTarget, bundle: Bundle, workers: int,
                  made: list[RunningDeployment]) -> Callable[[], int]:
    def add() -> int:
        rd = target.create(spec(bundle, workers), lambda _: None, threading.Event())
        made.append(rd)
        return rd.pid

    return add


def mlflow_fleet(files: ModelFiles, workers: int, logdir: Path, made: list[Server]) -> Callable[[], int]:
    def add() -> int:
        server = mlflow_server(files, workers)
        server.name = f"mlflow-{len(made)}"
        start(server, logdir)
        made.append(server)
        assert server.process is not None
        return server.process.pid

    return add


def row(name: str, totals: dict[int, int], budget_kb: float) -> str:
    counts = sorted(totals)
    first, last = counts[0], counts[-1]
    marginal = (totals[last] - totals[first]) / (last - first) if last > first else float(totals[first])
    fixed = totals[first] - first * marginal
    endpoints = int((budget_kb - max(fixed, 0)) // (2 * marginal)) if marginal > 0 else 0
    cells = [name, *(f"{totals[n] / 1024:.0f}" if n in totals else "-" for n in ALL_COUNTS),
             f"{marginal / 1024:.1f}", f"{endpoints}"]
    return "| " + " | ".join(cells) + " |"


ALL_COUNTS: list[int] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--counts", default="1,10,50", help="deployment counts (default 1,10,50)")
    parser.add_argument("--cold-counts", default=None, help="cold deployment counts (default: --counts)")
    parser.add_argument("--mlflow-counts", default="1,10", help="mlflow serve process counts (default 1,10)")
    parser.add_argument("--workers", type=int, default=2, help="workers per deployment (default 2)")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="memory for the endpoints count (default 24)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"modelcd home (default {DEFAULT_HOME})")
    parser.add_argument("--skip", default="", help="comma-separated kinds to skip: warm, cold, mlflow")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    mlflow_counts = [int(c) for c in args.mlflow_counts.split(",") if c]
    cold_counts = [int(c) for c in (args.cold_counts or args.counts).split(",") if c]
    ALL_COUNTS[:] = sorted({*counts, *cold_counts, *mlflow_counts})
    skip = set(args.skip.split(","))
    args.home.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="density-bench-"))
    results: dict[str, dict[int, int]] = {}
    try:
        files = train(workdir)
        bundle = bench_bundle(args.home, files)
        python = str(bundle.python.absolute())
        warm, cold = ProcessTarget(args.home), ProcessTarget(args.home, warm_starts=False)
        assert warm.warm is not None
        if "warm" not in skip:
            warm.warm.stop_all()  # a parent of this run's code and modules
            started = time.monotonic()
            hello = warm.warm.ensure(python, bundle.path, inherited_env(os.environ))
            print(f"  parent {hello['pid']} ready in {time.monotonic() - started:.1f}s "
                  f"({len(hello['modules'])} modules)", file=sys.stderr)
            made: list[RunningDeployment] = []
            try:
                results["modelcd warm (forked)"] = measure_fleet(
                    counts, process_fleet(warm, bundle, args.workers, made), lambda: hello["pid"], "warm")
            finally:
                for rd in made:
                    warm.delete(rd)
                warm.warm.stop_all()
        if "cold" not in skip:
            made = []
            try:
                results["modelcd cold (fresh interpreter)"] = measure_fleet(
                    cold_counts, process_fleet(cold, bundle, args.workers, made), lambda: None, "cold")
            finally:
                for rd in made:
                    cold.delete(rd)
        if "mlflow" not in skip and mlflow_counts:
            servers: list[Server] = []
            try:
                results["mlflow models serve"] = measure_fleet(
                    mlflow_counts, mlflow_fleet(files, args.workers, workdir, servers), lambda: None, "mlflow")
            finally:
                for server in servers:
                    stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    budget_kb = args.budget_gb * 1024 * 1024
    print(f"PSS in MiB, {args.workers} workers per deployment; endpoints = blue-green pairs that fit in "
          f"{args.budget_gb:g} GiB after the fixed part (total at the smallest count minus its marginal share)")
    print()
    print("| fleet | " + " | ".join(f"{n} deployments" for n in ALL_COUNTS) + " | marginal MiB | endpoints |")
    print("|---|" + "---:|" * (len(ALL_COUNTS) + 2))
    for name, totals in results.items():
        print(row(name, totals, budget_kb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
