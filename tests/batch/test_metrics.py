"""The streamed evaluation metrics against sklearn.metrics on the same arrays, and streamed
(small chunks) equal to one shot."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from modelcd.batch import metrics
from modelcd.batch.metrics import compute, parse_metrics
from modelcd.errors import InvalidInput


def _classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.choice(["setosa", "versicolor", "virginica"], size=n)
    predicted = np.where(rng.random(n) < 0.8, truth, rng.choice(["setosa", "versicolor", "virginica", "other"], n))
    return truth, predicted


@pytest.mark.parametrize("chunk", [None, 7, 1000])
def test_classification_equals_sklearn(chunk: int | None) -> None:
    truth, predicted = _classes(5000, 1)
    got = compute(truth, predicted, ["accuracy", "f1", "precision", "recall"], chunk=chunk)
    m = got["metrics"]
    assert got["task"] == "classification" and got["rows"] == 5000
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted), abs=1e-12)
    for name, fn in (("f1", sk.f1_score), ("precision", sk.precision_score), ("recall", sk.recall_score)):
        assert m[name] == pytest.approx(fn(truth, predicted, average="macro", zero_division=0), abs=1e-12), name
    labels = got["confusion_matrix"]["labels"]
    assert labels == ["other", "setosa", "versicolor", "virginica"]
    assert got["confusion_matrix"]["matrix"] == sk.confusion_matrix(truth, predicted, labels=labels).tolist()


def test_integer_labels_with_gaps_and_streamed_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 4, 3001)
    predicted = np.where(rng.random(3001) < 0.6, truth, rng.integers(0, 5, 3001)).astype("float64")  # 4: never true
    one = compute(truth, predicted, None)
    streamed = compute(truth, predicted, None, chunk=64)
    assert one["task"] == "classification"  # whole numbers: classes
    assert one["confusion_matrix"]["labels"] == [0, 1, 2, 3, 4]
    assert streamed["confusion_matrix"] == one["confusion_matrix"]
    for name, value in one["metrics"].items():
        assert streamed["metrics"][name] == pytest.approx(value, abs=1e-12)
    assert one["metrics"]["f1"] == pytest.approx(sk.f1_score(truth, predicted.astype(int), average="macro",
                                                             zero_division=0), abs=1e-12)


@pytest.mark.parametrize("chunk", [None, 33])
def test_roc_auc_with_ties_equals_sklearn(chunk: int | None) -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 4000)
    scores = np.round(np.clip(truth * 0.3 + rng.random(4000) * 0.7, 0, 1), 2)  # rounded: many ties
    got = compute(truth, scores, ["roc_auc"], chunk=chunk)
    assert got["metrics"]["roc_auc"] == pytest.approx(sk.roc_auc_score(truth, scores), abs=1e-12)


def test_roc_auc_positive_class_is_the_larger_label() -> None:
    truth = np.array(["no", "yes", "no", "yes", "yes", "no"])
    scores = np.array([0.1, 0.9, 0.4, 0.35, 0.8, 0.2])
    got = compute(truth, truth, ["accuracy", "roc_auc"], scores=scores)
    assert got["metrics"]["roc_auc"] == pytest.approx(sk.roc_auc_score(truth == "yes", scores))


def test_roc_auc_refuses_text_scores_and_more_than_two_classes() -> None:
    truth, predicted = _classes(50, 4)
    with pytest.raises(InvalidInput, match="roc_auc needs numeric scores.*--metrics") as e:
        compute(truth, predicted, ["roc_auc"])
    assert e.value.field == "metrics"
    with pytest.raises(InvalidInput, match="roc_auc needs a binary label; the label has 3 classes.*--metrics"):
        compute(np.array([0, 1, 2, 1]), np.array([0.1, 0.5, 0.9, 0.4]), ["roc_auc"])


@pytest.mark.parametrize("chunk", [None, 100, 70_001])
def test_regression_equals_sklearn_and_the_residual_summary_numpy(chunk: int | None) -> None:
    rng = np.random.default_rng(5)
    truth = rng.normal(10, 3, 150_000)
    predicted = truth + rng.normal(0.2, 1.0, 150_000)
    got = compute(truth, predicted, None, chunk=chunk)
    m = got["metrics"]
    assert got["task"] == "regression" and set(m) == {"rmse", "mae", "r2"}
    assert m["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(truth, predicted)), rel=1e-9)
    assert m["mae"] == pytest.approx(sk.mean_absolute_error(truth, predicted), rel=1e-9)
    assert m["r2"] == pytest.approx(sk.r2_score(truth, predicted), rel=1e-9)
    residual = truth - predicted
    summary = got["residuals"]
    assert summary["mean"] == pytest.approx(residual.mean(), abs=1e-9)
    assert summary["std"] == pytest.approx(residual.std(), rel=1e-9)
    assert (summary["min"], summary["max"]) == (residual.min(), residual.max())
    assert summary["quantiles_exact"] is False  # 150k rows > the reservoir: a sample, close to the truth
    for q, value in summary["quantiles"].items():
        assert value == pytest.approx(np.quantile(residual, float(q)), abs=0.03), q


def test_regression_quantiles_are_exact_up_to_the_reservoir_and_r2_of_a_constant() -> None:
    truth = np.arange(1000, dtype="float64") / 7
    predicted = truth * 0.9
    got = compute(truth, predicted, ["rmse", "r2"], chunk=99)
    assert got["residuals"]["quantiles_exact"] is True
    for q, value in got["residuals"]["quantiles"].items():
        assert value == pytest.approx(np.quantile(truth - predicted, float(q)), abs=1e-12)
    assert compute([2.5, 2.5], [2.5, 2.5], ["r2"])["metrics"]["r2"] == sk.r2_score([2.5, 2.5], [2.5, 2.5])
    assert compute([2.5, 2.5], [2.0, 2.5], ["r2"])["metrics"]["r2"] == 0.0


def test_bad_metrics_name_the_field_and_the_fix() -> None:
    with pytest.raises(InvalidInput, match="unknown metric 'acuracy'; use any of accuracy") as e:
        parse_metrics("acuracy,f1")
    assert e.value.field == "metrics"
    with pytest.raises(InvalidInput, match="mixes classification .* and regression"):
        parse_metrics(["accuracy", "rmse"])
    assert parse_metrics(" F1 ,accuracy,f1") == ("f1", "accuracy")
    assert parse_metrics(None) is None
    with pytest.raises(InvalidInput, match="label: the label holds 'setosa', not a number") as e:
        compute(["setosa", "virginica"], [1.0, 2.0], ["rmse"])
    assert e.value.field == "label"
    assert {"rmse", "mae"} == metrics.LOWER_IS_BETTER
