"""Custom ``mlflow.pyfunc.PythonModel`` classes for tests, pickled by value (as a class
defined in a notebook would be), so the scoring environment needs no ``tests`` package."""

from __future__ import annotations

import json
import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # MLflow's import-time warnings (type hints of its own agents)
    import mlflow.pyfunc


# Defined under catch_warnings: MLflow warns, as each class is made, that predict has no type
# hints, and type hints would become the signature (and turn off its enforcement).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")

    class ScaledSum(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        """``scale * x + y + offset``, with scale and offset read from the ``weights`` artifact
        in ``load_context``: the answer shows the artifact was read where the model is served."""

        def load_context(self, context: Any) -> None:
            with open(context.artifacts["weights"], encoding="utf-8") as f:
                weights = json.load(f)
            self.scale = float(weights["scale"])
            self.offset = float(weights["offset"])

        # predict has no type hints: MLflow would take them for the model's signature
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            out = model_input["x"] * self.scale + model_input["y"] + self.offset
            return out.to_numpy()


    class Threshold(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        """1 where ``amount * count`` exceeds ``params["threshold"]`` (default 10), else 0; the
        ``label`` column is optional and passed through to show string columns survive."""

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            threshold = float((params or {}).get("threshold", 10.0))
            return ((model_input["amount"] * model_input["count"]) > threshold).astype("int64").to_numpy()


def register_by_value() -> None:
    """Make cloudpickle store this module's classes in the model file itself."""
    import cloudpickle

    import tests.sources.pyfunc_models as module

    cloudpickle.register_pickle_by_value(module)
