"""Training statistics against a real `modelcd serve`: `modelcd register --training-data`
uploads the file once the version is registered and prints the statistics job; `modelcd
statistics` shows them, computes them again from another file, and fails naming the cause for
a bad one; the write needs the token; a restart ends a job the dead process left open."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from modelcd.cli import main
from modelcd.context import build_context
from modelcd.domain import JobState, JobType
from tests.conftest import Service, iris_model, running_service

pytestmark = pytest.mark.slow

MANUAL = "name: manual\nauto: false\nenvironments: [{name: production}]\n"  # record versions, release nothing


def _run(svc: Service, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
    return result.exit_code, result.output


def _iris_frame() -> pd.DataFrame:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["target"] = frame["target"].map(dict(enumerate(data.target_names)))
    return frame


def test_register_with_training_data_then_show_and_recompute(tmp_path: Path) -> None:
    with running_service(tmp_path, policy=MANUAL) as svc:
        iris_model(tmp_path / "m")
        _iris_frame().to_csv(tmp_path / "train.csv", index=False)
        code, out = _run(svc, "register", "iris", str(tmp_path / "m"), "--training-data", str(tmp_path / "train.csv"))
        assert code == 0, out
        job_id = re.search(r"statistics job (j-[0-9a-f]{12})", out)
        assert job_id is not None and "registered iris v1" in out, out
        job = svc.client.wait_job(job_id.group(1), timeout_s=120)
        assert job["state"] == "succeeded", job
        logs = svc.api("GET", f"/jobs/{job['id']}/logs").json()["logs"]
        assert any("rows read 150, features 5 (4 numeric, 1 categorical)" in line["line"] for line in logs), logs

        code, out = _run(svc, "statistics", "iris", "1")
        assert code == 0, out
        assert "iris v1: 150 rows, 5 features from train.csv" in out
        assert "sepal_length: numeric, 150 present, 0 missing, min 4.3, max 7.9" in out
        assert "target: categorical, 150 present, 0 missing, 3 distinct" in out
        doc = json.loads(_run(svc, "statistics", "iris", "1", "--json")[1])
        assert doc["statistics"]["rows"] == 150 and doc["job_id"] == job["id"]

        # again from a Parquet file, waiting for the job
        frame = _iris_frame().head(100)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "train.parquet")
        code, out = _run(svc, "statistics", "iris", "1", "--training-data", str(tmp_path / "train.parquet"))
        assert code == 0, out
        assert "statistics of iris v1: 100 rows, 5 features" in out and "from train.parquet" in out

        # a bad file: the job fails and the command says why; what was stored stays
        (tmp_path / "model.pkl").write_bytes(b"\x80\x04\x95\x00\x00 not a table \x00")
        code, out = _run(svc, "statistics", "iris", "1", "--training-data", str(tmp_path / "model.pkl"))
        assert code != 0 and "failed" in out and "model.pkl is not CSV, Parquet or JSON lines" in out, out
        assert svc.api("GET", "/models/iris/versions/1/statistics").json()["rows"] == 100

        # the write needs the token; reads do not
        with (tmp_path / "train.csv").open("rb") as f:
            r = svc.api("POST", "/models/iris/versions/1/statistics", headers={}, files={"data": ("t.csv", f)})
        assert r.status_code == 401
        assert svc.api("GET", "/models/iris/versions/1/statistics", headers={}).status_code == 200

        code, out = _run(svc, "statistics", "iris", "2")
        assert code != 0 and "has no version 2" in out


def test_large_upload_runs_off_the_request_path_and_a_restart_ends_an_open_job(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"f{i}": rng.normal(size=200_000) for i in range(10)})
    frame.to_csv(tmp_path / "big.csv", index=False)
    with running_service(tmp_path, policy=MANUAL) as svc:
        iris_model(tmp_path / "m")
        svc.register("iris", tmp_path / "m", {})
        job = svc.client.upload_statistics("iris", 1, tmp_path / "big.csv")
        assert job["state"] in ("scheduled", "running")  # answered before the statistics were computed
        job = svc.client.wait_job(job["id"], timeout_s=120)
        assert job["state"] == "succeeded", job
        assert svc.api("GET", "/models/iris/versions/1/statistics").json()["rows"] == 200_000

        # a job left running by a process that died (here: written while the service is stopped)
        svc.stop()
        ctx = build_context(svc.settings)
        left = ctx.jobs.create(JobType.STATISTICS, model="iris", version=1)
        ctx.jobs.transition(left.id, JobState.RUNNING, "reading big.csv")
        ctx.db.dispose()
        svc.start()
        ended = svc.client.get(f"/api/v1/jobs/{left.id}")
        assert ended["state"] == "failed" and "upload the training data again" in ended["error"], ended
