"""Input samples and expected outputs: the request-body shapes the scoring server accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelcd.errors import InvalidInput, PayloadTooLarge
from modelcd.registry.samples import MAX_SAMPLE_BYTES, parse_expected, parse_sample, sample_rows


@pytest.mark.parametrize(("value", "body", "rows"), [
    ({"data": [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3]]}, None, 2),
    ('{"data": [[1, 2], [3, 4], [5, 6]]}', {"data": [[1, 2], [3, 4], [5, 6]]}, 3),
    (b'{"data": [1, 2, 3]}', {"data": [1, 2, 3]}, 3),
    ([[1, 2], [3, 4]], {"data": [[1, 2], [3, 4]]}, 2),
    ("[[0.5]]", {"data": [[0.5]]}, 1),
    ({"data": [{"a": 1}, {"a": 2, "b": 3}]}, None, 2),
    ({"data": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]}, None, 2),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}, None, 2),
    ({"dataframe_split": {"columns": ["a"], "index": [7], "data": [[1]]}}, None, 1),
    ({"dataframe_split": {"data": [[1, 2]]}}, None, 1),
    ({"dataframe_records": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}, None, 2),
    ({"instances": [[1, 2], [3, 4], [5, 6]]}, None, 3),
    ({"instances": [{"x": [1, 2]}]}, None, 1),
    ({"inputs": [[1, 2]]}, None, 1),
    ({"inputs": {"a": [1, 2, 3], "b": [4, 5, 6]}}, None, 3),
    ({"inputs": {"a": [1, 2], "b": [3]}}, None, None),
    ({"inputs": {"text": "hello"}}, None, None),
    ({"inputs": "hello"}, None, None),
    ({"dataframe_records": [{"a": 1}], "params": {"threshold": 0.5}}, None, 1),
])
def test_accepted_sample_shapes(value: Any, body: Any, rows: int | None) -> None:
    parsed = parse_sample(value)
    assert parsed == (body if body is not None else value)
    assert parsed is not None and sample_rows(parsed) == rows


def test_none_stays_none() -> None:
    assert parse_sample(None) is None
    assert parse_expected(None) is None


@pytest.mark.parametrize(("value", "problem"), [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    ('{"data": [NaN]}', "not valid JSON"),
    ({"data": [float("nan")]}, "not plain JSON"),
    ({"data": {1, 2}}, "not plain JSON"),
    ("[]", "'data' must be a non-empty list of rows"),
    ([], "'data' must be a non-empty list of rows"),
    ({}, "expected exactly one of data, dataframe_split, dataframe_records, instances, inputs (got no keys)"),
    ({"rows": [[1]]}, "(got 'rows')"),
    ({"data": [[1]], "instances": [[1]]}, "(got 'data', 'instances')"),
    ({"data": [[1]], "extra": 1}, "(got 'data', 'extra')"),
    ({"data": "1,2,3"}, "'data' must be a non-empty list of rows"),
    ({"data": [[1, 2], [3]]}, "'data' is ragged: rows have 1, 2 values"),
    ({"data": [[], []]}, "'data' rows are empty"),
    ({"data": [[1], 2]}, "'data' mixes lists, objects and values"),
    ({"data": [{"a": 1}, [1]]}, "'data' mixes lists, objects and values"),
    ({"dataframe_split": [[1, 2]]}, "'dataframe_split' must be an object with 'columns' and 'data'"),
    ({"dataframe_split": {"columns": ["a"]}}, "'dataframe_split.data' must be a non-empty list of row lists"),
    ({"dataframe_split": {"data": [1, 2]}}, "'dataframe_split.data' must be a non-empty list of row lists"),
    ({"dataframe_split": {"data": [[1, 2], [3]]}}, "'dataframe_split.data' is ragged"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, "one name per value (2)"),
    ({"dataframe_split": {"index": [0, 1], "data": [[1, 2]]}}, "one label per row (1)"),
    ({"dataframe_split": {"data": [[1]], "orient": "split"}}, "unknown keys ['orient']"),
    ({"dataframe_records": {"a": 1}}, "'dataframe_records' must be a non-empty list of objects"),
    ({"dataframe_records": [[1, 2]]}, "'dataframe_records' must be a non-empty list of objects"),
    ({"instances": []}, "'instances' must be a non-empty list"),
    ({"inputs": None}, "'inputs' is empty"),
    ({"inputs": []}, "'inputs' is empty"),
    ({"data": [[1]], "params": [1]}, "'params' must be an object"),
    ("42", "a JSON int is not a request body"),
    ('"text"', "a JSON str is not a request body"),
])
def test_malformed_samples_name_the_field_and_the_shapes(value: Any, problem: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_sample(value)
    assert e.value.field == "sample"
    assert problem in e.value.message
    assert '{"data": [[...], ...]}' in e.value.message and "dataframe_split" in e.value.message
    assert "a bare list of rows" in e.value.message


def test_sample_field_name_can_be_changed() -> None:
    with pytest.raises(InvalidInput) as e:
        parse_sample("nope", field="metadata.sample")
    assert e.value.field == "metadata.sample"


def test_oversized_sample() -> None:
    big = json.dumps({"data": [[0.123456789] * 1000] * 200})
    assert len(big) > MAX_SAMPLE_BYTES
    with pytest.raises(PayloadTooLarge, match="use a few rows") as e:
        parse_sample(big)
    assert e.value.field == "sample"
    with pytest.raises(PayloadTooLarge):
        parse_sample(json.loads(big))


@pytest.mark.parametrize(("value", "sample", "expected"), [
    ([0, 1], {"data": [[1], [2]]}, [0, 1]),
    ('{"predictions": ["setosa"]}', {"dataframe_records": [{"a": 1}]}, ["setosa"]),
    ("[[0.1, 0.9], [0.8, 0.2]]", {"instances": [1, 2]}, [[0.1, 0.9], [0.8, 0.2]]),
    ([1, 2, 3], {"inputs": {"text": "x"}}, [1, 2, 3]),  # row count unknown: any length
    ([1], None, [1]),
])
def test_expected_outputs(value: Any, sample: Any, expected: list[Any]) -> None:
    assert parse_expected(value, sample) == expected


@pytest.mark.parametrize(("value", "sample", "problem"), [
    ([0, 1, 2], {"data": [[1], [2]]}, "3 predictions for a sample of 2 rows"),
    ({"predictions": [0]}, {"dataframe_split": {"data": [[1], [2]]}}, "1 predictions for a sample of 2 rows"),
    ([], None, "the list of predictions is empty"),
    ('{"predictions": []}', None, "the list of predictions is empty"),
    ({"outputs": [1]}, None, "a JSON dict is not a list of predictions"),
    ("7", None, "a JSON int is not a list of predictions"),
    ("[1,", None, "not valid JSON"),
])
def test_bad_expected_outputs(value: Any, sample: Any, problem: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_expected(value, sample)
    assert e.value.field == "expected"
    assert problem in e.value.message
    assert "one prediction per sample row" in e.value.message
