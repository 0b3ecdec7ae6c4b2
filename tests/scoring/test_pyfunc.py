"""The pyfunc flavor: any MLflow model, loaded with mlflow.pyfunc.load_model, its signature
enforced by MLflow and a misfit answered with a 400 naming the column and the expected type.
Models are saved here with mlflow.pyfunc.save_model (the test interpreter has MLflow)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas
import pytest
import requests

from modelcd.scoring.config import parse_config
from modelcd.scoring.flavors import LoadError, ModelError, load_scorer
from modelcd.scoring.protocol import BadInput
from tests.sources.pyfunc_models import ScaledSum, Threshold, register_by_value

from .conftest import Launcher


def save(folder: Path, model: Any, example: Any, **kwargs: Any) -> Path:
    """``mlflow.pyfunc.save_model`` into ``folder``, quietly."""
    import mlflow.pyfunc

    register_by_value()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(folder, python_model=model, input_example=example,
                                 pip_requirements=["mlflow", "pandas"], **kwargs)
    return folder


@pytest.fixture(scope="module")
def threshold_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Threshold with a signature: amount double, count long, label optional string; param threshold."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("double", "amount"), ColSpec("long", "count"),
                       ColSpec("string", "label", required=False)]),
        outputs=Schema([ColSpec("long")]), params=ParamSchema([ParamSpec("threshold", "double", 10.0)]))
    example = pandas.DataFrame({"amount": [2.5, 8.0], "count": [2, 3], "label": ["a", "b"]})
    return save(tmp_path_factory.mktemp("pyfunc") / "threshold", Threshold(), example, signature=signature)


@pytest.fixture(scope="module")
def scorer(threshold_dir: Path) -> Any:
    config = parse_config({"model": "t", "version": 1, "flavor": "pyfunc", "model_file": "MLmodel"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_scorer(config, str(threshold_dir))


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("doc", [
    {"dataframe_records": [{"amount": 6.0, "count": 2}, {"amount": 1.0, "count": 1}]},
    {"dataframe_split": {"columns": ["amount", "count"], "data": [[6.0, 2], [1.0, 1]]}},
    {"instances": [{"amount": 6.0, "count": 2}, {"amount": 1.0, "count": 1}]},
    {"inputs": {"amount": [6.0, 1.0], "count": [2, 1]}},
    {"data": [[6.0, 2, "x"], [1.0, 1, "y"]]},  # modelcd's rows get the signature's columns
    {"data": [{"amount": 6, "count": 2}, {"amount": 1, "count": 1}]},
])
def test_every_request_shape_scores(scorer: Any, doc: Any) -> None:
    assert scorer.score(body(doc)) == {"predictions": [1, 0]}


def test_params_reach_the_model(scorer: Any) -> None:
    doc = {"dataframe_records": [{"amount": 6.0, "count": 2}], "params": {"threshold": 20}}
    assert scorer.score(body(doc)) == {"predictions": [0]}


@pytest.mark.parametrize(("doc", "words"), [
    ({"dataframe_records": [{"amount": "lots", "count": 2}]}, ["column amount", "float64"]),
    ({"dataframe_split": {"columns": ["amount", "count"], "data": [[1.0, "two"]]}}, ["column count", "int64"]),
    ({"inputs": {"amount": [1.0], "count": ["x"]}}, ["column 'count' expects long, got 'x'"]),
    ({"instances": [{"amount": 1.0, "count": "one"}]}, ["column 'count' expects long, got 'one'"]),
    ({"dataframe_records": [{"amount": 1.0}]}, ["missing inputs ['count']"]),
    ({"dataframe_records": [{"amount": 1.0, "count": 1}], "params": {"threshold": "hi"}}, ["threshold"]),
    ({"data": [[1.0, 2]]}, ["each row must hold 3 values (amount, count, label)"]),
])
def test_a_request_that_does_not_fit_the_signature_is_a_400_naming_the_column(
        scorer: Any, doc: Any, words: list[str]) -> None:
    with pytest.raises(BadInput) as e:
        scorer.score(body(doc))
    assert e.value.status == 400 and e.value.error == "invalid_input"
    for word in words:
        assert word in e.value.message, e.value.message
    if "params" not in doc and "data" not in doc:
        assert "expected columns: amount (double), count (long), label (string, optional)" in e.value.message
    assert "Traceback" not in e.value.message and len(e.value.message) < 700


@pytest.mark.parametrize(("doc", "error"), [
    ([1, 2], "invalid_request"), ({"rows": []}, "invalid_request"),
    ({"inputs": [1], "instances": [1]}, "invalid_request"), ({"inputs": [1], "params": 3}, "invalid_request"),
])
def test_bodies_without_one_input_key_are_refused(scorer: Any, doc: Any, error: str) -> None:
    with pytest.raises(BadInput) as e:
        scorer.score(body(doc))
    assert e.value.error == error


def test_an_exception_in_the_model_is_a_model_error(tmp_path: Path) -> None:
    folder = save(tmp_path / "scaled", ScaledSum(), pandas.DataFrame({"x": [1.0], "y": [2.0]}),
                  artifacts={"weights": str(_weights(tmp_path, scale=2.0))})
    config = parse_config({"model": "s", "version": 1, "flavor": "pyfunc", "model_file": "MLmodel"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = load_scorer(config, str(folder))
    assert scorer.score(body({"dataframe_records": [{"x": 1.0, "y": 2.0}]})) == {"predictions": [4.0]}
    (folder / "artifacts" / "weights.json").unlink()  # load_context reads it: loading fails, naming it
    with pytest.raises(LoadError, match="mlflow.pyfunc.load_model.*weights.json"):
        load_scorer(config, str(folder))
    scorer._model._model_impl.python_model.scale = None  # the model's own code raises while scoring
    with pytest.raises(ModelError) as e:
        scorer.score(body({"dataframe_records": [{"x": 1.0, "y": 2.0}]}))
    assert e.value.exception == "TypeError"


def _weights(folder: Path, scale: float) -> Path:
    path = folder / "weights.json"
    path.write_text(json.dumps({"scale": scale, "offset": 0.0}))
    return path


def test_the_scoring_server_answers_pyfunc_misfits_with_400(start_server: Launcher, threshold_dir: Path) -> None:
    sample = {"dataframe_split": {"columns": ["amount", "count", "label"], "data": [[2.5, 2, "a"], [8.0, 3, "b"]]}}
    server = start_server(threshold_dir, {"model": "t", "version": 1, "flavor": "pyfunc", "model_file": "MLmodel",
                                          "sample": sample, "expected": [0, 1]}, workers=1)
    ok = requests.post(f"{server.url}/invocations", json=sample, timeout=30)
    assert ok.status_code == 200 and ok.json() == {"predictions": [0, 1]}
    bad = requests.post(f"{server.url}/score", json={"dataframe_records": [{"amount": "x", "count": 1}]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_input"
    assert "amount" in bad.json()["message"] and "Traceback" not in bad.text
    assert "Traceback" not in server.output()
