"""Any MLflow model reaches production through its ``python_function`` flavor (issue 10):
each model is logged and registered in a real MLflow tracking server, MLflow's webhook
delivers the registration, and a real ``modelcd serve`` builds the version's own environment
(its requirements with mlflow-skinny), smoke-tests it with the model's input example and
serves it through the router. One service and one MLflow server for the module: the custom
models share their requirements, so their environment is built once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas
import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, make_service
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture, pyfunc_requirements  # noqa: F401
from tests.sources.pyfunc_models import ScaledSum, Threshold

pytestmark = pytest.mark.slow

EXAMPLE = pandas.DataFrame({"x": [1.0, 2.0, 4.0], "y": [0.5, 0.25, 0.0]})
WEIGHTS = {"scale": 3.0, "offset": 1.0}


def shared_requirements() -> list[str]:
    """What the lightgbm model needs; the custom models are logged with the same list, so one
    environment (built once, by the first release) serves every model of the module."""
    import lightgbm

    return [*pyfunc_requirements(), f"lightgbm=={lightgbm.__version__}"]


def scaled(x: float, y: float) -> float:
    return x * WEIGHTS["scale"] + y + WEIGHTS["offset"]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Iterator[Service]:
    """One `modelcd serve` connected to the MLflow server's webhook."""
    service = make_service(tmp_path_factory.mktemp("pyfunc"))
    result = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri", mlflow_server.tracking_uri],
                                env=service.env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    service.start()
    try:
        yield service
    finally:
        service.stop()
        service.shutdown_data_plane()
        from modelcd.sources.mlflow_server import disconnect_webhook

        disconnect_webhook(mlflow_server.tracking_uri)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("artifacts") / "weights.json"
    path.write_text(json.dumps(WEIGHTS))
    return str(path)


def released(svc: Service, name: str, version: int = 1) -> dict[str, Any]:
    """The release of ``name`` v``version``, which must have succeeded."""
    rel = wait_release(svc, name, version)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    return rel


def wait_release(svc: Service, name: str, version: int, timeout_s: float = 600) -> dict[str, Any]:
    """Wait for the webhook's delivery to become a release, then for the release to end."""
    deadline = time.monotonic() + timeout_s
    while svc.client.find_release(name, version) is None:
        assert time.monotonic() < deadline, f"no release of {name} v{version}: {svc.api('GET', '/inbox').json()}"
        time.sleep(0.2)
    return svc.wait_release_for(name, version, timeout_s=timeout_s)


def score(svc: Service, name: str, body: dict[str, Any]) -> requests.Response:
    """POST ``body`` to the production endpoint of ``name`` through the router, with its key."""
    ep = svc.endpoint(name)
    return requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=body, timeout=30)


def test_custom_python_model_reads_its_artifact_and_is_smoke_checked(
        svc: Service, mlflow_server: MlflowServer, weights_file: str) -> None:
    name = mlflow_server.unique_name("scaled")
    expected = [scaled(x, y) for x, y in EXAMPLE.itertuples(index=False)]
    started = time.monotonic()
    mlflow_server.register_pyfunc(name, ScaledSum(), input_example=EXAMPLE, artifacts={"weights": weights_file},
                                  tags={"modelcd.expected": json.dumps(expected)},
                                  pip_requirements=shared_requirements())
    rel = wait_release(svc, name, 1)
    took = time.monotonic() - started
    log = svc.job_log(rel["id"])
    assert rel["phase"] == "succeeded", log
    print(f"\nfirst pyfunc release (environment built): {took:.1f} s")
    assert "predictions match the expected output" in log  # the tag's expected output was checked

    v = svc.api("GET", f"/models/{name}/versions/1").json()
    assert (v["flavor"], v["model_file"]) == ("pyfunc", "MLmodel")
    import mlflow

    assert f"mlflow-skinny=={mlflow.__version__}" in v["requirements"]
    assert not any(r.startswith("mlflow==") for r in v["requirements"])
    assert v["sample"] == {"dataframe_split": {"columns": ["x", "y"], "data": EXAMPLE.values.tolist()}}
    assert v["expected"] == expected and "modelcd.expected" not in v["tags"]

    r = score(svc, name, {"dataframe_records": [{"x": 10.0, "y": 2.0}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [scaled(10.0, 2.0)]}
    r = score(svc, name, {"inputs": {"x": [0.0, 1.0], "y": [1.0, 1.0]}})  # MLflow's other shapes too
    assert r.json() == {"predictions": [scaled(0.0, 1.0), scaled(1.0, 1.0)]}

    # a second version the build host cannot make an environment for: fails at build, v1 serves on
    version = mlflow_server.register_pyfunc_folder(name, ScaledSum(), input_example=EXAMPLE,
                                                   artifacts={"weights": weights_file}, python="3.5.10")
    assert version == "2"
    wait_release(svc, name, 2)
    log = svc.wait_failed_untouched(name, 2, "was saved with Python 3.5.10")
    assert "[build]" in log and "[deploy]" not in log
    assert score(svc, name, {"dataframe_records": [{"x": 1.0, "y": 1.0}]}).json() == {"predictions": [scaled(1, 1)]}


def test_lightgbm_model_serves_its_predictions(svc: Service, mlflow_server: MlflowServer) -> None:
    name = mlflow_server.unique_name("lgbm")
    started = time.monotonic()
    _, booster, example = mlflow_server.register_lightgbm(name)
    rel = released(svc, name)
    print(f"\nlightgbm release (environment reused): {time.monotonic() - started:.1f} s")
    v = svc.api("GET", f"/models/{name}/versions/1").json()
    assert v["flavor"] == "pyfunc" and any(r.startswith("lightgbm==") for r in v["requirements"])
    assert "reusing environment" in svc.job_log(rel["id"])

    rows = example.assign(sepal_length=example["sepal_length"] + 0.3)
    r = score(svc, name, {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}})
    assert r.status_code == 200, r.text
    want = booster.predict(rows).tolist()
    assert r.json()["predictions"] == pytest.approx(want, rel=1e-9)


def test_signature_is_enforced_with_a_400_naming_the_column(
        svc: Service, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("double", "amount"), ColSpec("long", "count"),
                       ColSpec("string", "label", required=False)]),
        outputs=Schema([ColSpec("long")]),
        params=ParamSchema([ParamSpec("threshold", "double", 10.0)]))
    example = pandas.DataFrame({"amount": [2.5, 8.0], "count": [2, 3], "label": ["a", "b"]})
    expected_file = tmp_path / "expected.json"
    expected_file.write_text(json.dumps([0, 1]))  # an expected.json among the model's artifacts
    name = mlflow_server.unique_name("threshold")
    mlflow_server.register_pyfunc(name, Threshold(), input_example=example, signature=signature,
                                  artifacts={"expected": str(expected_file)}, pip_requirements=shared_requirements())
    rel = released(svc, name)
    assert "predictions match the expected output" in svc.job_log(rel["id"])
    assert "reusing environment" in svc.job_log(rel["id"])
    assert svc.api("GET", f"/models/{name}/versions/1").json()["expected"] == [0, 1]

    ok = score(svc, name, {"dataframe_records": [{"amount": 6.0, "count": 2}, {"amount": 1.0, "count": 1}]})
    assert ok.status_code == 200 and ok.json() == {"predictions": [1, 0]}, ok.text
    with_params = score(svc, name, {"dataframe_records": [{"amount": 6.0, "count": 2}], "params": {"threshold": 20}})
    assert with_params.json() == {"predictions": [0]}

    for body, column, kind in (
            ({"dataframe_records": [{"amount": "lots", "count": 2}]}, "amount", "double"),
            ({"dataframe_split": {"columns": ["amount", "count"], "data": [[1.0, "two"]]}}, "count", "long"),
            ({"inputs": {"amount": [1.0], "count": ["x"]}}, "count", "long"),
            ({"dataframe_records": [{"amount": 1.0}]}, "count", "long")):
        bad = score(svc, name, body)
        assert bad.status_code == 400, (body, bad.text)
        error = bad.json()
        assert error["error"] == "invalid_input" and column in error["message"] and kind in error["message"], error
        assert "Traceback" not in bad.text and "File \"" not in bad.text
    bad_param = score(svc, name, {"dataframe_records": [{"amount": 1.0, "count": 1}], "params": {"threshold": "hi"}})
    assert bad_param.status_code == 400 and "threshold" in bad_param.json()["message"], bad_param.text
