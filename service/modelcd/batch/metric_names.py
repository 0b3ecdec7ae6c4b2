"""The names of the evaluation metrics (``batch.metrics``), importable without numpy: the
release policy's evaluation gate checks them when a policy is applied."""

from __future__ import annotations

CLASSIFICATION = ("accuracy", "f1", "precision", "recall", "roc_auc")
REGRESSION = ("rmse", "mae", "r2")
METRICS = CLASSIFICATION + REGRESSION
LOWER_IS_BETTER = frozenset({"rmse", "mae"})  # error metrics: a gate sets max and max_rise_vs_champion
