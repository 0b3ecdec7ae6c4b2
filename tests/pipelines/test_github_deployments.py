"""GitHub Deployments: the client's requests against the documented contract
(``reference/integrations.md`` §10), the observer's decisions as pure functions, the observer
over a real store against the contract stand-in (one deployment per release however often an
event comes, statuses in order, the model's previous deployment inactive, an instant rollback),
and a release driven by the external runner end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select, update

from modelcd import __version__
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.errors import InvalidInput
from modelcd.pipelines.deployments import describe, run_page, should_post
from modelcd.pipelines.github import GitHubClient
from modelcd.pipelines.http import PipelineApiError
from modelcd.releases import observers
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.releases.machine import Phase
from modelcd.releases.observers import ReleaseMoved
from modelcd.releases.policy import Policy
from modelcd.releases.rollback_event import ENDPOINT_ROLLED_BACK, ROLLED_BACK
from modelcd.store import schema
from modelcd.store.db import now
from modelcd.targets.process import free_port
from tests.conftest import iris_model, make_service
from tests.pipelines.contract_server import Canned, ContractServer, serve

TOKEN = "ghp_DEPLOYonly0123456789abcdefABCDEF"
REPO = "octo-org/churn-models"
BASE = f"/repos/{REPO}"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/vnd.github+json",
           "X-GitHub-Api-Version": "2022-11-28", "User-Agent": f"modelcd/{__version__}"}
DEPLOYMENT: dict[str, Any] = {
    "id": 42, "sha": "a84d88e7554fc1fa21bcbc4efae3c782a70d2b9d", "ref": "main", "task": "deploy",
    "environment": "production", "payload": {"release_id": "r_1"}, "created_at": "2026-01-02T10:00:00Z",
    "statuses_url": f"https://api.github.com{BASE}/deployments/42/statuses",
}


@pytest.fixture
def server() -> Iterator[ContractServer]:
    yield from serve(HEADERS)


def _client(url: str) -> GitHubClient:
    session = requests.Session()
    session.trust_env = False  # loopback only
    return GitHubClient(REPO, TOKEN, api_url=url, timeout=2.0, sleep=lambda s: None, session=session)


# --------------------------------------------------------------------------- the client


def test_create_deployment_sends_the_documented_request(server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/deployments", Canned(201, DEPLOYMENT), query={}, body={
        "ref": "main", "task": "deploy", "auto_merge": False, "required_contexts": [],
        "payload": {"release_id": "r_1", "model": "churn", "version": "3"}, "environment": "production",
        "description": "churn v3", "transient_environment": False})
    with _client(server.url) as c:
        made = c.create_deployment("main", "production", {"release_id": "r_1", "model": "churn", "version": "3"},
                                   "churn v3")
    assert (made.id, made.ref, made.environment, made.payload) == (42, "main", "production", {"release_id": "r_1"})


def test_a_merged_branch_answer_is_an_error_and_not_sent_again(server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/deployments",
                  Canned(202, {"message": "Auto-merged master into topic-branch on deployment."}))
    with _client(server.url) as c, pytest.raises(PipelineApiError) as e:
        c.create_deployment("topic-branch", "staging", {})
    assert e.value.status == 202 and "merged" in e.value.message and not e.value.retryable
    assert TOKEN not in str(e.value)
    assert len(server.requests) == 1


def test_list_deployments_filters_and_reads_string_payloads(server: ContractServer) -> None:
    server.expect("GET", f"{BASE}/deployments",
                  Canned(200, [DEPLOYMENT, {**DEPLOYMENT, "id": 41, "payload": '{"release_id": "r_0"}'},
                               {**DEPLOYMENT, "id": 40, "payload": ""}]),
                  query={"environment": "production", "ref": "main", "per_page": "100"})
    with _client(server.url) as c:
        found = c.list_deployments(environment="production", ref="main")
    assert [(d.id, d.payload.get("release_id")) for d in found] == [(42, "r_1"), (41, "r_0"), (40, None)]


def test_deployment_status_body_and_limits(server: ContractServer) -> None:
    long = "x" * 200
    server.expect("POST", f"{BASE}/deployments/42/statuses", Canned(201, {"id": 7, "state": "success"}),
                  body=lambda b: b == {"state": "success", "description": "x" * 139 + "…",
                                       "environment_url": "http://127.0.0.1:8700/churn/production",
                                       "log_url": "https://github.com/o/r/actions/runs/1", "auto_inactive": False})
    with _client(server.url) as c:
        assert c.create_deployment_status(42, "success", long, environment_url="http://127.0.0.1:8700/churn/production",
                                          log_url="https://github.com/o/r/actions/runs/1", auto_inactive=False) == 7
        with pytest.raises(InvalidInput) as e:
            c.create_deployment_status(42, "done")
        assert e.value.field == "state"
        with pytest.raises(InvalidInput):
            c.create_deployment_status(42, "success", log_url="javascript:alert(1)")
        with pytest.raises(InvalidInput):
            c.create_deployment_status(0, "success")
    assert len(server.requests) == 1


def test_a_refused_token_names_the_permission(server: ContractServer) -> None:
    server.expect("POST", f"{BASE}/deployments/42/statuses",
                  Canned(403, {"message": "Resource not accessible by personal access token"}))
    with _client(server.url) as c, pytest.raises(PipelineApiError) as e:
        c.create_deployment_status(42, "in_progress")
    assert "Deployments: write" in e.value.message and TOKEN not in e.value.message


# --------------------------------------------------------------------------- decisions


def test_statuses_never_repeat_nor_go_back() -> None:
    assert should_post(None, "in_progress") and should_post("in_progress", "success")
    assert should_post("in_progress", "failure") and should_post("success", "inactive")
    assert not should_post("success", "success") and not should_post("success", "in_progress")
    assert not should_post("failure", "in_progress") and not should_post("inactive", "success")
    assert should_post("inactive", "success", reviving=True)


def test_run_pages_of_github_and_enterprise_servers() -> None:
    assert run_page("https://api.github.com", "o/r", "9") == "https://github.com/o/r/actions/runs/9"
    assert run_page("https://ghe.example/api/v3/", "o/r", "9") == "https://ghe.example/o/r/actions/runs/9"
    assert run_page("http://127.0.0.1:9999", "o/r", "9") is None


def test_descriptions_name_the_release_and_its_error() -> None:
    moved = ReleaseMoved(release_id="r_9", model="churn", version=3, environment="production", phase="failed",
                         trigger="auto", runner="github", error="smoke failed: 500")
    assert describe(moved) == "churn v3: release r_9 failed: smoke failed: 500"
    assert describe(ReleaseMoved(**{**moved.to_payload(), "phase": ROLLED_BACK})) == "churn v3 serves again (rollback)"


# --------------------------------------------------------------------------- the observer over a real store


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    monkeypatch.setattr(observers, "OBSERVERS", ["modelcd.pipelines.deployments:observe"])
    monkeypatch.setenv("MODELCD_TEST_DEPLOY_TOKEN", TOKEN)
    c = build_context(load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"),
                                             "MODELCD_ROUTER_PORT": str(free_port()),
                                             "MODELCD_GITHUB_DEPLOYMENTS": "true"}))
    yield c
    c.db.dispose()


def _policy(url: str) -> Policy:
    return Policy.from_dict({"name": "gh", "runner": "github", "pipeline": {
        "repo": REPO, "api_url": url, "token_env": "MODELCD_TEST_DEPLOY_TOKEN", "ref": "release"}})


def _release(ctx: Context, url: str, version: int) -> str:
    with ctx.db.write() as conn:
        rid = ctx.releases.create_in(conn, model="churn", version=version, environment="production",
                                     policy=_policy(url), env_index=0, trigger="auto")
    assert ctx.releases.claim(rid)
    return rid


def _succeed(ctx: Context, rid: str) -> None:
    for phase in (Phase.DEPLOYING, Phase.SMOKE_TESTING, Phase.PROMOTING, Phase.SUCCEEDED):
        ctx.releases.advance(rid, phase, "ok")


def _redeliver(ctx: Context) -> None:
    """As if every event had been handed out again (at least once)."""
    with ctx.db.write() as conn:
        conn.execute(update(schema.outbox).values(processed_at=None, error=None))


def _statuses(server: ContractServer) -> list[tuple[str, str]]:
    return [(r.path.split("/")[-2], r.json["state"]) for r in server.requests if r.path.endswith("/statuses")]


def test_one_deployment_per_release_with_its_statuses_in_order(ctx: Context, server: ContractServer) -> None:
    server.route("POST", f"{BASE}/deployments", Canned(201, {**DEPLOYMENT, "id": 501}),
                 Canned(201, {**DEPLOYMENT, "id": 502}), body=lambda b: (
                     b["ref"] == "release" and b["environment"] == "production" and b["auto_merge"] is False
                     and b["required_contexts"] == [] and b["payload"]["model"] == "churn"))
    server.route("POST", f"{BASE}/deployments/501/statuses", Canned(201, {"id": 1}))
    server.route("POST", f"{BASE}/deployments/502/statuses", Canned(201, {"id": 2}))
    first = _release(ctx, server.url, 1)
    _succeed(ctx, first)
    dispatch_outbox(ctx)
    [created] = [r for r in server.requests if r.path.endswith("/deployments")]
    assert created.json["payload"] == {"release_id": first, "model": "churn", "version": "1"}
    assert _statuses(server) == [("501", "in_progress"), ("501", "success")]
    success = server.requests[-1].json
    assert success["environment_url"] == ctx.router.endpoint_uri("churn", "production")
    assert success["auto_inactive"] is False
    _redeliver(ctx)
    dispatch_outbox(ctx)
    assert len(server.requests) == 3  # nothing created or posted twice
    with ctx.db.read() as conn:
        notes = [r.error for r in conn.execute(select(schema.outbox))]
    assert notes == [None] * len(notes)

    # the next release of the model: its own deployment, and the first one becomes inactive
    second = _release(ctx, server.url, 2)
    _succeed(ctx, second)
    dispatch_outbox(ctx)
    assert _statuses(server)[2:] == [("502", "in_progress"), ("502", "success"), ("501", "inactive")]

    # an instant rollback: the first release serves again, the second is inactive
    moved = ReleaseMoved(release_id=first, model="churn", version=1, environment="production", phase=ROLLED_BACK,
                         trigger="rollback", runner="github")
    with ctx.db.write() as conn:
        conn.execute(schema.outbox.insert().values(kind=ENDPOINT_ROLLED_BACK, payload=moved.to_payload(),
                                                   created_at=now()))
    dispatch_outbox(ctx)
    assert _statuses(server)[5:] == [("501", "success"), ("502", "inactive")]


def test_a_failed_release_posts_failure_and_a_crashed_creation_is_found_not_repeated(
        ctx: Context, server: ContractServer) -> None:
    rid = _release(ctx, server.url, 1)
    # a handler claimed the creation and died after GitHub made it
    with ctx.db.write() as conn:
        conn.execute(schema.github_deployments.insert().values(
            release_id=rid, repo=REPO, model="churn", environment="production", claimed_at=time.time() - 3600,
            updated_at=now()))
    server.route("GET", f"{BASE}/deployments", Canned(200, [{**DEPLOYMENT, "id": 77, "payload": {"release_id": rid}}]),
                 query={"environment": "production", "ref": "release", "per_page": "100"})
    server.route("POST", f"{BASE}/deployments/77/statuses", Canned(201, {"id": 1}))
    ctx.releases.advance(rid, Phase.ROLLING_BACK, "deploy failed", error="deploy failed: no port")
    ctx.releases.advance(rid, Phase.FAILED, "rolled back")
    dispatch_outbox(ctx)
    assert _statuses(server) == [("77", "in_progress"), ("77", "failure")]
    assert "deploy failed: no port" in server.requests[-1].json["description"]


def test_quiet_for_other_runners_and_when_off(ctx: Context, server: ContractServer, tmp_path: Path) -> None:
    with ctx.db.write() as conn:
        rid = ctx.releases.create_in(conn, model="iris", version=1, environment="production",
                                     policy=Policy.from_dict({"name": "local"}), env_index=0, trigger="auto")
    assert ctx.releases.claim(rid)
    off = build_context(load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"),
                                               "MODELCD_ROUTER_PORT": str(free_port())}))
    try:
        _release(off, server.url, 1)
        dispatch_outbox(off)  # the setting is off: nothing is sent
    finally:
        off.db.dispose()
    assert server.requests == []


# --------------------------------------------------------------------------- end to end, external runner


def _stage(url: str, release_id: str, stage: str, token: str) -> requests.Response:
    """Run a stage as the workflow's CLI does: POST, then GET while it answers 202 running."""
    where = f"{url}/api/v1/releases/{release_id}/stages/{stage}"
    r = requests.post(where, params={"wait": 20}, headers={"Authorization": f"Bearer {token}"}, timeout=90)
    deadline = time.monotonic() + 300
    while r.status_code == 202 and time.monotonic() < deadline:
        r = requests.get(where, params={"wait": 5}, timeout=90)
    return r


@pytest.mark.slow
def test_a_release_run_by_github_shows_as_a_deployment(tmp_path: Path, server: ContractServer) -> None:
    model = "gh-deployed"
    workflow = f"modelcd-release-{model}.yml"
    server.route("POST", f"{BASE}/actions/workflows/{workflow}/dispatches",
                 Canned(200, {"workflow_run_id": 9, "run_url": "", "html_url": "https://github.com/o/r/runs/9"}))
    server.route("GET", f"{BASE}/actions/runs/9", Canned(200, {
        "id": 9, "status": "in_progress", "conclusion": None, "html_url": "https://github.com/o/r/actions/runs/9",
        "display_title": "t", "created_at": None}))
    server.route("POST", f"{BASE}/deployments", Canned(201, {**DEPLOYMENT, "id": 601}))
    server.route("POST", f"{BASE}/deployments/601/statuses", Canned(201, {"id": 1}))
    svc = make_service(tmp_path, MODELCD_TEST_DEPLOY_TOKEN=TOKEN, MODELCD_GITHUB_DEPLOYMENTS="true")
    svc.start()
    try:
        svc.apply_policy(f"""\
name: gh-deploy
match: {{models: ["{model}"]}}
runner: github
pipeline: {{repo: {REPO}, api_url: "{server.url}", token_env: MODELCD_TEST_DEPLOY_TOKEN, poll_interval_s: 1}}
smoke: {{requests: 3}}
""")
        meta = iris_model(tmp_path / "v1")
        svc.register(model, tmp_path / "v1", meta)
        deadline = time.monotonic() + 60
        while not any(r.path.endswith("/dispatches") for r in server.requests) and time.monotonic() < deadline:
            time.sleep(0.2)
        [dispatch] = [r for r in server.requests if r.path.endswith("/dispatches")]
        rid, token = dispatch.json["inputs"]["release_id"], dispatch.json["inputs"]["release_token"]
        for stage in ("build", "deploy", "smoke", "promote"):
            r = _stage(svc.url, rid, stage, token)
            assert r.status_code == 200 and r.json()["outcome"] == "succeeded", r.text
        deadline = time.monotonic() + 30
        while ("601", "success") not in _statuses(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _statuses(server) == [("601", "in_progress"), ("601", "success")]
        [created] = [r for r in server.requests if r.path == f"{BASE}/deployments"]
        assert created.json["payload"] == {"release_id": rid, "model": model, "version": "1"}
        assert created.json["environment"] == "production" and created.json["ref"] == "main"
        success = [r for r in server.requests if r.path.endswith("/statuses")][-1].json
        assert "log_url" not in success  # the stand-in's address is neither github.com nor a GitHub Enterprise API
        assert success["environment_url"] == svc.endpoint(model)["uri"]
    finally:
        svc.stop()
        svc.shutdown_data_plane()
