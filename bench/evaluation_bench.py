"""Evaluation jobs (issue 13): the same labelled CSV evaluated by modelcd's ``evaluate_dataset``
(the version's bundle, the batch worker, metrics folded chunk by chunk), scored by a plain batch
run (``score_dataset``, the label as a key column: the same rows through the same engine, no
metrics) and evaluated one shot in memory (pandas ``read_csv`` + the model's ``predict`` +
``sklearn.metrics``), side by side in one run.

    python bench/evaluation_bench.py [--rows 1000000] [--big 5000000] [--repeat 3]

Each measured run is a fresh process; its wall time covers everything (start, model load,
reading, scoring, metrics). Peak RSS: the process and, for modelcd, its scoring worker apart
(``getrusage``). The bundle's environment is built before the timed runs. The model is the
quickstart's LogisticRegression on iris; the CSV holds 4 uniform random float columns and a
label 0/1/2. The metrics of the three must agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("batch_bench", ROOT / "bench" / "batch_bench.py")
assert _spec is not None and _spec.loader is not None
batch_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_bench)
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def make_csv(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    with path.open("w") as f:
        f.write(",".join([*COLUMNS, "species"]) + "\n")
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            frame = pd.DataFrame(rng.uniform(0.1, 8.0, size=(n, 4)).round(3))
            frame["species"] = rng.integers(0, 3, n)
            frame.to_csv(f, header=False, index=False)


def _context(work: Path) -> object:
    from modelcd.config import load_settings
    from modelcd.context import build_context

    return build_context(load_settings(environ={"MODELCD_HOME": str(work / "home"), "MODELCD_TOKEN": "b" * 24}))


def _rss() -> dict[str, float]:
    return {"rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def evaluate(work: Path, data: Path) -> None:
    from modelcd.batch.evaluation import evaluate_dataset

    started = time.monotonic()
    result = evaluate_dataset(_context(work), model="iris", version=1, data_uri=str(data), label="species",
                              metrics=None, fmt=None, log=lambda _line: None, cancel=threading.Event())
    print(json.dumps({"seconds": time.monotonic() - started, "rows": result["rows"], "metrics": result["metrics"],
                      **_rss()}))


def batch(work: Path, data: Path) -> None:
    from modelcd.batch.scoring import score_dataset

    started = time.monotonic()
    result = score_dataset(_context(work), model="iris", version=1, input_uri=str(data),
                           output_uri=str(work / "scored.csv"), fmt=None, keys=("species",), max_errors=None,
                           log=lambda _line: None, cancel=threading.Event())
    print(json.dumps({"seconds": time.monotonic() - started, "rows": result.rows_scored, **_rss()}))


def one_shot(work: Path, data: Path) -> None:
    import joblib
    import pandas as pd
    from sklearn import metrics as sk

    started = time.monotonic()
    frame = pd.read_csv(data)
    predicted = joblib.load(work / "model" / "model.joblib").predict(frame[COLUMNS].to_numpy())
    truth = frame["species"].to_numpy()
    values = {"accuracy": sk.accuracy_score(truth, predicted)}
    for name, fn in (("f1", sk.f1_score), ("precision", sk.precision_score), ("recall", sk.recall_score)):
        values[name] = fn(truth, predicted, average="macro", zero_division=0)
    sk.confusion_matrix(truth, predicted)
    print(json.dumps({"seconds": time.monotonic() - started, "rows": len(frame), "metrics": values, **_rss()}))


MODES = {"evaluate": evaluate, "batch": batch, "one-shot": one_shot}


def run(mode: str, work: Path, data: Path) -> dict[str, float]:
    seconds, rss, out = batch_bench.timed([sys.executable, __file__, "--mode", mode, str(work), str(data)])
    doc = json.loads(out.strip().splitlines()[-1])
    return {**doc, "inner_seconds": doc["seconds"], "seconds": seconds, "rss_tree_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=0, help="also evaluate this many rows (modelcd only)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        MODES[args.mode[0]](Path(args.mode[1]), Path(args.mode[2]))
        return
    with tempfile.TemporaryDirectory(prefix="evaluation-bench-") as tmp:
        work = Path(tmp)
        batch_bench.setup(work)
        data = work / "labelled.csv"
        make_csv(data, args.rows)
        print(f"{args.rows:,} labelled rows, {data.stat().st_size / 1e6:.0f} MB CSV; {os.cpu_count()} CPUs")
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for i in range(args.repeat):  # interleaved rounds
            for mode in MODES:
                runs[mode].append(run(mode, work, data))
            print(f"round {i + 1}: " + "; ".join(f"{m} {r[-1]['seconds']:.2f} s" for m, r in runs.items()))
        ours, theirs = runs["evaluate"][-1]["metrics"], runs["one-shot"][-1]["metrics"]
        same = all(abs(ours[k] - theirs[k]) < 1e-12 for k in theirs)
        print(f"metrics equal to sklearn's (1e-12): {same} ({', '.join(f'{k} {v:.4f}' for k, v in ours.items())})")
        print("\n| command | rows | median s (wall) | rows/s | peak RSS MB |\n|---|---|---|---|---|")
        names = {"evaluate": "modelcd `evaluate_dataset`", "batch": "modelcd `score_dataset` (no metrics)",
                 "one-shot": "pandas + predict + sklearn.metrics, in memory"}
        medians = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
        for mode, rs in runs.items():
            memory = (f"{max(r['rss_self_mb'] for r in rs):.0f} (reader) / {max(r['rss_worker_mb'] for r in rs):.0f} "
                      "(worker)" if mode != "one-shot" else f"{max(r['rss_self_mb'] for r in rs):.0f}")
            print(f"| {names[mode]} | {args.rows:,} | {medians[mode]:.2f} | {args.rows / medians[mode]:,.0f} | "
                  f"{memory} |")
        print(f"\nevaluate / batch run time: {medians['evaluate'] / medians['batch']:.2f}x; evaluate / one shot: "
              f"{medians['evaluate'] / medians['one-shot']:.2f}x")
        if args.big:
            data.unlink()
            make_csv(data, args.big)
            big = run("evaluate", work, data)
            print(f"| modelcd `evaluate_dataset` | {args.big:,} | {big['seconds']:.2f} | "
                  f"{args.big / big['seconds']:,.0f} | {big['rss_self_mb']:.0f} (reader) / "
                  f"{big['rss_worker_mb']:.0f} (worker) |")


if __name__ == "__main__":
    main()
