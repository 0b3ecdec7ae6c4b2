"""Benchmark modelcd's scoring server against ``mlflow models serve`` on the same model.

Trains a small scikit-learn model (LogisticRegression on iris, fit on a DataFrame), saves it
as an MLflow model and as a modelcd model dir, starts both servers on 127.0.0.1 (2 workers
each) and loads each with wrk at batch 1 and 100, concurrency 1 and 16. Prints a markdown
table: requests/s, p50/p99 latency and the server process tree's CPU time per request (psutil,
before/after each run). Each cell is the median over ``--repeat`` runs.

    pip install -e '.[bench]'
    python bench/scoring_bench.py --duration 10 --repeat 3

Loopback only; every run is bounded by ``--duration`` (wrk) and fixed start-up timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from modelcd.targets.process import free_port

HERE = Path(__file__).resolve().parent
LUA = HERE / "scoring_post.lua"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
SCENARIOS = ((1, 1), (1, 16), (100, 1), (100, 16))  # (batch rows, concurrent connections)
COLUMNS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@dataclass
class Server:
    """A server under test: its name, command, process and URLs."""

    name: str
    command: list[str]
    score_url: str
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Sample:
    """One wrk run: throughput, latency percentiles (ms), CPU ms per request, failed requests."""

    rps: float
    p50: float
    p99: float
    cpu_ms: float
    requests: int
    errors: int


@dataclass
class ModelFiles:
    """The trained model in both layouts plus one request body per batch size."""

    model_dir: Path
    config: Path
    mlflow_dir: Path
    bodies: dict[int, Path]




def train(workdir: Path, batches: Sequence[int] = (1, 100)) -> ModelFiles:
    """Fit the model, save it for modelcd and for MLflow, and write the request bodies."""
    import joblib
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    frame, target = load_iris(return_X_y=True, as_frame=True)
    frame.columns = list(COLUMNS)
    model = LogisticRegression(max_iter=1000).fit(frame, target)

    model_dir = workdir / "modelcd-model"
    model_dir.mkdir()
    joblib.dump(model, model_dir / "model.pkl")
    rows = frame.to_numpy().tolist()
    bodies = {}
    for batch in batches:
        body = {"dataframe_split": {"columns": list(COLUMNS), "data": [rows[i % len(rows)] for i in range(batch)]}}
        bodies[batch] = workdir / f"body-{batch}.json"
        bodies[batch].write_text(json.dumps(body))
    sample = json.loads(bodies[batches[0]].read_text())
    config = workdir / "config.json"
    config.write_text(
        json.dumps(
            {
                "model": "iris",
                "version": 1,
                "flavor": "sklearn",
                "model_file": "model.pkl",
                "sample": sample,
                "expected": model.predict(frame.head(batches[0])).tolist(),
            }
        )
    )
    mlflow_dir = workdir / "mlflow-model"
    signature = infer_signature(frame.head(5), model.predict(frame.head(5)))
    mlflow.sklearn.save_model(model, str(mlflow_dir), signature=signature)
    return ModelFiles(model_dir, config, mlflow_dir, bodies)


def modelcd_server(files: ModelFiles, workers: int = 2) -> Server:
    """modelcd's scoring server as the launcher starts it."""
    port = free_port()
    command = [sys.executable, "-m", "modelcd.scoring", "--model-dir", str(files.model_dir)]
    command += ["--config", str(files.config), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    base = f"http://127.0.0.1:{port}"
    return Server("modelcd", command, f"{base}/score", f"{base}/healthz")


def mlflow_server(files: ModelFiles, workers: int = 2) -> Server:
    """``mlflow models serve`` with the local environment and the same number of workers."""
    port = free_port()
    mlflow = shutil.which("mlflow")
    command = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    command += ["models", "serve", "-m", str(files.mlflow_dir), "--env-manager", "local"]
    command += ["-p", str(port), "-h", "127.0.0.1", "-w", str(workers)]
    base = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    return Server("mlflow", command, f"{base}/invocations", f"{base}/ping", env)


def start(server: Server, logdir: Path, timeout: float = 120.0) -> None:
    """Start ``server`` and wait (bounded) until its health URL answers 200."""
    server.log = logdir / f"{server.name}.log"
    with open(server.log, "wb") as log:
        server.process = subprocess.Popen(
            server.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **server.env}
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {server.log}")
        try:
            with urllib.request.urlopen(server.health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"{server.name} not healthy after {timeout} s; see {server.log}")


def stop(server: Server, timeout: float = 20.0) -> None:
    """SIGTERM the server, then SIGKILL whatever of its process tree is left."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(5)


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


_DURATION = re.compile(r"([\d.]+)(us|ms|s|m)\b")
_SCALE_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    """A wrk duration such as ``812.00us`` in milliseconds."""
    match = _DURATION.search(text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _SCALE_MS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, float, float, int, int]:
    """requests/s, p50 ms, p99 ms, requests and failed requests from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        errors += sum(int(g) for g in sockets.groups())
    return rps, p50, p99, requests, errors


def wrk_command(url: str, connections: int, duration: float) -> list[str]:
    """The wrk command line for one run (the body comes from $BODY_FILE through the Lua script)."""
    threads = min(connections, 2)
    command = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency"]
    return [*command, "-s", str(LUA), url]


def measure(server: Server, body: Path, connections: int, duration: float) -> Sample:
    """Load ``server`` with wrk for ``duration`` seconds; CPU is the server tree's delta."""
    assert server.process is not None
    command = wrk_command(server.score_url, connections, duration)
    env = {**os.environ, "BODY_FILE": str(body)}
    before = tree_cpu(server.process.pid)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + 30, check=True)
    after = tree_cpu(server.process.pid)
    rps, p50, p99, requests, errors = parse_wrk(done.stdout)
    cpu_ms = (after - before) * 1000.0 / max(requests, 1)
    return Sample(rps, p50, p99, cpu_ms, requests, errors)


def check_answer(server: Server, body: Path) -> None:
    """Refuse to benchmark a server that does not answer the body with 200 and predictions."""
    request = urllib.request.Request(
        server.score_url, data=body.read_bytes(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    if "predictions" not in answer:
        raise RuntimeError(f"{server.name} answered {answer!r}")


def median_sample(samples: Sequence[Sample]) -> Sample:
    """Each metric's median over repeated runs."""
    return Sample(
        statistics.median(s.rps for s in samples),
        statistics.median(s.p50 for s in samples),
        statistics.median(s.p99 for s in samples),
        statistics.median(s.cpu_ms for s in samples),
        int(statistics.median(s.requests for s in samples)),
        sum(s.errors for s in samples),
    )


def run_matrix(
    servers: Sequence[Server],
    bodies: dict[int, Path],
    scenarios: Sequence[tuple[int, int]],
    duration: float,
    repeat: int,
    warmup: float = 2.0,
) -> dict[tuple[str, int, int], Sample]:
    """Measure every server in every scenario ``repeat`` times, interleaved; return medians."""
    for server in servers:
        check_answer(server, bodies[scenarios[0][0]])
        measure(server, bodies[scenarios[0][0]], 16, warmup)
    runs: dict[tuple[str, int, int], list[Sample]] = {}
    for _ in range(repeat):
        for server in servers:
            for batch, connections in scenarios:
                sample = measure(server, bodies[batch], connections, duration)
                runs.setdefault((server.name, batch, connections), []).append(sample)
                print(
                    f"  {server.name:<28} batch {batch:>3} c{connections:<2} {sample.rps:8.0f} req/s "
                    f"p50 {sample.p50:6.2f} ms p99 {sample.p99:6.2f} ms cpu {sample.cpu_ms:5.2f} ms/req",
                    file=sys.stderr,
                    flush=True,
                )
    return {key: median_sample(samples) for key, samples in runs.items()}


def table(results: dict[tuple[str, int, int], Sample]) -> str:
    """The results as a markdown table."""
    lines = [
        "| server | batch | connections | requests/s | p50 ms | p99 ms | server CPU ms/request | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, batch, connections), s in results.items():
        cells = (name, batch, connections, f"{s.rps:.0f}", f"{s.p50:.2f}", f"{s.p99:.2f}", f"{s.cpu_ms:.2f}", s.errors)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the modelcd vs MLflow comparison and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the table shows medians (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each server (default 2)")
    parser.add_argument("--mlflow-workers", type=int, default=None,
                        help="MLflow's workers if not --workers (1 = `mlflow models serve`'s own default)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="scoring-bench-"))
    servers: list[Server] = []
    try:
        files = train(workdir)
        servers = [modelcd_server(files, args.workers), mlflow_server(files, args.mlflow_workers or args.workers)]
        for server in servers:
            start(server, workdir)
        results = run_matrix(servers, files.bodies, SCENARIOS, args.duration, args.repeat)
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    print()
    for batch, connections in SCENARIOS:
        ours, theirs = results[("modelcd", batch, connections)], results[("mlflow", batch, connections)]
        print(f"- batch {batch}, {connections} connections: modelcd/mlflow = {ours.rps / theirs.rps:.1f}x requests/s")
    print()
    print("Commands:")
    for server in servers:
        print(f"- {server.name}: `{' '.join(server.command)}`")
    print(f"- load: `BODY_FILE=body-<batch>.json {' '.join(wrk_command('<url>', 16, args.duration))}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
