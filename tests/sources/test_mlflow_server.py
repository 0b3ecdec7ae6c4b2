"""modelcd.sources.mlflow_server against a real MLflow tracking server (tests/sources/mlflow_fixture.py):
fetching versions, polling for new ones, and webhooks the real server signs and sends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import joblib
import pandas
import pytest
from packaging.requirements import Requirement

from modelcd.domain import Flavor
from modelcd.errors import InvalidInput, NotFound
from modelcd.registry.flavors import detect_flavor
from modelcd.registry.samples import parse_sample
from modelcd.sources.mlflow_server import (
    PollCursor,
    SourceUnavailable,
    VersionRef,
    connect_webhook,
    disconnect_webhook,
    fetch_model_version,
    next_batch,
    poll_new_versions,
    read_sample,
    test_webhook,
)
from tests.sources.mlflow_fixture import MlflowServer, free_port, mlflow_server_fixture  # noqa: F401

SECRET = "whsec-modelcd-test-0123456789"


def down_uri() -> str:
    """An http URI on loopback where no server listens (a stopped MLflow server)."""
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- fetch


def test_fetch_sklearn_version(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = mlflow_server.unique_name("iris")
    version = mlflow_server.register_sklearn(name, C=0.5, tags={"team": "risk"}, description="iris, C=0.5")
    dest = tmp_path / "files"

    got = fetch_model_version(mlflow_server.tracking_uri, name, version, dest)

    assert got.files_dir == dest
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert {"MLmodel", "model.pkl", "requirements.txt", "conda.yaml"} <= set(files)
    assert "registered_model_meta" not in files
    assert all(p.is_file() and not p.is_symlink() for p in dest.rglob("*"))
    assert (got.flavor, got.model_file) == (Flavor.SKLEARN, "model.pkl")
    assert detect_flavor(dest).model_file == "model.pkl"  # modelcd's own detection agrees
    assert "scikit-learn" in {Requirement(r).name for r in got.requirements}
    assert got.sample is not None
    split = got.sample["dataframe_split"]
    assert len(split["columns"]) == 4 and len(split["data"]) == 3
    assert parse_sample(got.sample) == got.sample
    model = joblib.load(dest / "model.pkl")  # the very estimator that was logged
    assert list(model.predict(pandas.DataFrame(split["data"], columns=split["columns"]))) == [0, 0, 0]
    assert got.run_id and got.source.startswith("models:/")
    assert got.tags == {"team": "risk"} and got.description == "iris, C=0.5"
    assert got.external_ref == f"models:/{name}/{version}" and got.version == version


def test_fetch_skops_model_is_sklearn_with_its_trusted_types(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """skops is MLflow 3's default format for scikit-learn: served by the sklearn flavor, with
    the types the MLmodel trusts carried into the scoring config."""
    from modelcd.builders.bundle import skops_trusted_types

    name = mlflow_server.unique_name("skops")
    version = mlflow_server.register_sklearn(name, serialization_format="skops",
                                             skops_trusted_types=["datetime.date"])

    got = fetch_model_version(mlflow_server.tracking_uri, name, version, tmp_path / "files")

    assert got.flavor is Flavor.SKLEARN and got.model_file == "model.skops" and not got.notes
    assert got.sample is not None and (got.files_dir / "model.skops").is_file()
    assert any(r.startswith("skops==") for r in got.requirements)
    assert skops_trusted_types(got.files_dir, got.model_file) == ["datetime.date"]


def test_fetch_pyfunc_version_with_its_environment_and_expected_output(mlflow_server: MlflowServer,
                                                                     tmp_path: Path) -> None:
    """Any other MLflow model is pyfunc: its requirements with mlflow-skinny, the Python it was
    saved with, its serving example as the sample and the expected output of its tag."""
    import platform

    import mlflow

    from tests.sources.pyfunc_models import ScaledSum

    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"scale": 2.0, "offset": 0.0}))
    example = pandas.DataFrame({"x": [1.0, 2.0], "y": [0.0, 1.0]})
    name = mlflow_server.unique_name("pyfunc")
    version = mlflow_server.register_pyfunc(name, ScaledSum(), input_example=example,
                                            artifacts={"weights": str(weights)},
                                            tags={"modelcd.expected": "[2.0, 5.0]"})

    got = fetch_model_version(mlflow_server.tracking_uri, name, version, tmp_path / "files")

    assert (got.flavor, got.model_file) == (Flavor.PYFUNC, "MLmodel")
    assert detect_flavor(got.files_dir) == (Flavor.PYFUNC, "MLmodel", None)  # modelcd's own detection agrees
    assert (got.files_dir / "artifacts" / "weights.json").is_file()
    assert f"mlflow-skinny=={mlflow.__version__}" in got.requirements
    assert not any(Requirement(r).name == "mlflow" for r in got.requirements)
    assert got.python == platform.python_version()
    assert got.sample == {"dataframe_split": {"columns": ["x", "y"], "data": [[1.0, 0.0], [2.0, 1.0]]}}
    assert got.expected == [2.0, 5.0]

    mlflow_server.client().set_model_version_tag(name, version, "modelcd.expected", "[1, 2, 3]")
    with pytest.raises(InvalidInput, match=f"{name}/{version}, tag modelcd.expected: expected: 3 predictions for a "
                                           "sample of 2 rows") as e:
        fetch_model_version(mlflow_server.tracking_uri, name, version, tmp_path / "again")
    assert e.value.field == "expected" and not (tmp_path / "again").exists()


def test_fetch_missing_version_is_not_found(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = mlflow_server.unique_name("missing")
    mlflow_server.register_sklearn(name)
    for model, version in ((name, "99"), (mlflow_server.unique_name("nobody"), "1")):
        with pytest.raises(NotFound, match=f"{model}.*not found.*check the model name") as info:
            fetch_model_version(mlflow_server.tracking_uri, model, version, tmp_path / "x")
        assert info.value.code == "not_found"
    assert not (tmp_path / "x").exists()


def test_fetch_from_stopped_server_is_retryable(tmp_path: Path) -> None:
    uri = down_uri()
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot reach the MLflow tracking server.*running") as info:
        fetch_model_version(uri, "iris", "1", tmp_path / "x")
    assert time.monotonic() - started < 15  # MLflow's own retries would take minutes
    assert info.value.code == "source_unavailable" and info.value.retryable
    assert uri in info.value.message and not (tmp_path / "x").exists()


def test_tracking_uri_must_be_http() -> None:
    for bad in ("sqlite:///mlflow.db", "127.0.0.1:5000", "http://user:pw@127.0.0.1:5000"):
        with pytest.raises(InvalidInput, match="tracking_uri") as info:
            poll_new_versions(bad, None)
        assert "pw" not in info.value.message


def _write(folder: Path, files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, doc in files.items():
        (folder / rel).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder


@pytest.mark.parametrize(("info", "example", "expected"), [
    ({"type": "dataframe", "pandas_orient": "split"}, {"columns": ["a", "b"], "data": [[1, 2]]},
     {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}),
    ({"type": "dataframe", "pandas_orient": "records"}, [{"a": 1, "b": 2}], {"dataframe_records": [{"a": 1, "b": 2}]}),
    ({"type": "ndarray", "format": "tf-serving"}, {"inputs": [[1.0, 2.0]]}, {"inputs": [[1.0, 2.0]]}),
    ({"type": "ndarray"}, [[1.0, 2.0]], {"inputs": [[1.0, 2.0]]}),
    ({"type": "json_object", "params": "true"}, {"inputs": {"q": ["hi"]}, "params": {"k": 3}},
     {"inputs": {"q": ["hi"]}, "params": {"k": 3}}),
])
def test_input_example_becomes_a_scoring_request(tmp_path: Path, info: dict[str, str], example: Any,
                                                 expected: dict[str, Any]) -> None:
    folder = _write(tmp_path, {"input_example.json": example})
    assert read_sample(folder, {"saved_input_example_info": {"artifact_path": "input_example.json", **info}}) \
        == (expected, None)


def test_serving_example_wins_and_bad_examples_become_notes(tmp_path: Path) -> None:
    folder = _write(tmp_path / "a", {"serving_input_example.json": {"inputs": [[1]]},
                                     "input_example.json": {"columns": ["x"], "data": [[2]]}})
    assert read_sample(folder, {}) == ({"inputs": [[1]]}, None)
    folder = _write(tmp_path / "b", {"serving_input_example.json": '{"data": [[1], [1, 2]]}'})
    sample, note = read_sample(folder, {})
    assert sample is None and note is not None and "ragged" in note
    assert read_sample(tmp_path / "c", {}) == (None, None)
    _write(tmp_path / "secret.json", {})  # an MLmodel cannot point outside the model's files
    hostile = {"saved_input_example_info": {"serving_input_path": "../secret.json/x", "artifact_path": "/etc/hosts"}}
    assert read_sample(tmp_path / "a", hostile) == (None, None)


# --------------------------------------------------------------------------- poll


def test_poll_returns_each_new_version_once(mlflow_server: MlflowServer) -> None:
    uid = mlflow_server.unique_name("p")
    only_ours = f"name LIKE '%-{uid}'"
    a, b = f"polla-{uid}", f"pollb-{uid}"
    registered = [(a, mlflow_server.register_sklearn(a)), (a, mlflow_server.register_sklearn(a, C=2.0)),
                  (b, mlflow_server.register_sklearn(b))]
    uri = mlflow_server.tracking_uri

    first, cursor = poll_new_versions(uri, None, filter_string=only_ours)
    assert [(r.name, r.version) for r in first] == registered
    assert all(r.status == "READY" and r.external_ref == f"models:/{r.name}/{r.version}" for r in first)
    again, cursor = poll_new_versions(uri, PollCursor.from_json(cursor.to_json()), filter_string=only_ours)
    assert again == []

    newest = mlflow_server.register_sklearn(b, C=3.0, tags={"stage": "candidate"})
    found, cursor = poll_new_versions(uri, cursor, filter_string=only_ours)
    assert [(r.name, r.version, r.tags) for r in found] == [(b, newest, {"stage": "candidate"})]
    assert poll_new_versions(uri, cursor, filter_string=only_ours)[0] == []
    assert PollCursor.from_json(cursor.to_json()) == cursor

    pages: list[list[tuple[str, str]]] = []
    paged: PollCursor | None = None  # small batches: the same four, once each, in order
    for _ in range(4):
        batch, paged = poll_new_versions(uri, paged, max_results=3, filter_string=only_ours)
        pages.append([(r.name, r.version) for r in batch])
    assert pages == [registered, [(b, newest)], [], []]


def test_poll_stopped_server_is_retryable() -> None:
    with pytest.raises(SourceUnavailable, match="cannot reach"):
        poll_new_versions(down_uri(), None)


def ref(name: str, version: str, ts: int, status: str = "READY") -> VersionRef:
    return VersionRef(name=name, version=version, creation_timestamp=ts, status=status, source="", run_id=None)


def test_next_batch_exactly_once_with_ties_late_commits_and_failures() -> None:
    a1, a2, b1 = ref("a", "1", 1000), ref("a", "2", 1000), ref("b", "1", 1000)
    batch, cur = next_batch([b1, a2, a1], None, max_results=2, lookback_ms=0)
    assert batch == [a1, a2] and cur.timestamp == 999  # b1 at the same millisecond is still to come
    batch, cur = next_batch([a1, a2, b1], cur, max_results=2, lookback_ms=0)
    assert batch == [b1] and cur == PollCursor(1000, frozenset({("a", "1", 1000), ("a", "2", 1000),
                                                                 ("b", "1", 1000)}))
    late, failed, c1 = ref("late", "1", 900), ref("bad", "1", 1500, "FAILED_REGISTRATION"), ref("c", "1", 2000)
    batch, cur = next_batch([a1, a2, b1, late, failed, c1], cur, max_results=10, lookback_ms=500)
    assert batch == [late, c1] and cur.timestamp == 2000
    assert cur.seen == {("c", "1", 2000)}  # older entries fell out of the 500 ms window
    assert next_batch([c1, failed], cur, max_results=10, lookback_ms=500)[0] == []


def test_cursor_json_rejects_garbage() -> None:
    with pytest.raises(InvalidInput, match="cursor: not an MLflow poll cursor"):
        PollCursor.from_json('{"timestamp": "soon"}')


# --------------------------------------------------------------------------- webhooks


@dataclass
class Receiver:
    """A tiny HTTP server on 127.0.0.1 that records every POST and answers 200."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, pred: Any, timeout: float = 20.0) -> tuple[dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                hit = next((d for d in self.received if pred(d)), None)
                if hit is not None or time.monotonic() > deadline:
                    assert hit is not None, f"no matching delivery in {timeout} s; got {self.received}"
                    return hit
                self.arrived.wait(0.2)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rec = box["r"]
            with rec.arrived:
                rec.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                rec.arrived.notify_all()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box["r"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hooks/mlflow")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box["r"]
    server.shutdown()
    server.server_close()
    thread.join(5)


def signature_ok(headers: dict[str, str], body: bytes, secret: str) -> bool:
    """MLflow's scheme: v1,<base64 HMAC-SHA256(secret, delivery_id.timestamp.body)>."""
    msg = f"{headers['x-mlflow-delivery-id']}.{headers['x-mlflow-timestamp']}.".encode() + body
    want = "v1," + base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(want, headers["x-mlflow-signature"])


def test_connect_webhook_is_idempotent_and_testable(mlflow_server: MlflowServer, receiver: Receiver) -> None:
    uri, hook = mlflow_server.tracking_uri, mlflow_server.unique_name("hook")
    try:
        first = connect_webhook(uri, receiver.url, SECRET, name=hook)
        assert connect_webhook(uri, receiver.url, SECRET, name=hook) == first
        assert [w.webhook_id for w in mlflow_server.client().list_webhooks() if w.name == hook] == [first]

        check = test_webhook(uri, first)
        assert (check.success, check.response_status, check.response_body) == (True, 200, "ok")
        headers, body = receiver.wait_for(lambda d: True, timeout=5)
        assert signature_ok(headers, body, SECRET)
        assert json.loads(body)["data"]["name"] == "example_model"  # MLflow's fixed test data
    finally:
        assert disconnect_webhook(uri, hook) is True
    assert disconnect_webhook(uri, hook) is False


def test_refused_webhook_url_names_the_cause_not_the_secret(mlflow_server: MlflowServer) -> None:
    with pytest.raises(InvalidInput, match="scheme") as info:
        connect_webhook(mlflow_server.tracking_uri, "ftp://127.0.0.1/hooks", SECRET,
                        name=mlflow_server.unique_name("bad"))
    assert SECRET not in str(info.value) and info.value.field == "url"
    with pytest.raises(InvalidInput, match="secret"):
        connect_webhook(mlflow_server.tracking_uri, "http://127.0.0.1/hooks", "", name="x")


def test_registering_a_version_sends_a_signed_delivery(mlflow_server: MlflowServer, receiver: Receiver) -> None:
    uri, hook = mlflow_server.tracking_uri, mlflow_server.unique_name("hook")
    name = mlflow_server.unique_name("hooked")
    connect_webhook(uri, receiver.url, SECRET, name=hook)
    try:
        time.sleep(1.2)  # the server caches webhooks for MLFLOW_WEBHOOK_CACHE_TTL (1 s here)
        version = mlflow_server.register_sklearn(name, tags={"team": "risk"})

        headers, body = receiver.wait_for(lambda d: json.loads(d[1])["data"].get("name") == name)
    finally:
        disconnect_webhook(uri, hook)
    assert headers["content-type"] == "application/json"
    assert signature_ok(headers, body, SECRET)
    assert not signature_ok(headers, body, SECRET + "x")
    assert abs(int(headers["x-mlflow-timestamp"]) - time.time()) < 120  # unix seconds, not ms
    event = json.loads(body)
    assert (event["entity"], event["action"]) == ("model_version", "created")
    assert event["data"]["version"] == version and event["data"]["source"].startswith("models:/")
    # the delivery id is a uuid4; the webhook body names the version fetch_model_version takes
    assert len(headers["x-mlflow-delivery-id"]) == 36
