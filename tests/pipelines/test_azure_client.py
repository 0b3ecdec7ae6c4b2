"""AzureDevOpsClient against a loopback server that plays the Azure DevOps REST API as
documented in ``reference/integrations.md`` §6: the Runs API (exact request, Basic PAT auth,
the Run's fields), build timelines and their stage outcomes, the incoming webhook with its
HMAC-SHA1 signature (the documented test vector), errors without the PAT, and retries."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from modelcd import __version__
from modelcd.errors import InvalidInput
from modelcd.pipelines.azure import AzureDevOpsClient, PipelineRun, TimelineRecord, stage_outcome, webhook_signature
from modelcd.pipelines.http import PipelineApiError
from tests.pipelines.contract_server import Canned, ContractServer, serve

PAT = "azdoPATtestonly0123456789abcdefghij"
BASIC = "Basic " + base64.b64encode(f":{PAT}".encode()).decode()
HEADERS = {"Authorization": BASIC, "Accept": "application/json", "User-Agent": f"modelcd/{__version__}"}
PROJECT = "ML Models"
PROJ = "/org/ML%20Models/_apis"  # the project's path, percent-encoded
API = {"api-version": "7.1"}
RUN: dict[str, Any] = {
    "_links": {"self": {"href": "https://dev.azure.com/org/p/_apis/pipelines/12/runs/345"},
               "web": {"href": "https://dev.azure.com/org/p/_build/results?buildId=345"}},
    "pipeline": {"id": 12, "name": "release", "folder": "\\", "revision": 3},
    "state": "inProgress", "result": None, "createdDate": "2026-01-02T10:00:00.1234567Z",
    "url": "https://dev.azure.com/org/p/_apis/pipelines/12/runs/345", "id": 345, "name": "20260102.1",
}
VECTOR_BODY = b'{"model":"churn","version":"3"}'
VECTOR_SIGNATURE = "sha1=4e5a7e2faffc304e60faf14504f5319de5ff6bac"


@pytest.fixture
def server() -> Iterator[ContractServer]:
    yield from serve()  # the webhook must not carry the PAT: auth headers are checked per route


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(url: str, sleeps: list[float], **kwargs: Any) -> AzureDevOpsClient:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: loopback only
    kwargs.setdefault("timeout", 2.0)
    return AzureDevOpsClient(url + "/org", PROJECT, PAT, sleep=sleeps.append, session=session, **kwargs)


@pytest.fixture
def client(server: ContractServer, sleeps: list[float]) -> Iterator[AzureDevOpsClient]:
    with make_client(server.url, sleeps) as c:
        yield c


def secret_free(e: BaseException) -> None:
    for secret in (PAT, BASIC, BASIC.removeprefix("Basic ")):
        assert secret not in str(e) and secret not in repr(e)
        assert secret not in str(getattr(e, "service_message", "") or "")


# --------------------------------------------------------------------------- runs


def test_run_pipeline_sends_the_documented_request(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("POST", f"{PROJ}/pipelines/12/runs", Canned(200, RUN), query=API, headers=HEADERS, body={
        "resources": {"repositories": {"self": {"refName": "refs/heads/main"}}},
        "templateParameters": {"model": "churn", "version": "3", "canary": "true"},
        "variables": {"CORRELATION_ID": {"value": "c-7f3a", "isSecret": False}},
        "stagesToSkip": [], "previewRun": False})
    run = client.run_pipeline(12, {"model": "churn", "version": 3, "canary": True},
                              variables={"CORRELATION_ID": "c-7f3a"})
    assert run == PipelineRun(id=345, name="20260102.1", state="inProgress", result=None,
                              web_url="https://dev.azure.com/org/p/_build/results?buildId=345",
                              created_date=datetime(2026, 1, 2, 10, 0, 0, 123456, tzinfo=UTC), pipeline_id=12)
    assert not run.completed


def test_run_pipeline_on_a_ref_without_variables(client: AzureDevOpsClient, server: ContractServer) -> None:
    def body(b: dict[str, Any]) -> None:
        assert b["resources"]["repositories"]["self"]["refName"] == "refs/tags/v2"
        assert "variables" not in b and b["templateParameters"] == {}

    server.expect("POST", f"{PROJ}/pipelines/12/runs", Canned(200, RUN), query=API, headers=HEADERS, body=body)
    assert client.run_pipeline(12, {}, branch="refs/tags/v2").id == 345


def test_get_run_parses_a_completed_run(client: AzureDevOpsClient, server: ContractServer) -> None:
    done = {**RUN, "state": "completed", "result": "succeeded", "finishedDate": "2026-01-02T10:05:00Z"}
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345", Canned(200, done), query=API, headers=HEADERS)
    run = client.get_run(12, 345)
    assert run.completed and run.result == "succeeded"
    assert run.finished_date == datetime(2026, 1, 2, 10, 5, tzinfo=UTC)


def test_timeline_records(client: AzureDevOpsClient, server: ContractServer) -> None:
    records = [
        {"id": "s1", "parentId": None, "type": "Stage", "name": "Build", "identifier": "build", "state": "completed",
         "result": "succeeded", "order": 1},
        {"id": "j1", "parentId": "p1", "type": "Job", "name": "Build image", "identifier": "build.image.__default",
         "state": "completed", "result": "succeeded", "order": 1},
        {"id": "s2", "parentId": None, "type": "Stage", "name": "Deploy", "identifier": "deploy",
         "state": "inProgress", "result": None, "order": 2},
    ]
    server.expect("GET", f"{PROJ}/build/builds/345/timeline", Canned(200, {"records": records, "id": "t"}),
                  query=API, headers=HEADERS)
    got = client.timeline(345)
    assert got[0] == TimelineRecord(type="Stage", name="Build", identifier="build", state="completed",
                                    result="succeeded", id="s1", parent_id=None, order=1)
    assert [r.type for r in got] == ["Stage", "Job", "Stage"] and got[2].result is None


def test_timeline_not_there_yet(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("GET", f"{PROJ}/build/builds/345/timeline", Canned(204), query=API, headers=HEADERS)
    assert client.timeline(345) == []


def test_api_version_is_configurable(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345", Canned(200, RUN), query={"api-version": "7.2-preview.1"},
                  headers=HEADERS)
    with make_client(server.url, sleeps, api_version="7.2-preview.1") as c:
        assert c.get_run(12, 345).id == 345


# --------------------------------------------------------------------------- incoming webhook


def test_webhook_signature_matches_the_documented_vector() -> None:
    assert webhook_signature("s3cr3t", VECTOR_BODY) == VECTOR_SIGNATURE


def test_trigger_webhook_signs_the_exact_bytes_sent(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("POST", "/org/_apis/public/distributedtask/webhooks/modelcd", Canned(200),
                  query={"api-version": "6.0-preview"}, absent=["Authorization"],
                  headers={"X-Hub-Signature": VECTOR_SIGNATURE, "Content-Type": "application/json"},
                  raw_body=lambda raw: raw == VECTOR_BODY)
    client.trigger_webhook("modelcd", {"model": "churn", "version": "3"}, secret="s3cr3t")


def test_trigger_webhook_with_other_header_bytes_or_no_secret(client: AzureDevOpsClient,
                                                              server: ContractServer) -> None:
    raw = b'{ "version": "3", "model": "churn" }'
    server.expect("POST", "/org/_apis/public/distributedtask/webhooks/modelcd", Canned(200),
                  headers={"X-Modelcd-Signature": webhook_signature("s3cr3t", raw)}, absent=["Authorization"],
                  raw_body=lambda b: b == raw)
    server.expect("POST", "/org/_apis/public/distributedtask/webhooks/deploy_hook", Canned(200),
                  absent=["Authorization", "X-Hub-Signature"], body={"action": "deploy"})
    client.trigger_webhook("modelcd", raw, secret="s3cr3t", header="X-Modelcd-Signature")
    client.trigger_webhook("deploy_hook", {"action": "deploy"})


def test_missing_webhook_500_is_not_retried(client: AzureDevOpsClient, server: ContractServer,
                                            sleeps: list[float]) -> None:
    server.expect("POST", "/org/_apis/public/distributedtask/webhooks/modelcd", Canned(500, {
        "$id": "1", "innerException": None, "message": "Cannot find webhook for the given webHookId modelcd. Try "
        "enabling CD trigger for this artifact.", "typeName": "Microsoft.TeamFoundation.DistributedTask.Pipelines."
        "Artifacts.WebHooks.WebHookException", "typeKey": "WebHookException", "errorCode": 0, "eventId": 3000}))
    with pytest.raises(PipelineApiError) as info:
        client.trigger_webhook("modelcd", {"model": "churn"}, secret="s3cr3t")
    assert info.value.status == 500 and not info.value.retryable and sleeps == []
    assert "Cannot find webhook" in info.value.message and "default branch" in info.value.message
    assert "s3cr3t" not in info.value.message


def test_webhook_secret_is_redacted(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("POST", "/org/_apis/public/distributedtask/webhooks/modelcd",
                  Canned(400, {"message": "bad signature for secret s3cr3t-webhook"}))
    with pytest.raises(PipelineApiError) as info:
        client.trigger_webhook("modelcd", {"model": "churn"}, secret="s3cr3t-webhook")
    assert "s3cr3t-webhook" not in str(info.value) and "***" in info.value.message


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "answer", "needle"), [
    (401, Canned(401, raw=b"<html><body>Access Denied: The Personal Access Token used has expired.</body></html>",
                 content_type="text/html"), "missing, wrong or expired"),
    (404, Canned(404, {"message": "Pipeline with id 99 not found."}), "Pipeline with id 99 not found."),
    (400, Canned(400, {"message": "Unexpected parameter 'colour'"}), "Unexpected parameter 'colour'"),
    (203, Canned(203, raw=b"<html>Sign in to your account</html>", content_type="text/html"), "sign-in page"),
])
def test_client_errors_are_clear_and_not_retried(client: AzureDevOpsClient, server: ContractServer,
                                                 sleeps: list[float], caplog: pytest.LogCaptureFixture,
                                                 status: int, answer: Canned, needle: str) -> None:
    caplog.set_level(logging.DEBUG)
    server.expect("POST", f"{PROJ}/pipelines/99/runs", answer, headers=HEADERS)
    with pytest.raises(PipelineApiError) as info:
        client.run_pipeline(99, {"colour": "blue"})
    e = info.value
    assert e.status == status and not e.retryable and sleeps == [] and len(server.requests) == 1
    assert f"answered {status}" in e.message and needle in e.message
    assert "POST /org/ML%20Models/_apis/pipelines/99/runs" in e.message and "api-version" not in e.message
    assert "<html>" not in e.message
    secret_free(e)
    assert PAT not in caplog.text and BASIC.removeprefix("Basic ") not in caplog.text


def test_a_sign_in_page_with_200_is_an_error(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345",
                  Canned(200, raw=b"<!DOCTYPE html><html>Azure DevOps Services | Sign In</html>",
                         content_type="text/html"))
    with pytest.raises(PipelineApiError) as info:
        client.get_run(12, 345)
    assert "not JSON" in info.value.message and "PAT" in info.value.message and not info.value.retryable


def test_pat_echoed_by_the_server_is_redacted(client: AzureDevOpsClient, server: ContractServer) -> None:
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345",
                  Canned(401, {"message": f"token {PAT} / header {BASIC} rejected"}))
    with pytest.raises(PipelineApiError) as info:
        client.get_run(12, 345)
    secret_free(info.value)
    assert PAT not in repr(client)


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_then_success(client: AzureDevOpsClient, server: ContractServer,
                                           sleeps: list[float]) -> None:
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345",
                  Canned(429, {"message": "TF400733: request throttled"}, headers={"Retry-After": "3"}),
                  Canned(200, RUN), headers=HEADERS, query=API)
    assert client.get_run(12, 345).id == 345
    assert sleeps == [3.0]


def test_5xx_on_run_pipeline_is_retried(client: AzureDevOpsClient, server: ContractServer,
                                        sleeps: list[float]) -> None:
    server.expect("POST", f"{PROJ}/pipelines/12/runs", Canned(503, raw=b"Service Unavailable",
                                                              content_type="text/plain"), Canned(200, RUN))
    assert client.run_pipeline(12, {"model": "churn"}).id == 345
    assert len(sleeps) == 1 and 0.25 <= sleeps[0] <= 0.5


def test_persistent_5xx_gives_up(server: ContractServer, sleeps: list[float]) -> None:
    server.route("GET", f"{PROJ}/build/builds/345/timeline", Canned(500, {"message": "VS402335: backend down"}))
    with make_client(server.url, sleeps, retries=1) as c, pytest.raises(PipelineApiError) as info:
        c.timeline(345)
    assert len(server.requests) == 2 and len(sleeps) == 1 and info.value.retryable and info.value.status == 500
    assert "VS402335: backend down" in info.value.message and "2 attempt(s)" in info.value.message
    secret_free(info.value)


def test_a_timeout_on_polling_is_retried(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345", Canned(200, RUN, delay=5.0))
    server.expect("GET", f"{PROJ}/pipelines/12/runs/345", Canned(200, RUN))
    with make_client(server.url, sleeps, timeout=0.5) as c:
        assert c.get_run(12, 345).id == 345
    assert len(sleeps) == 1


def test_a_run_that_timed_out_is_not_started_twice(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("POST", f"{PROJ}/pipelines/12/runs", Canned(200, RUN, delay=5.0))
    with make_client(server.url, sleeps, timeout=0.5) as c, pytest.raises(PipelineApiError) as info:
        c.run_pipeline(12, {"model": "churn"})
    assert info.value.ambiguous and len(server.requests) == 1 and sleeps == []


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.run_pipeline(0, {}), "pipeline_id"),
    (lambda c: c.run_pipeline("12; drop", {}), "pipeline_id"),
    (lambda c: c.run_pipeline(12, {"model": ["a", "b"]}), "template_parameters.model"),
    (lambda c: c.run_pipeline(12, {"model": None}), "template_parameters.model"),
    (lambda c: c.run_pipeline(12, {}, variables={"X": {"value": "v"}}), "variables.X"),
    (lambda c: c.run_pipeline(12, {}, branch=""), "branch"),
    (lambda c: c.get_run(12, -1), "run_id"),
    (lambda c: c.timeline(True), "build_id"),
    (lambda c: c.trigger_webhook("../evil", {}), "webhook_name"),
    (lambda c: c.trigger_webhook("modelcd", {}, header="X Bad"), "header"),
    (lambda c: c.trigger_webhook("modelcd", {"x": float("nan")}), "payload"),
])
def test_inputs_are_checked_before_any_request(client: AzureDevOpsClient, server: ContractServer, call: Any,
                                               field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call(client)
    assert info.value.field == field
    assert server.requests == []


@pytest.mark.parametrize(("url", "project", "token", "field"), [
    ("dev.azure.com/org", PROJECT, PAT, "organization_url"),
    (f"https://user:{PAT}@dev.azure.com/org", PROJECT, PAT, "organization_url"),
    ("https://dev.azure.com/org", "", PAT, "project"),
    ("https://dev.azure.com/org", PROJECT, "", "token"),
])
def test_constructor_checks(url: str, project: str, token: str, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        AzureDevOpsClient(url, project, token)
    assert info.value.field == field and PAT not in info.value.message


# --------------------------------------------------------------------------- stage outcomes

STAGES = {"build": "build", "deploy": "deploy", "smoke": "smoke", "promote": "promote", "rollback": "rollback"}


def _stage(identifier: str, state: str, result: str | None = None, name: str | None = None) -> TimelineRecord:
    return TimelineRecord("Stage", name or identifier.title(), identifier, state, result)


def _azrun(state: str, result: str | None = None) -> PipelineRun:
    return PipelineRun(1, "r", state, result, "", None)


def test_stage_outcome_while_running() -> None:
    records = [_stage("build", "completed", "succeededWithIssues"), _stage("deploy", "inProgress"),
               _stage("smoke", "pending"), TimelineRecord("Job", "smoke", "smoke", "completed", "failed")]
    assert stage_outcome(records, STAGES) == {
        "build": "succeeded", "deploy": "running", "smoke": "pending", "promote": "pending", "rollback": "pending"}


def test_stage_outcome_after_a_failure_with_rollback() -> None:
    records = [_stage("build", "completed", "succeeded"), _stage("deploy", "completed", "succeeded"),
               _stage("smoke", "completed", "failed"), _stage("promote", "completed", "skipped"),
               _stage("rollback", "completed", "succeeded")]
    assert stage_outcome(records, STAGES, _azrun("completed", "failed")) == {
        "build": "succeeded", "deploy": "succeeded", "smoke": "failed", "promote": "skipped",
        "rollback": "succeeded"}


def test_stage_outcome_of_a_cancelled_run_and_display_names() -> None:
    records = [_stage("Build_Image", "completed", "succeeded", name="Build image"),
               _stage("deploy", "completed", "canceled"), _stage("smoke", "pending")]
    got = stage_outcome(records, {"build": "Build image", "deploy": "deploy", "smoke": "smoke", "promote": "promote"},
                        _azrun("completed", "canceled"))
    assert got == {"build": "succeeded", "deploy": "cancelled", "smoke": "cancelled", "promote": "cancelled"}


def test_stage_outcome_refuses_unknown_stages() -> None:
    with pytest.raises(InvalidInput):
        stage_outcome([], {"deploy": ""})
    with pytest.raises(InvalidInput):
        stage_outcome([], {"approve": "approve"})
