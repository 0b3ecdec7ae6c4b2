"""An MLflow model version whose files hold its training data gets training statistics when
modelcd imports it (a real MLflow tracking server, tests/sources/mlflow_fixture.py): the file
the version tag ``modelcd.training_data`` names, computed as a `statistics` job by the import."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas
import pytest

from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.domain import JobState, JobType, Source
from modelcd.inbox.importer import import_event
from modelcd.jobs.statistics import TRAINING_DATA_TAG
from modelcd.sources.base import Registered
from tests.conftest import free_port
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401


@pytest.fixture
def ctx(tmp_path: Path, mlflow_server: MlflowServer) -> Iterator[Context]:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": "t" * 24,
                                      "MODELCD_ROUTER_PORT": str(free_port()),
                                      "MODELCD_MLFLOW_TRACKING_URI": mlflow_server.tracking_uri})
    c = build_context(settings)
    yield c
    c.db.dispose()


def _event(name: str, version: str) -> Registered:
    return Registered(source=Source.MLFLOW, model=name, external_version=version,
                      external_ref=f"models:/{name}/{version}", artifact_uri=f"models:/{name}/{version}")


def test_import_computes_statistics_of_the_training_data_in_the_version(ctx: Context, mlflow_server: MlflowServer,
                                                                        tmp_path: Path) -> None:
    from tests.sources.pyfunc_models import ScaledSum

    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"scale": 2.0, "offset": 0.0}))
    train = tmp_path / "train.csv"
    pandas.DataFrame({"x": [float(i) for i in range(200)], "y": [i % 3 for i in range(200)]}).to_csv(train,
                                                                                                   index=False)
    example = pandas.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]})
    name = mlflow_server.unique_name("stats")
    version = mlflow_server.register_pyfunc(name, ScaledSum(), input_example=example,
                                            artifacts={"weights": str(weights), "training_data": str(train)},
                                            tags={TRAINING_DATA_TAG: "artifacts/train.csv"})

    v = import_event(ctx, _event(name, version))

    jobs = [j for j in ctx.jobs.list() if j.type is JobType.STATISTICS]
    assert len(jobs) == 1 and jobs[0].state is JobState.SUCCEEDED, [(j.state, j.error) for j in jobs]
    stored = ctx.registry.get_statistics(name, v.version)
    assert (stored["rows"], stored["features"], stored["source"]) == (200, 2, "artifacts/train.csv")
    assert [f["name"] for f in stored["statistics"]["features"]] == ["x", "y"]

    # a tag naming a file the version does not hold: the job fails naming the tag, the import stands
    other = mlflow_server.register_pyfunc(name, ScaledSum(), input_example=example,
                                          artifacts={"weights": str(weights)},
                                          tags={TRAINING_DATA_TAG: "artifacts/missing.csv"})
    v2 = import_event(ctx, _event(name, other))
    assert v2.version == v.version + 1
    failed = [j for j in ctx.jobs.list() if j.type is JobType.STATISTICS and j.version == v2.version]
    assert failed[0].state is JobState.FAILED and TRAINING_DATA_TAG in (failed[0].error or "")
