"""A real MLflow tracking server for tests: ``mlflow server`` as a subprocess on loopback,
with a SQLite backend store, served artifacts and webhooks allowed to reach 127.0.0.1.

Use the ``mlflow_server`` fixture (import it into a test module:
``from tests.sources.mlflow_fixture import mlflow_server_fixture  # noqa: F401``). It is
session-scoped and shared: every module that imports it gets the same server, started on
first use and stopped (its whole process group) when the session ends. Give each test its
own model names (``server.unique_name("iris")``) because versions and webhooks persist for
the session. ``start_mlflow_server``/``MlflowServer.stop`` start and stop a private one.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.targets.process import free_port

STARTUP_TIMEOUT_S = 90.0
WEBHOOK_CACHE_TTL_S = 1  # MLFLOW_WEBHOOK_CACHE_TTL: a new webhook applies after about this long
EXPERIMENT = "modelcd-tests"




def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the server process: webhooks may call http://127.0.0.1, their
    secrets are encrypted with a fixed key, and the webhook cache is short."""
    env = dict(os.environ if base is None else base)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    env.update({
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": _fernet_key(),
        "MLFLOW_WEBHOOK_CACHE_TTL": str(WEBHOOK_CACHE_TTL_S),
        "MLFLOW_WEBHOOK_REQUEST_TIMEOUT": "5",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class MlflowServer:
    """A running ``mlflow server`` subprocess (its own process group) on 127.0.0.1."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)
    _experiment_id: str | None = field(default=None, repr=False)

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until ``/health`` answers 200; RuntimeError with the log tail if the
        server exits or does not come up in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.tracking_uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """Terminate the server's process group (then kill it); idempotent."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def unique_name(self, prefix: str = "model") -> str:
        """A model name no other test on this server uses."""
        return f"{prefix}-{next(self._names)}-{uuid.uuid4().hex[:6]}"

    def client(self) -> Any:
        """An ``mlflow.MlflowClient`` for this server."""
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client = self.client()
            found = client.get_experiment_by_name(EXPERIMENT)
            self._experiment_id = found.experiment_id if found else client.create_experiment(EXPERIMENT)
        return self._experiment_id

    def register_sklearn(self, name: str, C: float = 1.0, tags: dict[str, str] | None = None, *,
                         serialization_format: str = "cloudpickle",
                         pip_requirements: Sequence[str] | None = None,
                         description: str | None = None,
                         skops_trusted_types: Sequence[str] | None = None) -> str:
        """Train a LogisticRegression on iris and log it through this server with
        ``mlflow.sklearn.log_model`` (input example: 3 rows as a DataFrame), registered as
        ``name``; returns the new version. ``tags`` become version tags. Requirements are
        pinned (scikit-learn, numpy, cloudpickle) unless given: MLflow's inference of them
        costs about 5 s. ``serialization_format="skops"`` is MLflow 3's own default;
        ``skops_trusted_types`` (e.g. ``["datetime.date"]``) adds an attribute of that type."""
        import mlflow
        import mlflow.sklearn
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        X, y = _iris()
        model = _fit(X, y, C)
        if skops_trusted_types:  # give the estimator an attribute of a type skops does not trust by default
            import datetime

            model.trained_on = datetime.date(2026, 11, 1)
        reqs = list(pip_requirements) if pip_requirements is not None else default_requirements(serialization_format)
        with _MLFLOW_LOCK, _use_tracking_uri(self.tracking_uri), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow warns about pickle formats, type hints, pip pins...
            with mlflow.start_run(experiment_id=self._experiment()):
                info = mlflow.sklearn.log_model(model, name="model", input_example=X.head(3),
                                                registered_model_name=name, pip_requirements=reqs,
                                                serialization_format=serialization_format,
                                                skops_trusted_types=list(skops_trusted_types or []) or None)
        version = str(info.registered_model_version)
        client = self.client()
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, key, value)
        if description is not None:
            client.update_model_version(name, version, description=description)
        return version


    def _log(self, name: str, log_model: Any, tags: dict[str, str] | None, **kwargs: Any) -> str:
        """Log a model in a new run through this server, registered as ``name``; the version."""
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _MLFLOW_LOCK, _use_tracking_uri(self.tracking_uri), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mlflow.start_run(experiment_id=self._experiment()):
                info = log_model(name="model", registered_model_name=name, **kwargs)
        version = str(info.registered_model_version)
        client = self.client()
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, key, value)
        return version

    def register_pyfunc(self, name: str, python_model: Any, *, input_example: Any, tags: dict[str, str] | None = None,
                        artifacts: dict[str, str] | None = None, signature: Any = None,
                        pip_requirements: Sequence[str] | None = None) -> str:
        """Log a custom ``mlflow.pyfunc.PythonModel`` (pickled by value) with
        ``mlflow.pyfunc.log_model``, registered as ``name``; returns the version. The signature
        is inferred from ``input_example`` unless given; requirements default to
        ``pyfunc_requirements()`` (the same for every such model, so one environment serves them)."""
        import mlflow.pyfunc

        from tests.sources.pyfunc_models import register_by_value

        register_by_value()
        reqs = list(pip_requirements) if pip_requirements is not None else pyfunc_requirements()
        return self._log(name, mlflow.pyfunc.log_model, tags, python_model=python_model, artifacts=artifacts,
                         input_example=input_example, signature=signature, pip_requirements=reqs)

    def register_pyfunc_folder(self, name: str, python_model: Any, *, input_example: Any, python: str,
                               artifacts: dict[str, str] | None = None) -> str:
        """Save a custom PythonModel with ``mlflow.pyfunc.save_model``, claim in its files that
        it was saved with Python ``python``, log the folder as run artifacts and register it
        (``runs:/<run>/model``) as ``name``; returns the version."""
        import tempfile

        import mlflow
        import mlflow.pyfunc
        import yaml
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from tests.sources.pyfunc_models import register_by_value

        register_by_value()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = Path(tmp) / "model"
            mlflow.pyfunc.save_model(folder, python_model=python_model, artifacts=artifacts,
                                     input_example=input_example, pip_requirements=pyfunc_requirements())
            env = yaml.safe_load((folder / "python_env.yaml").read_text())
            (folder / "python_env.yaml").write_text(yaml.safe_dump({**env, "python": python}))
            mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
            mlmodel["flavors"]["python_function"]["python_version"] = python
            (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
            with _MLFLOW_LOCK, _use_tracking_uri(self.tracking_uri):
                with mlflow.start_run(experiment_id=self._experiment()) as run:
                    mlflow.log_artifacts(str(folder), "model")
                registered = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
        return str(registered.version)

    def register_lightgbm(self, name: str, tags: dict[str, str] | None = None) -> tuple[str, Any, Any]:
        """Train a small LightGBM regressor (Booster) on the iris measurements and log it with
        ``mlflow.lightgbm.log_model`` (input example: 3 rows), registered as ``name``; returns
        (version, the Booster, the example DataFrame)."""
        import lightgbm
        import mlflow.lightgbm

        X, _ = _iris()
        frame = X.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
        data = lightgbm.Dataset(frame.iloc[:, :3], label=frame["petal_width"])
        booster = lightgbm.train({"objective": "regression", "num_leaves": 7, "verbose": -1, "num_threads": 1},
                                 data, num_boost_round=20)
        example = frame.iloc[[0, 60, 120], :3]
        reqs = [*pyfunc_requirements(), f"lightgbm=={lightgbm.__version__}"]  # as MLflow would infer
        version = self._log(name, mlflow.lightgbm.log_model, tags, lgb_model=booster, input_example=example,
                            pip_requirements=reqs)
        return version, booster, example


_MLFLOW_LOCK = threading.Lock()  # the fluent API's tracking URI is process-global


def pyfunc_requirements() -> list[str]:
    """Pinned requirements of the custom pyfunc test models, as MLflow would infer them."""
    import cloudpickle
    import mlflow
    import numpy
    import pandas

    return [f"mlflow=={mlflow.__version__}", f"cloudpickle=={cloudpickle.__version__}",
            f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}"]


def default_requirements(serialization_format: str = "cloudpickle") -> list[str]:
    """Pinned pip requirements of the fixture's sklearn model, as MLflow would infer them."""
    import numpy
    import sklearn

    reqs = [f"scikit-learn=={sklearn.__version__}", f"numpy=={numpy.__version__}"]
    if serialization_format == "cloudpickle":
        import cloudpickle

        reqs.append(f"cloudpickle=={cloudpickle.__version__}")
    elif serialization_format == "skops":
        import skops

        reqs.append(f"skops=={skops.__version__}")
    return reqs


_IRIS: Any = None


def _iris() -> tuple[Any, Any]:
    global _IRIS
    if _IRIS is None:
        from sklearn.datasets import load_iris

        _IRIS = load_iris(return_X_y=True, as_frame=True)
    return _IRIS


def _fit(X: Any, y: Any, C: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=500).fit(X, y)


def start_mlflow_server(root: Path, *, port: int | None = None, wait: bool = True) -> MlflowServer:
    """Start ``mlflow server`` with its database and artifacts under ``root``; with
    ``wait`` False, call ``wait_ready()`` before using it (warm up meanwhile)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = root / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = MlflowServer(root=root, port=port, proc=proc, log_path=log_path)
    atexit.register(server.stop)
    if wait:
        server.wait_ready()
    return server


def _warm_up() -> None:
    """Import what ``register_sklearn`` needs while the server starts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow.sklearn  # noqa: F401

        _iris()


# One server per test session, shared by every module that imports the fixture.
_shared: MlflowServer | None = None
_shared_users = 0
_shared_lock = threading.Lock()


@pytest.fixture(name="mlflow_server", scope="session")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server for the session (see the module docstring)."""
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None or _shared.proc.poll() is not None:
            _shared = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), wait=False)
            _warm_up()
            _shared.wait_ready()
        _shared_users += 1
        server = _shared
    try:
        yield server
    finally:
        with _shared_lock:
            _shared_users -= 1
            if _shared_users == 0 and _shared is server:
                server.stop()
                _shared = None
