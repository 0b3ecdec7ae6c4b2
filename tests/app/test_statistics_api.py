"""Training statistics through the API (Flask's test client on a fresh store): the upload
becomes a `statistics` job that computes them off the request path and stores them with the
version; bad files fail the job naming the cause; the job's lifecycle when stopped, after a
restart, and after an import whose files hold the training data."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flask.testing import FlaskClient

from modelcd.context import Context
from modelcd.domain import JobState, JobType
from modelcd.jobs.statistics import (
    TRAINING_DATA_TAG,
    display_name,
    fail_interrupted,
    run_statistics_job,
    statistics_after_import,
)
from modelcd.registry.archive import pack_tree
from tests.app.conftest import AUTH
from tests.conftest import iris_model

STATS = "/api/v1/models/iris/versions/1/statistics"


@pytest.fixture
def registered(client: FlaskClient, tmp_path: Path) -> dict[str, Any]:
    meta = iris_model(tmp_path / "m")
    data = {"artifact": (io.BytesIO(pack_tree(tmp_path / "m")), "a.tar.gz"), "metadata": json.dumps(meta)}
    r = client.post("/api/v1/models/iris/versions", headers=AUTH, content_type="multipart/form-data", data=data)
    assert r.status_code == 201, r.json
    return r.json


def _training_csv(rows: int = 600) -> bytes:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"sepal_length": rng.normal(5.8, 0.8, rows), "sepal_width": rng.normal(3.0, 0.4, rows),
                       "petal_length": rng.normal(3.7, 1.7, rows), "species": rng.choice(["a", "b", "c"], rows)})
    df.loc[::50, "sepal_width"] = None
    return df.to_csv(index=False).encode()


def _upload(client: FlaskClient, data: bytes, name: str = "train.csv", headers: dict[str, str] | None = None,
            path: str = STATS) -> Any:
    return client.post(path, headers=AUTH if headers is None else headers, content_type="multipart/form-data",
                       data={"data": (io.BytesIO(data), name)})


def _wait_job(ctx: Context, job_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = ctx.jobs.get(job_id)
        if job.state.terminal:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {ctx.jobs.get(job_id).state}")


def _log(ctx: Context, job_id: str) -> str:
    return "\n".join(line["line"] for line in ctx.jobs.logs(job_id))


def test_upload_computes_and_stores_the_statistics_in_a_job(client: FlaskClient, ctx: Context,
                                                            registered: dict[str, Any]) -> None:
    r = _upload(client, _training_csv())
    assert r.status_code == 202, r.json
    assert r.json["type"] == "statistics" and r.json["model"] == "iris" and r.json["version"] == 1
    job = _wait_job(ctx, r.json["id"])
    log = _log(ctx, job.id)
    assert job.state is JobState.SUCCEEDED, (job.error, log)
    assert "rows read 600, features 4 (3 numeric, 1 categorical), seconds" in log
    kinds = [e["kind"] for e in ctx.jobs.events(job_id=job.id)]
    assert kinds == ["job.created", "job.scheduled", "job.running", "job.succeeded"]

    doc = client.get(STATS).json
    assert (doc["rows"], doc["features"], doc["source"], doc["job_id"]) == (600, 4, "train.csv", job.id)
    features = {f["name"]: f for f in doc["statistics"]["features"]}
    assert list(features) == ["sepal_length", "sepal_width", "petal_length", "species"]
    assert features["sepal_width"]["missing"] == 12 and features["sepal_width"]["count"] == 588
    assert len(features["sepal_length"]["edges"]) == 9 and sum(features["sepal_length"]["bin_counts"]) == 600
    assert sorted(features["species"]["categories"]) == ["a", "b", "c"]
    assert not any((ctx.home / "tmp").iterdir())  # the upload is gone once computed


def test_a_new_upload_replaces_the_statistics(client: FlaskClient, ctx: Context, registered: dict[str, Any]) -> None:
    for rows in (300, 400):
        job = _wait_job(ctx, _upload(client, _training_csv(rows), name=f"t{rows}.csv").json["id"])
        assert job.state is JobState.SUCCEEDED
    doc = client.get(STATS).json
    assert doc["rows"] == 400 and doc["source"] == "t400.csv"


@pytest.mark.parametrize(("name", "data", "cause"), [
    ("model.pkl", b"\x80\x04\x95binary\x00\x00data", "model.pkl is not CSV, Parquet or JSON lines"),
    ("train.csv", b"a,b,c\n", "train.csv: no rows"),
    ("train.parquet", b"a,b\n1,2\n", "train.parquet is not a Parquet file"),
    ("train.csv", b"", "train.csv is empty"),
])
def test_a_bad_file_fails_the_job_naming_the_cause(client: FlaskClient, ctx: Context, registered: dict[str, Any],
                                                   name: str, data: bytes, cause: str) -> None:
    r = _upload(client, data, name=name)
    assert r.status_code == 202
    job = _wait_job(ctx, r.json["id"])
    assert job.state is JobState.FAILED and job.error is not None and cause in job.error, job.error
    assert cause in _log(ctx, job.id)
    r = client.get(STATS)
    assert r.status_code == 404 and "modelcd statistics iris 1 --training-data FILE" in r.json["message"]


def test_writes_need_the_token_and_the_part_and_the_version(client: FlaskClient, ctx: Context,
                                                            registered: dict[str, Any]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = _upload(client, _training_csv(), headers=headers)
        assert r.status_code == 401 and r.json["code"] == "unauthorized"
    r = client.post(STATS, headers=AUTH, content_type="multipart/form-data", data={"other": "x"})
    assert r.status_code == 400 and r.json["field"] == "data"
    r = _upload(client, _training_csv(), path="/api/v1/models/iris/versions/9/statistics")
    assert r.status_code == 404 and r.json["field"] == "version"
    assert client.get("/api/v1/models/iris/versions/9/statistics").status_code == 404
    assert client.get("/api/v1/models/nope/versions/1/statistics").status_code == 404
    assert ctx.jobs.list() == []


def test_an_upload_over_the_artifact_cap_is_refused(tmp_path: Path) -> None:
    from modelcd.app import create_app
    from modelcd.config import load_settings
    from modelcd.context import build_context
    from tests.app.conftest import TOKEN
    from tests.conftest import free_port

    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "h"), "MODELCD_TOKEN": TOKEN,
                                      "MODELCD_ROUTER_PORT": str(free_port()), "MODELCD_MAX_ARTIFACT_BYTES": "10000"})
    c = build_context(settings)
    try:
        r = _upload(create_app(c, TOKEN).test_client(), _training_csv(2_000))
        assert r.status_code == 413 and "MODELCD_MAX_ARTIFACT_BYTES" in r.json["message"]
    finally:
        c.db.dispose()


def test_file_names_are_shown_without_their_folders() -> None:
    assert display_name("../../etc/train.csv") == "train.csv"
    assert display_name("C:\\data\\train.parquet") == "train.parquet"
    assert display_name("bad\x00name\n.csv") == "badname.csv"
    assert display_name(None) == display_name("") == "training-data"


def test_a_stopped_job_is_cancelled(ctx: Context, registered: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(_training_csv())
    job = ctx.jobs.create(JobType.STATISTICS, model="iris", version=1)
    ctx.jobs.request_cancel(job.id)
    assert run_statistics_job(ctx, job.id, path, "train.csv") is False
    assert ctx.jobs.get(job.id).state is JobState.CANCELLED


def test_a_restart_ends_the_jobs_a_dead_process_left(ctx: Context, registered: dict[str, Any]) -> None:
    running = ctx.jobs.create(JobType.STATISTICS, model="iris", version=1)
    ctx.jobs.transition(running.id, JobState.RUNNING)
    scheduled = ctx.jobs.create(JobType.STATISTICS, model="iris", version=1)
    ctx.jobs.transition(scheduled.id, JobState.SCHEDULED)
    other = ctx.jobs.create(JobType.BUILD, model="iris", version=1)
    assert sorted(fail_interrupted(ctx)) == sorted([running.id, scheduled.id])
    assert ctx.jobs.get(running.id).state is JobState.FAILED
    assert "upload the training data again" in (ctx.jobs.get(running.id).error or "")
    assert ctx.jobs.get(scheduled.id).state is JobState.CANCELLED
    assert ctx.jobs.get(other.id).state is JobState.CREATED


def test_an_import_whose_files_hold_training_data_computes_statistics(ctx: Context, tmp_path: Path) -> None:
    from modelcd.registry.service import RegisterMetadata

    files = tmp_path / "files"
    meta = iris_model(files)
    (files / "training_data.csv").write_bytes(_training_csv(250))
    version = ctx.registry.import_files("imp", files, RegisterMetadata(**meta))
    job_id = statistics_after_import(ctx, version, files)
    assert job_id is not None and ctx.jobs.get(job_id).state is JobState.SUCCEEDED
    assert ctx.registry.get_statistics("imp", 1)["source"] == "training_data.csv"

    # a tag naming a file elsewhere in the folder; a tag naming nothing fails the job, the import stands
    (files / "data").mkdir()
    (files / "training_data.csv").rename(files / "data" / "train.csv")
    tagged = ctx.registry.import_files("imp", files, RegisterMetadata(
        **{**meta, "tags": {TRAINING_DATA_TAG: "data/train.csv"}}))
    job_id = statistics_after_import(ctx, tagged, files)
    assert ctx.jobs.get(job_id or "").state is JobState.SUCCEEDED
    assert ctx.registry.get_statistics("imp", 2)["rows"] == 250
    missing = ctx.registry.import_files("imp", files, RegisterMetadata(
        **{**meta, "tags": {TRAINING_DATA_TAG: "../outside.csv"}}))
    job = ctx.jobs.get(statistics_after_import(ctx, missing, files) or "")
    assert job.state is JobState.FAILED and TRAINING_DATA_TAG in (job.error or "")
    plain = ctx.registry.import_files("imp", files, RegisterMetadata(**meta))
    assert statistics_after_import(ctx, plain, files) is None
