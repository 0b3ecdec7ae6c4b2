"""Evaluations through the API (Flask's test client): POST checks the request before a job
exists (400/404 naming the field), 401 without a token, 202 with an `evaluate` job that
scores for real and stores the result; GET lists it and the version document shows it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flask.testing import FlaskClient
from sklearn.datasets import load_iris

from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.registry.archive import pack_tree
from tests.app.conftest import AUTH
from tests.conftest import iris_model

PATH = "/api/v1/models/iris/versions/1/evaluations"


@pytest.fixture
def data(client: FlaskClient, tmp_path: Path) -> Path:
    meta = iris_model(tmp_path / "m")
    body = {"artifact": (io.BytesIO(pack_tree(tmp_path / "m")), "a.tar.gz"), "metadata": json.dumps(meta)}
    r = client.post("/api/v1/models/iris/versions", headers=AUTH, content_type="multipart/form-data", data=body)
    assert r.status_code == 201, r.json
    x, y = load_iris(return_X_y=True)
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["species"] = y
    frame.to_csv(tmp_path / "iris.csv", index=False)
    return tmp_path / "iris.csv"


def test_bad_requests_name_the_field_and_no_job_starts(client: FlaskClient, ctx: Context, data: Path) -> None:
    good = {"data": str(data), "label": "species"}
    assert client.post(PATH, json=good).status_code == 401
    cases: list[tuple[Any, int, str]] = [
        ({"label": "species"}, 400, "data"),
        ({"data": str(data)}, 400, "label"),
        ({**good, "metrics": "accuracy,bogus"}, 400, "metrics"),
        ({**good, "metrics": ["accuracy", "mae"]}, 400, "metrics"),
        ({**good, "data": str(data.parent / "none.csv")}, 400, "data"),
        ({**good, "data": "ftp://host/x.csv"}, 400, "data"),
        ({**good, "format": "xlsx"}, 400, "format"),
        ({**good, "max_errors": -1}, 400, "max_errors"),
        ({**good, "extra": 1}, 400, "extra"),
        (["not", "an", "object"], 400, "body"),
    ]
    for body, status, field in cases:
        r = client.post(PATH, json=body, headers=AUTH)
        assert (r.status_code, r.json["field"]) == (status, field), (body, r.json)
    r = client.post("/api/v1/models/iris/versions/7/evaluations", json=good, headers=AUTH)
    assert r.status_code == 404 and "version 7" in r.json["message"]
    assert client.get("/api/v1/models/iris/versions/7/evaluations").status_code == 404
    assert [j for j in ctx.jobs.list() if j.type == "evaluate"] == []
    assert client.get(PATH).json == {"evaluations": []}


def test_an_evaluation_job_scores_stores_and_shows(client: FlaskClient, ctx: Context, data: Path) -> None:
    r = client.post(PATH, json={"data": str(data), "label": "species", "metrics": "accuracy,f1"}, headers=AUTH)
    assert r.status_code == 202, r.json
    assert r.json["type"] == "evaluate" and r.json["model"] == "iris" and r.json["version"] == 1
    deadline = time.monotonic() + 120
    while not ctx.jobs.get(r.json["id"]).state.terminal and time.monotonic() < deadline:
        time.sleep(0.05)
    job = ctx.jobs.get(r.json["id"])
    assert job.state is JobState.SUCCEEDED, job.error
    assert ("job.created", "admin") in {(e["kind"], e.get("actor")) for e in ctx.jobs.events(job_id=job.id)}
    [stored] = client.get(PATH).json["evaluations"]
    assert stored["job_id"] == job.id and stored["rows"] == 150 and set(stored["metrics"]) == {"accuracy", "f1"}
    assert stored["confusion_matrix"]["labels"] == [0, 1, 2] and stored["data_digest"].startswith("sha256:")
    version = client.get("/api/v1/models/iris/versions/1").json
    assert version["evaluations"][0]["id"] == stored["id"]
    assert client.get(PATH + "?limit=0").status_code == 400
    doc = client.get("/api/v1/openapi.json").json
    assert {"post", "get"} <= set(doc["paths"]["/models/{name}/versions/{version}/evaluations"])
