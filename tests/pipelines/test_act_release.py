"""The rendered GitHub release workflow, run for real by `act` (self-hosted platform, no image
pulls): a model registration reaches production through the service's GitHub runner, which
dispatches the workflow to a local stand-in for GitHub's API; the stand-in checks each request
against the documented contract and starts `act` on a clone of the model's repository, whose
jobs run `modelcd build|deploy|smoke|promote --release …` against the service. A version whose
smoke test fails runs the rollback job and production keeps the old version."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, iris_model, make_service
from tests.pipelines.github_standin import GH_TOKEN, REPO, GitHubStandIn


@pytest.fixture(scope="module")
def github(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitHubStandIn, Path]]:
    root = tmp_path_factory.mktemp("gh")
    remote = root / "models.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch", "main", str(remote)], check=True)
    stand_in = GitHubStandIn(str(remote), root)
    try:
        yield stand_in, remote
    finally:
        stand_in.close()


@pytest.fixture(scope="module")
def gh_service(tmp_path_factory: pytest.TempPathFactory, github: tuple[GitHubStandIn, Path]) -> Iterator[Service]:
    stand_in, remote = github
    svc = make_service(tmp_path_factory.mktemp("gh-svc"), MODELCD_TEST_GH_TOKEN=GH_TOKEN)
    svc.start()
    policy = f"""\
name: github-models
match: {{models: ["gh-*"]}}
runner: github
pipeline:
  repo: {REPO}
  api_url: {stand_in.url}
  token_env: MODELCD_TEST_GH_TOKEN
  poll_interval_s: 2
smoke: {{requests: 5}}
"""
    try:
        svc.apply_policy(policy)
        # the model's repository gets its release workflow through the CLI, as a user would
        out = subprocess.run(["modelcd", "pipelines", "publish", "gh-iris", "--provider", "github", "--repo",
                              str(remote), "--branch", "main"], env=svc.env, capture_output=True, text=True,
                             check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        yield svc
    finally:
        svc.stop()
        svc.shutdown_data_plane()


def _release(svc: Service, name: str, version: int) -> dict[str, Any]:
    rel = svc.wait_release_for(name, version, timeout_s=600)
    return svc.release_detail(rel["id"])


def test_registration_runs_the_workflow_under_act_to_production(
        gh_service: Service, github: tuple[GitHubStandIn, Path], tmp_path: Path) -> None:
    svc, (stand_in, _) = gh_service, github
    meta = iris_model(tmp_path / "v1")
    svc.register("gh-iris", tmp_path / "v1", meta)
    detail = _release(svc, "gh-iris", 1)
    run_id = stand_in.finished_run()
    assert detail["phase"] == "succeeded", (detail["error"], stand_in.act_log(run_id))
    assert stand_in.problems == []
    (dispatch,) = stand_in.dispatches
    assert dispatch["workflow"] == "modelcd-release-gh-iris.yml"
    assert dispatch["inputs"]["release_id"] == detail["id"] and dispatch["inputs"]["version"] == "1"
    token = dispatch["inputs"]["release_token"]
    assert [j["type"] for j in detail["jobs"]] == ["build", "deploy", "smoke", "promote"]
    kinds = [e["kind"] for e in detail["events"]]
    assert "pipeline.triggered" in kinds
    act_log = stand_in.act_log(run_id)
    for job in ("build", "deploy", "smoke", "promote"):
        assert f"Success - Main modelcd {job}" in act_log, act_log
    assert "Main modelcd rollback" not in act_log and stand_in.runs[run_id]["conclusion"] == "success"
    assert token not in act_log  # masked by the workflow
    assert token not in json.dumps(detail) and token not in svc.job_log(detail["id"])

    ep = svc.endpoint("gh-iris")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"
    # the run's token is revoked once the release finished
    deadline = time.monotonic() + 10
    while True:
        r = requests.post(f"{svc.url}/api/v1/releases/{detail['id']}/stages/promote",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if r.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 401


def test_failing_smoke_runs_the_rollback_job_and_production_stays(
        gh_service: Service, github: tuple[GitHubStandIn, Path], tmp_path: Path) -> None:
    svc, (stand_in, _) = gh_service, github
    if svc.api("GET", "/models/gh-iris").status_code == 404:
        test_registration_runs_the_workflow_under_act_to_production(svc, github, tmp_path)
    before = svc.endpoint("gh-iris")["traffic"]
    wrong = iris_model(tmp_path / "wrong", expected_offset=1)
    v = svc.register("gh-iris", tmp_path / "wrong", wrong)
    detail = _release(svc, "gh-iris", v["version"])
    run_id = stand_in.finished_run()
    act_log = stand_in.act_log(run_id)
    assert detail["phase"] == "failed", act_log
    assert "smoke failed" in detail["error"], detail["error"]
    assert "Failure - Main modelcd smoke" in act_log and "Success - Main modelcd rollback" in act_log, act_log
    assert [j["type"] for j in detail["jobs"]] == ["build", "deploy", "smoke", "rollback"]
    assert svc.endpoint("gh-iris")["traffic"] == before
    assert stand_in.runs[run_id]["conclusion"] == "failure"  # the workflow run fails as a whole
    ep = svc.endpoint("gh-iris")
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=wrong["sample"], timeout=10)
    assert r.status_code == 200 and r.headers["X-Modelcd-Version"] == "1"
