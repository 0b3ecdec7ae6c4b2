"""Model flavors: load a model once per worker, score one request body.

Each scorer takes the raw request body and returns the JSON value to answer with. It raises
``BadInput`` for what the client must fix (400) and ``ModelError`` for an exception the model
itself raised (500). numpy, joblib, pandas, onnxruntime and MLflow (pyfunc, see ``pyfunc.py``)
are imported only by the flavors that need them: a custom model's bundle may hold none of them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .config import ScoringConfig
from .protocol import BadInput, Table, decode_json, parse_envelope


class LoadError(RuntimeError):
    """The model could not be loaded; the message says which file and why."""


class ModelError(RuntimeError):
    """The model raised while scoring; carries the original exception's type name and message."""

    def __init__(self, exc: BaseException) -> None:
        self.exception = type(exc).__name__
        self.message = str(exc)
        super().__init__(f"{self.exception}: {self.message}")


class Scorer(Protocol):
    """One loaded model."""

    flavor: str

    def score(self, body: bytes) -> Any:
        """Score one request body; return the JSON value of the response."""
        ...


def load_scorer(config: ScoringConfig, model_dir: str) -> Scorer:
    """Load the model ``config`` describes from ``model_dir``; raise ``LoadError`` if it cannot be."""
    loaders: dict[str, Callable[[ScoringConfig, str], Scorer]] = {
        "sklearn": _load_sklearn,
        "onnx": _load_onnx,
        "custom": _load_custom,
        "pyfunc": _load_pyfunc,
    }
    if not os.path.isdir(model_dir):
        raise LoadError(f"model dir {model_dir!r} does not exist")
    return loaders[config.flavor](config, model_dir)


def _model_path(model_dir: str, relative: str | None) -> str:
    """The absolute path of a file named in the config; ``LoadError`` if it is not there."""
    path = os.path.join(model_dir, relative or "")
    if not os.path.isfile(path):
        raise LoadError(f"model file {relative!r} not found in model dir {model_dir!r}")
    return path


def _load_sklearn(config: ScoringConfig, model_dir: str) -> Scorer:
    """Load an estimator: skops for a ``.skops`` file, else unpickle it with joblib (or
    pickle when joblib is absent)."""
    path = _model_path(model_dir, config.model_file)
    if path.lower().endswith(".skops"):
        model = _load_skops(config, path)
    else:
        model = _unpickle(config, path)
    if not callable(getattr(model, "predict", None)):
        raise LoadError(f"{config.model_file!r} holds a {type(model).__name__}, which has no predict()")
    return SklearnScorer(model, numeric_only=_all_numeric(config.sample), probe=_probe_rows(model, config.sample))


def _load_skops(config: ScoringConfig, path: str) -> Any:
    """A skops file, trusting skops' default types plus those the model's MLmodel lists
    (MLflow checked at save time that these suffice)."""
    try:
        import skops.io
    except ImportError:
        raise LoadError(f"{config.model_file!r} is saved with skops, which is not installed: add skops to the "
                        "version's requirements") from None
    try:
        return skops.io.load(path, trusted=list(config.skops_trusted_types) or None)
    except Exception as e:
        hint = ""
        if type(e).__name__ == "UntrustedTypesFoundException":
            hint = "; list them in the MLmodel's skops_trusted_types (log_model(skops_trusted_types=...))"
        raise LoadError(f"cannot load {config.model_file!r} with skops: {type(e).__name__}: {e}{hint}") from e


def _unpickle(config: ScoringConfig, path: str) -> Any:
    try:
        try:
            import joblib
        except ImportError:
            with open(path, "rb") as f:
                model = pickle.load(f)
        else:
            model = joblib.load(path)
    except Exception as e:
        raise LoadError(f"cannot unpickle {config.model_file!r}: {type(e).__name__}: {e}") from e
    return model


def _load_onnx(config: ScoringConfig, model_dir: str) -> Scorer:
    """Open an ONNX model in an onnxruntime CPU session (one intra-op thread per worker)."""
    path = _model_path(model_dir, config.model_file)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise LoadError("flavor 'onnx' needs onnxruntime: add it to the model's requirements") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LoadError(f"cannot open ONNX model {config.model_file!r}: {type(e).__name__}: {e}") from e
    return OnnxScorer(session)


def _load_pyfunc(config: ScoringConfig, model_dir: str) -> Scorer:
    """Load an MLflow model with ``mlflow.pyfunc.load_model`` from the folder of its ``MLmodel``."""
    from .pyfunc import load_pyfunc

    path = _model_path(model_dir, config.model_file)
    try:
        return load_pyfunc(os.path.dirname(path), ModelError)
    except ImportError as e:
        raise LoadError(f"flavor 'pyfunc' needs MLflow in the model's environment ({e}): add mlflow-skinny "
                        "to the version's requirements") from e
    except Exception as e:
        raise LoadError(f"mlflow.pyfunc.load_model({config.model_file!r}) failed: {type(e).__name__}: "
                        f"{str(e)[:500]}") from e


def _load_custom(config: ScoringConfig, model_dir: str) -> Scorer:
    """Import an Azure ML style entry script and call its ``init()`` once."""
    path = _model_path(model_dir, config.entry_script)
    os.environ["AZUREML_MODEL_DIR"] = model_dir
    script_dir = os.path.dirname(path)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    name = os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:  # never replace an imported module (a script named json.py, say)
        name = f"modelcd_entry_{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import entry script {config.entry_script!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise LoadError(f"importing entry script {config.entry_script!r} failed: {type(e).__name__}: {e}") from e
    for function in ("init", "run"):
        if not callable(getattr(module, function, None)):
            raise LoadError(f"entry script {config.entry_script!r} has no {function}() function")
    try:
        module.init()
    except Exception as e:
        raise LoadError(f"init() of {config.entry_script!r} failed: {type(e).__name__}: {e}") from e
    return CustomScorer(module.run)


class CustomScorer:
    """An entry script's ``run(raw_data)``: gets the body as a str, its return value is the response."""

    flavor = "custom"

    def __init__(self, run: Callable[[str], Any]) -> None:
        self._run = run

    def score(self, body: bytes) -> Any:
        """Pass the UTF-8 body to ``run()`` unchanged."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("invalid_input", "the request body is not valid UTF-8") from None
        try:
            return self._run(text)
        except Exception as e:
            raise ModelError(e) from e


class SklearnScorer:
    """An object with ``predict(X)``: scikit-learn estimators and pipelines, or lookalikes.

    Named columns are laid out in the model's ``feature_names_in_`` order. The model then gets
    a float64 array, the fast path, unless it was fit on a DataFrame and needs one: a
    ColumnTransformer that selects columns by name, string columns (the sample holds strings),
    or answers that differ. A probe at load time decides, on the sample's rows or a row of
    zeros. A DataFrame needs pandas, which the runtime never requires. ``numeric_only`` (true
    unless the sample holds strings) makes non-numeric values a 400 before the model sees them.
    """

    flavor = "sklearn"

    def __init__(self, model: Any, numeric_only: bool = True, probe: list[Any] | None = None) -> None:
        self._predict = model.predict
        names = getattr(model, "feature_names_in_", None)
        self.feature_names: list[str] | None = [str(n) for n in names] if names is not None else None
        n_features = getattr(model, "n_features_in_", None)
        self.n_features: int | None = int(n_features) if n_features is not None else None
        self.numeric_only = numeric_only
        self._pandas = None
        if self.feature_names is not None:
            self._pandas = self._dataframe_module(probe)
        if self.feature_names is not None and self._pandas is None:
            # Columns are already in the fitted order; the positional array is what the model expects.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")

    def _dataframe_module(self, probe: list[Any] | None) -> Any:
        """pandas when this model needs DataFrames, None when a float array gives the same answers."""
        pandas = _import_pandas()
        if pandas is None or not self.numeric_only:
            return pandas
        rows = probe or [[0.0] * len(self.feature_names or ())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = _as_list(self._predict(pandas.DataFrame(rows, columns=self.feature_names)))
            except Exception:
                return pandas  # the probe does not fit the model: keep the faithful path
            try:
                fast = _as_list(self._predict(to_matrix(rows, "float64")))
            except Exception:
                return pandas
        return None if fast == expected else pandas

    def score(self, body: bytes) -> Any:
        """Decode, lay out and predict; answer ``{"predictions": [...]}``."""
        table = parse_envelope(decode_json(body))
        return {"predictions": _as_list(self._call(self.features(table)))}

    def features(self, table: Table) -> Any:
        """The model's input for ``table``: a checked 2-D float array, or a DataFrame."""
        order = self.feature_names if table.names is not None else None
        rows = table.rows(order)
        if self.numeric_only:
            matrix = to_matrix(rows, "float64")
            if matrix.ndim != 2:
                raise BadInput("invalid_input", f"expected a list of rows (2-D), got {matrix.ndim}-D input")
            width = matrix.shape[1]
        else:
            matrix = rows
            widths = {len(row) if isinstance(row, list) else -1 for row in rows}
            if len(widths) != 1 or -1 in widths:
                raise BadInput("invalid_input", "expected a list of rows, each a list of the same length")
            width = widths.pop()
        if self.n_features is not None and width != self.n_features:
            raise BadInput("invalid_input", f"expected {self.n_features} feature(s) per row, got {width}")
        if self._pandas is not None:
            return self._pandas.DataFrame(matrix, columns=self.feature_names)
        return matrix

    def predict_array(self, matrix: Any) -> Any:
        """Predict a 2-D float array whose columns are in the model's order (batch scoring's
        fast path: no JSON); the model's answer as it gave it."""
        if self.n_features is not None and matrix.shape[1] != self.n_features:
            raise BadInput("invalid_input", f"expected {self.n_features} feature(s) per row, got {matrix.shape[1]}")
        if self._pandas is not None:
            return self._call(self._pandas.DataFrame(matrix, columns=self.feature_names))
        return self._call(matrix)

    def _call(self, features: Any) -> Any:
        """Run ``predict``; any exception is the model's."""
        try:
            return self._predict(features)
        except Exception as e:
            raise ModelError(e) from e


class OnnxScorer:
    """An onnxruntime session: the first input gets the rows, the first output is the prediction.

    A model with several inputs (skl2onnx's one-input-per-column form) gets one named column
    per input, shaped (rows, 1).
    """

    flavor = "onnx"

    def __init__(self, session: Any) -> None:
        self._session = session
        self._inputs = session.get_inputs()
        self._output = session.get_outputs()[0].name

    def score(self, body: bytes) -> Any:
        """Decode, convert to the input's dtype, check its rank, run; answer ``{"predictions": ...}``."""
        table = parse_envelope(decode_json(body))
        feeds = self._feeds(table)
        try:
            result = self._session.run([self._output], feeds)[0]
        except Exception as e:
            raise ModelError(e) from e
        return {"predictions": _as_list(result)}

    def _feeds(self, table: Table) -> dict[str, Any]:
        """Build the input feed for ``table``."""
        if len(self._inputs) == 1:
            spec = self._inputs[0]
            array = to_matrix(table.rows(), _onnx_dtype(spec.type))
            _check_shape(array.shape, spec.shape)
            return {spec.name: array}
        names = [spec.name for spec in self._inputs]
        if table.names is None:
            raise BadInput("invalid_input", f"this model takes named columns: {', '.join(names)}")
        rows = table.rows(names)
        feeds = {}
        for i, spec in enumerate(self._inputs):
            column = to_matrix([[row[i]] for row in rows], _onnx_dtype(spec.type))
            feeds[spec.name] = column
        return feeds


def to_matrix(rows: Any, dtype: str) -> Any:
    """Convert nested lists to a numeric numpy array; ``BadInput`` for ragged or non-numeric values.

    ``None`` becomes NaN for float types (a model with an imputer accepts it); strings, objects
    and booleans mixed with lists are refused.
    """
    import numpy as np

    try:
        array = np.asarray(rows)
    except ValueError:
        raise BadInput("invalid_input", "rows must all have the same number of values") from None
    kind = array.dtype.kind
    if kind == "O" and all(v is None or isinstance(v, int | float) for v in array.flat):
        kind = "f"
    if kind not in "biuf":
        raise BadInput("invalid_input", "input values must be numbers")
    try:
        return array.astype(dtype, copy=False)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadInput("invalid_input", f"input values do not fit {dtype}: {e}") from None


def _check_shape(shape: Sequence[int], expected: Sequence[Any]) -> None:
    """Refuse an array whose rank or fixed dimensions differ from an ONNX input's shape."""
    if len(shape) != len(expected):
        raise BadInput("invalid_input", f"expected {len(expected)}-D input, got {len(shape)}-D")
    for axis, (have, want) in enumerate(zip(shape, expected, strict=True)):
        if isinstance(want, int) and want > 0 and have != want:
            raise BadInput("invalid_input", f"expected size {want} on axis {axis}, got {have}")


def _onnx_dtype(onnx_type: str) -> str:
    """The numpy dtype for an ONNX tensor type such as ``tensor(float)``."""
    return {
        "tensor(float)": "float32",
        "tensor(double)": "float64",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
        "tensor(bool)": "bool",
    }.get(onnx_type, "float32")


def _as_list(result: Any) -> Any:
    """Predictions as JSON-ready Python values (numpy arrays, pandas objects, lists)."""
    to_list = getattr(result, "tolist", None)
    if callable(to_list):
        return to_list()
    if isinstance(result, list | tuple):
        return [_as_list(v) if hasattr(v, "tolist") else v for v in result]
    return result


def _all_numeric(sample: Any) -> bool:
    """True unless the sample's values hold a string: then the model takes mixed columns as sent."""
    if sample is None:
        return True
    try:
        rows = parse_envelope(sample).rows()
    except BadInput:
        return True
    return not _has_string(rows)


def _probe_rows(model: Any, sample: Any) -> list[Any] | None:
    """The sample's rows in the model's feature order, or None when there is no usable sample."""
    names = getattr(model, "feature_names_in_", None)
    if sample is None or names is None:
        return None
    try:
        table = parse_envelope(sample)
        return table.rows([str(n) for n in names] if table.names is not None else None)
    except BadInput:
        return None


def _has_string(value: Any) -> bool:
    """Whether a nested list or dict holds a string anywhere."""
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return any(_has_string(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_string(v) for v in value)
    return False


def _import_pandas() -> Any:
    """pandas if installed, else None: it is never a requirement of the runtime."""
    try:
        import pandas
    except ImportError:
        return None
    return pandas
