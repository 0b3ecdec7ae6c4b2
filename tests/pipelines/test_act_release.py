"""The rendered GitHub release workflow, run for real by `act` (self-hosted platform, no image
pulls): a model registration reaches production through the service's GitHub runner, which
dispatches the workflow to a local stand-in for GitHub's API; the stand-in checks each request
against the documented contract and starts `act` on a clone of the model's repository, whose
jobs run `modelcd build|deploy|smoke|promote --release …` against the service. A version whose
smoke test fails runs the rollback job and production keeps the old version."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, iris_model, make_service

GH_TOKEN = "ghp_standin_0123456789abcdef"
REPO = "acme/models"


class GitHubStandIn:
    """GitHub's workflow_dispatch and runs endpoints, backed by `act` on a local clone."""

    def __init__(self, repo_url: str, workdir: Path) -> None:
        self.repo_url, self.workdir = repo_url, workdir
        self.problems: list[str] = []
        self.dispatches: list[dict[str, Any]] = []
        self.runs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: Any = None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _check_headers(self) -> bool:
                expected = {"Authorization": f"Bearer {GH_TOKEN}", "Accept": "application/vnd.github+json",
                            "X-GitHub-Api-Version": "2022-11-28"}
                for key, value in expected.items():
                    if self.headers.get(key) != value:
                        stand_in.problems.append(f"{self.command} {self.path}: header {key}={self.headers.get(key)!r}")
                if not self.headers.get("User-Agent"):
                    stand_in.problems.append(f"{self.command} {self.path}: no User-Agent")
                if self.headers.get("Authorization") != f"Bearer {GH_TOKEN}":
                    self._reply(401, {"message": "Bad credentials"})
                    return False
                return True

            def do_POST(self) -> None:
                if not self._check_headers():
                    return
                match = re.fullmatch(rf"/repos/{REPO}/actions/workflows/([A-Za-z0-9._-]+)/dispatches", self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if match is None:
                    stand_in.problems.append(f"unexpected POST {self.path}")
                    self._reply(404, {"message": "Not Found"})
                    return
                inputs = body.get("inputs", {})
                if body.get("ref") != "main" or body.get("return_run_details") is not True or \
                        not all(isinstance(v, str) for v in inputs.values()) or len(inputs) > 25:
                    stand_in.problems.append(f"dispatch body breaks the contract: {body}")
                    self._reply(422, {"message": "Invalid request"})
                    return
                run_id = stand_in.start(match.group(1), inputs)
                self._reply(200, {"workflow_run_id": run_id,
                                  "run_url": f"https://api.github.com/repos/{REPO}/actions/runs/{run_id}",
                                  "html_url": f"https://github.com/{REPO}/actions/runs/{run_id}"})

            def do_GET(self) -> None:
                if not self._check_headers():
                    return
                match = re.fullmatch(rf"/repos/{REPO}/actions/runs/(\d+)", self.path)
                run = stand_in.runs.get(int(match.group(1))) if match else None
                if run is None:
                    stand_in.problems.append(f"unexpected GET {self.path}")
                    self._reply(404, {"message": "Not Found"})
                    return
                self._reply(200, {"id": run["id"], "status": run["status"], "conclusion": run["conclusion"],
                                  "html_url": f"https://github.com/{REPO}/actions/runs/{run['id']}",
                                  "display_title": run["title"], "created_at": "2026-01-01T00:00:00Z",
                                  "event": "workflow_dispatch", "head_branch": "main"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def start(self, workflow: str, inputs: dict[str, str]) -> int:
        with self._lock:
            run_id = len(self.runs) + 1
            self.dispatches.append({"workflow": workflow, "inputs": dict(inputs)})
            self.runs[run_id] = {"id": run_id, "status": "in_progress", "conclusion": None,
                                 "title": f"release v{inputs.get('version')} [{inputs.get('release_id')}]"}
        threading.Thread(target=self._act, args=(run_id, workflow, inputs), daemon=True).start()
        return run_id

    def _act(self, run_id: int, workflow: str, inputs: dict[str, str]) -> None:
        checkout = self.workdir / f"run-{run_id}"
        subprocess.run(["git", "clone", "-q", "--branch", "main", self.repo_url, str(checkout)], check=True)
        event = self.workdir / f"event-{run_id}.json"
        event.write_text(json.dumps({"inputs": inputs}))
        log = self.workdir / f"act-{run_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.run(["act", "workflow_dispatch", "-e", str(event), "-W", f".github/workflows/{workflow}",
                                   "-P", "ubuntu-latest=-self-hosted"], cwd=checkout, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=600, check=False)
        self.runs[run_id].update(status="completed", conclusion="success" if proc.returncode == 0 else "failure")

    def act_log(self, run_id: int) -> str:
        path = self.workdir / f"act-{run_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.server.shutdown()


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


def _finished_run(stand_in: GitHubStandIn) -> int:
    """The latest run, once act has finished it (the release ends a moment before its job does)."""
    run_id = len(stand_in.runs)
    deadline = time.monotonic() + 60
    while stand_in.runs[run_id]["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.2)
    return run_id


def test_registration_runs_the_workflow_under_act_to_production(
        gh_service: Service, github: tuple[GitHubStandIn, Path], tmp_path: Path) -> None:
    svc, (stand_in, _) = gh_service, github
    meta = iris_model(tmp_path / "v1")
    svc.register("gh-iris", tmp_path / "v1", meta)
    detail = _release(svc, "gh-iris", 1)
    run_id = _finished_run(stand_in)
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
    run_id = _finished_run(stand_in)
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
