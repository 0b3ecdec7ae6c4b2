"""Request envelopes of ``POST /score``, as pure functions over decoded JSON.

Accepted bodies (exactly one of the keys, plus an optional ``"params"`` that is ignored):

- ``{"data": ...}``, the Azure ML convention: a list of rows, a list of records or a dict of columns;
- MLflow's ``{"dataframe_split": {"columns": [...], "data": [[...]]}}``,
  ``{"dataframe_records": [{...}]}``, ``{"instances": [...]}`` and ``{"inputs": [...] | {col: [...]}}``.

``parse_envelope`` turns any of them into a ``Table``; ``Table.rows`` then lays the values out
in the column order a model expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ENVELOPE_KEYS = ("data", "dataframe_split", "dataframe_records", "instances", "inputs")
IGNORED_KEYS = frozenset({"params"})


class Layout(StrEnum):
    """How the values of a ``Table`` are held."""

    ROWS = "rows"  # a list of rows (or any nested list: a tensor); columns are optional names
    RECORDS = "records"  # a list of {column: value} objects
    COLUMNS = "columns"  # a {column: [values]} object


class BadInput(ValueError):
    """The request cannot be scored as sent: answered with 400 (or ``status``) and a JSON error.

    ``error`` is a stable code (``invalid_json``, ``invalid_request``, ``invalid_input``, ...);
    the message says what to change. It never contains a stack trace.
    """

    def __init__(self, error: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Table:
    """The input of one scoring call, before a flavor converts it to its array type."""

    layout: Layout
    values: Any
    columns: tuple[str, ...] | None = None

    @property
    def names(self) -> tuple[str, ...] | None:
        """The column names the client sent, in the order it sent them (None when positional)."""
        if self.layout is Layout.RECORDS:
            return tuple(self.values[0]) if self.values else ()
        if self.layout is Layout.COLUMNS:
            return tuple(self.values)
        return self.columns

    def rows(self, order: Sequence[str] | None = None) -> list[Any]:
        """Return the values as a list of rows, columns laid out in ``order`` when given.

        Without ``order`` named values keep the client's column order. Extra columns that
        ``order`` does not name are dropped; a missing one raises ``BadInput``.
        """
        if self.layout is Layout.ROWS:
            if order is None or self.columns is None or tuple(order) == self.columns:
                return self.values  # type: ignore[no-any-return]
            index = _column_index(self.columns, order)
            return [_pick(row, index) for row in self.values]
        if self.layout is Layout.RECORDS:
            names = tuple(order) if order is not None else self.names or ()
            return [_record_row(record, names, i) for i, record in enumerate(self.values)]
        names = tuple(order) if order is not None else tuple(self.values)
        missing = [name for name in names if name not in self.values]
        if missing:
            raise BadInput("invalid_input", f"missing column(s): {', '.join(map(str, missing))}")
        return [list(row) for row in zip(*(self.values[name] for name in names), strict=True)]


def decode_json(body: bytes) -> Any:
    """Decode a JSON request body, raising ``BadInput`` (invalid_json) when it is not JSON."""
    if not body:
        raise BadInput("invalid_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadInput("invalid_json", f"the request body is not valid UTF-8 JSON: {_short(e)}") from None


def parse_envelope(doc: Any) -> Table:
    """Turn a decoded request body into a ``Table``; raise ``BadInput`` naming what is wrong."""
    if not isinstance(doc, dict):
        raise BadInput("invalid_request", f"the body must be a JSON object with one of: {_keys_text()}")
    keys = [key for key in doc if key not in IGNORED_KEYS]
    if len(keys) != 1 or keys[0] not in ENVELOPE_KEYS:
        found = ", ".join(repr(k) for k in keys) or "none"
        raise BadInput("invalid_request", f"the body must have exactly one of {_keys_text()}; found {found}")
    key = keys[0]
    value = doc[key]
    if key == "dataframe_split":
        return _dataframe_split(value)
    if key == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise BadInput("invalid_input", "'dataframe_records' must be a list of objects")
        return _nonempty(Table(Layout.RECORDS, value))
    return _nonempty(_free_form(key, value))


def _free_form(key: str, value: Any) -> Table:
    """Interpret the value of ``data``, ``instances`` or ``inputs``: rows, records or columns."""
    if isinstance(value, dict):
        if not all(isinstance(v, list) for v in value.values()):
            raise BadInput("invalid_input", f"'{key}' as an object must map each column to a list of values")
        lengths = {len(v) for v in value.values()}
        if len(lengths) > 1:
            raise BadInput("invalid_input", f"the columns of '{key}' have different lengths")
        return Table(Layout.COLUMNS, value)
    if not isinstance(value, list):
        raise BadInput("invalid_input", f"'{key}' must be a list of rows, a list of records or an object")
    if value and isinstance(value[0], dict):
        if not all(isinstance(r, dict) for r in value):
            raise BadInput("invalid_input", f"'{key}' mixes records (objects) with other values")
        return Table(Layout.RECORDS, value)
    return Table(Layout.ROWS, value)


def _dataframe_split(value: Any) -> Table:
    """Interpret pandas' ``split`` orientation: ``{"columns": [...], "data": [[...]], "index"?: [...]}``."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise BadInput("invalid_input", "'dataframe_split' must be an object with a 'data' list of rows")
    columns = value.get("columns")
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str | int) for c in columns)):
        raise BadInput("invalid_input", "'dataframe_split.columns' must be a list of column names")
    rows = value["data"]
    if columns is not None:
        width = len(columns)
        if any(not isinstance(row, list) or len(row) != width for row in rows):
            raise BadInput("invalid_input", f"every row of 'dataframe_split.data' must have {width} values")
        return _nonempty(Table(Layout.ROWS, rows, tuple(str(c) for c in columns)))
    return _nonempty(Table(Layout.ROWS, rows))


def _nonempty(table: Table) -> Table:
    """Refuse an empty batch: there is nothing to predict."""
    if not table.values or (table.layout is Layout.COLUMNS and not next(iter(table.values.values()))):
        raise BadInput("invalid_input", "the input holds no rows")
    return table


def _column_index(have: Sequence[str], order: Sequence[str]) -> list[int]:
    """Positions of ``order``'s columns in ``have``; ``BadInput`` if one is missing."""
    position = {name: i for i, name in enumerate(have)}
    missing = [name for name in order if name not in position]
    if missing:
        raise BadInput("invalid_input", f"missing column(s): {', '.join(map(str, missing))}")
    return [position[name] for name in order]


def _pick(row: Any, index: list[int]) -> list[Any]:
    """Reorder one row by column positions."""
    return [row[i] for i in index]


def _record_row(record: Mapping[str, Any], names: Sequence[str], i: int) -> list[Any]:
    """One record as a row in ``names`` order; ``BadInput`` naming the record and column if absent."""
    try:
        return [record[name] for name in names]
    except KeyError as e:
        raise BadInput("invalid_input", f"record {i} has no column {e.args[0]!r}") from None


def _keys_text() -> str:
    """The accepted envelope keys, quoted."""
    return ", ".join(f"'{k}'" for k in ENVELOPE_KEYS)


def _short(error: BaseException, limit: int = 200) -> str:
    """An exception's message, shortened for an HTTP error body."""
    text = str(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."
