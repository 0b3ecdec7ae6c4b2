"""GitHubClient against a loopback server that plays the GitHub REST API as documented in
``reference/integrations.md`` §5: the exact requests (paths, queries, headers, bodies), the
answers' parsing, the errors (never retried for 4xx, never carrying the token), the retries
(429 Retry-After, rate-limit 403, 5xx, timeouts) and the input limits checked before sending."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from modelcd import __version__
from modelcd.errors import InvalidInput
from modelcd.pipelines.github import GitHubClient, Job, WorkflowRun, run_outcome
from modelcd.pipelines.http import PipelineApiError, server_wait
from tests.pipelines.contract_server import Canned, ContractServer, serve

TOKEN = "ghp_TESTonly0123456789abcdefABCDEF"
REPO = "octo-org/churn-models"
BASE = f"/repos/{REPO}"
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Accept": "application/vnd.github+json",
    "X-GitHub-Api-Version": "2022-11-28",
    "User-Agent": f"modelcd/{__version__}",
}
RUN: dict[str, Any] = {
    "id": 123, "name": "release", "display_title": "deploy churn v3 [c-7f3a]", "event": "workflow_dispatch",
    "status": "completed", "conclusion": "success", "head_branch": "main",
    "html_url": "https://github.com/octo-org/churn-models/actions/runs/123", "created_at": "2026-01-02T10:00:00Z",
}


@pytest.fixture
def server() -> Iterator[ContractServer]:
    yield from serve(HEADERS)


@pytest.fixture
def sleeps() -> list[float]:
    return []


def _no_proxy() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: loopback only
    return session


def make_client(url: str, sleeps: list[float], **kwargs: Any) -> GitHubClient:
    kwargs.setdefault("timeout", 2.0)
    return GitHubClient(REPO, TOKEN, api_url=url, sleep=sleeps.append, session=_no_proxy(), **kwargs)


@pytest.fixture
def client(server: ContractServer, sleeps: list[float]) -> Iterator[GitHubClient]:
    with make_client(server.url, sleeps) as c:
        yield c


def secret_free(e: BaseException) -> None:
    assert TOKEN not in str(e) and TOKEN not in repr(e)
    assert TOKEN not in str(getattr(e, "service_message", "") or "")


# --------------------------------------------------------------------------- starting runs


def test_repository_dispatch_sends_the_documented_request(client: GitHubClient, server: ContractServer) -> None:
    payload = {"model": "churn", "version": "3", "source": "models:/m-abc", "correlation_id": "c-7f3a"}
    server.expect("POST", f"{BASE}/dispatches", Canned(204), query={},
                  body={"event_type": "model-registered", "client_payload": payload})
    client.repository_dispatch("model-registered", payload)
    [req] = server.requests
    assert req.headers["content-type"] == "application/json"
    assert req.body == b'{"event_type":"model-registered","client_payload":{"model":"churn","version":"3",' \
                       b'"source":"models:/m-abc","correlation_id":"c-7f3a"}}'


def test_workflow_dispatch_returns_the_run_id_from_200(client: GitHubClient, server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/actions/workflows/release.yml/dispatches",
                  Canned(200, {"workflow_run_id": 123, "run_url": f"https://api.github.com{BASE}/actions/runs/123",
                               "html_url": RUN["html_url"]}),
                  body={"ref": "main", "return_run_details": True,
                        "inputs": {"model": "churn", "version": "3", "dry_run": "false", "replicas": "2"}})
    run_id = client.workflow_dispatch("release.yml", "main",
                                      {"model": "churn", "version": "3", "dry_run": False, "replicas": 2})
    assert run_id == 123


def test_workflow_dispatch_204_gives_no_run_id(client: GitHubClient, server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/actions/workflows/4242/dispatches", Canned(204),
                  body=lambda b: b["return_run_details"] is True and b["ref"] == "v1.2" and b["inputs"] == {})
    assert client.workflow_dispatch(4242, "v1.2", {}) is None


def test_api_version_is_configurable(server: ContractServer, sleeps: list[float]) -> None:
    server.common_headers["X-GitHub-Api-Version"] = "2026-03-10"
    server.expect("GET", f"{BASE}/actions/runs/123", Canned(200, RUN))
    with make_client(server.url, sleeps, api_version="2026-03-10") as c:
        assert c.get_run(123).id == 123


def test_enterprise_api_url_with_a_path_prefix(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("GET", f"/api/v3{BASE}/actions/runs/123", Canned(200, RUN))
    with make_client(server.url + "/api/v3/", sleeps) as c:
        assert c.get_run(123).status == "completed"


# --------------------------------------------------------------------------- following runs


def test_get_run_parses_the_run(client: GitHubClient, server: ContractServer) -> None:
    server.expect("GET", f"{BASE}/actions/runs/123", Canned(200, {**RUN, "status": "in_progress", "conclusion": None}),
                  query={})
    run = client.get_run(123)
    assert run == WorkflowRun(id=123, status="in_progress", conclusion=None, html_url=RUN["html_url"],
                              display_title="deploy churn v3 [c-7f3a]",
                              created_at=datetime(2026, 1, 2, 10, 0, tzinfo=UTC), event="workflow_dispatch",
                              head_branch="main")
    assert not run.completed


def test_find_run_uses_the_documented_query_and_matches_the_title(client: GitHubClient,
                                                                 server: ContractServer) -> None:
    other = {**RUN, "id": 122, "display_title": "deploy churn v2 [c-0000]"}
    server.expect("GET", f"{BASE}/actions/workflows/release.yml/runs",
                  Canned(200, {"total_count": 2, "workflow_runs": [RUN, other]}),
                  query={"event": "workflow_dispatch", "branch": "main", "created": ">=2026-01-01T00:00:00Z",
                         "per_page": "20"})
    run = client.find_run("release.yml", "workflow_dispatch", datetime(2026, 1, 1, 0, 0, 0, 999), "[c-7f3a]",
                          branch="main")
    assert run is not None and run.id == 123


def test_find_run_for_repository_dispatch_none_when_absent(client: GitHubClient, server: ContractServer) -> None:
    server.expect("GET", f"{BASE}/actions/workflows/release.yml/runs",
                  Canned(200, {"total_count": 1, "workflow_runs": [RUN]}),
                  query={"event": "repository_dispatch", "created": ">=2026-01-02T09:00:00Z", "per_page": "20"})
    when = datetime(2026, 1, 2, 11, 0, tzinfo=timezone(timedelta(hours=2)))  # any zone: sent as UTC
    assert client.find_run("release.yml", "repository_dispatch", when, "[c-nope]") is None


def test_find_run_reads_further_pages(client: GitHubClient, server: ContractServer) -> None:
    page1 = [{**RUN, "id": 200 + i, "display_title": f"deploy x [c-{i}]"} for i in range(20)]
    query = {"event": "workflow_dispatch", "created": ">=2026-01-01T00:00:00Z", "per_page": "20"}
    server.expect("GET", f"{BASE}/actions/workflows/release.yml/runs",
                  Canned(200, {"total_count": 21, "workflow_runs": page1}), query=query)
    server.expect("GET", f"{BASE}/actions/workflows/release.yml/runs",
                  Canned(200, {"total_count": 21, "workflow_runs": [RUN]}), query={**query, "page": "2"})
    run = client.find_run("release.yml", "workflow_dispatch", datetime(2026, 1, 1, tzinfo=UTC), "[c-7f3a]")
    assert run is not None and run.id == 123


def test_list_jobs(client: GitHubClient, server: ContractServer) -> None:
    jobs = [{"id": 1, "name": "build", "status": "completed", "conclusion": "success", "html_url": "h1"},
            {"id": 2, "name": "deploy", "status": "in_progress", "conclusion": None, "html_url": "h2"}]
    server.expect("GET", f"{BASE}/actions/runs/123/jobs", Canned(200, {"total_count": 2, "jobs": jobs}),
                  query={"per_page": "100"})
    assert client.list_jobs(123) == [Job(1, "build", "completed", "success", "h1"),
                                     Job(2, "deploy", "in_progress", None, "h2")]


# --------------------------------------------------------------------------- pull requests


def test_create_pull_request(client: GitHubClient, server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/pulls",
                  Canned(201, {"number": 7, "html_url": "https://github.com/octo-org/churn-models/pull/7"}),
                  body={"title": "modelcd: release pipeline", "head": "modelcd/pipeline", "base": "main",
                        "body": "Rendered by modelcd."})
    assert client.create_pull_request("modelcd/pipeline", "main", "modelcd: release pipeline",
                                      "Rendered by modelcd.") == (7, "https://github.com/octo-org/churn-models/pull/7")


def test_create_pull_request_returns_the_open_one_when_it_exists(client: GitHubClient,
                                                                 server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/pulls", Canned(422, {
        "message": "Validation Failed", "documentation_url": "https://docs.github.com/rest/pulls/pulls",
        "errors": [{"resource": "PullRequest", "code": "custom",
                    "message": "A pull request already exists for octo-org:modelcd/pipeline."}]}))
    server.expect("GET", f"{BASE}/pulls",
                  Canned(200, [{"number": 5, "html_url": "https://github.com/octo-org/churn-models/pull/5"}]),
                  query={"head": "octo-org:modelcd/pipeline", "base": "main", "state": "open"})
    assert client.create_pull_request("modelcd/pipeline", "main", "t", "b") == (
        5, "https://github.com/octo-org/churn-models/pull/5")


def test_create_pull_request_other_422_is_an_error(client: GitHubClient, server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/pulls", Canned(422, {
        "message": "Validation Failed", "errors": [{"resource": "PullRequest", "field": "base", "code": "invalid"}]}))
    with pytest.raises(PipelineApiError) as info:
        client.create_pull_request("modelcd/pipeline", "nope", "t")
    assert info.value.status == 422 and not info.value.retryable
    assert "422" in info.value.message and "base invalid" in info.value.message
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "body", "needle"), [
    (401, {"message": "Bad credentials"}, "token is missing, wrong or expired"),
    (403, {"message": "Resource not accessible by personal access token"}, "Actions: write"),
    (404, {"message": "Not Found"}, "cannot see it"),
    (422, {"message": "Workflow does not have 'workflow_dispatch' trigger"}, "workflow_dispatch trigger"),
])
def test_client_errors_are_clear_and_not_retried(client: GitHubClient, server: ContractServer, sleeps: list[float],
                                                 status: int, body: dict[str, Any], needle: str) -> None:
    server.expect("POST", f"{BASE}/actions/workflows/release.yml/dispatches", Canned(status, body))
    with pytest.raises(PipelineApiError) as info:
        client.workflow_dispatch("release.yml", "main", {"model": "churn"})
    e = info.value
    assert e.status == status and not e.retryable and sleeps == []
    assert f"answered {status}" in e.message and body["message"] in e.message and needle in e.message
    assert f"POST {BASE}/actions/workflows/release.yml/dispatches" in e.message
    assert e.path == f"{BASE}/actions/workflows/release.yml/dispatches"
    assert e.code == "pipeline_api_error"
    secret_free(e)
    assert len(server.requests) == 1


def test_the_token_is_redacted_even_when_echoed(client: GitHubClient, server: ContractServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.expect("GET", f"{BASE}/actions/runs/5", Canned(503, {"message": f"proxy saw Bearer {TOKEN}"}))
    server.expect("GET", f"{BASE}/actions/runs/5", Canned(401, {"message": f"Bad credentials: {TOKEN}"}))
    with pytest.raises(PipelineApiError) as info:
        client.get_run(5)
    secret_free(info.value)
    assert "***" in info.value.message
    assert TOKEN not in caplog.text and "retry 1/3" in caplog.text
    assert TOKEN not in repr(client)


# --------------------------------------------------------------------------- retries


def test_429_waits_for_retry_after_then_succeeds(client: GitHubClient, server: ContractServer,
                                                 sleeps: list[float]) -> None:
    server.expect("POST", f"{BASE}/dispatches",
                  Canned(429, {"message": "API rate limit exceeded"}, headers={"Retry-After": "2"}), Canned(204))
    client.repository_dispatch("model-registered", {"model": "churn"})
    assert sleeps == [2.0] and len(server.requests) == 2


def test_rate_limit_403_waits_until_the_reset(client: GitHubClient, server: ContractServer,
                                              sleeps: list[float]) -> None:
    reset = int(time.time()) + 3
    server.expect("GET", f"{BASE}/actions/runs/123",
                  Canned(403, {"message": "API rate limit exceeded for user"},
                         headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}),
                  Canned(200, RUN))
    assert client.get_run(123).id == 123
    [wait] = sleeps
    assert 1.0 < wait <= 3.5


def test_a_wait_longer_than_the_cap_gives_up_at_once(client: GitHubClient, server: ContractServer,
                                                     sleeps: list[float]) -> None:
    server.expect("GET", f"{BASE}/actions/runs/123", Canned(429, {"message": "slow down"},
                                                             headers={"Retry-After": "120"}))
    with pytest.raises(PipelineApiError) as info:
        client.get_run(123)
    assert info.value.retryable and info.value.retry_after == 120 and info.value.status == 429
    assert "asked to wait 120 s" in info.value.message and sleeps == []


def test_secondary_rate_limit_waits_a_minute(server: ContractServer, sleeps: list[float]) -> None:
    limited = Canned(403, {"message": "You have exceeded a secondary rate limit. Please wait a few minutes."})
    server.expect("POST", f"{BASE}/dispatches", limited, Canned(204))
    server.expect("POST", f"{BASE}/dispatches", limited)
    with make_client(server.url, sleeps) as c:
        c.repository_dispatch("model-registered", {"model": "churn"})
    assert sleeps == [60.0]
    with make_client(server.url, sleeps, max_wait=5) as c, pytest.raises(PipelineApiError) as info:
        c.repository_dispatch("model-registered", {"model": "churn"})
    assert info.value.retryable and info.value.retry_after == 60 and sleeps == [60.0]


def test_server_wait_reads_seconds_dates_and_resets() -> None:
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    assert server_wait(429, {"retry-after": "7"}, now) == 7.0
    assert server_wait(503, {"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, now) == 30.0
    assert server_wait(403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(now) + 42)}, now) == 42.0
    assert server_wait(403, {"x-ratelimit-remaining": "12", "x-ratelimit-reset": str(int(now) + 42)}, now) is None
    assert server_wait(500, {}, now) is None


def test_5xx_is_retried_with_growing_backoff(client: GitHubClient, server: ContractServer,
                                             sleeps: list[float]) -> None:
    server.expect("GET", f"{BASE}/actions/runs/123/jobs", Canned(502, raw=b"<html>bad gateway</html>"),
                  Canned(503, {"message": "unavailable"}), Canned(200, {"total_count": 0, "jobs": []}))
    assert client.list_jobs(123) == []
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0


def test_persistent_5xx_gives_up_after_the_retries(server: ContractServer, sleeps: list[float]) -> None:
    server.route("GET", f"{BASE}/actions/runs/9", Canned(500, {"message": "Server Error"}))
    with make_client(server.url, sleeps, retries=2) as c, pytest.raises(PipelineApiError) as info:
        c.get_run(9)
    assert len(server.requests) == 3 and len(sleeps) == 2
    assert info.value.status == 500 and info.value.retryable
    assert "500 Internal Server Error: Server Error" in info.value.message and "3 attempt(s)" in info.value.message


def test_a_timeout_is_retried(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("GET", f"{BASE}/actions/runs/123", Canned(200, RUN, delay=5.0))
    server.expect("GET", f"{BASE}/actions/runs/123", Canned(200, RUN))
    with make_client(server.url, sleeps, timeout=0.5) as c:
        assert c.get_run(123).id == 123
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_a_dispatch_that_timed_out_is_not_sent_twice(server: ContractServer, sleeps: list[float]) -> None:
    server.expect("POST", f"{BASE}/actions/workflows/release.yml/dispatches", Canned(204, delay=5.0))
    with make_client(server.url, sleeps, timeout=0.5) as c, pytest.raises(PipelineApiError) as info:
        c.workflow_dispatch("release.yml", "main", {"correlation_id": "c-1"})
    assert info.value.ambiguous and info.value.retryable and info.value.status is None
    assert "look for the run" in info.value.message
    assert len(server.requests) == 1 and sleeps == []


def test_connection_refused_is_retried_then_reported(sleeps: list[float]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with make_client(f"http://127.0.0.1:{port}", sleeps, retries=2) as c, pytest.raises(PipelineApiError) as info:
        c.workflow_dispatch("release.yml", "main")  # never connected: safe to re-send
    assert len(sleeps) == 2 and info.value.status is None and info.value.retryable and not info.value.ambiguous
    assert "3 attempt(s)" in info.value.message
    secret_free(info.value)


# --------------------------------------------------------------------------- validation before sending


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.repository_dispatch("", {}), "event_type"),
    (lambda c: c.repository_dispatch("x" * 101, {}), "event_type"),
    (lambda c: c.repository_dispatch("deploy", {f"k{i}": i for i in range(11)}), "client_payload"),
    (lambda c: c.repository_dispatch("deploy", {"blob": "x" * 65_530}), "client_payload"),
    (lambda c: c.repository_dispatch("deploy", {"s": {1, 2}}), "client_payload"),
    (lambda c: c.workflow_dispatch("release.yml", "main", {f"i{i}": "v" for i in range(26)}), "inputs"),
    (lambda c: c.workflow_dispatch("release.yml", "main", {"blob": "x" * 65_530}), "inputs"),
    (lambda c: c.workflow_dispatch("release.yml", "main", {"model": {"nested": 1}}), "inputs.model"),
    (lambda c: c.workflow_dispatch("release.yml", "main", {"bad name": "x"}), "inputs"),
    (lambda c: c.workflow_dispatch("../../x", "main"), "workflow"),
    (lambda c: c.workflow_dispatch("release.yml", ""), "ref"),
    (lambda c: c.get_run(0), "run_id"),
    (lambda c: c.find_run("release.yml", "workflow_dispatch", datetime(2026, 1, 1), ""), "title_contains"),
    (lambda c: c.create_pull_request("", "main", "t"), "head"),
])
def test_inputs_are_checked_before_any_request(client: GitHubClient, server: ContractServer, call: Any,
                                               field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call(client)
    assert info.value.field == field and info.value.message.startswith(field.split(".")[0])
    assert server.requests == []


def test_limits_at_the_edge_are_sent(client: GitHubClient, server: ContractServer) -> None:
    ten = {f"k{i}": "v" for i in range(10)}
    server.expect("POST", f"{BASE}/dispatches", Canned(204), body=lambda b: len(b["client_payload"]) == 10)
    client.repository_dispatch("x" * 100, ten)
    inputs = {f"i{i}": "v" for i in range(25)}
    server.expect("POST", f"{BASE}/actions/workflows/release.yml/dispatches", Canned(204),
                  body=lambda b: len(b["inputs"]) == 25)
    client.workflow_dispatch("release.yml", "main", inputs)


@pytest.mark.parametrize(("repo", "token"), [("no-slash", TOKEN), ("a/b/c", TOKEN), (REPO, ""), (REPO, "  ")])
def test_constructor_checks(repo: str, token: str) -> None:
    with pytest.raises(InvalidInput) as info:
        GitHubClient(repo, token)
    assert TOKEN not in info.value.message


def test_api_url_with_credentials_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        GitHubClient(REPO, TOKEN, api_url="https://user:pw@api.github.com")
    assert info.value.field == "api_url" and "pw" not in info.value.message


# --------------------------------------------------------------------------- stage outcomes

STAGE_JOBS = {"build": "build", "deploy": "deploy", "smoke": "smoke", "promote": "promote", "rollback": "rollback"}


def _run(status: str, conclusion: str | None = None) -> WorkflowRun:
    return WorkflowRun(1, status, conclusion, "", "deploy", None)


def _job(name: str, status: str, conclusion: str | None = None) -> Job:
    return Job(abs(hash(name)) % 1000, name, status, conclusion)


def test_run_outcome_while_running() -> None:
    jobs = [_job("build (3.11)", "completed", "success"), _job("build (3.12)", "completed", "success"),
            _job("deploy", "in_progress"), _job("smoke", "queued"), _job("rollback", "completed", "skipped")]
    assert run_outcome(_run("in_progress"), jobs, STAGE_JOBS) == {
        "build": "succeeded", "deploy": "running", "smoke": "pending", "promote": "pending", "rollback": "skipped"}


def test_run_outcome_after_a_failure() -> None:
    jobs = [_job("build", "completed", "success"), _job("deploy / start", "completed", "success"),
            _job("deploy / health", "completed", "success"), _job("smoke", "completed", "failure"),
            _job("promote", "completed", "skipped"), _job("rollback", "completed", "success")]
    assert run_outcome(_run("completed", "failure"), jobs, STAGE_JOBS) == {
        "build": "succeeded", "deploy": "succeeded", "smoke": "failed", "promote": "skipped",
        "rollback": "succeeded"}


def test_run_outcome_of_a_cancelled_run() -> None:
    jobs = [_job("build", "completed", "success"), _job("deploy", "completed", "cancelled"),
            _job("smoke", "queued")]
    assert run_outcome(_run("completed", "cancelled"), jobs, {"build": "build", "deploy": "deploy",
                                                              "smoke": "smoke", "promote": "promote"}) == {
        "build": "succeeded", "deploy": "cancelled", "smoke": "cancelled", "promote": "cancelled"}


def test_run_outcome_mixed_matrix_and_timeouts() -> None:
    jobs = [_job("smoke (a)", "completed", "success"), _job("smoke (b)", "in_progress"),
            _job("build", "completed", "timed_out"), _job("smoke-extra", "completed", "failure")]
    assert run_outcome(_run("in_progress"), jobs, {"smoke": "smoke", "build": "build"}) == {
        "smoke": "running", "build": "failed"}


def test_run_outcome_refuses_unknown_stages() -> None:
    with pytest.raises(InvalidInput) as info:
        run_outcome(_run("queued"), [], {"train": "train"})
    assert info.value.field == "stage_jobs"


# --------------------------------------------------------------------------- the contract server itself


def test_the_contract_server_reports_broken_contracts(sleeps: list[float]) -> None:
    srv = ContractServer(HEADERS)
    try:
        srv.expect("POST", f"{BASE}/dispatches", Canned(204), body={"event_type": "other", "client_payload": {}})
        srv.expect("GET", f"{BASE}/actions/runs/1", Canned(200, RUN))
        with GitHubClient(REPO, "wrong-token", api_url=srv.url, sleep=sleeps.append, session=_no_proxy()) as c:
            with pytest.raises(PipelineApiError) as info:
                c.repository_dispatch("model-registered", {})
            assert info.value.status == 418 and not info.value.retryable
            with pytest.raises(PipelineApiError):
                c.get_run(2)
    finally:
        srv.close()
    assert any("header Authorization: 'Bearer wrong-token'" in f for f in srv.failures)
    assert any("body {" in f and "'model-registered'" in f for f in srv.failures)
    assert any(f"expected GET {BASE}/actions/runs/1 next" in f for f in srv.failures)
    assert srv.unmet == [f"GET {BASE}/actions/runs/1"]
