"""Named users, roles and API tokens over a real store and the Flask app: every route of the
URL map answered for every role (so a route added without a role check fails here), 401 vs
403 and their messages, revocation at once, hashes only in the store, the approver's name on
the approval, the first admin, and reads open or closed by the setting."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.routing import Rule

from modelcd.access import ACTIONS, ROLES, can, refusal, roles_for
from modelcd.app import create_app
from modelcd.app.api import API_TOKEN_HINT, OPEN, RELEASE, RELEASE_READ, SIGNED_IN, auth_kind
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.errors import Conflict, InvalidInput, NotFound
from modelcd.registry.service import parse_metadata
from modelcd.releases.machine import Phase
from modelcd.releases.manual import start_release
from modelcd.users import principal_for
from tests.app.conftest import AUTH, TOKEN
from tests.conftest import free_port, iris_model

# what each declared kind needs: an action of access.ACTIONS (None: nothing)
KIND_ACTION = {OPEN: None, "read": "read", "deploy": "deploy", "approve": "approve", "admin": "admin",
               RELEASE: "deploy", RELEASE_READ: "read", SIGNED_IN: "read"}
# routes that check their caller another way: a webhook is signed by its source (sources/*),
# the console's pages need a session (tested below and in tests/app/test_console.py)
SIGNED_BY_SOURCE = {"hooks.receive"}
# a representative route of each action, and what it must declare
REPRESENTATIVE = {"api.list_models": "read", "api.create_release": "deploy", "api.rollback": "deploy",
                  "api.register_version": "deploy", "api.run_batch": "deploy", "api.retry_inbox": "deploy",
                  "api.approve_release": "approve", "api.reject_release": "approve", "api.put_policy": "admin",
                  "api.delete_policy": "admin", "api.keys": "admin", "api.add_connection": "admin",
                  "api.connect_mlflow_source": "admin", "api.stop_data_plane": "admin",
                  "users_api.add_user": "admin", "users_api.create_token": SIGNED_IN,
                  "api.run_release_stage": RELEASE, "api.release_stage_status": RELEASE_READ,
                  "ops.healthz": OPEN, "ops.readyz": OPEN, "ops.metrics": "read"}
# a value for each path variable, naming nothing (handlers answer 404/400/409 once admitted)
PATH_VALUES = {"release_id": "r-000000000000", "job_id": "j-000000000000", "name": "nope", "model": "nope",
               "environment": "production", "number": 1, "row_id": 1, "stage": "build", "user": "nobody",
               "token_id": "t-000000000000", "source": "generic", "filename": "console.js"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(tmp_path: Path, **env: str) -> tuple[Context, Flask]:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": TOKEN,
                                      "MODELCD_ROUTER_PORT": str(free_port()), **env})
    ctx = build_context(settings)
    return ctx, create_app(ctx, TOKEN)


@pytest.fixture
def tokens(ctx: Context) -> dict[str, str]:
    """One user of each role, with a token each (the role's name is the user's)."""
    out = {}
    for role in ROLES:
        ctx.users.add(f"{role}-user", role)
        out[role] = ctx.users.create_token(f"{role}-user", "test").token
    return out


def _register(ctx: Context, tmp: Path, name: str = "iris") -> None:
    folder = tmp / f"files-{name}"
    folder.mkdir(exist_ok=True)
    meta = {**iris_model(folder), "release": False}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    buf.seek(0)
    ctx.registry.register(name, buf, parse_metadata(meta))


def _release_at_gate(ctx: Context) -> str:
    """A release of iris v1 waiting at its approval gate (moved there as the runner would)."""
    rid = start_release(ctx, "iris", 1, "production")
    assert ctx.releases.claim(rid)
    for phase in (Phase.DEPLOYING, Phase.SMOKE_TESTING, Phase.AWAITING_APPROVAL):
        ctx.releases.advance(rid, phase)
    return rid


# -- the rules -------------------------------------------------------------------------------


def test_roles_grant_exactly_their_actions() -> None:
    grants = {role: {a for a in ACTIONS if can(role, a)} for role in ROLES}
    assert grants == {"viewer": {"read"}, "deployer": {"read", "deploy"}, "approver": {"read", "approve"},
                      "admin": set(ACTIONS)}
    assert not can("nobody", "read") and roles_for("approve") == ["approver", "admin"]


# -- every route, every role ---------------------------------------------------------------


def _url(rule: Rule) -> str:
    values = {arg: PATH_VALUES.get(arg, "x") for arg in rule.arguments}
    return rule.build(values, append_unknown=False)[1]  # type: ignore[index]


def _routes(app: Flask) -> Iterator[tuple[Rule, str, str | None]]:
    """(rule, method, declared kind) of every API and ops route."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint in SIGNED_BY_SOURCE or rule.endpoint == "static" or rule.endpoint.startswith("ui."):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule, method, auth_kind(app.view_functions[rule.endpoint])


def test_every_route_declares_what_it_needs(app: Flask) -> None:
    routes = list(_routes(app))
    assert len(routes) > 60
    undeclared = [f"{m} {r.rule} ({r.endpoint})" for r, m, kind in routes if kind not in KIND_ACTION]
    assert not undeclared, f"routes without a role check (decorate them with requires/read/write/...): {undeclared}"
    declared = {r.endpoint: kind for r, _, kind in routes}
    assert {e: declared.get(e) for e in REPRESENTATIVE} == REPRESENTATIVE


def _call(client: FlaskClient, method: str, url: str, headers: dict[str, str]) -> Any:
    return client.open(url, method=method, headers=headers, data=b"{}", content_type="application/json")


def test_every_route_answers_every_role_as_its_action_says(app: Flask, client: FlaskClient,
                                                           tokens: dict[str, str]) -> None:
    """Each role's token on each route: 403 naming the roles exactly when the role lacks the
    route's action, otherwise past the check (whatever the handler then answers); without a
    token 401 with the hint, except open routes and (loopback: open) reads."""
    callers = {**{role: _bearer(tok) for role, tok in tokens.items()}, "first admin": AUTH}
    checked = 0
    for rule, method, kind in _routes(app):
        url, action = _url(rule), KIND_ACTION[str(kind)]
        for who, headers in callers.items():
            r = _call(client, method, url, headers)
            role = "admin" if who == "first admin" else who
            if action is not None and not can(role, action):
                assert r.status_code == 403, (who, method, url, r.status_code, r.get_data(as_text=True)[:200])
                assert r.json["code"] == "forbidden"
                assert r.json["message"].startswith(f"this needs the {' or '.join(roles_for(action))} role; "
                                                     f"your token is for {role} `{role}-user`"), r.json
            else:
                assert r.status_code not in (401, 403), (who, method, url, r.status_code, r.get_data(as_text=True))
            checked += 1
        anonymous = _call(client, method, url, {})
        if action is None or kind in ("read", RELEASE_READ):  # reads are open on loopback (auto)
            assert anonymous.status_code not in (401, 403), (method, url, anonymous.get_data(as_text=True)[:200])
        else:
            assert anonymous.status_code == 401, (method, url)
            assert anonymous.json["code"] == "unauthorized"
    assert checked > 250


# -- 401 and 403 -----------------------------------------------------------------------------


def test_unknown_and_missing_tokens_are_401_with_the_hint_and_a_role_short_of_it_403(
        client: FlaskClient, tokens: dict[str, str]) -> None:
    for headers in ({}, _bearer("mcd_not-a-token-anyone-made"), _bearer("wrong"), {"Authorization": TOKEN}):
        r = client.post("/api/v1/releases", json={}, headers=headers)
        assert r.status_code == 401 and r.json == {"code": "unauthorized", "message": API_TOKEN_HINT, "field": None}
    r = client.post("/api/v1/releases", json={}, headers=_bearer(tokens["viewer"]))
    assert r.status_code == 403
    assert r.json["message"] == "this needs the deployer or admin role; your token is for viewer `viewer-user`"
    r = client.put("/api/v1/policies", data="name: x\n", headers=_bearer(tokens["deployer"]))
    assert r.status_code == 403 and r.json["message"].startswith("this needs the admin role; your token is for "
                                                                 "deployer `deployer-user`")
    r = client.post("/api/v1/releases/r-000000000000/approve", headers=_bearer(tokens["deployer"]))
    assert r.status_code == 403 and "approver or admin role" in r.json["message"]
    # an approver passes the check: the release just does not exist
    r = client.post("/api/v1/releases/r-000000000000/approve", headers=_bearer(tokens["approver"]))
    assert r.status_code == 404


def test_a_role_change_and_a_disabled_user_take_effect_on_the_next_request(
        ctx: Context, client: FlaskClient, tokens: dict[str, str]) -> None:
    viewer = _bearer(tokens["viewer"])
    assert client.post("/api/v1/policies/plan", data="x", headers=viewer).status_code == 403
    r = client.post("/api/v1/users/viewer-user/role", json={"role": "deployer"}, headers=AUTH)
    assert r.status_code == 200 and r.json["role"] == "deployer"
    assert client.post("/api/v1/policies/plan", data="x", headers=viewer).status_code == 400  # past the check
    r = client.post("/api/v1/users/viewer-user/disable", headers=viewer)
    assert r.status_code == 403  # a deployer may not
    r = client.post("/api/v1/users/viewer-user/disable", headers=AUTH)
    assert r.status_code == 200 and r.json["disabled"] is True
    assert client.get("/api/v1/tokens", headers=viewer).status_code == 401
    assert client.post("/api/v1/users/nobody/disable", headers=AUTH).status_code == 404
    r = client.post("/api/v1/users/viewer-user/enable", headers=AUTH)
    assert r.status_code == 200 and r.json["disabled"] is False
    assert client.get("/api/v1/tokens", headers=viewer).status_code == 200
    kinds = [e["kind"] for e in ctx.jobs.events()]
    assert "user.disabled" in kinds and "user.enabled" in kinds


# -- tokens ----------------------------------------------------------------------------------


def test_a_revoked_token_is_refused_at_once(client: FlaskClient, tokens: dict[str, str]) -> None:
    mine = _bearer(tokens["deployer"])
    listed = client.get("/api/v1/tokens", headers=mine).json["tokens"]
    assert [t["user"] for t in listed] == ["deployer-user"]  # a non-admin sees their own only
    assert client.post("/api/v1/releases", json={}, headers=mine).status_code == 400  # admitted
    r = client.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=mine)  # anyone may revoke their own
    assert r.status_code == 200 and r.json["revoked_at"]
    r = client.post("/api/v1/releases", json={}, headers=mine)
    assert r.status_code == 401 and r.json["message"] == API_TOKEN_HINT
    assert client.get("/api/v1/tokens", headers=mine).status_code == 401


def test_users_manage_their_own_tokens_and_only_admins_anyone_s(client: FlaskClient, tokens: dict[str, str]) -> None:
    viewer = _bearer(tokens["viewer"])
    r = client.post("/api/v1/tokens", json={"name": "laptop"}, headers=viewer)
    assert r.status_code == 201 and r.json["user"] == "viewer-user" and r.json["token"].startswith("mcd_")
    assert r.json["prefix"] == r.json["token"][:8] and r.json["name"] == "laptop"
    second = r.json
    assert client.get("/api/v1/models", headers=_bearer(second["token"])).status_code == 200
    r = client.post("/api/v1/tokens", json={"user": "deployer-user"}, headers=viewer)
    assert r.status_code == 403 and "only your own tokens" in r.json["message"]
    assert client.get("/api/v1/tokens?user=admin-user", headers=viewer).status_code == 403
    deployer_tokens = client.get("/api/v1/tokens?user=deployer-user", headers=AUTH).json["tokens"]
    assert client.delete(f"/api/v1/tokens/{deployer_tokens[0]['id']}", headers=viewer).status_code == 403
    assert client.get("/api/v1/users", headers=viewer).status_code == 403
    # an admin (a user, or the service's API token) makes one for anyone
    r = client.post("/api/v1/tokens", json={"user": "deployer-user", "name": "ci"}, headers=_bearer(tokens["admin"]))
    assert r.status_code == 201 and r.json["user"] == "deployer-user"
    everyone = client.get("/api/v1/tokens", headers=AUTH).json["tokens"]
    assert {t["user"] for t in everyone} == {f"{role}-user" for role in ROLES}
    assert all("token" not in t and "token_hash" not in t for t in everyone)
    # the first admin has no stored user: it makes tokens for users, not for itself
    r = client.post("/api/v1/tokens", json={}, headers=AUTH)
    assert r.status_code == 400 and r.json["field"] == "user" and "reserved" in r.json["message"]


def test_users_and_roles_are_checked_with_a_clear_error(ctx: Context, client: FlaskClient) -> None:
    r = client.post("/api/v1/users", json={"name": "Alice Smith", "role": "viewer"}, headers=AUTH)
    assert r.status_code == 400 and r.json["field"] == "name" and "try 'alice-smith'" in r.json["message"]
    r = client.post("/api/v1/users", json={"name": "alice", "role": "boss"}, headers=AUTH)
    assert r.status_code == 400 and r.json["field"] == "role"
    assert "viewer, deployer, approver, admin" in r.json["message"]
    for reserved in ("admin", "modelcd"):
        r = client.post("/api/v1/users", json={"name": reserved, "role": "viewer"}, headers=AUTH)
        assert r.status_code == 400 and "reserved" in r.json["message"]
    assert client.post("/api/v1/users", json={"name": "alice", "role": "viewer"}, headers=AUTH).status_code == 201
    r = client.post("/api/v1/users", json={"name": "alice", "role": "admin"}, headers=AUTH)
    assert r.status_code == 409 and "set-role alice" in r.json["message"]
    r = client.post("/api/v1/tokens", json={"user": "alice", "name": "x" * 65}, headers=AUTH)
    assert r.status_code == 400 and r.json["field"] == "name"
    assert client.delete("/api/v1/users/nobody", headers=AUTH).status_code == 404
    with pytest.raises(InvalidInput):
        ctx.users.set_role("alice", "root")
    with pytest.raises(NotFound):
        ctx.users.create_token("nobody")
    ctx.users.set_disabled("alice", True)
    with pytest.raises(Conflict):
        ctx.users.create_token("alice")


def test_removing_a_user_revokes_their_tokens(ctx: Context, client: FlaskClient, tokens: dict[str, str]) -> None:
    r = client.delete("/api/v1/users/approver-user", headers=AUTH)
    assert r.status_code == 200 and len(r.json["revoked_tokens"]) == 1
    assert principal_for(ctx, tokens["approver"]) is None
    assert client.get("/api/v1/tokens?user=approver-user", headers=AUTH).json["tokens"][0]["revoked_at"]
    assert "approver-user" not in [u["name"] for u in client.get("/api/v1/users", headers=AUTH).json["users"]]


def test_principal_for_resolves_the_api_token_users_and_nothing_else(ctx: Context, app: Flask,
                                                                      tokens: dict[str, str]) -> None:
    first = principal_for(ctx, TOKEN)
    assert first is not None and (first.name, first.role, first.token_id) == ("admin", "admin", None)
    viewer = principal_for(ctx, tokens["viewer"])
    assert viewer is not None and (viewer.name, viewer.role) == ("viewer-user", "viewer")
    assert viewer.token_id and viewer.token_id.startswith("t-")
    for nothing in (None, "", TOKEN + "x", tokens["viewer"][:-1], tokens["viewer"] + " "):
        assert principal_for(ctx, nothing) is None
    last_used = ctx.users.get_token(viewer.token_id).last_used_at
    assert last_used is not None


def test_tokens_are_stored_only_as_hashes_and_reach_no_log_or_event(
        ctx: Context, client: FlaskClient, tokens: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    made = client.post("/api/v1/tokens", json={"user": "viewer-user", "name": "scan"}, headers=AUTH).json
    secrets = [*tokens.values(), made["token"]]
    for token in secrets:  # used, refused, revoked: every path a token takes
        client.get("/api/v1/models", headers=_bearer(token))
        client.post("/api/v1/users", json={}, headers=_bearer(token))
    client.delete(f"/api/v1/tokens/{made['id']}", headers=AUTH)
    client.get("/api/v1/models", headers=_bearer(made["token"]))
    ctx.db.dispose()  # checkpoint the WAL into the file
    home = ctx.settings.home
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file() and p.name != "token")
    for token in secrets:
        assert token.encode() not in stored
        assert token[8:].encode() not in stored  # the shown prefix, never the rest
        assert hashlib.sha256(token.encode()).hexdigest().encode() in stored  # what is kept instead
        assert token not in caplog.text
    events = client.get("/api/v1/jobs", headers=AUTH)  # and the events the changes wrote
    assert events.status_code == 200
    written = " ".join(str(e) for e in ctx.jobs.events())
    assert "token.created" in written and "token.revoked" in written
    assert not any(token in written for token in secrets)


# -- who did it ------------------------------------------------------------------------------


def test_the_approval_and_every_change_a_person_makes_name_them(ctx: Context, client: FlaskClient, tmp_path: Path,
                                                                 tokens: dict[str, str]) -> None:
    _register(ctx, tmp_path)
    rid = _release_at_gate(ctx)
    r = client.post(f"/api/v1/releases/{rid}/approve", json={"comment": "looks good"},
                    headers=_bearer(tokens["approver"]))
    assert r.status_code == 200 and r.json["phase"] == "promoting"
    events = client.get(f"/api/v1/releases/{rid}").json["events"]
    approved = [e for e in events if e["kind"] == "release.approved"]
    assert [(e["message"], e["actor"]) for e in approved] == [("approved by approver-user: looks good",
                                                               "approver-user")]
    engine = [e for e in events if e["kind"] in ("release.building", "release.deploying")]
    assert engine and all(e["actor"] is None for e in engine)  # the engine's own moves: no actor
    # a deployer's release and its stop; the first admin's policy
    r = client.post("/api/v1/releases", json={"model": "iris", "version": 1, "environment": "staging"},
                    headers=_bearer(tokens["deployer"]))
    assert r.status_code == 202
    client.post(f"/api/v1/releases/{r.json['id']}/stop", headers=_bearer(tokens["deployer"]))
    client.put("/api/v1/policies", data="name: web\nmatch: {models: ['web-*']}\n", headers=AUTH)
    by_kind = {e["kind"]: e["actor"] for e in ctx.jobs.events()}
    assert by_kind["release.queued"] == "deployer-user" and by_kind["release.stop_requested"] == "deployer-user"
    assert by_kind["policy.applied"] == "admin"
    stopped = client.get(f"/api/v1/releases/{r.json['id']}").json["events"]
    assert any(e["message"] == "stop requested by deployer-user" for e in stopped)


def test_a_rejection_names_who_rejected_in_the_release_error(ctx: Context, client: FlaskClient, tmp_path: Path,
                                                             tokens: dict[str, str]) -> None:
    _register(ctx, tmp_path)
    rid = _release_at_gate(ctx)
    r = client.post(f"/api/v1/releases/{rid}/reject", headers=_bearer(tokens["admin"]))
    assert r.status_code == 200 and r.json["error"] == "rejected by admin-user"


# -- reads open or closed --------------------------------------------------------------------


@pytest.mark.parametrize(("env", "open_"), [({}, True), ({"MODELCD_OPEN_READS": "false"}, False),
                                            ({"MODELCD_HOST": "0.0.0.0"}, False),
                                            ({"MODELCD_HOST": "0.0.0.0", "MODELCD_OPEN_READS": "true"}, True),
                                            ({"MODELCD_HOST": "::1"}, True)])
def test_reads_are_open_only_as_the_setting_says(tmp_path: Path, env: dict[str, str], open_: bool) -> None:
    ctx, app = _app(tmp_path, **env)
    try:
        client = app.test_client()
        for path in ("/api/v1/models", "/api/v1/releases", "/api/v1/openapi.json", "/metrics"):
            r = client.get(path)
            assert r.status_code == (200 if open_ else 401), (path, r.status_code)
            if not open_:
                assert r.json["message"] == API_TOKEN_HINT
        for path in ("/healthz", "/readyz"):  # always open
            assert client.get(path).status_code in (200, 503)
        ctx.users.add("eve", "viewer")
        viewer = _bearer(ctx.users.create_token("eve").token)
        assert client.get("/api/v1/models", headers=viewer).status_code == 200
        assert client.get("/metrics", headers=viewer).status_code == 200
        assert client.get("/api/v1/models", headers=_bearer("mcd_unknown")).status_code == (200 if open_ else 401)
        # a user's own tokens always need their token, open reads or not
        assert client.get("/api/v1/tokens").status_code == 401
    finally:
        ctx.db.dispose()


@pytest.mark.parametrize("app_env", [{"MODELCD_OPEN_READS": "false"}])
def test_the_console_pages_need_a_session(app: Flask, client: FlaskClient) -> None:
    """The console's routes (their own session auth), reads closed: none answers a page without
    signing in (with reads open, pages are read only: tests/app/test_console.py)."""
    public = {"ui.login", "ui.login_post", "ui.static"}
    pages = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("ui.") and r.endpoint not in public]
    for rule in pages:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            r = client.open(_url(rule), method=method)
            assert r.status_code in (303, 403), (method, rule.rule, r.status_code)
            if r.status_code == 303:
                assert re.search(r"/ui/login", r.headers["Location"])


def test_refusal_is_none_for_granted_actions() -> None:
    from modelcd.access import Principal

    assert refusal(Principal("a", "admin"), "admin") is None
    assert refusal(Principal("v", "viewer"), "read") is None


def test_a_pipeline_token_drives_its_own_release_only_even_with_reads_closed(tmp_path: Path) -> None:
    ctx, app = _app(tmp_path, MODELCD_OPEN_READS="false")
    try:
        client = app.test_client()
        _register(ctx, tmp_path)
        mine, other = (start_release(ctx, "iris", 1, env) for env in ("production", "staging"))
        pipeline = _bearer(ctx.pipeline_runs.mint(mine, "github"))
        # its own release's stage status (a read) and files (a write route): past the check
        assert client.get(f"/api/v1/releases/{mine}/stages/build?wait=0", headers=pipeline).status_code == 200
        assert client.get(f"/api/v1/releases/{mine}/files", headers=pipeline).status_code == 200
        # another release's, any other read or write: 401 (it is no user's token)
        assert client.get(f"/api/v1/releases/{other}/stages/build?wait=0", headers=pipeline).status_code == 401
        assert client.get(f"/api/v1/releases/{other}/files", headers=pipeline).status_code == 401
        assert client.get("/api/v1/models", headers=pipeline).status_code == 401
        assert client.post(f"/api/v1/releases/{mine}/stop", headers=pipeline).status_code == 401
    finally:
        ctx.db.dispose()


def test_the_openapi_document_names_the_roles_of_each_operation(client: FlaskClient) -> None:
    paths = client.get("/api/v1/openapi.json").json["paths"]
    assert paths["/releases"]["post"]["x-modelcd-roles"] == ["deployer", "admin"]
    assert paths["/releases/{release_id}/approve"]["post"]["x-modelcd-roles"] == ["approver", "admin"]
    assert paths["/policies"]["put"]["x-modelcd-roles"] == ["admin"]
    assert paths["/models/{name}/versions/{version}"]["get"]["x-modelcd-action"] == "read"
    assert paths["/releases/{release_id}/stages/{stage}"]["post"]["x-modelcd-action"] == RELEASE
    assert all("x-modelcd-roles" in op for ops in paths.values() for op in ops.values())
