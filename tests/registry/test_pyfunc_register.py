"""Registering an MLflow model folder natively: flavor pyfunc, its environment, and its sample
and expected output found among its files (as the MLflow import finds them)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pandas
import pytest

from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.domain import Flavor
from modelcd.errors import InvalidInput
from modelcd.registry.archive import pack_tree
from modelcd.registry.service import parse_metadata
from tests.conftest import free_port
from tests.sources.pyfunc_models import ScaledSum, register_by_value


def saved_model(folder: Path) -> Path:
    import mlflow.pyfunc

    register_by_value()
    weights = folder.parent / "weights.json"
    weights.write_text(json.dumps({"scale": 2.0, "offset": 0.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(folder, python_model=ScaledSum(), artifacts={"weights": str(weights)},
                                 input_example=pandas.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]}),
                                 pip_requirements=["mlflow==3.17.2", "pandas"])
    return folder


def test_an_mlflow_folder_registers_as_pyfunc_with_its_example_and_expected_json(tmp_path: Path) -> None:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_ROUTER_PORT": str(free_port())})
    ctx = build_context(settings)
    try:
        folder = saved_model(tmp_path / "m")
        (folder / "expected.json").write_text("[2.0, 5.0]")
        version = ctx.registry.register("scaled", io.BytesIO(pack_tree(folder)), parse_metadata({}))
        assert (version.flavor, version.model_file) == (Flavor.PYFUNC, "MLmodel")
        assert version.requirements == ("mlflow-skinny==3.17.2", "pandas", "numpy")
        assert version.sample == {"dataframe_split": {"columns": ["x", "y"], "data": [[1.0, 0.0], [2.0, 1.0]]}}
        assert version.expected == [2.0, 5.0]

        given = ctx.registry.register("scaled", io.BytesIO(pack_tree(folder)), parse_metadata(
            {"sample": {"dataframe_records": [{"x": 1.0, "y": 1.0}]}, "expected": [3.0]}))
        assert given.sample == {"dataframe_records": [{"x": 1.0, "y": 1.0}]} and given.expected == [3.0]

        (folder / "expected.json").write_text("[1.0]")  # one prediction for a sample of two rows
        with pytest.raises(InvalidInput, match="expected.json among the model's files: expected: 1 predictions "
                                               "for a sample of 2 rows") as e:
            ctx.registry.register("scaled", io.BytesIO(pack_tree(folder)), parse_metadata({}))
        assert e.value.field == "expected"
    finally:
        ctx.db.dispose()
