"""Any MLflow model, served through its ``python_function`` flavor.

The bundle's environment holds the model's own requirements with ``mlflow-skinny``; this
module imports MLflow only when a pyfunc model is loaded, and uses the parts of it that
MLflow's own scoring server uses: ``mlflow.pyfunc.load_model``, the request parsing of
``mlflow.pyfunc.scoring_server`` (``infer_and_parse_data``: the body's columns cast to the
signature's types) and ``PyFuncModel.predict``, which enforces the signature. A request that
does not fit is a 400 naming the column and the type the signature expects; an exception of
the model's own code is a 500 (``ModelError``), as for the other flavors.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from .protocol import BadInput, decode_json

MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
_SCHEMA_FAILURES = ("Failed to enforce", "Invalid parameters found")  # MLflow's messages, 2.x and 3.x
_DETAIL_LIMIT = 300
_NOT_COMPATIBLE = "Data is not compatible with model signature. "


class PyfuncScorer:
    """An ``mlflow.pyfunc.PyFuncModel``: MLflow's request formats (plus modelcd's ``{"data": rows}``),
    the model's signature enforced, answers shaped as MLflow's server shapes them."""

    flavor = "pyfunc"

    def __init__(self, model: Any, parse: Callable[[Any, Any], Any], jsonable: Callable[[Any], Any],
                 model_error: Callable[[BaseException], Exception]) -> None:
        self._model = model
        self._parse = parse
        self._jsonable = jsonable
        self._model_error = model_error
        self.schema = model.metadata.get_input_schema()
        self.columns: list[tuple[str, str, bool]] = _column_specs(self.schema)
        from mlflow.exceptions import MlflowException

        self._mlflow_exception = MlflowException

    def score(self, body: bytes) -> Any:
        """Decode, parse as MLflow's server does, predict; answer ``{"predictions": ...}``."""
        doc = decode_json(body)
        data, params = self.envelope(doc)
        try:
            parsed = self._parse(data, self.schema)
        except self._mlflow_exception as e:
            raise BadInput("invalid_input", self._explain(_message(e), doc)) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = self._model.predict(parsed, params=params) if params else self._model.predict(parsed)
        except self._mlflow_exception as e:
            if _message(e).startswith(_SCHEMA_FAILURES):
                raise BadInput("invalid_input", self._explain(_schema_detail(e), doc)) from None
            raise self._model_error(e) from e
        except Exception as e:
            raise self._model_error(e) from e
        return {"predictions": self._jsonable(result)}

    def envelope(self, doc: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the one MLflow input key and its value, params) of a request body; modelcd's
        ``{"data": rows}`` becomes ``dataframe_split`` with the signature's column names."""
        if not isinstance(doc, dict):
            raise BadInput("invalid_request", f"the body must be a JSON object with one of: {_keys_text()}")
        params = doc.get(PARAMS_KEY)
        if params is not None and not isinstance(params, dict):
            raise BadInput("invalid_request", "'params' must be an object of parameter names and values")
        keys = [k for k in doc if k != PARAMS_KEY]
        if len(keys) != 1 or keys[0] not in (*MLFLOW_KEYS, "data"):
            found = ", ".join(repr(k) for k in keys) or "none"
            raise BadInput("invalid_request", f"the body must have exactly one of {_keys_text()}; found {found}")
        key, value = keys[0], doc[keys[0]]
        if key == "data":
            key, value = self._from_data(value)
        return {key: value}, params

    def _from_data(self, rows: Any) -> tuple[str, Any]:
        """modelcd's ``{"data": ...}``: records stay records, rows get the signature's columns."""
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            return "dataframe_records", rows
        if isinstance(rows, list) and rows and all(isinstance(r, list) for r in rows) and self.columns:
            names = [name for name, _, _ in self.columns]
            if all(len(r) == len(names) for r in rows):
                return "dataframe_split", {"columns": names, "data": rows}
            raise BadInput("invalid_input", f"each row must hold {len(names)} values ({', '.join(names)})")
        return "inputs", rows

    def _explain(self, detail: str, doc: Any) -> str:
        """The 400 message: what did not fit (the column, when it can be found) and what the
        signature expects."""
        detail = _clip(detail).removeprefix("Invalid input. ").replace(_NOT_COMPATIBLE, "").rstrip(".")
        if "column" not in detail:
            found = _bad_column(doc, self.columns)
            if found:
                detail = f"{found} ({detail})"
        expected = ", ".join(f"{n} ({t}{'' if required else ', optional'})" for n, t, required in self.columns)
        if expected:
            return f"the input does not fit the model's signature: {detail}; expected columns: {expected}"
        return f"the input does not fit the model: {detail}"


def preimport() -> None:
    """Import MLflow's pyfunc machinery (and pandas) once, in the arbiter before it forks the
    workers, so each worker only loads the model: importing it is most of a pyfunc worker's
    start. Importing starts no thread (checked with MLflow 3.17), so forking after it is safe;
    the model itself is still loaded in each worker. An import failure is left for the
    worker's load to report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import mlflow.pyfunc
            import mlflow.pyfunc.scoring_server
            import mlflow.utils.proto_json_utils  # noqa: F401
        except Exception:  # reported by load_pyfunc in each worker, with the fix
            return


def load_pyfunc(model_path: str, model_error: Callable[[BaseException], Exception]) -> PyfuncScorer:
    """Load the MLflow model in the folder ``model_path`` (its ``MLmodel`` inside) with
    ``mlflow.pyfunc.load_model``; ``ImportError`` or the loader's own exception when it cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dependency-mismatch and pickle warnings: the build decided
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        import mlflow.pyfunc
        from mlflow.pyfunc import scoring_server

        model = mlflow.pyfunc.load_model(model_path)
    parse = getattr(scoring_server, "infer_and_parse_data", None) or scoring_server.infer_and_parse_json_input
    return PyfuncScorer(model, parse, _jsonable_function(), model_error)


def _jsonable_function() -> Callable[[Any], Any]:
    """MLflow's own conversion of predictions to JSON values (records for DataFrames)."""
    try:
        from mlflow.utils.proto_json_utils import _get_jsonable_obj
    except ImportError:  # an MLflow without it: numpy and pandas objects have tolist()
        return lambda value: value
    return lambda value: _get_jsonable_obj(value, pandas_orient="records")


def _column_specs(schema: Any) -> list[tuple[str, str, bool]]:
    """(name, type, required) of each named column of an MLflow input schema."""
    out = []
    for spec in getattr(schema, "inputs", None) or []:
        name = getattr(spec, "name", None)
        if name is None:
            continue
        kind = getattr(spec, "type", None)
        kind_text = getattr(kind, "name", None) or str(kind)
        out.append((str(name), kind_text, bool(getattr(spec, "required", True))))
    return out


def _message(error: BaseException) -> str:
    return str(getattr(error, "message", None) or error)


def _schema_detail(error: BaseException) -> str:
    """The reason MLflow's schema enforcement gave (its cause: "Incompatible input types for
    column a..."), without the request's data MLflow puts in front of it."""
    cause = error.__cause__ or error.__context__
    if cause is not None:
        return _message(cause)
    text = _message(error)
    return text.rsplit("Error: ", 1)[-1] if "Error: " in text else text


def _bad_column(doc: Any, columns: list[tuple[str, str, bool]]) -> str | None:
    """The first column whose values cannot be the signature's type, as "column 'a' (double)
    got 'x'", found by converting each column of the request on its own."""
    if not columns or not isinstance(doc, dict):
        return None
    import numpy

    kinds = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool"}
    for name, kind, _ in columns:
        values = _column_values(doc, name)
        if values is None or kind not in kinds:
            continue
        for value in values:
            if isinstance(value, str) or (kind != "boolean" and isinstance(value, bool)):
                return f"column {name!r} expects {kind}, got {value!r}"
            try:
                numpy.asarray([value]).astype(kinds[kind])
            except (TypeError, ValueError, OverflowError):
                return f"column {name!r} expects {kind}, got {value!r}"
    return None


def _column_values(doc: dict[str, Any], name: str) -> list[Any] | None:
    """The values of column ``name`` in any of the request shapes, or None."""
    for key in ("inputs", "instances", "dataframe_records", "data"):
        value = doc.get(key)
        if isinstance(value, dict) and isinstance(value.get(name), list):
            return list(value[name])
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            return [r[name] for r in value if name in r]
    split = doc.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("columns"), list) and name in split["columns"]:
        i = split["columns"].index(name)
        return [row[i] for row in split.get("data") or [] if isinstance(row, list) and len(row) > i]
    return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _keys_text() -> str:
    return ", ".join(f"'{k}'" for k in (*MLFLOW_KEYS, "data"))
