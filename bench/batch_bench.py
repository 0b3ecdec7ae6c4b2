"""Batch scoring (issue 13): the same CSV scored with the same sklearn model by modelcd's
``score_dataset`` (the version's bundle, a worker process fed float arrays over a pipe) and by
``mlflow models predict`` (MLflow's own batch command, ``--env-manager local``), side by side
in one run.

    python bench/batch_bench.py [--rows 1000000] [--big 10000000] [--repeat 3]

Three ways of running ours: ``modelcd batch run NAME --wait`` against a running ``modelcd
serve`` (the command a user types: its wall time, and the batch_prediction job's own time from
running to succeeded), and ``score_dataset`` in a fresh Python process (no service). Each
measured run is a fresh process; its wall time covers everything the command does (start,
model load, reading, scoring, writing the output). Peak RSS: the largest of the process and
its children (``getrusage``; for modelcd the reading process and the scoring worker are shown
apart). The bundle's environment is built before the timed runs (``--env-manager local``
likewise uses an environment that exists). The model is the quickstart's LogisticRegression on
iris; the CSV holds 4 uniform random float columns.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_csv(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    with path.open("w") as f:
        f.write("sepal_length,sepal_width,petal_length,petal_width\n")
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            pd.DataFrame(rng.uniform(0.1, 8.0, size=(n, 4)).round(3)).to_csv(f, header=False, index=False)


def setup(work: Path) -> dict[str, Any]:
    """The model, registered in a modelcd home (bundle built, its environment's warm parent
    started, as a service that serves or scored the version has it) and saved as an MLflow
    model; returns the model's metadata."""
    import joblib
    import mlflow.sklearn

    from modelcd.builders.bundle import build_bundle
    from modelcd.config import load_settings
    from modelcd.context import build_context
    from modelcd.quickstart import make_model
    from modelcd.registry.archive import pack_tree
    from modelcd.registry.service import parse_metadata
    from modelcd.targets.process import inherited_env

    meta = make_model(work / "model", 1.0)
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(work / "home"), "MODELCD_TOKEN": "b" * 24}))
    version = ctx.registry.register("iris", io.BytesIO(pack_tree(work / "model")), parse_metadata(meta))
    bundle = build_bundle(ctx.home, version, ctx.registry.materialize(version), lambda _line: None, threading.Event())
    ctx.target("process").warm.ensure(os.path.abspath(bundle.python), Path(bundle.path), inherited_env(os.environ))
    mlflow.sklearn.save_model(joblib.load(work / "model" / "model.joblib"), str(work / "mlflow-model"))
    return meta


def ours(work: Path, data: Path, out: Path) -> None:
    """One modelcd run in this process; prints a JSON line. A forked worker is not this
    process's child, so its peak RSS is sampled (every 20 ms) while it runs."""
    import psutil

    from modelcd.batch.scoring import score_dataset
    from modelcd.config import load_settings
    from modelcd.context import build_context

    started = time.monotonic()
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(work / "home"), "MODELCD_TOKEN": "b" * 24}))
    lines: list[str] = []
    peak = [0]
    done = threading.Event()

    def sample(pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("scoring worker started (warm, pid "):
            threading.Thread(target=sample, args=(int(line.split("pid ")[1].split(",")[0]),), daemon=True).start()

    result = score_dataset(ctx, model="iris", version=1, input_uri=str(data), output_uri=str(out), fmt=None, keys=(),
                           max_errors=None, log=log, cancel=threading.Event())
    seconds = time.monotonic() - started  # from the context's making: what a running service spends
    done.set()
    how = "warm" if any("scoring worker started (warm" in line for line in lines) else "cold"
    why = next((line for line in lines if "warm start unavailable" in line), "")
    worker_mb = max(peak[0] / 2**20, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"seconds": seconds, "rows": result.rows_scored, "how": how, "why": why,
                      "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_worker_mb": worker_mb}))


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the process tree's largest process, stdout) of a fresh process,
    measured by a small wrapper so that only this command's children count."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.monotonic()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "s = time.monotonic() - t\n"
               "sys.stderr.write(p.stderr[-2000:] if p.returncode else '')\n"
               "print(json.dumps({'rc': p.returncode, 'seconds': s, 'out': p.stdout,"
               " 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n")
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, check=True, env=env)
    doc = json.loads(done.stdout)
    if doc["rc"] != 0:
        raise SystemExit(f"{argv[:4]} failed: {done.stderr}")
    return doc["seconds"], doc["rss_mb"], doc["out"]


def run_ours(work: Path, data: Path) -> dict[str, float]:
    seconds, _, out = timed([sys.executable, __file__, "--ours", str(work), str(data), str(work / "ours-out.csv")])
    doc = json.loads(out.strip().splitlines()[-1])
    return {**doc, "inner_seconds": doc["seconds"], "seconds": seconds}


class Service:
    """A `modelcd serve` in its own home with the model registered and a manual batch deployment
    ``bench`` of it over ``data`` (its first run, not measured, builds the environment)."""

    def __init__(self, work: Path, data: Path, meta: dict[str, Any]) -> None:
        from release_bench import start_service  # bench/ is on sys.path when run as a script

        (work / "svc").mkdir()
        self.proc, self.env, client = start_service(work / "svc")
        self.out = work / "svc-out.csv"
        client.register("iris", work / "model", meta)
        self.cli("batch", "create", "bench", "--model", "iris", "--version", "1", "--input", str(data), "--output",
                 str(self.out), "--schedule", "manual")
        job = json.loads(self.cli("batch", "run", "bench", "--wait", "--json"))
        assert job["state"] == "succeeded", job

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "modelcd", *args], env=self.env, capture_output=True, text=True,
                              check=True).stdout

    def run(self) -> dict[str, Any]:
        """One ``modelcd batch run bench --wait --json``: its wall time, the job's own time, how its
        worker started."""
        from release_bench import iso_seconds

        seconds, rss, out = timed([sys.executable, "-m", "modelcd", "batch", "run", "bench", "--wait", "--json"],
                                  env=self.env)
        job = json.loads(out)
        assert job["state"] == "succeeded", job
        logs = self.cli("jobs", "logs", job["id"])
        why = next((line.strip() for line in logs.splitlines() if "warm start unavailable" in line), "")
        return {"seconds": seconds, "job_seconds": iso_seconds(job["finished_at"]) - iso_seconds(job["started_at"]),
                "how": "warm" if "scoring worker started (warm" in logs else "cold", "why": why, "cli_rss_mb": rss}

    def stop(self) -> None:
        from release_bench import stop_service

        stop_service(self.proc, self.env)


def run_mlflow(work: Path, data: Path) -> dict[str, float]:
    mlflow = [sys.executable, "-m", "mlflow"]
    seconds, rss, _ = timed([*mlflow, "models", "predict", "-m", str(work / "mlflow-model"), "-i", str(data),
                             "-o", str(work / "mlflow-out.json"), "-t", "csv", "--env-manager", "local"])
    return {"seconds": seconds, "rss_mb": rss}


def check_equal(work: Path, ours_out: Path) -> bool:
    import pandas as pd

    mine = pd.read_csv(ours_out)["prediction"].tolist()
    theirs = json.loads((work / "mlflow-out.json").read_text())
    theirs = theirs["predictions"] if isinstance(theirs, dict) else theirs
    return mine == [int(p) for p in theirs]


def main() -> None:
    from modelcd.targets.warm import WarmStarts

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=0, help="also score this many rows with modelcd only")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ours", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        ours(*(Path(a) for a in args.ours))
        return
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        work = Path(tmp)
        meta = setup(work)
        data = work / "in.csv"
        make_csv(data, args.rows)
        print(f"{args.rows:,} rows, {data.stat().st_size / 1e6:.0f} MB CSV; {os.cpu_count()} CPUs; load average "
              f"at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        service = Service(work, data, meta)
        try:
            served: list[dict[str, Any]] = []
            mine: list[dict[str, Any]] = []
            theirs: list[dict[str, float]] = []
            for i in range(args.repeat):  # interleaved rounds
                served.append(service.run())
                mine.append(run_ours(work, data))
                theirs.append(run_mlflow(work, data))
                print(f"round {i + 1}: `batch run --wait` {served[-1]['seconds']:.2f} s (job "
                      f"{served[-1]['job_seconds']:.2f} s, worker {served[-1]['how']} {served[-1]['why']}); "
                      "score_dataset "
                      f"{mine[-1]['seconds']:.2f} s (reader {mine[-1]['rss_self_mb']:.0f} MB, worker "
                      f"{mine[-1]['rss_worker_mb']:.0f} MB, {mine[-1]['how']} {mine[-1]['why']}); "
                      f"mlflow {theirs[-1]['seconds']:.2f} s ({theirs[-1]['rss_mb']:.0f} MB)", flush=True)
            print(f"predictions equal on every row: service {check_equal(work, service.out)}, "
                  f"score_dataset {check_equal(work, work / 'ours-out.csv')}")
            big: dict[str, Any] = {}
            if args.big:
                for name in ("ours-out.csv", "mlflow-out.json", "svc-out.csv", "in.csv"):
                    (work / name).unlink(missing_ok=True)
                make_csv(data, args.big)
                big = run_ours(work, data)
        finally:
            service.stop()
            WarmStarts(work / "home").stop_all()
        mlflow_s = statistics.median(r["seconds"] for r in theirs)
        cli_s = statistics.median(r["seconds"] for r in served)
        job_s = statistics.median(r["job_seconds"] for r in served)
        ours_s = statistics.median(r["seconds"] for r in mine)
        inner_s = statistics.median(r["inner_seconds"] for r in mine)
        n = args.rows
        print("\n| command | rows | median s | rows/s | vs mlflow | peak RSS MB |\n|---|---:|---:|---:|---:|---|")
        print(f"| `modelcd batch run NAME --wait`, a running service (the whole command) | {n:,} | {cli_s:.2f} | "
              f"{n / cli_s:,.0f} | {mlflow_s / cli_s:.1f} | (in the service) |")
        print(f"| its batch_prediction job, running → succeeded | {n:,} | {job_s:.2f} | {n / job_s:,.0f} | "
              f"{mlflow_s / job_s:.1f} | |")
        print(f"| modelcd `score_dataset`, a fresh Python process | {n:,} | {ours_s:.2f} | {n / ours_s:,.0f} | "
              f"{mlflow_s / ours_s:.1f} | {max(r['rss_self_mb'] for r in mine):.0f} (reader) / "
              f"{max(r['rss_worker_mb'] for r in mine):.0f} (worker) |")
        print(f"| modelcd, `score_dataset`'s own time in it | {n:,} | {inner_s:.2f} | {n / inner_s:,.0f} | "
              f"{mlflow_s / inner_s:.1f} | (same processes) |")
        print(f"| `mlflow models predict -t csv --env-manager local` | {n:,} | {mlflow_s:.2f} | {n / mlflow_s:,.0f} | "
              f"1.0 | {max(r['rss_mb'] for r in theirs):.0f} |")
        if big:
            print(f"| modelcd `score_dataset`, a fresh Python process | {args.big:,} | {big['seconds']:.2f} | "
                  f"{args.big / big['seconds']:,.0f} | | {big['rss_self_mb']:.0f} (reader) / "
                  f"{big['rss_worker_mb']:.0f} (worker) |")
            print(f"| modelcd, `score_dataset`'s own time in it | {args.big:,} | {big['inner_seconds']:.2f} | "
                  f"{args.big / big['inner_seconds']:,.0f} | | (same processes) |")


if __name__ == "__main__":
    main()
