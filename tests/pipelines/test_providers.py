"""Pipeline providers: what the external runner sends to start a release's run, checked
against the documented contract (contract server on 127.0.0.1), and credentials by reference."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from modelcd.errors import ConfigError
from modelcd.pipelines.http import PipelineApiError
from modelcd.pipelines.provider_azure import AzureProvider
from modelcd.pipelines.provider_github import GitHubProvider
from modelcd.pipelines.providers import PROVIDERS, resolve_credential
from modelcd.releases.machine import Phase
from modelcd.releases.policy import PipelineSpec, Policy
from modelcd.releases.service import Release
from tests.pipelines.contract_server import Canned, ContractServer, serve
from tests.pipelines.test_azure_client import RUN

TOKEN = "mcdr_release_token_value"


@pytest.fixture
def server() -> Iterator[ContractServer]:
    yield from serve()


def _release(runner: str, pipeline: PipelineSpec) -> Release:
    policy = Policy.from_dict({"name": "p", "runner": runner, "pipeline": pipeline.model_dump(exclude_none=True)})
    return Release(id="r-0123456789ab", model="churn", version=3, environment="production", policy_name="p",
                   policy=policy, env_index=0, trigger="auto", phase=Phase.BUILDING, cancel_requested=False,
                   error=None, deployment_id=None, bundle=None, image=None, image_digest=None, analysis=None,
                   previous_traffic=None,
                   endpoint_previous=None,
                   created_at="", updated_at="", finished_at=None)


def _spec(**fields: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({"token_env": "CI_TOKEN", **fields})


def test_azure_run_gets_template_parameters_and_the_token_as_a_secret_variable(server: ContractServer) -> None:
    pat = "azdo-pat-0123456789"
    headers = {"Authorization": "Basic " + base64.b64encode(f":{pat}".encode()).decode()}
    server.expect("POST", "/org/models/_apis/pipelines/7/runs", Canned(200, RUN), query={"api-version": "7.1"},
                  headers=headers, body={
                      "resources": {"repositories": {"self": {"refName": "refs/heads/main"}}},
                      "templateParameters": {"model": "churn", "version": "3", "environment": "production",
                                             "release_id": "r-0123456789ab", "callback_url": "http://127.0.0.1:8600"},
                      "variables": {"MODELCD_RELEASE_TOKEN": {"value": TOKEN, "isSecret": True}},
                      "stagesToSkip": [], "previewRun": False})
    spec = _spec(organization_url=server.url + "/org", project="models", pipeline_id=7)
    provider = AzureProvider(spec, pat)
    ref = provider.trigger(_release("azure", spec), TOKEN, "http://127.0.0.1:8600")
    assert ref.run_id == "345" and ref.url and ref.url.endswith("buildId=345")
    server.expect("GET", "/org/models/_apis/pipelines/7/runs/345",
                  Canned(200, {**RUN, "state": "completed", "result": "failed"}), query={"api-version": "7.1"})
    records = [{"id": f"s{i}", "parentId": None, "type": "Stage", "name": name, "identifier": name,
                "state": "completed", "result": result, "order": i}
               for i, (name, result) in enumerate([("Build", "succeeded"), ("Deploy", "failed"),
                                                   ("Rollback", "succeeded")])]
    server.expect("GET", "/org/models/_apis/build/builds/345/timeline", Canned(200, {"records": records}),
                  query={"api-version": "7.1"})
    status = provider.status("345")
    assert status.finished and status.conclusion == "failed"
    assert status.describe() == "build succeeded, deploy failed, rollback succeeded"


def test_azure_refusal_never_shows_the_release_token(server: ContractServer) -> None:
    server.expect("POST", "/org/models/_apis/pipelines/7/runs",
                  Canned(400, {"message": f"variable MODELCD_RELEASE_TOKEN={TOKEN} is not settable at queue time"}))
    spec = _spec(organization_url=server.url + "/org", project="models", pipeline_id=7)
    with pytest.raises(PipelineApiError) as e:
        AzureProvider(spec, "pat").trigger(_release("azure", spec), TOKEN, "http://127.0.0.1:8600")
    assert TOKEN not in str(e.value) and "settable" in str(e.value)


def test_github_workflow_dispatch_carries_every_input_as_a_string(server: ContractServer) -> None:
    server.expect("POST", "/repos/acme/models/actions/workflows/modelcd-release-churn.yml/dispatches",
                  Canned(200, {"workflow_run_id": 99, "run_url": "", "html_url": ""}),
                  headers={"Authorization": "Bearer ghp_x", "X-GitHub-Api-Version": "2022-11-28"},
                  body={"ref": "main", "return_run_details": True, "inputs": {
                      "model": "churn", "version": "3", "environment": "production", "release_id": "r-0123456789ab",
                      "callback_url": "http://127.0.0.1:8600", "release_token": TOKEN}})
    spec = _spec(repo="acme/models", api_url=server.url)
    ref = GitHubProvider(spec, "ghp_x").trigger(_release("github", spec), TOKEN, "http://127.0.0.1:8600")
    assert ref.run_id == "99"


def test_credentials_are_read_by_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCD_TEST_CI_TOKEN", "from-env")
    assert resolve_credential(_spec(token_env="MODELCD_TEST_CI_TOKEN"), tmp_path) == "from-env"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ado").write_text("from-file\n")
    assert resolve_credential(_spec(token_env=None, token_file="ado"), tmp_path) == "from-file"
    with pytest.raises(ConfigError, match="MODELCD_TEST_MISSING is not set"):
        resolve_credential(_spec(token_env="MODELCD_TEST_MISSING"), tmp_path)
    with pytest.raises(ConfigError, match="token_file"):
        resolve_credential(_spec(token_env=None, token_file="nope"), tmp_path)


def test_github_repository_dispatch_finds_its_run_by_title(server: ContractServer) -> None:
    server.expect("POST", "/repos/acme/models/dispatches", Canned(204),
                  body=lambda b: b["event_type"] == "model-registered" and len(b["client_payload"]) <= 10
                  and b["client_payload"]["release_id"] == "r-0123456789ab")
    runs = {"total_count": 2, "workflow_runs": [
        {"id": 41, "status": "queued", "conclusion": None, "html_url": "https://github.com/acme/models/actions/runs/41",
         "display_title": "release churn v3 [r-0123456789ab]", "created_at": datetime.now(UTC).isoformat(),
         "event": "repository_dispatch"},
        {"id": 40, "status": "completed", "conclusion": "success", "html_url": "",
         "display_title": "release churn v2 [r-other]", "created_at": "2026-11-22T04:00:00Z",
         "event": "repository_dispatch"}]}
    server.expect("GET", "/repos/acme/models/actions/workflows/modelcd-release-churn.yml/runs", Canned(200, runs))
    spec = _spec(repo="acme/models", api_url=server.url, trigger="repository_dispatch")
    ref = GitHubProvider(spec, "ghp_x").trigger(_release("github", spec), TOKEN, "http://127.0.0.1:8600")
    assert ref.run_id == "41" and ref.url and ref.url.endswith("/41")


def test_providers_are_chosen_by_runner_name() -> None:
    assert PROVIDERS.factory("github") is GitHubProvider and PROVIDERS.factory("azure") is AzureProvider
    with pytest.raises(ConfigError, match="known: azure, github") as e:
        PROVIDERS.factory("jenkins")
    assert e.value.field == "runner"
