"""Evaluation metrics computed over chunks: what ``batch.evaluation`` folds the scored rows
into, so memory stays flat whatever the data's size.

Classification: accuracy, macro precision / recall / f1 over the labels seen in the truth or
the predictions (as ``sklearn.metrics`` with ``average="macro"``, 0 for a label never
predicted), the confusion matrix (rows: truth, columns: prediction, in label order) and
``roc_auc`` for a binary label scored by numbers (the positive class is the larger label, as
sklearn's). The confusion matrix is kept as counts per (truth, prediction) pair; roc_auc keeps
a count per distinct score and class (exact, ties counted half).

Regression: rmse, mae, r2 (1.0 for a constant truth predicted exactly, 0.0 otherwise, as
sklearn's) and a residual (truth - prediction) summary: mean, population std, min, max and
quantiles, exact up to ``RESERVOIR`` rows and from a seeded uniform sample beyond.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modelcd.batch.metric_names import CLASSIFICATION, LOWER_IS_BETTER, METRICS, REGRESSION
from modelcd.errors import InvalidInput

DEFAULT_CLASSIFICATION = ("accuracy", "f1", "precision", "recall")
DEFAULT_REGRESSION = REGRESSION
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
RESERVOIR = 100_000  # residuals kept for the quantiles
MAX_CLASSES = 1000  # distinct labels (truth or prediction) before the data is judged not a classification


def parse_metrics(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``accuracy,f1`` (or a list) as a tuple of known metric names, None when not given;
    InvalidInput naming ``metrics`` for an unknown name or a mix of classification and
    regression metrics."""
    if value is None or value == "" or value == []:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise InvalidInput(f"metrics must be names from {', '.join(METRICS)}", field="metrics")
    wanted = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in wanted if n not in METRICS]
    if unknown:
        raise InvalidInput(f"metrics: unknown metric {', '.join(map(repr, unknown))}; use any of "
                           f"{', '.join(METRICS)} (comma-separated)", field="metrics")
    if not wanted:
        return None
    task_of(wanted)
    return wanted


def task_of(metrics: Iterable[str]) -> str:
    """``classification`` or ``regression`` for a set of metric names; InvalidInput when mixed."""
    names = list(metrics)
    kinds = {"classification" if n in CLASSIFICATION else "regression" for n in names}
    if len(kinds) > 1:
        raise InvalidInput(f"metrics: {', '.join(names)} mixes classification ({', '.join(CLASSIFICATION)}) and "
                           f"regression ({', '.join(REGRESSION)}) metrics; choose one kind", field="metrics")
    return kinds.pop() if kinds else "classification"


def _integral(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(np.all(finite == np.round(finite)))


def guess_task(truth: pd.Series, predicted: pd.Series) -> str:
    """The task the data looks like: regression when the truth or the predictions are numbers
    that are not whole; classification for text, booleans and whole numbers."""
    for series in (truth, predicted):
        if pd.api.types.is_float_dtype(series.dtype) and not _integral(series.to_numpy(dtype="float64")):
            return "regression"
    return "classification"


def plain(value: Any) -> Any:
    """A label as a plain JSON value: numpy scalars unwrapped, whole floats as ints."""
    item = getattr(value, "item", None)
    if callable(item):
        value = item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _label_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool):
        return (0, int(value))
    if isinstance(value, int | float):
        return (0, value)
    return (1, str(value))


def _labels(series: pd.Series) -> pd.Series:
    """Labels compared as values: whole floats (a numeric column with gaps) as integers."""
    if pd.api.types.is_float_dtype(series.dtype) and _integral(series.to_numpy(dtype="float64")):
        return series.astype("int64")
    return series


class Classification:
    """Counts of (truth, prediction) pairs and, for roc_auc, counts per score and class."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self.metrics = tuple(metrics)
        self.pairs: Counter[tuple[Any, Any]] = Counter()
        self.rows = 0
        self.want_auc = "roc_auc" in self.metrics
        self.scores: dict[Any, tuple[np.ndarray, np.ndarray]] = {}  # label -> (distinct scores, counts)

    def update(self, truth: pd.Series, predicted: pd.Series, scores: pd.Series | None = None) -> None:
        """Fold in one chunk: truth and predictions aligned, missing truth already left out."""
        if not len(truth):
            return
        truth = _labels(truth.reset_index(drop=True))
        predicted = _labels(predicted.reset_index(drop=True))
        frame = pd.DataFrame({"t": truth, "p": predicted})
        for (t, p), n in frame.value_counts(dropna=False).items():
            self.pairs[(plain(t), plain(p))] += int(n)
        self.rows += len(truth)
        if len({t for t, _ in self.pairs} | {p for _, p in self.pairs}) > MAX_CLASSES:
            raise InvalidInput(f"label: more than {MAX_CLASSES} distinct labels: this is not a classification; "
                               f"choose regression metrics ({', '.join(REGRESSION)}) in --metrics", field="label")
        if self.want_auc:
            self._update_scores(truth, predicted if scores is None else scores)

    def _update_scores(self, truth: pd.Series, scores: pd.Series) -> None:
        if not (pd.api.types.is_numeric_dtype(scores.dtype) or pd.api.types.is_bool_dtype(scores.dtype)):
            raise InvalidInput(f"metrics: roc_auc needs numeric scores from the model; it answers "
                               f"{scores.dtype!s} values such as {plain(scores.iloc[0])!r}: leave roc_auc out "
                               "of --metrics, or evaluate a model that answers a score (e.g. a probability)",
                               field="metrics")
        values = scores.to_numpy(dtype="float64")
        for label, group in pd.Series(values).groupby(truth.to_numpy(), sort=False):
            key = plain(label)
            uniq, counts = np.unique(group.to_numpy(), return_counts=True)
            if key in self.scores:
                old_u, old_c = self.scores[key]
                merged, inverse = np.unique(np.concatenate([old_u, uniq]), return_inverse=True)
                uniq, counts = merged, np.bincount(inverse, weights=np.concatenate([old_c, counts])).astype("int64")
            self.scores[key] = (uniq, counts)
            if len(self.scores) > 2:
                raise InvalidInput(self._not_binary(), field="metrics")

    def _not_binary(self) -> str:
        labels = sorted({t for t, _ in self.pairs} | set(self.scores), key=_label_key)
        shown = ", ".join(repr(v) for v in labels[:10])
        return (f"metrics: roc_auc needs a binary label; the label has {len(labels)} classes ({shown}): leave roc_auc "
                "out of --metrics")

    def labels(self) -> list[Any]:
        return sorted({t for t, _ in self.pairs} | {p for _, p in self.pairs}, key=_label_key)

    def result(self) -> dict[str, Any]:
        labels = self.labels()
        index = {v: i for i, v in enumerate(labels)}
        matrix = np.zeros((len(labels), len(labels)), dtype="int64")
        for (t, p), n in self.pairs.items():
            matrix[index[t], index[p]] += n
        tp = np.diag(matrix).astype("float64")
        predicted = matrix.sum(axis=0).astype("float64")
        support = matrix.sum(axis=1).astype("float64")
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        denominator = predicted + support
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        values: dict[str, float] = {}
        for name in self.metrics:
            if name == "accuracy":
                values[name] = float(tp.sum() / self.rows) if self.rows else 0.0
            elif name in ("precision", "recall", "f1"):
                per = {"precision": precision, "recall": recall, "f1": f1}[name]
                values[name] = float(per.mean()) if len(labels) else 0.0
            elif name == "roc_auc":
                values[name] = self._roc_auc()
        return {"task": "classification", "rows": self.rows, "metrics": values,
                "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()},
                "per_class": [{"label": v, "precision": float(precision[i]), "recall": float(recall[i]),
                               "f1": float(f1[i]), "support": int(support[i])} for i, v in enumerate(labels)]}

    def _roc_auc(self) -> float:
        truth = sorted(self.scores, key=_label_key)
        if len(truth) != 2:
            if len(truth) > 2:
                raise InvalidInput(self._not_binary(), field="metrics")
            raise InvalidInput(f"metrics: roc_auc needs both classes in the truth; the data has only "
                               f"{', '.join(map(repr, truth)) or 'none'}: leave roc_auc out of --metrics or use data "
                               "with both", field="metrics")
        (neg_u, neg_c), (pos_u, pos_c) = self.scores[truth[0]], self.scores[truth[1]]
        neg_below = np.concatenate([[0], np.cumsum(neg_c)])  # negatives with a score below neg_u[i]
        at = np.searchsorted(neg_u, pos_u, side="left")
        below = neg_below[at].astype("float64")
        tied = np.where((at < len(neg_u)) & (neg_u[np.minimum(at, len(neg_u) - 1)] == pos_u),
                        neg_c[np.minimum(at, len(neg_u) - 1)], 0).astype("float64")
        wins = float(np.sum(pos_c * (below + 0.5 * tied)))
        return wins / (float(pos_c.sum()) * float(neg_c.sum()))


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, values: np.ndarray) -> None:
        n_b = len(values)
        if not n_b:
            return
        mean_b = float(values.mean())
        m2_b = float(np.sum((values - mean_b) ** 2))
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n


class Regression:
    """Sums over residuals, the truth's moments (for r2) and a sample of residuals."""

    def __init__(self, metrics: Sequence[str], seed: int = 0) -> None:
        self.metrics = tuple(metrics)
        self.truth = _Moments()
        self.residual = _Moments()
        self.squares = 0.0
        self.absolute = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.sample = np.empty(RESERVOIR, dtype="float64")
        self.kept = 0
        self.rng = np.random.default_rng(seed)

    @property
    def rows(self) -> int:
        return self.residual.n

    def update(self, truth: pd.Series, predicted: pd.Series) -> None:
        if not len(truth):
            return
        y = _numbers(truth, "label", "the label")
        p = _numbers(predicted, "metrics", "the model's predictions")
        residual = y - p
        seen = self.residual.n
        self.truth.add(y)
        self.residual.add(residual)
        self.squares += float(np.sum(residual * residual))
        self.absolute += float(np.sum(np.abs(residual)))
        self.low = min(self.low, float(residual.min()))
        self.high = max(self.high, float(residual.max()))
        self._keep(residual, seen)

    def _keep(self, residual: np.ndarray, seen: int) -> None:
        """Reservoir sampling (algorithm R), a chunk at a time."""
        room = RESERVOIR - self.kept
        head = residual[:room]
        self.sample[self.kept:self.kept + len(head)] = head
        self.kept += len(head)
        rest = residual[len(head):]
        if not len(rest):
            return
        position = seen + len(head) + np.arange(len(rest))  # 0-based index of each value in the stream
        slots = (self.rng.random(len(rest)) * (position + 1)).astype("int64")
        take = slots < RESERVOIR
        self.sample[slots[take]] = rest[take]

    def result(self) -> dict[str, Any]:
        n = self.rows
        values: dict[str, float] = {}
        for name in self.metrics:
            if name == "rmse":
                values[name] = math.sqrt(self.squares / n) if n else 0.0
            elif name == "mae":
                values[name] = self.absolute / n if n else 0.0
            elif name == "r2":
                if self.truth.m2 > 0:
                    values[name] = 1.0 - self.squares / self.truth.m2
                else:
                    values[name] = 1.0 if self.squares == 0 else 0.0
        kept = self.sample[:self.kept]
        quantiles = {f"{q:g}": float(np.quantile(kept, q)) for q in QUANTILES} if self.kept else {}
        residuals = {"mean": self.residual.mean, "std": math.sqrt(self.residual.m2 / n) if n else 0.0,
                     "min": self.low if n else None, "max": self.high if n else None, "quantiles": quantiles,
                     "quantiles_exact": n <= RESERVOIR}
        return {"task": "regression", "rows": n, "metrics": values, "residuals": residuals}


def _numbers(series: pd.Series, field: str, what: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype="float64")
    values = pd.to_numeric(series, errors="coerce")
    wrong = values.isna() & series.notna()
    if wrong.any():
        example = series[wrong].iloc[0]
        raise InvalidInput(f"{field}: {what} holds {example!r}, not a number; rmse, mae and r2 need numbers: choose "
                           f"classification metrics ({', '.join(DEFAULT_CLASSIFICATION)}) in --metrics",
                           field=field)
    return values.to_numpy(dtype="float64")


def accumulator(metrics: Sequence[str] | None, task: str) -> Classification | Regression:
    """The accumulator of ``task`` for ``metrics`` (None: the task's defaults)."""
    if task == "regression":
        return Regression(metrics or DEFAULT_REGRESSION)
    return Classification(metrics or DEFAULT_CLASSIFICATION)


def compute(truth: Sequence[Any] | np.ndarray, predicted: Sequence[Any] | np.ndarray,
            metrics: Sequence[str] | None = None, scores: Sequence[Any] | np.ndarray | None = None,
            chunk: int | None = None) -> dict[str, Any]:
    """The metrics of whole arrays (in chunks of ``chunk`` rows when given): what the tests and
    small callers use."""
    t, p = pd.Series(truth), pd.Series(predicted)
    s = pd.Series(scores) if scores is not None else None
    task = task_of(metrics) if metrics else guess_task(t, p)
    acc = accumulator(metrics, task)
    step = chunk or max(len(t), 1)
    for start in range(0, len(t), step):
        part = slice(start, start + step)
        if isinstance(acc, Classification):
            acc.update(t.iloc[part], p.iloc[part], None if s is None else s.iloc[part])
        else:
            acc.update(t.iloc[part], p.iloc[part])
    return acc.result()


__all__ = ["CLASSIFICATION", "LOWER_IS_BETTER", "METRICS", "REGRESSION", "Classification", "Regression",
           "accumulator", "compute", "guess_task", "parse_metrics", "task_of"]
