"""MLflow registration → production: a real MLflow tracking server (SQLite, loopback) with a
webhook to a real `modelcd serve`; each version is registered through MLflow's own client
(`mlflow.sklearn.log_model(..., registered_model_name=...)`) and timed until modelcd's
endpoint URI answers with it. The first version (cold environment) is reported apart.
``--flavor pyfunc`` registers a custom ``mlflow.pyfunc.PythonModel`` instead (its
``load_context`` reads an artifact), served through the pyfunc flavor in its own
environment (mlflow-skinny and the model's requirements).

Usage (from the repo root): python bench/mlflow_bench.py [--versions 5] [--flavor sklearn|pyfunc]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelcd.client import Client
from modelcd.config import load_settings
from release_bench import OPEN_POLICY, stop_service  # bench/ is on sys.path when run as a script
from tests.sources.mlflow_fixture import MlflowServer, free_port, start_mlflow_server

SKLEARN_BODY = {"data": [[5.1, 3.5, 1.4, 0.2]]}
PYFUNC_BODY = {"dataframe_split": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}}


def wait_serving(client: Client, name: str, version: int, timeout_s: float = 600,
                 body: dict[str, Any] = SKLEARN_BODY) -> float:
    deadline = time.monotonic() + timeout_s
    session = requests.Session()
    while time.monotonic() < deadline:
        try:
            ep = client.get(f"/api/v1/endpoints/{name}/production")
            r = session.post(ep["scoring_uri"], json=body, timeout=5)
            if r.status_code == 200 and r.headers.get("X-Modelcd-Version") == str(version):
                return time.monotonic()
        except Exception:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{name} v{version} never served")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--flavor", choices=("sklearn", "pyfunc"), default="sklearn",
                    help="what each version is: mlflow.sklearn.log_model or a custom pyfunc PythonModel")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-mlflow-bench-"))
    server = start_mlflow_server(tmp / "mlflow")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")},
           "MODELCD_HOME": str(tmp / "home"), "MODELCD_PORT": str(port), "MODELCD_ROUTER_PORT": str(free_port()),
           "MODELCD_URL": f"http://127.0.0.1:{port}", "MODELCD_TOKEN": "bench-token-0123456789abcdef"}
    subprocess.run([sys.executable, "-m", "modelcd", "sources", "connect", "mlflow", "--tracking-uri",
                    server.tracking_uri], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], env=env, start_new_session=True,
                            stdout=open(tmp / "serve.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    client = Client(load_settings(environ=env))
    try:
        while not client.healthy():
            time.sleep(0.1)
        client.request("PUT", "/api/v1/policies", data=OPEN_POLICY.encode(),
                       headers={"Content-Type": "application/yaml"})
        time.sleep(2)  # MLflow's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1 in the fixture)
        times = []
        register, body = register_pyfunc(tmp) if args.flavor == "pyfunc" else (None, SKLEARN_BODY)
        for i in range(1, args.versions + 2):
            t0 = time.monotonic()
            if register is not None:
                register(server, "bench-mlflow", i)
            else:
                server.register_sklearn("bench-mlflow", C=1.0 / i)
            t_registered = time.monotonic()
            times.append((t_registered - t0, wait_serving(client, "bench-mlflow", i, body=body) - t_registered))
        cold, warm = times[0], times[1:]
        print("| measurement | n | median | min | max |")
        print("|---|---|---|---|---|")
        print(f"| MLflow log_model + register, {args.flavor} (client side) | {len(times)} | "
              f"{statistics.median(t[0] for t in times):.2f} s | {min(t[0] for t in times):.2f} s | "
              f"{max(t[0] for t in times):.2f} s |")
        print(f"| registered in MLflow → modelcd endpoint serves it (warm env) | {len(warm)} | "
              f"{statistics.median(t[1] for t in warm):.2f} s | {min(t[1] for t in warm):.2f} s | "
              f"{max(t[1] for t in warm):.2f} s |")
        print(f"| same, first version (cold environment) | 1 | {cold[1]:.2f} s | | |")
    finally:
        stop_service(proc, env)
        server.stop()


def register_pyfunc(tmp: Path) -> tuple[Callable[[MlflowServer, str, int], str], dict[str, Any]]:
    """A registration of the custom pyfunc test model (``ScaledSum``, its weights an artifact
    that changes with each version) and the body to score it with."""
    import pandas

    from tests.sources.pyfunc_models import ScaledSum

    def register(server: MlflowServer, name: str, i: int) -> str:
        weights = tmp / f"weights-{i}.json"
        weights.write_text(json.dumps({"scale": float(i), "offset": 0.0}))
        example = pandas.DataFrame({"x": [1.0, 2.0], "y": [0.5, 0.0]})
        return server.register_pyfunc(name, ScaledSum(), input_example=example, artifacts={"weights": str(weights)})

    return register, PYFUNC_BODY


if __name__ == "__main__":
    main()
