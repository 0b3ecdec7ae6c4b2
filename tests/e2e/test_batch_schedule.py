"""Batch deployments end to end with a real `modelcd serve` and the real scoring engine: @once
runs once, a seconds-level cron runs again, pause stops it, a restart keeps the schedule and
runs the missed occurrence once; `batch run --wait` of a CSV equals the model's own
predictions; --env production follows a new release; Stop during a run leaves no output."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from tests.conftest import Service, iris_model, running_service, wait_until

pytestmark = pytest.mark.slow
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.uniform(0.1, 8.0, size=(n, 4)).round(3), columns=COLUMNS)
    frame.insert(0, "id", np.arange(n) + 1)
    return frame


def cli(svc: Service, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "modelcd", *args], env=svc.env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def runs(svc: Service, name: str) -> list[dict[str, Any]]:
    r = svc.api("GET", f"/batch/{name}")
    assert r.status_code == 200, r.text
    return r.json()["runs"]


def ended_runs(svc: Service, name: str) -> list[dict[str, Any]]:
    return [r for r in runs(svc, name) if r["state"] in ("succeeded", "failed", "cancelled")]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_batch_deployments_on_a_schedule(tmp_path: Path) -> None:
    v1 = iris_model(tmp_path / "v1")
    model = joblib.load(tmp_path / "v1" / "model.joblib")
    data = rows(20_000)
    data.to_csv(tmp_path / "in.csv", index=False)
    with running_service(tmp_path) as svc:
        svc.register("iris", tmp_path / "v1", v1)
        assert svc.wait_release_for("iris", 1)["phase"] == "succeeded"

        # @once, following production: one run right after creation, never again
        out = cli(svc, "batch", "create", "once", "--model", "iris", "--env", "production", "--input",
                  str(tmp_path / "in.csv"), "--output", str(tmp_path / "once.csv"), "--schedule", "@once",
                  "--key", "id")
        assert "batch deployment once" in out.stdout
        [run] = wait_until(lambda: ended_runs(svc, "once"), timeout_s=300)
        assert run["state"] == "succeeded" and run["trigger"] == "once" and run["version"] == 1, run
        scored = pd.read_csv(tmp_path / "once.csv")
        assert scored["id"].tolist() == data["id"].tolist()
        assert (scored["prediction"].to_numpy() == model.predict(data[COLUMNS].to_numpy())).all()
        log = "\n".join(e["line"] for e in svc.api("GET", f"/jobs/{run['job_id']}/logs").json()["logs"])
        assert "rows read 20000, rows scored 20000, rows/s" in log and "errors 0" in log, log

        # batch run --wait of a CSV: the output, the figures, exit 0; a missing input: exit 1
        cli(svc, "batch", "create", "byhand", "--model", "iris", "--version", "1", "--input",
            str(tmp_path / "in.csv"), "--output", str(tmp_path / "byhand.csv"), "--key", "id")
        out = cli(svc, "batch", "run", "byhand", "--wait")
        assert "succeeded" in out.stdout and "rows scored 20000" in out.stdout, out.stdout
        assert len(pd.read_csv(tmp_path / "byhand.csv")) == 20_000
        cli(svc, "batch", "create", "missing", "--model", "iris", "--version", "1", "--input",
            str(tmp_path / "nope.csv"), "--output", str(tmp_path / "nope-out.csv"))
        failed = cli(svc, "batch", "run", "missing", "--wait", check=False)
        assert failed.returncode == 1 and "failed" in failed.stdout, failed.stdout + failed.stderr

        # a seconds-level cron runs again, each occurrence once and on time; pause stops it
        cli(svc, "batch", "create", "tick", "--model", "iris", "--version", "1", "--input",
            str(tmp_path / "in.csv"), "--output", str(tmp_path / "tick.csv"), "--schedule", "* * * * * */4",
            "--key", "id")
        wait_until(lambda: len(ended_runs(svc, "tick")) >= 2, timeout_s=120)
        cli(svc, "batch", "pause", "tick")
        wait_until(lambda: len(ended_runs(svc, "tick")) == len(runs(svc, "tick")), timeout_s=120)
        ticks = runs(svc, "tick")
        occurrences = [r["occurrence"] for r in ticks]
        assert len(occurrences) == len(set(occurrences)) >= 2
        assert all(r["state"] == "succeeded" for r in ticks), ticks
        assert all(_ts(r["created_at"]) - _ts(r["occurrence"]) < 2.0 for r in ticks[-1:]), ticks  # bench: p99
        time.sleep(9)
        assert len(runs(svc, "tick")) == len(ticks)  # paused: no more runs
        assert "paused" in cli(svc, "batch", "show", "tick").stdout

        # a restart keeps the schedule and runs what it missed once
        cli(svc, "batch", "resume", "tick")
        wait_until(lambda: len(ended_runs(svc, "tick")) > len(ticks), timeout_s=60)
        wait_until(lambda: len(ended_runs(svc, "tick")) == len(runs(svc, "tick")), timeout_s=120)
        svc.stop()
        down = time.time()
        time.sleep(13)  # three occurrences or more fall while nothing runs (and more while the service starts)
        svc.start()
        wait_until(lambda: [r for r in runs(svc, "tick") if _ts(r["occurrence"]) > down], timeout_s=60)
        time.sleep(2)
        after = sorted((r for r in runs(svc, "tick") if _ts(r["occurrence"]) > down),
                       key=lambda r: _ts(r["created_at"]))
        # the first run after the restart catches up: every occurrence up to its creation runs once, together
        missed = [r for r in after if _ts(r["occurrence"]) <= _ts(after[0]["created_at"])]
        assert len(missed) == 1 and missed[0]["trigger"] == "schedule", after
        cli(svc, "batch", "pause", "tick")
        assert len([r for r in runs(svc, "once")]) == 1  # @once did not run again after the restart

        # --env production follows a new release
        v2 = iris_model(tmp_path / "v2", c=0.05)
        svc.register("iris", tmp_path / "v2", v2)
        assert svc.wait_release_for("iris", 2)["phase"] == "succeeded"
        cli(svc, "batch", "create", "follow", "--model", "iris", "--env", "production", "--input",
            str(tmp_path / "in.csv"), "--output", str(tmp_path / "follow.csv"), "--key", "id")
        job = cli(svc, "batch", "run", "follow", "--wait", "--json")
        assert '"version": 2' in job.stdout, job.stdout
        assert set(pd.read_csv(tmp_path / "follow.csv")["model_version"]) == {2}

        # Stop during a run: the job is cancelled, no output appears
        rows(400_000, seed=3).to_csv(tmp_path / "big.csv", index=False)
        cli(svc, "batch", "create", "big", "--model", "iris", "--version", "1", "--input",
            str(tmp_path / "big.csv"), "--output", str(tmp_path / "big-out.csv"), "--key", "id")
        started = svc.api("POST", "/batch/big/run").json()

        def scoring() -> bool:
            lines = svc.api("GET", f"/jobs/{started['id']}/logs").json()["logs"]
            return any("rows" in e["line"] and "scored" in e["line"] for e in lines[1:]) or any(
                "scoring worker started" in e["line"] for e in lines)

        wait_until(scoring, timeout_s=120, poll_s=0.05)
        assert svc.api("POST", f"/jobs/{started['id']}/stop").status_code == 202
        job = svc.client.wait_job(started["id"], timeout_s=60)
        assert job["state"] == "cancelled", job
        assert not (tmp_path / "big-out.csv").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".modelcd-tmp")]
        r = svc.api("DELETE", "/batch/big")
        assert r.status_code == 200, r.text
