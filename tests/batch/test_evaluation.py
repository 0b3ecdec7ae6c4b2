"""Evaluation jobs with real scoring (the iris LogisticRegression in the bundle modelcd builds):
metrics equal sklearn's on the model's own predictions, streamed in small chunks equal one
shot, the label never reaches the model, errors name the field, a moto S3 prefix, the job's
lifecycle and the stored result."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk
from sklearn.datasets import load_iris

from modelcd.batch.evaluation import data_identity, evaluate_dataset
from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import Cancelled, InvalidInput, NotFound
from modelcd.jobs.evaluation import evaluation_spec, start_evaluation_job
from modelcd.registry.archive import pack_tree
from modelcd.registry.service import parse_metadata
from modelcd.targets.warm import WarmStarts
from tests.batch.test_scoring import _context
from tests.conftest import iris_model
from tests.registry.conftest import aws_env, moto_endpoint  # noqa: F401 - fixtures

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One home for the module (the bundle is built once) with iris v1, and labelled data:
    iris itself (150 rows, species as text) and 20,000 noisy rows labelled 0/1/2; the warm
    parents the runs started are stopped at the end."""
    root = tmp_path_factory.mktemp("evaluation")
    ctx = _context(root / "home")
    meta = iris_model(root / "iris")
    ctx.registry.register("iris", io.BytesIO(pack_tree(root / "iris")), parse_metadata(meta))
    ctx.db.dispose()
    model = joblib.load(root / "iris" / "model.joblib")
    x, y = load_iris(return_X_y=True)
    iris = pd.DataFrame(x, columns=COLUMNS)
    iris.insert(2, "species", y)  # the label between features: it must not reach the model
    iris.to_csv(root / "iris.csv", index=False)
    rng = np.random.default_rng(7)
    rows = x[rng.integers(0, 150, 20_000)] + rng.normal(0, 0.4, (20_000, 4))
    noisy = pd.DataFrame(rows.round(3), columns=COLUMNS)
    noisy["species"] = y[rng.integers(0, 150, 20_000)] * 0 + model.predict(x[rng.integers(0, 150, 20_000)])
    noisy.to_parquet(root / "noisy.parquet", index=False)
    yield {"home": root / "home", "model": model, "iris": root / "iris.csv", "noisy": root / "noisy.parquet",
           "x": x, "y": y, "rows": noisy}
    WarmStarts(root / "home").stop_all()


@pytest.fixture
def ctx(shared: dict[str, Any]) -> Iterator[Context]:
    c = _context(shared["home"])
    yield c
    c.db.dispose()


def evaluate(ctx: Context, data: str | Path, label: str = "species", metrics: Any = None, **kw: Any) -> dict[str, Any]:
    return evaluate_dataset(ctx, model="iris", version=1, data_uri=str(data), label=label, metrics=metrics, fmt=None,
                            log=kw.pop("log", lambda _line: None), cancel=kw.pop("cancel", threading.Event()), **kw)


def test_iris_metrics_equal_sklearn_on_the_models_own_predictions(ctx: Context, shared: dict[str, Any]) -> None:
    lines: list[str] = []
    got = evaluate(ctx, shared["iris"], log=lines.append)
    predicted = shared["model"].predict(shared["x"])
    y = shared["y"]
    assert got["task"] == "classification" and got["rows"] == 150 and got["errors"] == 0
    assert got["metrics"]["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted), abs=1e-12)
    assert got["metrics"]["f1"] == pytest.approx(sk.f1_score(y, predicted, average="macro"), abs=1e-12)
    assert got["confusion_matrix"] == {"labels": [0, 1, 2], "matrix": sk.confusion_matrix(y, predicted).tolist()}
    assert got["data_digest"] == data_identity(ctx, str(shared["iris"]))
    assert any(line.startswith("evaluated 150 rows of ") and "accuracy 0.9" in line for line in lines), lines


def test_streamed_in_small_chunks_equals_one_shot(ctx: Context, shared: dict[str, Any]) -> None:
    one = evaluate(ctx, shared["noisy"], metrics="accuracy,f1,precision,recall")
    streamed = evaluate(ctx, shared["noisy"], metrics="accuracy,f1,precision,recall", chunk_rows=997)
    rows = shared["rows"]
    predicted = shared["model"].predict(rows[COLUMNS].to_numpy())
    assert one["rows"] == streamed["rows"] == 20_000
    assert streamed["confusion_matrix"] == one["confusion_matrix"]
    assert one["confusion_matrix"]["matrix"] == sk.confusion_matrix(rows["species"], predicted).tolist()
    for name, value in one["metrics"].items():
        assert streamed["metrics"][name] == pytest.approx(value, abs=1e-12)
    assert one["metrics"]["recall"] == pytest.approx(sk.recall_score(rows["species"], predicted, average="macro"))


def test_regression_metrics_on_class_numbers_and_missing_labels_left_out(ctx: Context, shared: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    frame = pd.read_csv(shared["iris"])
    frame["species"] = frame["species"].astype("float64")
    frame.loc[::10, "species"] = None
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    got = evaluate(ctx, tmp_path / "gaps.csv", metrics=["rmse", "mae", "r2"])
    known = frame["species"].notna().to_numpy()
    truth, predicted = frame["species"][known], shared["model"].predict(shared["x"][known])
    assert got["task"] == "regression" and got["rows"] == known.sum() and got["unlabelled"] == 15
    assert got["metrics"]["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(truth, predicted)))
    assert got["metrics"]["r2"] == pytest.approx(sk.r2_score(truth, predicted))
    assert got["residuals"]["quantiles_exact"] is True


def test_bad_input_names_the_field_and_the_fix(ctx: Context, shared: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"label: the data has no column 'kind' \(its columns: sepal_length") as e:
        evaluate(ctx, shared["iris"], label="kind")
    assert e.value.field == "label"
    with pytest.raises(InvalidInput, match="unknown metric 'auc'") as e:
        evaluate(ctx, shared["iris"], metrics="accuracy,auc")
    assert e.value.field == "metrics"
    with pytest.raises(InvalidInput, match="roc_auc needs a binary label; the label has 3 classes") as e:
        evaluate(ctx, shared["iris"], metrics="roc_auc")
    assert e.value.field == "metrics"
    (tmp_path / "empty.csv").write_text(",".join([*COLUMNS, "species"]) + "\n")
    with pytest.raises(InvalidInput, match="data: nothing to evaluate in .*holds no rows; give labelled rows") as e:
        evaluate(ctx, tmp_path / "empty.csv")
    assert e.value.field == "data"
    with pytest.raises(InvalidInput, match="data: .*missing.csv does not exist") as e:
        evaluate(ctx, tmp_path / "missing.csv")
    assert e.value.field == "data"
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Cancelled, match="evaluation stopped; nothing was stored"):
        evaluate(ctx, shared["iris"], cancel=stopped)
    cases = [({"label": "species"}, "data"), ({"data": str(shared["iris"])}, "label"),
             ({"data": str(shared["iris"]), "label": "prediction"}, "label"),
             ({"data": str(tmp_path / "nope.csv"), "label": "species"}, "data"),
             ({"data": str(shared["iris"]), "label": "species", "metrics": "accuracy,rmse"}, "metrics"),
             ({"data": str(shared["iris"]), "label": "species", "format": "xls"}, "format"),
             ({"data": "sql://nosuch/t", "label": "species"}, "data"),
             ({"data": "t", "label": "species", "connection": "bad name"}, "connection"),
             ({"data": str(shared["iris"]), "label": "species", "colour": "red"}, "colour")]
    for body, field in cases:
        with pytest.raises(InvalidInput) as bad:
            evaluation_spec(ctx, "iris", 1, body)
        assert bad.value.field == field, (body, bad.value.message)
    with pytest.raises(NotFound):
        evaluation_spec(ctx, "iris", 9, {"data": str(shared["iris"]), "label": "species"})
    with pytest.raises(InvalidInput, match="data: no connection 'wh'; add it with `modelcd connections add wh") as e:
        evaluation_spec(ctx, "iris", 1, {"data": "scores", "label": "y", "connection": "wh"})  # sql://wh/scores
    assert e.value.field == "data"


def test_a_job_stores_the_evaluation_with_the_version(ctx: Context, shared: dict[str, Any]) -> None:
    job = start_evaluation_job(ctx, "iris", 1, {"data": str(shared["iris"]), "label": "species",
                                                "metrics": "accuracy,f1"})
    deadline = time.monotonic() + 60
    while not ctx.jobs.get(job.id).state.terminal and time.monotonic() < deadline:
        time.sleep(0.05)
    done = ctx.jobs.get(job.id)
    assert done.state is JobState.SUCCEEDED, done.error
    stored = ctx.registry.evaluations("iris", 1)[0]
    assert stored["job_id"] == job.id and stored["label"] == "species" and stored["rows"] == 150
    assert set(stored["metrics"]) == {"accuracy", "f1"} and stored["data"] == str(shared["iris"])
    events = [e for e in ctx.jobs.events(job_id=job.id) if e["kind"] == "evaluation.result"]
    assert events and "accuracy 0.9" in events[0]["message"] and "150 rows" in events[0]["message"]


def test_from_a_moto_s3_prefix(shared: dict[str, Any], moto_endpoint: str, aws_env: None) -> None:  # noqa: F811
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"eval-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    frame = pd.read_csv(shared["iris"])
    for i in range(2):
        client.put_object(Bucket=bucket, Key=f"iris/part-{i}.csv",
                          Body=frame.iloc[i * 75:(i + 1) * 75].to_csv(index=False).encode())
    ctx = _context(shared["home"], MODELCD_S3_ENDPOINT_URL=moto_endpoint)
    try:
        got = evaluate(ctx, f"s3://{bucket}/iris/")
        local = evaluate(ctx, shared["iris"])
        assert got["metrics"] == local["metrics"] and got["rows"] == 150
        assert got["data_digest"].startswith("sha256:") and got["data_digest"] == data_identity(ctx, f"s3://{bucket}/iris/")
        client.put_object(Bucket=bucket, Key="iris/part-1.csv", Body=frame.iloc[75:].to_csv(index=False).encode()[:-30])
        assert data_identity(ctx, f"s3://{bucket}/iris/") != got["data_digest"]  # the data changed: another identity
    finally:
        ctx.db.dispose()


def test_the_gate_judges_each_limit_with_its_figures() -> None:
    from modelcd.releases.evaluation_gate import judge
    from modelcd.releases.policy import EvaluationGate

    gate = EvaluationGate(data="d.csv", label="y", metric="accuracy", min=0.9, max_drop_vs_champion=0.01)
    assert judge(gate, 0.95, 0.955) == []
    assert judge(gate, 0.95, None) == []  # nothing serves: only min applies
    assert judge(gate, 0.7133, 0.97) == ["accuracy 0.7133 < min 0.9", "accuracy 0.7133 < champion 0.97 - 0.01"]
    errors = EvaluationGate(data="d.csv", label="y", metric="rmse", max=1.5, max_rise_vs_champion=0.1)
    assert judge(errors, 1.2, 1.15) == []
    assert judge(errors, 1.6, 1.2) == ["rmse 1.6 > max 1.5", "rmse 1.6 > champion 1.2 + 0.1"]


def test_a_restart_ends_the_evaluate_jobs_a_dead_process_left_open(ctx: Context) -> None:
    from modelcd.domain import JobType
    from modelcd.jobs.evaluation import fail_interrupted

    running = ctx.jobs.create(JobType.EVALUATE, model="iris", version=1)
    ctx.jobs.transition(running.id, JobState.SCHEDULED)
    ctx.jobs.transition(running.id, JobState.RUNNING)
    waiting = ctx.jobs.create(JobType.EVALUATE, model="iris", version=1)
    told: list[str] = []
    assert set(fail_interrupted(ctx, told.append)) == {running.id, waiting.id}
    assert ctx.jobs.get(running.id).state is JobState.FAILED and ctx.jobs.get(waiting.id).state is JobState.CANCELLED
    assert "run the evaluation again (`modelcd evaluate`)" in (ctx.jobs.get(running.id).error or "")
    assert len(told) == 2 and fail_interrupted(ctx) == []
