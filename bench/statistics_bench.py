"""Training statistics and drift (issue 11): 1 M rows x 20 numeric features, generated and
written to a CSV file and to Parquet files in a temporary folder, then

- compute statistics (``analysis.statistics.statistics_from_file``): seconds, and the peak
  memory of a fresh process doing only that (peak RSS, and how far it rose from the peak
  before the measured call: after imports, and for PSI after its inputs were made; the
  Python-heap peak from tracemalloc, which sees numpy's buffers; the peak of arrow's memory
  pool);
- reading alone (the same chunks, no statistics): what the file format costs;
- PSI of 100 k live rows against the statistics (``analysis.drift.input_psi``), the rows as a
  DataFrame and as a list of records.

Each measurement runs ``--repeat`` times, each in a new process; the table shows the median
and the range.

Usage: python bench/statistics_bench.py [--rows 1000000] [--features 20] [--repeat 3]
Prints a markdown table. Goal: statistics and PSI in <= 2 s, memory bounded (streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def generate(folder: Path, rows: int, features: int) -> dict[str, Path]:
    """The training data: feature i ~ Normal(i, 1 + i/10), 1 % missing in the odd features."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    columns = {}
    for i in range(features):
        x = rng.normal(i, 1 + i / 10, rows)
        if i % 2:
            x[rng.random(rows) < 0.01] = np.nan
        columns[f"f{i}"] = x
    table = pa.table(columns)
    files = {"csv": folder / "train.csv", "parquet": folder / "train.parquet",
             "parquet-1-group": folder / "train-one-group.parquet"}
    pc.write_csv(table, files["csv"])
    pq.write_table(table, files["parquet"], row_group_size=131_072)
    pq.write_table(table, files["parquet-1-group"], row_group_size=rows)
    live = {}
    for i in range(features):  # the first five shifted by half a standard deviation; as many missing
        x = rng.normal(i + (0.5 * (1 + i / 10) if i < 5 else 0.0), 1 + i / 10, 100_000)
        if i % 2:
            x[rng.random(x.size) < 0.01] = np.nan
        live[f"f{i}"] = x
    (folder / "live.json").write_text(json.dumps({k: [None if v != v else v for v in x.tolist()]
                                                  for k, x in live.items()}))
    return files


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss, which a child
    inherits from the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(kind: str, path: Path, folder: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import tracemalloc

    import pandas as pd
    import pyarrow as pa

    from modelcd.analysis.drift import input_psi
    from modelcd.analysis.statistics import DatasetStats, detect_format, read_chunks, statistics_from_file

    out: dict[str, Any] = {}
    if kind.startswith("psi"):  # the inputs first: the peaks below are the PSI's own
        stats = DatasetStats.from_dict(json.loads((folder / "train.parquet.stats.json").read_text()))
        live = pd.DataFrame(json.loads((folder / "live.json").read_text()))
        rows: Any = live if kind == "psi-frame" else live.to_dict("records")
    base_mb = _peak_rss_mb()
    tracemalloc.start()
    if kind == "stats":
        t0 = time.perf_counter()
        stats = statistics_from_file(path)
        out["seconds"] = time.perf_counter() - t0
        (folder / f"{path.name}.stats.json").write_text(json.dumps(stats.to_dict()))
    elif kind == "read":
        t0 = time.perf_counter()
        out["rows"] = sum(len(c) for c in read_chunks(path, detect_format(path)))
        out["seconds"] = time.perf_counter() - t0
    else:  # psi-frame | psi-records
        t0 = time.perf_counter()
        psi = input_psi(stats, rows)
        out["seconds"] = time.perf_counter() - t0
        out["psi_shifted"] = round(min(psi[f"f{i}"] for i in range(5)), 3)
        out["psi_same"] = round(max(v for k, v in psi.items() if int(k[1:]) >= 5), 4)
    out["tracemalloc_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
    out["arrow_pool_mb"] = pa.default_memory_pool().max_memory() / 1e6
    out["rss_mb"] = _peak_rss_mb()
    out["rss_over_imports_mb"] = out["rss_mb"] - base_mb
    return out


def _child(kind: str, path: Path, folder: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "service"),
                                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--measure", kind, str(path), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return fmt.format(med) + (f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, path, folder = args.measure
        print(json.dumps(measure(kind, Path(path), Path(folder))))
        return
    with tempfile.TemporaryDirectory(prefix="modelcd-stats-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        files = generate(folder, args.rows, args.features)
        sizes = {k: p.stat().st_size / 1e6 for k, p in files.items()}
        print(f"generated {args.rows} rows x {args.features} features in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items()), file=sys.stderr)
        plan = [("compute statistics", "stats", "parquet"), ("compute statistics", "stats", "parquet-1-group"),
                ("compute statistics", "stats", "csv"), ("read only (no statistics)", "read", "parquet"),
                ("read only (no statistics)", "read", "csv"),
                ("PSI of 100 k live rows (DataFrame)", "psi-frame", "parquet"),
                ("PSI of 100 k live rows (list of records)", "psi-records", "parquet")]
        print("| what | input | seconds | peak RSS MB (rise in the call) | tracemalloc peak MB | arrow pool peak MB |")
        print("|---|---|---|---|---|---|")
        notes = []
        for label, kind, fmt in plan:
            runs = [_child(kind, files[fmt], folder) for _ in range(args.repeat)]
            where = f"{fmt} ({sizes[fmt]:.0f} MB)" if kind in ("stats", "read") else "stats of the Parquet file"
            cells = [_cell([r["seconds"] for r in runs])]
            cells.append(f"{_cell([r['rss_mb'] for r in runs], '{:.0f}')} "
                         f"({_cell([r['rss_over_imports_mb'] for r in runs], '{:.0f}')})")
            cells += [_cell([r[k] for r in runs], "{:.0f}") for k in ("tracemalloc_mb", "arrow_pool_mb")]
            print(f"| {label} | {where} | " + " | ".join(cells) + " |")
            if "psi_shifted" in runs[0]:
                notes.append(f"{label}: PSI of the five features shifted by 0.5 sd >= {runs[0]['psi_shifted']}, "
                             f"of the unshifted ones <= {runs[0]['psi_same']}")
        for note in notes:
            print(f"\n{note}")


if __name__ == "__main__":
    main()
