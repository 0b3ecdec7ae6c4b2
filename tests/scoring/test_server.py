"""The real scoring server as a subprocess on 127.0.0.1: formats, errors, auth, docs, metrics, signals."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from .conftest import COLUMNS, KEY, Iris, Launcher, ScoringProcess, sklearn_config

pytestmark = pytest.mark.slow


def post(server: ScoringProcess, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(
        f"{server.url}/score",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def assert_error(response: requests.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "message"}
    if error:
        assert body["error"] == error
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in metrics:\n{text}"
    return float(match.group(1))


# --- sklearn: the formats -----------------------------------------------------------------


def test_ready_line_and_health(sklearn_server: ScoringProcess) -> None:
    assert sklearn_server.stdout[0].strip() == f"modelcd-scoring listening on http://127.0.0.1:{sklearn_server.port}"
    response = requests.get(f"{sklearn_server.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "iris", "version": 3}


@pytest.mark.parametrize(
    "make_body",
    [
        lambda rows: {"data": rows},
        lambda rows: {"dataframe_split": {"columns": COLUMNS, "data": rows}},
        lambda rows: {"dataframe_records": [dict(zip(COLUMNS, r, strict=True)) for r in rows]},
        lambda rows: {"instances": rows},
        lambda rows: {"instances": [dict(zip(COLUMNS, r, strict=True)) for r in rows]},
        lambda rows: {"inputs": rows},
        lambda rows: {"inputs": {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}},
        lambda rows: {"inputs": rows, "params": {"threshold": 0.5}},
    ],
    ids=["data", "split", "records", "instances", "instance-records", "inputs", "inputs-columns", "params"],
)
def test_every_input_format_scores(sklearn_server: ScoringProcess, iris: Iris, make_body: Any) -> None:
    response = post(sklearn_server, make_body(iris.rows))
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [0, 1, 2]}


def test_invocations_alias(sklearn_server: ScoringProcess, iris: Iris) -> None:
    response = requests.post(f"{sklearn_server.url}/invocations", json={"data": iris.rows}, timeout=5)
    assert response.json() == {"predictions": [0, 1, 2]}


def test_named_columns_are_reordered_for_a_dataframe_model(frame_server: ScoringProcess, iris: Iris) -> None:
    shuffled = list(reversed(COLUMNS))
    rows = [list(reversed(r)) for r in iris.rows]
    split = post(frame_server, {"dataframe_split": {"columns": shuffled, "data": rows}})
    records = post(frame_server, {"dataframe_records": [dict(zip(shuffled, r, strict=True)) for r in rows]})
    positional = post(frame_server, {"data": iris.rows})
    assert split.json() == records.json() == positional.json() == {"predictions": [0, 1, 2]}
    missing = post(frame_server, {"dataframe_split": {"columns": COLUMNS[:3], "data": [r[:3] for r in iris.rows]}})
    assert "petal_width" in assert_error(missing, 400, "invalid_input")["message"]


def test_batch_of_100(sklearn_server: ScoringProcess, iris: Iris) -> None:
    rows = iris.x[:100].tolist()
    response = post(sklearn_server, {"dataframe_split": {"columns": COLUMNS, "data": rows}})
    assert len(response.json()["predictions"]) == 100


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"data": [[1,2,3,4]], "inputs": [[1,2,3,4]]}', "invalid_request"),
        (b'{"rows": [[1,2,3,4]]}', "invalid_request"),
        (b"[[1,2,3,4]]", "invalid_request"),
        (b'{"data": [[1,2,3]]}', "invalid_input"),
        (b'{"data": [1,2,3,4]}', "invalid_input"),
        (b'{"data": [[1,2,3,4],[1,2]]}', "invalid_input"),
        (b'{"data": [["a","b","c","d"]]}', "invalid_input"),
        (b'{"data": []}', "invalid_input"),
        (b'{"dataframe_records": [{"sepal_length": 1}]}', "invalid_input"),
    ],
)
def test_bad_input_is_400_without_traceback(sklearn_server: ScoringProcess, raw: bytes, error: str) -> None:
    assert_error(post(sklearn_server, None, raw=raw), 400, error)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"]
)
def test_wrong_content_type_is_415(sklearn_server: ScoringProcess, iris: Iris, content_type: str) -> None:
    response = post(sklearn_server, {"data": iris.rows}, headers={"Content-Type": content_type})
    assert_error(response, 415, "unsupported_media_type")


def test_model_exception_is_500_with_type_and_message(sklearn_server: ScoringProcess) -> None:
    # LogisticRegression refuses NaN inside predict(): an exception of the model, not of the input check.
    body = assert_error(post(sklearn_server, {"data": [[None, 1, 2, 3]]}), 500, "model_error")
    assert body["exception"] == "ValueError"
    assert "NaN" in body["message"]
    deadline = time.monotonic() + 5
    while "Traceback" not in sklearn_server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" in sklearn_server.output()


def test_wrong_method_and_route(sklearn_server: ScoringProcess) -> None:
    assert_error(requests.get(f"{sklearn_server.url}/score", timeout=5), 405, "method_not_allowed")
    assert_error(requests.get(f"{sklearn_server.url}/nope", timeout=5), 404, "not_found")


# --- documents and metrics ----------------------------------------------------------------


def test_swagger_is_generated_from_the_sample(sklearn_server: ScoringProcess, iris: Iris) -> None:
    doc = requests.get(f"{sklearn_server.url}/swagger.json", timeout=5).json()
    assert doc["swagger"] == "2.0"
    assert "/score" in doc["paths"] and "securityDefinitions" not in doc
    request = doc["definitions"]["ScoringInput"]
    assert request["example"] == {"data": iris.rows}
    assert request["properties"]["data"]["items"]["items"]["type"] == "number"
    assert doc["definitions"]["ScoringOutput"]["example"] == {"predictions": [0, 1, 2]}
    assert doc["definitions"]["ScoringOutput"]["properties"]["predictions"]["items"]["type"] == "integer"
    v3 = requests.get(f"{sklearn_server.url}/swagger.json?version=3", timeout=5).json()
    assert v3["openapi"].startswith("3.0")
    assert v3["components"]["schemas"]["ScoringInput"]["example"] == {"data": iris.rows}


def test_metrics_sum_over_all_workers(start_server: Launcher, custom_model_dir: Path, iris: Iris) -> None:
    config = {"model": "custom-iris", "version": 1, "flavor": "custom", "entry_script": "score.py"}
    server = start_server(custom_model_dir, config, workers=2)
    answered: dict[int, int] = {}
    sent = 0
    # new connections until both workers answered; the second may still be booting (importing
    # its libraries) when the first answers, so this is bounded by time, pausing now and then
    deadline = time.monotonic() + 30
    while len(answered) < 2 or sent < 20:
        assert time.monotonic() < deadline, f"only worker(s) {answered} answered {sent} requests in 30 s"
        response = requests.post(
            f"{server.url}/score", json={"data": iris.rows}, headers={"Connection": "close"}, timeout=5
        )
        assert response.status_code == 200
        pid = response.json()["pid"]
        answered[pid] = answered.get(pid, 0) + 1
        sent += 1
        if sent % 50 == 0:
            time.sleep(0.2)
    assert_error(post(server, {"boom": True}), 500)
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert metric(text, 'modelcd_scoring_requests_total{route="score",code="200"}') == sent
    assert metric(text, 'modelcd_scoring_requests_total{route="score",code="500"}') == 1
    assert metric(text, "modelcd_scoring_model_errors_total") == 1
    assert metric(text, "modelcd_scoring_request_duration_seconds_count") == sent + 1
    assert metric(text, 'modelcd_scoring_request_duration_seconds_bucket{le="+Inf"}') == sent + 1


def test_metrics_count_rows_errors_and_routes(sklearn_server: ScoringProcess, iris: Iris) -> None:
    def read() -> tuple[str, dict[str, float]]:
        response = requests.get(f"{sklearn_server.url}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        names = {
            "ok": 'modelcd_scoring_requests_total{route="score",code="200"}',
            "bad": 'modelcd_scoring_requests_total{route="score",code="400"}',
            "errors": "modelcd_scoring_model_errors_total",
            "rows": "modelcd_scoring_rows_total",
            "count": "modelcd_scoring_request_duration_seconds_count",
        }
        text = response.text
        return text, {k: metric(text, n) if n in text else 0.0 for k, n in names.items()}

    _, before = read()
    for _ in range(5):
        assert post(sklearn_server, {"data": iris.rows}).status_code == 200
    assert post(sklearn_server, None, raw=b"nope").status_code == 400
    assert post(sklearn_server, {"data": [[None, 1, 2, 3]]}).status_code == 500
    text, after = read()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"ok": 5, "bad": 1, "errors": 1, "rows": 15, "count": 7}
    assert 'modelcd_scoring_info{model="iris",version="3",flavor="sklearn"} 1' in text
    assert "# TYPE modelcd_scoring_request_duration_seconds histogram" in text


def test_keep_alive_serves_many_requests_on_one_connection(sklearn_server: ScoringProcess, iris: Iris) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", sklearn_server.port, timeout=5)
    body = json.dumps({"data": iris.rows})
    connection.connect()
    sock = connection.sock
    for _ in range(50):
        connection.request("POST", "/score", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == {"predictions": [0, 1, 2]}
    assert connection.sock is sock
    connection.close()


# --- custom entry script and key ----------------------------------------------------------


def test_custom_entry_script_contract(custom_server: ScoringProcess, custom_model_dir: Path, iris: Iris) -> None:
    response = post(custom_server, {"data": iris.rows}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"] == [0, 1, 2]
    assert body["model_dir"] == str(custom_model_dir)
    assert body["init_calls"] == 1
    assert body["raw_type"] == "str"
    assert body["key_visible"] is False


def test_custom_init_runs_once_per_worker(custom_server: ScoringProcess, iris: Iris) -> None:
    seen = {}
    for _ in range(30):
        response = requests.post(
            f"{custom_server.url}/score",
            json={"data": iris.rows},
            headers={"Authorization": f"Bearer {KEY}", "Connection": "close"},
            timeout=5,
        )
        seen[response.json()["pid"]] = response.json()["init_calls"]
    assert set(seen.values()) == {1}
    assert set(seen) <= {p.pid for p in psutil.Process(custom_server.process.pid).children()}


def test_custom_run_gets_text_bodies_and_its_value_is_the_response(custom_server: ScoringProcess) -> None:
    response = requests.post(
        f"{custom_server.url}/score",
        data="text:héllo".encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain; charset=utf-8"},
        timeout=5,
    )
    assert response.status_code == 200
    assert response.json() == {"echo": "text:héllo"}


def test_custom_run_exception_is_500(custom_server: ScoringProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = assert_error(post(custom_server, {"boom": True}, headers=auth), 500, "model_error")
    assert body == {"error": "model_error", "message": "boom: the model refused", "exception": "ValueError"}
    bad = assert_error(post(custom_server, {"unserialisable": True}, headers=auth), 500, "model_error")
    assert bad["exception"] == "TypeError"
    assert_error(post(custom_server, None, raw=b"\xff", headers=auth), 400, "invalid_input")
    assert_error(post(custom_server, {}, headers={**auth, "Content-Type": "image/png"}), 415)


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", KEY])
def test_key_is_required_on_score(custom_server: ScoringProcess, iris: Iris, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = post(custom_server, {"data": iris.rows}, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_key_is_not_needed_for_health_docs_metrics_and_never_printed(custom_server: ScoringProcess) -> None:
    for path in ("/healthz", "/swagger.json", "/metrics"):
        response = requests.get(custom_server.url + path, timeout=5)
        assert response.status_code == 200
        assert KEY not in response.text
    doc = requests.get(f"{custom_server.url}/swagger.json", timeout=5).json()
    assert doc["paths"]["/score"]["post"]["security"] == [{"Bearer": []}]
    assert doc["definitions"]["ScoringOutput"]["example"] == {"predictions": [0, 1, 2]}
    assert KEY not in custom_server.output()
    assert KEY not in " ".join(psutil.Process(custom_server.process.pid).cmdline())


def test_runs_from_a_copy_holding_only_the_runtime(
    tmp_path: Path, start_server: Launcher, sklearn_model_dir: Path, iris: Iris
) -> None:
    # What a builder copies into a bundle: modelcd/__init__.py and modelcd/scoring/, nothing else.
    import modelcd
    import modelcd.scoring

    package = tmp_path / "copy" / "modelcd"
    shutil.copytree(
        Path(modelcd.scoring.__file__).parent, package / "scoring", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(modelcd.__file__, package / "__init__.py")
    server = start_server(sklearn_model_dir, sklearn_config(iris), workers=1, env={"PYTHONPATH": str(package.parent)})
    assert post(server, {"data": iris.rows}).json() == {"predictions": [0, 1, 2]}


# --- process model ------------------------------------------------------------------------


def test_sigterm_stops_the_whole_server(start_server: Launcher, sklearn_model_dir: Path, iris: Iris) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = Path(tempfile.gettempdir()) / f"modelcd-scoring-{dead.pid}-test"
    stale.mkdir()
    server = start_server(sklearn_model_dir, sklearn_config(iris), workers=2)
    assert not stale.exists()  # a killed arbiter's state dir is swept at start
    state = list(Path(tempfile.gettempdir()).glob(f"modelcd-scoring-{server.process.pid}-*"))
    assert len(state) == 1
    workers = psutil.Process(server.process.pid).children(recursive=True)
    assert len(workers) == 2
    assert server.stop() == 0
    assert not state[0].exists()
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    assert "Traceback" not in server.output()


def test_workers_die_with_a_killed_arbiter(start_server: Launcher, sklearn_model_dir: Path, iris: Iris) -> None:
    server = start_server(sklearn_model_dir, sklearn_config(iris), workers=2)
    workers = psutil.Process(server.process.pid).children()
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    _gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive


def test_a_stopped_worker_is_replaced_and_metrics_survive(
    start_server: Launcher, sklearn_model_dir: Path, iris: Iris
) -> None:
    server = start_server(sklearn_model_dir, sklearn_config(iris), workers=2)
    for _ in range(3):
        assert post(server, {"data": iris.rows}).status_code == 200
    arbiter = psutil.Process(server.process.pid)
    victim = arbiter.children()[0]
    victim.terminate()  # a graceful worker exit unwinds through the arbiter's frames: it must not clean up
    victim.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = {p.pid for p in arbiter.children()}
        if len(pids) == 2 and victim.pid not in pids:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no replacement worker:\n{server.output()}")
    for _ in range(20):
        response = requests.post(
            f"{server.url}/score", json={"data": iris.rows}, headers={"Connection": "close"}, timeout=10
        )
        assert response.json() == {"predictions": [0, 1, 2]}
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    # The stopped worker's counts stay in its file: nothing goes backwards.
    assert metric(text, 'modelcd_scoring_requests_total{route="score",code="200"}') == 23
    assert server.process.poll() is None
    assert server.stop() == 0


def test_skops_model_loads_with_the_trusted_types_of_its_config(
        tmp_path: Path, start_server: Launcher, iris: Iris) -> None:
    """MLflow 3 saves scikit-learn models with skops by default; types beyond skops' defaults
    load only when the config (from the MLmodel's skops_trusted_types) trusts them."""
    import datetime

    import skops.io
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=500).fit(iris.x, iris.y)
    model.trained_on = datetime.date(2026, 11, 1)  # a type skops does not trust by default
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    skops.io.dump(model, model_dir / "model.skops")

    refused = start_server(model_dir, sklearn_config(iris, model_file="model.skops"), wait=False)
    assert refused.process.wait(30) == 4
    deadline = time.monotonic() + 5
    while "skops_trusted_types" not in refused.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "UntrustedTypesFoundException" in refused.output() and "datetime.date" in refused.output()
    assert "skops_trusted_types" in refused.output() and "Traceback" not in refused.output()

    server = start_server(model_dir, sklearn_config(iris, model_file="model.skops",
                                                    skops_trusted_types=["datetime.date"]))
    r = requests.post(f"{server.url}/score", json={"data": iris.rows}, timeout=10)
    assert r.status_code == 200 and r.json()["predictions"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"model_file": "absent.pkl"}, "not found"),
        ({"model_file": "garbage.pkl"}, "cannot unpickle"),
        ({"flavor": "custom", "entry_script": "broken.py"}, "init() of 'broken.py' failed: RuntimeError: no weights"),
        ({"flavor": "custom", "entry_script": "norun.py"}, "has no run() function"),
    ],
)
def test_a_model_that_does_not_load_exits_fast(
    tmp_path: Path, start_server: Launcher, iris: Iris, config: dict[str, Any], fragment: str
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "garbage.pkl").write_bytes(b"not a pickle")
    (model_dir / "broken.py").write_text(
        "def init():\n    raise RuntimeError('no weights')\n\ndef run(raw):\n    return 1\n"
    )
    (model_dir / "norun.py").write_text("def init():\n    pass\n")
    server = start_server(model_dir, sklearn_config(iris, **config), wait=False)
    started = time.monotonic()
    status = server.process.wait(30)
    assert status == 4  # gunicorn's "App failed to load"
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 5
    while fragment not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cannot load model 'iris' version 3" in server.output()
    assert fragment in server.output()
    assert "Traceback" not in server.output()


def test_an_invalid_config_exits_2(start_server: Launcher, sklearn_model_dir: Path) -> None:
    server = start_server(sklearn_model_dir, {"model": "x", "flavor": "nope"}, wait=False)
    assert server.process.wait(30) == 2
    deadline = time.monotonic() + 5
    while "invalid scoring config" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "'flavor' must be one of" in server.output()
