"""A version's input sample and expected output: the request body that smoke tests and the
scoring server's swagger use, checked against the shapes the scoring server accepts, and
the predictions it should answer with. For an MLflow model both can come from its files:
the serving or input example its ``MLmodel`` names, and an ``expected.json`` beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelcd.errors import InvalidInput, PayloadTooLarge

MAX_SAMPLE_BYTES = 1024 * 1024
SERVING_EXAMPLE = "serving_input_example.json"  # MLflow's example as a scoring request
INPUT_EXAMPLE = "input_example.json"  # MLflow's example as the model's input
EXPECTED_FILE = "expected.json"  # a user's expected predictions for the sample, beside MLmodel
SAMPLE_KEYS = ("data", "dataframe_split", "dataframe_records", "instances", "inputs")
EXTRA_SAMPLE_KEYS = ("params",)  # MLflow's inference parameters may ride along
SAMPLE_SHAPES = ('{"data": [[...], ...]}, {"dataframe_split": {"columns": [...], "data": [[...], ...]}}, '
                 '{"dataframe_records": [{...}, ...]}, {"instances": [...]}, {"inputs": ...}, '
                 "or a bare list of rows")


def _bad(field: str, problem: str, fix: str) -> InvalidInput:
    return InvalidInput(f"{field}: {problem}; {fix}", field=field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(value: Any, field: str, fix: str) -> Any:
    """Decode JSON text (str or bytes), or check an already decoded value is plain JSON."""
    if isinstance(value, bytes | bytearray | str):
        if len(value) > MAX_SAMPLE_BYTES:
            raise PayloadTooLarge(f"{field}: {len(value)} bytes (at most {MAX_SAMPLE_BYTES}); use a few rows",
                                  field=field)
        try:
            return json.loads(value, parse_constant=_reject_constant)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _bad(field, f"not valid JSON ({e})", fix) from None
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise _bad(field, f"not plain JSON ({e})", fix) from None
    if size > MAX_SAMPLE_BYTES:
        raise PayloadTooLarge(f"{field}: {size} bytes as JSON (at most {MAX_SAMPLE_BYTES}); use a few rows",
                              field=field)
    return value


def _check_rows(rows: Any, key: str, field: str, fix: str) -> None:
    """``rows`` is a non-empty list of rows of one kind: all lists of one width, all
    objects, or all scalars."""
    if not isinstance(rows, list) or not rows:
        raise _bad(field, f"{key!r} must be a non-empty list of rows", fix)
    if all(isinstance(r, list) for r in rows):
        widths = sorted({len(r) for r in rows})
        if len(widths) > 1:
            raise _bad(field, f"{key!r} is ragged: rows have {', '.join(map(str, widths))} values", fix)
        if widths == [0]:
            raise _bad(field, f"{key!r} rows are empty", fix)
    elif not (all(isinstance(r, dict) for r in rows) or not any(isinstance(r, list | dict) for r in rows)):
        raise _bad(field, f"{key!r} mixes lists, objects and values", fix)


def _check_split(split: Any, field: str, fix: str) -> None:
    if not isinstance(split, dict):
        raise _bad(field, "'dataframe_split' must be an object with 'columns' and 'data'", fix)
    unknown = sorted(set(split) - {"columns", "data", "index"})
    if unknown:
        raise _bad(field, f"'dataframe_split' has unknown keys {unknown} (allowed: columns, data, index)", fix)
    rows = split.get("data")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise _bad(field, "'dataframe_split.data' must be a non-empty list of row lists", fix)
    _check_rows(rows, "dataframe_split.data", field, fix)
    columns = split.get("columns")
    if columns is not None and (not isinstance(columns, list) or len(columns) != len(rows[0])):
        raise _bad(field, f"'dataframe_split.columns' must list one name per value ({len(rows[0])})", fix)
    index = split.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        raise _bad(field, f"'dataframe_split.index' must list one label per row ({len(rows)})", fix)


def _check_body(body: dict[str, Any], field: str, fix: str) -> None:
    keys = [k for k in body if k in SAMPLE_KEYS]
    unknown = sorted(k for k in body if k not in SAMPLE_KEYS and k not in EXTRA_SAMPLE_KEYS)
    if unknown or len(keys) != 1:
        got = ", ".join(map(repr, body)) or "no keys"
        raise _bad(field, f"expected exactly one of {', '.join(SAMPLE_KEYS)} (got {got})", fix)
    if "params" in body and not isinstance(body["params"], dict):
        raise _bad(field, "'params' must be an object", fix)
    key = keys[0]
    value = body[key]
    if key == "data":
        _check_rows(value, key, field, fix)
    elif key == "dataframe_split":
        _check_split(value, field, fix)
    elif key == "dataframe_records":
        if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
            raise _bad(field, "'dataframe_records' must be a non-empty list of objects", fix)
    elif key == "instances":
        if not isinstance(value, list) or not value:
            raise _bad(field, "'instances' must be a non-empty list", fix)
    elif value is None or value == [] or value == {}:
        raise _bad(field, "'inputs' is empty", fix)


def parse_sample(value: Any, field: str = "sample") -> dict[str, Any] | None:
    """The input sample as a scoring request body (None stays None). ``value`` is JSON text
    or its decoded value: one of ``{"data": [...]}``, ``{"dataframe_split": {...}}``,
    ``{"dataframe_records": [...]}``, ``{"instances": [...]}``, ``{"inputs": ...}`` (optionally
    with ``"params"``); a bare list becomes ``{"data": list}``. Anything else is
    InvalidInput naming the accepted shapes."""
    if value is None:
        return None
    fix = f"send one of {SAMPLE_SHAPES}"
    body = _load_json(value, field, fix)
    if isinstance(body, list):
        body = {"data": body}
    if not isinstance(body, dict):
        raise _bad(field, f"a JSON {type(body).__name__} is not a request body", fix)
    _check_body(body, field, fix)
    return body


def sample_rows(sample: Mapping[str, Any]) -> int | None:
    """How many rows a parsed sample holds, when that can be told from its shape."""
    if "dataframe_split" in sample:
        return len(sample["dataframe_split"]["data"])
    for key in ("data", "dataframe_records", "instances"):
        if key in sample:
            return len(sample[key])
    inputs = sample.get("inputs")
    if isinstance(inputs, list):
        return len(inputs)
    if isinstance(inputs, dict) and inputs and all(isinstance(v, list) for v in inputs.values()):
        lengths = {len(v) for v in inputs.values()}
        return lengths.pop() if len(lengths) == 1 else None
    return None


def parse_expected(value: Any, sample: Mapping[str, Any] | None = None, field: str = "expected") -> list[Any] | None:
    """The expected predictions for the sample (None stays None): a JSON list, or
    ``{"predictions": [...]}``, with one entry per sample row when the row count is known."""
    if value is None:
        return None
    fix = 'send a JSON list with one prediction per sample row, or {"predictions": [...]}'
    expected = _load_json(value, field, fix)
    if isinstance(expected, dict) and set(expected) == {"predictions"}:
        expected = expected["predictions"]
    if not isinstance(expected, list):
        raise _bad(field, f"a JSON {type(expected).__name__} is not a list of predictions", fix)
    if not expected:
        raise _bad(field, "the list of predictions is empty", fix)
    rows = sample_rows(sample) if isinstance(sample, Mapping) else None
    if rows is not None and rows != len(expected):
        raise _bad(field, f"{len(expected)} predictions for a sample of {rows} rows", fix)
    return expected


def example_to_request(example: Any, info: Mapping[str, Any]) -> Any:
    """An MLflow ``input_example.json`` document as a scoring request (see MLflow's
    ``models/utils.py`` ``_Example``: dataframes are saved split/records, arrays and JSON
    objects become ``inputs``; ``{"inputs": ..., "params": ...}`` when params were given)."""
    params = None
    if info.get("params") and isinstance(example, dict) and "inputs" in example:
        example, params = example["inputs"], example.get("params")
    kind = info.get("type")
    if kind == "dataframe":
        body: dict[str, Any] = ({"dataframe_records": example} if info.get("pandas_orient") == "records"
                                else {"dataframe_split": example})
    elif kind in ("ndarray", "json_object"):
        tf_serving = info.get("format") == "tf-serving" and isinstance(example, dict) and "inputs" in example
        body = example if tf_serving else {"inputs": example}
    elif kind is None and isinstance(example, dict) and "data" in example:
        body = {"dataframe_split": example}
    elif kind is None and isinstance(example, list):
        body = {"inputs": example}
    else:
        raise ValueError(f"input example type {kind!r} has no scoring request form")
    if params:
        body = {**body, "params": params}
    return body


def _inside(folder: Path, rel: Any) -> Path | None:
    """``folder / rel`` when ``rel`` is a relative path that stays inside, else None."""
    from modelcd.registry.archive import safe_relpath

    try:
        clean = safe_relpath(str(rel))
    except ValueError:
        return None
    return folder / clean if clean else None


def mlmodel_sample(folder: Path, mlmodel: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(scoring request, None) from the MLflow model in ``folder``: its serving example
    (``serving_input_example.json``), else its input example (``input_example.json``) as a
    request; (None, note) when neither gives a usable sample, (None, None) when there is none."""
    info = mlmodel.get("saved_input_example_info")
    info = info if isinstance(info, dict) else {}
    serving = _inside(folder, info.get("serving_input_path") or SERVING_EXAMPLE)
    example = _inside(folder, info.get("artifact_path") or INPUT_EXAMPLE)
    try:
        if serving is not None and serving.is_file():
            return parse_sample(serving.read_bytes(), field="sample"), None
        if example is not None and example.is_file():
            doc = json.loads(example.read_bytes())
            return parse_sample(example_to_request(doc, info), field="sample"), None
    except (InvalidInput, ValueError) as e:
        reason = e.message if isinstance(e, InvalidInput) else str(e)
        return None, f"sample: the model's input example is not usable as a scoring request ({reason})"
    return None, None


def files_expected(folder: Path, sample: Mapping[str, Any] | None) -> list[Any] | None:
    """The predictions an ``expected.json`` beside the model's ``MLmodel`` in ``folder`` holds
    for ``sample``, or one under ``artifacts/`` (where ``log_model(artifacts=...)`` puts it);
    None without either. InvalidInput naming the file when it is not a list of predictions."""
    for rel in (EXPECTED_FILE, f"artifacts/{EXPECTED_FILE}"):
        path = folder / rel
        if not path.is_file():
            continue
        try:
            return parse_expected(path.read_bytes(), sample, field="expected")
        except InvalidInput as e:
            raise InvalidInput(f"{rel} among the model's files: {e.message}", field="expected") from None
    return None
