"""Batch scoring (issue 13): the same CSV scored with the same sklearn model by modelcd's
``score_dataset`` (the version's bundle, a worker process fed float arrays over a pipe) and by
``mlflow models predict`` (MLflow's own batch command, ``--env-manager local``), side by side
in one run.

    python bench/batch_bench.py [--rows 1000000] [--big 10000000] [--repeat 3]

Each measured run is a fresh process; its wall time covers everything the command does (start,
model load, reading, scoring, writing the output). Peak RSS: the largest of the process and
its children (``getrusage``; for modelcd the reading process and the scoring worker are shown
apart). The bundle's environment is built before the timed runs (``--env-manager local``
likewise uses an environment that exists). The model is the quickstart's LogisticRegression on
iris; the CSV holds 4 uniform random float columns.
"""

from __future__ import annotations

import argparse
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


def setup(work: Path) -> None:
    """The model, registered in a modelcd home (bundle built) and saved as an MLflow model."""
    import joblib
    import mlflow.sklearn

    from modelcd.builders.bundle import build_bundle
    from modelcd.config import load_settings
    from modelcd.context import build_context
    from modelcd.quickstart import make_model
    from modelcd.registry.archive import pack_tree
    from modelcd.registry.service import parse_metadata

    meta = make_model(work / "model", 1.0)
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(work / "home"), "MODELCD_TOKEN": "b" * 24}))
    version = ctx.registry.register("iris", io.BytesIO(pack_tree(work / "model")), parse_metadata(meta))
    build_bundle(ctx.home, version, ctx.registry.materialize(version), lambda _line: None, threading.Event())
    mlflow.sklearn.save_model(joblib.load(work / "model" / "model.joblib"), str(work / "mlflow-model"))


def ours(work: Path, data: Path, out: Path) -> None:
    """One modelcd run in this process; prints a JSON line."""
    from modelcd.batch.scoring import score_dataset
    from modelcd.config import load_settings
    from modelcd.context import build_context

    started = time.monotonic()
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(work / "home"), "MODELCD_TOKEN": "b" * 24}))
    result = score_dataset(ctx, model="iris", version=1, input_uri=str(data), output_uri=str(out), fmt=None, keys=(),
                           max_errors=None, log=lambda _line: None, cancel=threading.Event())
    seconds = time.monotonic() - started  # from the context's making: what a running service spends
    print(json.dumps({"seconds": seconds, "rows": result.rows_scored,
                      "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the process tree's largest process, stdout) of a fresh process,
    measured by a small wrapper so that only this command's children count."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.monotonic()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "s = time.monotonic() - t\n"
               "sys.stderr.write(p.stderr[-2000:] if p.returncode else '')\n"
               "print(json.dumps({'rc': p.returncode, 'seconds': s, 'out': p.stdout,"
               " 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n")
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, check=True)
    doc = json.loads(done.stdout)
    if doc["rc"] != 0:
        raise SystemExit(f"{argv[:4]} failed: {done.stderr}")
    return doc["seconds"], doc["rss_mb"], doc["out"]


def run_ours(work: Path, data: Path) -> dict[str, float]:
    seconds, _, out = timed([sys.executable, __file__, "--ours", str(work), str(data), str(work / "ours-out.csv")])
    doc = json.loads(out.strip().splitlines()[-1])
    return {**doc, "inner_seconds": doc["seconds"], "seconds": seconds}


def run_mlflow(work: Path, data: Path) -> dict[str, float]:
    mlflow = [sys.executable, "-m", "mlflow"]
    seconds, rss, _ = timed([*mlflow, "models", "predict", "-m", str(work / "mlflow-model"), "-i", str(data),
                             "-o", str(work / "mlflow-out.json"), "-t", "csv", "--env-manager", "local"])
    return {"seconds": seconds, "rss_mb": rss}


def check_equal(work: Path) -> bool:
    import pandas as pd

    ours_out = pd.read_csv(work / "ours-out.csv")["prediction"].tolist()
    theirs = json.loads((work / "mlflow-out.json").read_text())
    theirs = theirs["predictions"] if isinstance(theirs, dict) else theirs
    return ours_out == [int(p) for p in theirs]


def main() -> None:
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
        setup(work)
        data = work / "in.csv"
        make_csv(data, args.rows)
        print(f"{args.rows:,} rows, {data.stat().st_size / 1e6:.0f} MB CSV; {os.cpu_count()} CPUs")
        mine: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for i in range(args.repeat):  # interleaved rounds
            mine.append(run_ours(work, data))
            theirs.append(run_mlflow(work, data))
            print(f"round {i + 1}: modelcd {mine[-1]['seconds']:.2f} s (reader {mine[-1]['rss_self_mb']:.0f} MB, "
                  f"worker {mine[-1]['rss_worker_mb']:.0f} MB); mlflow {theirs[-1]['seconds']:.2f} s "
                  f"({theirs[-1]['rss_mb']:.0f} MB)")
        print(f"predictions equal on every row: {check_equal(work)}")
        ours_s = statistics.median(r["seconds"] for r in mine)
        mlflow_s = statistics.median(r["seconds"] for r in theirs)
        print("\n| command | rows | median s | rows/s | peak RSS MB |\n|---|---|---|---|---|")
        print(f"| modelcd `score_dataset` | {args.rows:,} | {ours_s:.2f} | {args.rows / ours_s:,.0f} | "
              f"{max(r['rss_self_mb'] for r in mine):.0f} (reader) / {max(r['rss_worker_mb'] for r in mine):.0f} "
              "(worker) |")
        inner_s = statistics.median(r["inner_seconds"] for r in mine)
        print(f"| modelcd, `score_dataset`'s own time (a running service's batch run) | {args.rows:,} | {inner_s:.2f} "
              f"| {args.rows / inner_s:,.0f} | (same processes) |")
        print(f"| `mlflow models predict` | {args.rows:,} | {mlflow_s:.2f} | {args.rows / mlflow_s:,.0f} | "
              f"{max(r['rss_mb'] for r in theirs):.0f} |")
        print(f"\nmodelcd / mlflow rows/s: {mlflow_s / ours_s:.1f}x as a fresh process, {mlflow_s / inner_s:.1f}x "
              "inside a running service")
        if args.big:
            (work / "ours-out.csv").unlink(missing_ok=True)
            (work / "mlflow-out.json").unlink(missing_ok=True)
            data.unlink()
            make_csv(data, args.big)
            big = run_ours(work, data)
            print(f"| modelcd `score_dataset` | {args.big:,} | {big['seconds']:.2f} | {args.big / big['seconds']:,.0f} "
                  f"| {big['rss_self_mb']:.0f} (reader) / {big['rss_worker_mb']:.0f} (worker) |")
            print(f"| modelcd, `score_dataset`'s own time | {args.big:,} | {big['inner_seconds']:.2f} | "
                  f"{args.big / big['inner_seconds']:,.0f} | (same processes) |")


if __name__ == "__main__":
    main()
