"""Fixtures for the scoring runtime: small models trained here, and the real server as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.targets.process import free_port

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
KEY = "scoring-key-7f3a9c1e5b"
START_TIMEOUT = 60.0

CUSTOM_SCRIPT = textwrap.dedent(
    """
    import json
    import os

    import joblib

    model = None
    init_calls = 0


    def init():
        global model, init_calls
        init_calls += 1
        model = joblib.load(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model", "model.pkl"))


    def run(raw_data):
        if raw_data.startswith("text:"):
            return {"echo": raw_data}
        body = json.loads(raw_data)
        if body.get("boom"):
            raise ValueError("boom: the model refused")
        if body.get("unserialisable"):
            return {"value": object()}
        return {
            "predictions": model.predict(body["data"]).tolist(),
            "model_dir": os.environ["AZUREML_MODEL_DIR"],
            "init_calls": init_calls,
            "pid": os.getpid(),
            "key_visible": "MODELCD_SCORING_KEY" in os.environ,
            "raw_type": type(raw_data).__name__,
        }
    """
)




@dataclass
class Iris:
    """Training data and a fitted reference model."""

    x: Any
    y: Any
    rows: list[list[float]]


@pytest.fixture(scope="session")
def iris() -> Iris:
    """scikit-learn's bundled iris data."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return Iris(x, y, x[[0, 60, 120]].tolist())


@pytest.fixture(scope="session")
def sklearn_model_dir(tmp_path_factory: pytest.TempPathFactory, iris: Iris) -> Path:
    """A LogisticRegression fit on a numpy array (no feature names), saved with joblib."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("sklearn-model")
    joblib.dump(LogisticRegression(max_iter=500).fit(iris.x, iris.y), folder / "model.pkl")
    return folder


@pytest.fixture(scope="session")
def frame_model_dir(tmp_path_factory: pytest.TempPathFactory, iris: Iris) -> Path:
    """A pipeline fit on a DataFrame whose ColumnTransformer selects columns by name."""
    import joblib
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.DataFrame(iris.x, columns=COLUMNS)
    select = ColumnTransformer([("scale", StandardScaler(), ["petal_length", "petal_width", "sepal_length"])])
    model = make_pipeline(select, LogisticRegression(max_iter=500)).fit(frame, iris.y)
    folder = tmp_path_factory.mktemp("frame-model")
    joblib.dump(model, folder / "model.pkl")
    return folder


@pytest.fixture(scope="session")
def custom_model_dir(tmp_path_factory: pytest.TempPathFactory, iris: Iris) -> Path:
    """An Azure ML style model: ``score.py`` with init()/run() and the estimator under ``model/``."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("custom-model")
    (folder / "model").mkdir()
    joblib.dump(LogisticRegression(max_iter=500).fit(iris.x, iris.y), folder / "model" / "model.pkl")
    (folder / "score.py").write_text(CUSTOM_SCRIPT)
    return folder


@dataclass
class ScoringProcess:
    """A running ``python -m modelcd.scoring`` and what it printed."""

    process: subprocess.Popen[str]
    port: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything printed so far, stdout then stderr."""
        return "".join(self.stdout) + "".join(self.stderr)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def _pump(stream: Any, sink: list[str]) -> None:
    """Copy a pipe into a list of lines until EOF."""
    for line in iter(stream.readline, ""):
        sink.append(line)
    stream.close()


def launch(
    tmp_path: Path,
    model_dir: Path,
    config: dict[str, Any],
    workers: int = 2,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> ScoringProcess:
    """Start the server on a free port; with ``wait``, return once the ready line is printed."""
    config_path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    command = [sys.executable, "-m", "modelcd.scoring", "--model-dir", str(model_dir), "--config", str(config_path)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    child_env = {k: v for k, v in os.environ.items() if k != "MODELCD_SCORING_KEY"}
    child_env.update(env or {})
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env, cwd=tmp_path
    )
    server = ScoringProcess(process, port)
    for stream, sink in ((process.stdout, server.stdout), (process.stderr, server.stderr)):
        threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
    if wait:
        deadline = time.monotonic() + START_TIMEOUT
        while not any("listening on" in line for line in server.stdout):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"scoring server did not start:\n{server.output()}")
            time.sleep(0.05)
        _wait_healthy(server, deadline)
    return server


def _wait_healthy(server: ScoringProcess, deadline: float) -> None:
    """Poll /healthz until 200 (bounded by ``deadline``)."""
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"scoring server never healthy:\n{server.output()}")


Launcher = Callable[..., ScoringProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Launcher]:
    """Start servers for one test and stop them all afterwards."""
    started: list[ScoringProcess] = []

    def start(model_dir: Path, config: dict[str, Any], **kwargs: Any) -> ScoringProcess:
        server = launch(tmp_path, model_dir, config, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def sklearn_config(iris: Iris, **extra: Any) -> dict[str, Any]:
    """The scoring config of the iris model."""
    return {
        "model": "iris",
        "version": 3,
        "flavor": "sklearn",
        "model_file": "model.pkl",
        "sample": {"data": iris.rows},
        "expected": [0, 1, 2],
        **extra,
    }


@pytest.fixture(scope="module")
def sklearn_server(
    tmp_path_factory: pytest.TempPathFactory, sklearn_model_dir: Path, iris: Iris
) -> Iterator[ScoringProcess]:
    """One server for the module: the numpy-fit iris model, 2 workers, no key."""
    server = launch(tmp_path_factory.mktemp("sklearn-server"), sklearn_model_dir, sklearn_config(iris))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frame_server(
    tmp_path_factory: pytest.TempPathFactory, frame_model_dir: Path, iris: Iris
) -> Iterator[ScoringProcess]:
    """The DataFrame-fit pipeline, 1 worker."""
    config = sklearn_config(iris, sample={"dataframe_split": {"columns": COLUMNS, "data": iris.rows}})
    server = launch(tmp_path_factory.mktemp("frame-server"), frame_model_dir, config, workers=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def custom_server(
    tmp_path_factory: pytest.TempPathFactory, custom_model_dir: Path, iris: Iris
) -> Iterator[ScoringProcess]:
    """The custom entry-script model with a key, 2 workers."""
    config = {
        "model": "custom-iris",
        "version": "7",
        "flavor": "custom",
        "entry_script": "score.py",
        "sample": {"data": iris.rows},
        "expected": {"predictions": [0, 1, 2]},
    }
    server = launch(
        tmp_path_factory.mktemp("custom-server"), custom_model_dir, config, env={"MODELCD_SCORING_KEY": KEY}
    )
    yield server
    server.stop()
