"""Pure parts of the scoring runtime: envelopes, array conversion, config, OpenAPI, metrics text."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from modelcd.scoring import RUNTIME_REQUIREMENTS
from modelcd.scoring.app import AsgiApp, ScoringApp, WsgiApp
from modelcd.scoring.config import ConfigError, ScoringConfig, load_config, parse_config
from modelcd.scoring.flavors import SklearnScorer, to_matrix
from modelcd.scoring.metrics import Metrics, render_text
from modelcd.scoring.openapi import build_document, infer_schema, merge_schemas
from modelcd.scoring.protocol import BadInput, Layout, decode_json, parse_envelope


def rows_of(doc: Any, order: list[str] | None = None) -> list[Any]:
    return parse_envelope(doc).rows(order)


def error_of(doc: Any) -> str:
    with pytest.raises(BadInput) as info:
        parse_envelope(doc).rows(["a", "b"])
    return info.value.message


def test_runtime_requirements_are_pip_strings() -> None:
    assert RUNTIME_REQUIREMENTS and all(isinstance(r, str) and ">=" in r for r in RUNTIME_REQUIREMENTS)
    assert any(r.startswith("gunicorn") for r in RUNTIME_REQUIREMENTS)


def test_data_rows_stay_positional() -> None:
    assert rows_of({"data": [[1, 2], [3, 4]]}) == [[1, 2], [3, 4]]
    assert parse_envelope({"data": [[1, 2]]}).names is None


def test_dataframe_split_reorders_to_model_columns() -> None:
    doc = {"dataframe_split": {"columns": ["b", "a"], "data": [[2, 1], [4, 3]], "index": [0, 1]}}
    assert rows_of(doc, ["a", "b"]) == [[1, 2], [3, 4]]
    assert rows_of(doc) == [[2, 1], [4, 3]]


def test_records_and_instances_follow_the_given_order() -> None:
    records = [{"b": 2, "a": 1, "extra": 9}, {"a": 3, "b": 4, "extra": 9}]
    assert rows_of({"dataframe_records": records}, ["a", "b"]) == [[1, 2], [3, 4]]
    assert rows_of({"instances": records}, ["a", "b"]) == [[1, 2], [3, 4]]
    assert rows_of({"instances": [[1, 2]]}) == [[1, 2]]


def test_inputs_as_columns_or_list() -> None:
    table = parse_envelope({"inputs": {"b": [2, 4], "a": [1, 3]}})
    assert table.layout is Layout.COLUMNS
    assert table.rows(["a", "b"]) == [[1, 2], [3, 4]]
    assert rows_of({"inputs": [[1, 2]], "params": {"x": 1}}) == [[1, 2]]


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ([1, 2], "must be a JSON object"),
        ({}, "exactly one of"),
        ({"data": [[1]], "inputs": [[1]]}, "exactly one of"),
        ({"columns": ["a"], "data": [[1]]}, "exactly one of"),
        ({"data": []}, "no rows"),
        ({"data": 5}, "must be a list"),
        ({"inputs": {"a": [1], "b": [1, 2]}}, "different lengths"),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}, "every row"),
        ({"dataframe_split": [[1, 2]]}, "'data' list"),
        ({"dataframe_records": [[1, 2]]}, "list of objects"),
        ({"dataframe_records": [{"a": 1}]}, "no column 'b'"),
        ({"dataframe_split": {"columns": ["a", "c"], "data": [[1, 2]]}}, "missing column(s): b"),
        ({"inputs": {"a": [1]}}, "missing column(s): b"),
    ],
)
def test_bad_envelopes_are_named(doc: Any, fragment: str) -> None:
    assert fragment in error_of(doc)


def test_decode_json_refuses_non_json() -> None:
    for body in (b"", b"{not json", b"\xff\xfe\x00"):
        with pytest.raises(BadInput) as info:
            decode_json(body)
        assert info.value.error == "invalid_json"


def test_to_matrix_accepts_numbers_and_nulls_only() -> None:
    assert to_matrix([[1, 2.5]], "float64").tolist() == [[1.0, 2.5]]
    assert math.isnan(to_matrix([[None, 1]], "float64")[0][0])
    for rows in ([["a", 1]], [[1, 2], [3]], [[{"x": 1}, 2]]):
        with pytest.raises(BadInput):
            to_matrix(rows, "float64")


class FrameOnly:
    """A model that only accepts named columns, as a ColumnTransformer on strings does."""

    feature_names_in_ = ("a", "b")
    n_features_in_ = 2

    def predict(self, x: Any) -> list[float]:
        if not hasattr(x, "columns"):
            raise ValueError("Specifying the columns using strings is only supported for dataframes")
        return list(x["a"] * 10 + x["b"])


class Linear:
    """A numeric model fit with feature names that answers the same for arrays."""

    feature_names_in_ = ("a", "b")
    n_features_in_ = 2

    def predict(self, x: Any) -> list[float]:
        return [float(r[0] * 10 + r[1]) for r in (x.to_numpy() if hasattr(x, "to_numpy") else x)]


def test_sklearn_scorer_probes_for_the_fast_array_path() -> None:
    pytest.importorskip("pandas")
    body = json.dumps({"dataframe_records": [{"b": 2, "a": 1}]}).encode()
    frame = SklearnScorer(FrameOnly(), probe=[[1.0, 2.0]])
    fast = SklearnScorer(Linear(), probe=[[1.0, 2.0]])
    assert frame._pandas is not None
    assert fast._pandas is None
    assert frame.score(body) == fast.score(body) == {"predictions": [12.0]}
    with pytest.raises(BadInput, match="expected 2 feature"):
        fast.score(b'{"data": [[1, 2, 3]]}')


def test_config_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": "", "version": True, "flavor": "tensorflow"})
    message = str(info.value)
    assert "'model'" in message and "'version'" in message and "'flavor'" in message
    with pytest.raises(ConfigError, match="needs 'entry_script'"):
        parse_config({"model": "m", "version": 1, "flavor": "custom"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    good = parse_config({"model": "m", "version": 2, "flavor": "sklearn", "model_file": "m.pkl", "sample": None})
    assert good == ScoringConfig("m", 2, "sklearn", "m.pkl")


def test_infer_schema_merges_numbers() -> None:
    schema = infer_schema({"data": [[1, 2.5], [3, 4]], "name": "x", "flag": True})
    assert schema["properties"]["data"] == {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number", "format": "double"}},
    }
    assert schema["properties"]["name"] == {"type": "string"}
    assert schema["properties"]["flag"] == {"type": "boolean"}
    assert merge_schemas({"type": "string"}, {"type": "integer"}) == {}


def test_documents_for_swagger_2_and_openapi_3() -> None:
    config = ScoringConfig("iris", 3, "sklearn", "m.pkl", sample={"data": [[1.0, 2.0]]}, expected=[0])
    v2 = build_document(config, 2, auth=True)
    assert v2["swagger"] == "2.0"
    assert v2["definitions"]["ScoringInput"]["example"] == {"data": [[1.0, 2.0]]}
    assert v2["definitions"]["ScoringOutput"]["example"] == {"predictions": [0]}
    assert v2["paths"]["/score"]["post"]["security"] == [{"Bearer": []}]
    v3 = build_document(config, 3)
    assert v3["openapi"].startswith("3.")
    assert "securitySchemes" not in v3["components"]
    generic = build_document(ScoringConfig("m", 1, "custom", entry_script="s.py"))
    assert generic["definitions"]["ScoringInput"]["type"] == "object"


def test_metrics_sum_worker_files(tmp_path: Path) -> None:
    metrics = Metrics(str(tmp_path))
    metrics.observe("score", 200, 0.0007, rows=3)
    metrics.observe("score", 500, 0.02)
    metrics.observe("healthz", 200)
    # A second worker's file (another pid): its counts add up.
    (tmp_path / "worker-999999.bin").write_bytes((tmp_path / f"worker-{__import__('os').getpid()}.bin").read_bytes())
    text = metrics.render({"model": 'a"b', "version": "1", "flavor": "sklearn"})
    assert 'modelcd_scoring_requests_total{route="score",code="200"} 2' in text
    assert 'modelcd_scoring_requests_total{route="score",code="500"} 2' in text
    assert "modelcd_scoring_model_errors_total 2" in text
    assert "modelcd_scoring_rows_total 6" in text
    assert 'modelcd_scoring_request_duration_seconds_bucket{le="0.001"} 2' in text
    assert 'modelcd_scoring_request_duration_seconds_bucket{le="+Inf"} 4' in text
    assert "modelcd_scoring_request_duration_seconds_count 4" in text
    assert 'model="a\\"b"' in text


def test_render_text_without_traffic() -> None:
    from modelcd.scoring.metrics import SLOTS

    text = render_text([0.0] * SLOTS, {"model": "m"})
    assert 'modelcd_scoring_requests_total{route="score",code="200"} 0' in text


class Echo:
    """A scorer that answers the number of rows."""

    flavor = "sklearn"

    def score(self, body: bytes) -> Any:
        return {"predictions": [len(json.loads(body)["data"])]}


def small_app(tmp_path: Path, key: str | None = None) -> ScoringApp:
    config = ScoringConfig("m", 1, "sklearn", "m.pkl")
    return ScoringApp(config, Echo(), Metrics(str(tmp_path)), key=key, max_body=64)


def test_app_limits_body_size_and_checks_key(tmp_path: Path) -> None:
    app = small_app(tmp_path, key="k")
    assert app.handle("POST", "/score", "", JSONT, "Bearer k", None).status == 413
    assert app.handle("POST", "/score", "", JSONT, "Bearer x", b"{}").status == 401
    assert app.handle("POST", "/score", "", JSONT, None, b"{}").status == 401
    ok = app.handle("POST", "/score", "", "application/json; charset=utf-8", "Bearer k", b'{"data":[[1]]}')
    assert (ok.status, ok.body) == (200, b'{"predictions":[1]}')
    assert app.handle("POST", "/score", "", "application/json; charset=latin-1", "Bearer k", b"{}").status == 415
    assert app.handle("DELETE", "/healthz", "", None, None, b"").status == 405


JSONT = "application/json"


def test_asgi_adapter_reads_chunks_and_handles_lifespan(tmp_path: Path) -> None:
    asgi = AsgiApp(small_app(tmp_path))

    async def call(scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asgi(scope, receive, send)
        return sent

    scope = {"type": "http", "method": "POST", "path": "/score", "query_string": b"", "headers": []}
    chunks = [
        {"type": "http.request", "body": b'{"data":', "more_body": True},
        {"type": "http.request", "body": b"[[1],[2]]}", "more_body": False},
    ]
    sent = asyncio.run(call(scope, chunks))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"predictions":[2]}'
    big = [{"type": "http.request", "body": b"x" * 65, "more_body": False}]
    assert asyncio.run(call(scope, big))[0]["status"] == 413
    life = asyncio.run(call({"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]))
    assert [m["type"] for m in life] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_wsgi_adapter(tmp_path: Path) -> None:
    import io

    wsgi = WsgiApp(small_app(tmp_path))
    statuses: list[str] = []
    body = b'{"data":[[1]]}'
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/score",
        "CONTENT_TYPE": JSONT,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    out = wsgi(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"] and b"".join(out) == b'{"predictions":[1]}'
    environ.update({"CONTENT_LENGTH": "100000", "wsgi.input": io.BytesIO(b"")})
    wsgi(environ, lambda status, headers: statuses.append(status))
    assert statuses[-1] == "413 Request Entity Too Large"


def test_runtime_imports_nothing_else_of_modelcd() -> None:
    import subprocess
    import sys

    code = (
        "import sys, modelcd.scoring.server, modelcd.scoring.app, modelcd.scoring.flavors\n"
        "bad = sorted(m for m in sys.modules if m.startswith('modelcd.') and not m.startswith('modelcd.scoring'))\n"
        "heavy = sorted(m for m in ('numpy', 'pandas', 'sklearn', 'flask', 'sqlalchemy') if m in sys.modules)\n"
        "print(bad, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[] []"
