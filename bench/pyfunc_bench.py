"""Benchmark modelcd's scoring server against ``mlflow models serve`` on the same MLflow
pyfunc model (issue 10): a custom ``mlflow.pyfunc.PythonModel`` whose ``load_context``
loads a scikit-learn LogisticRegression (fit on the iris DataFrame) from an artifact, saved
with ``mlflow.pyfunc.save_model`` (signature inferred from the input example). modelcd serves
it with its ``pyfunc`` flavor (``mlflow.pyfunc.load_model``, MLflow's request parsing and
signature enforcement), MLflow with ``mlflow models serve --env-manager local``: the same
folder, the same interpreter and libraries, 2 workers each. Same wrk matrix and table as
``scoring_bench.py``; each cell the median over ``--repeat`` interleaved runs.

    pip install -e '.[bench]' && apt-get install -y wrk
    python bench/pyfunc_bench.py --duration 10 --repeat 3

Loopback only; every run is bounded by ``--duration`` (wrk) and fixed start-up timeouts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelcd.targets.process import free_port
from scoring_bench import (  # bench/ is on sys.path when run as a script
    COLUMNS,
    SCENARIOS,
    ModelFiles,
    Server,
    mlflow_server,
    run_matrix,
    start,
    stop,
    table,
    wrk_command,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import mlflow.pyfunc


class IrisClassifier(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """A custom pyfunc model: the estimator is an artifact read in ``load_context``."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        import joblib

        self.model = joblib.load(context.artifacts["estimator"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.model.predict(model_input)


def train(workdir: Path, batches: Sequence[int] = (1, 100)) -> ModelFiles:
    """Fit the estimator, save the pyfunc model once (both servers read that folder) and write
    the request bodies."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    frame, target = load_iris(return_X_y=True, as_frame=True)
    frame.columns = list(COLUMNS)
    estimator = LogisticRegression(max_iter=1000).fit(frame, target)
    joblib.dump(estimator, workdir / "estimator.joblib")
    model_dir = workdir / "pyfunc-model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(str(model_dir), python_model=IrisClassifier(),
                                 artifacts={"estimator": str(workdir / "estimator.joblib")},
                                 input_example=frame.head(3), pip_requirements=["mlflow", "scikit-learn", "pandas"])
    rows = frame.to_numpy().tolist()
    bodies = {}
    for batch in batches:
        body = {"dataframe_split": {"columns": list(COLUMNS), "data": [rows[i % len(rows)] for i in range(batch)]}}
        bodies[batch] = workdir / f"body-{batch}.json"
        bodies[batch].write_text(json.dumps(body))
    config = workdir / "config.json"
    config.write_text(json.dumps({
        "model": "iris-pyfunc", "version": 1, "flavor": "pyfunc", "model_file": "MLmodel",
        "sample": json.loads(bodies[batches[0]].read_text()),
        "expected": estimator.predict(frame.head(batches[0])).tolist()}))
    return ModelFiles(model_dir, config, model_dir, bodies)


def modelcd_server(files: ModelFiles, workers: int = 2) -> Server:
    """modelcd's scoring server on the pyfunc model, as the process target starts it."""
    port = free_port()
    command = [sys.executable, "-m", "modelcd.scoring", "--model-dir", str(files.model_dir)]
    command += ["--config", str(files.config), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    base = f"http://127.0.0.1:{port}"
    return Server("modelcd (pyfunc)", command, f"{base}/score", f"{base}/healthz")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pyfunc comparison and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the table shows medians (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each server (default 2)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pyfunc-bench-"))
    servers: list[Server] = []
    results: dict[tuple[str, int, int], Any] = {}
    try:
        files = train(workdir)
        servers = [modelcd_server(files, args.workers), mlflow_server(files, args.workers)]
        servers[1].name = "mlflow models serve"
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
        ours, theirs = results[(servers[0].name, batch, connections)], results[(servers[1].name, batch, connections)]
        print(f"- batch {batch}, {connections} connections: modelcd/mlflow = {ours.rps / theirs.rps:.1f}x requests/s, "
              f"{theirs.cpu_ms / ours.cpu_ms:.1f}x less CPU per request")
    print()
    print("Commands:")
    for server in servers:
        print(f"- {server.name}: `{' '.join(server.command)}`")
    print(f"- load: `BODY_FILE=body-<batch>.json {' '.join(wrk_command('<url>', 16, args.duration))}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
