"""`modelcd pipelines publish`: render, check, commit and push to a real bare repository;
idempotent; optionally opens the pull request through a GitHub API stand-in that checks the
documented contract."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipelines.contract_server import Canned, ContractServer, serve


@pytest.fixture
def server() -> Iterator[ContractServer]:
    yield from serve()


def _modelcd(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    environ.update(MODELCD_HOME=str(home), GIT_CONFIG_GLOBAL="/dev/null", **env)
    return subprocess.run([sys.executable, "-m", "modelcd", *args], env=environ, capture_output=True, text=True,
                          timeout=120, check=False)


def test_publish_commits_once_and_opens_a_pull_request(tmp_path: Path, server: ContractServer) -> None:
    remote = tmp_path / "iris.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch", "main", str(remote)], check=True)
    server.expect("POST", "/repos/acme/iris/pulls",
                  Canned(201, {"number": 7, "html_url": "https://github.com/acme/iris/pull/7"}),
                  headers={"Authorization": "Bearer ghp_pr", "X-GitHub-Api-Version": "2022-11-28"},
                  body=lambda b: b["head"] == "modelcd/pipelines" and b["base"] == "main" and "iris" in b["title"])
    args = ("pipelines", "publish", "iris", "--provider", "github", "--repo", str(remote),
            "--branch", "modelcd/pipelines", "--pull-request", "acme/iris", "--github-api-url", server.url,
            "--github-token-env", "MODELCD_TEST_PR_TOKEN")
    out = _modelcd(*args, home=tmp_path / "home", MODELCD_TEST_PR_TOKEN="ghp_pr")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "committed" in out.stdout and "pull request #7" in out.stdout
    files = subprocess.run(["git", "--git-dir", str(remote), "ls-tree", "-r", "--name-only", "modelcd/pipelines"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert files == [".github/workflows/modelcd-release-iris.yml"]
    head = subprocess.run(["git", "--git-dir", str(remote), "rev-parse", "modelcd/pipelines"], capture_output=True,
                          text=True, check=True).stdout

    server.expect("POST", "/repos/acme/iris/pulls",
                  Canned(422, {"message": "Validation Failed",
                               "errors": [{"message": "A pull request already exists for acme:modelcd/pipelines."}]}))
    server.expect("GET", "/repos/acme/iris/pulls",
                  Canned(200, [{"number": 7, "html_url": "https://github.com/acme/iris/pull/7"}]))
    again = _modelcd(*args, home=tmp_path / "home", MODELCD_TEST_PR_TOKEN="ghp_pr")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already up to date" in again.stdout and "pull request #7" in again.stdout
    assert subprocess.run(["git", "--git-dir", str(remote), "rev-parse", "modelcd/pipelines"], capture_output=True,
                          text=True, check=True).stdout == head  # no second commit


def test_publish_refuses_a_bad_model_name_before_touching_the_repository(tmp_path: Path) -> None:
    out = _modelcd("pipelines", "publish", "bad$(id)", "--provider", "azure", "--repo", str(tmp_path / "none.git"),
                   home=tmp_path / "home")
    assert out.returncode != 0 and "name" in out.stderr.lower()
    assert not (tmp_path / "none.git").exists()
