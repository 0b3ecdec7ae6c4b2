"""What a scoring process of an environment imports, by the environment's requirements: the
modules a warm parent imports before it forks deployments (``targets/warm.py``) and those an
environment's build imports once so that their bytecode is compiled before the first start
(``builders/bundle.py``)."""

from __future__ import annotations

from collections.abc import Sequence

# what a parent imports for a requirement (by its PEP 503 name); other requirements are left to
# the deployments (importing an unknown package could start threads and make the parent unsafe)
HEAVY_MODULES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy", "numpy.random"),
    "scipy": ("scipy", "scipy.sparse", "scipy.special", "scipy.linalg"),
    # with scikit-learn, a DataFrame input goes through narwhals' pandas layer (imported on first use)
    "pandas": ("pandas", "narwhals._pandas_like.dataframe", "narwhals._pandas_like.namespace",
               "narwhals._interchange.dataframe", "narwhals.stable.v2._namespace"),
    "joblib": ("joblib",),
    "scikit-learn": ("numpy", "numpy.random", "scipy", "scipy.sparse", "joblib", "threadpoolctl", "sklearn",
                     "sklearn.base", "sklearn.utils.validation", "sklearn.linear_model", "sklearn.ensemble",
                     "sklearn.tree", "sklearn.pipeline", "sklearn.preprocessing", "sklearn.compose",
                     "sklearn.impute", "sklearn.svm", "sklearn.neighbors", "sklearn.naive_bayes"),
    "skops": ("skops.io",),
    "onnxruntime": ("numpy", "onnxruntime"),
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),
    "mlflow": ("pandas", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server", "mlflow.utils.proto_json_utils"),
    "mlflow-skinny": ("pandas", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server", "mlflow.utils.proto_json_utils"),
}


def heavy_modules(requirements: Sequence[str]) -> list[str]:
    """The modules a parent imports for an environment with ``requirements``, in order, once each."""
    out: dict[str, None] = {}
    for line in requirements:
        name = line.split(";")[0].strip()
        for sep in "<>=!~[ @":
            name = name.split(sep)[0]
        for module in HEAVY_MODULES.get(name.lower().replace("_", "-").replace(".", "-"), ()):
            out[module] = None
    return list(out)
