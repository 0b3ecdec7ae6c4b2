"""The console (/ui/) through Flask's test client over a real store, and its live log through a
real ``modelcd serve``: sign-in and sessions, cookie flags, CSRF, roles (buttons and 403s),
escaping, every page, pagination, the actions, and server-sent events."""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import select, update

from modelcd.app.ui import stream
from modelcd.app.wsgi_bridge import DISCONNECTED
from modelcd.context import Context
from modelcd.domain import JobState, JobType
from modelcd.registry.service import parse_metadata
from modelcd.releases.machine import Phase
from modelcd.store import schema
from modelcd.store.db import now
from tests.app.conftest import TOKEN
from tests.conftest import TOKEN as SERVICE_TOKEN
from tests.conftest import iris_model, running_service

XSS = "<script>alert('x')</script>"
ACTION = re.compile(r'data-action="([a-z-]+)"')


def _register(ctx: Context, tmp: Path, name: str, description: str = "", tags: dict[str, str] | None = None) -> None:
    folder = tmp / f"files-{name}"
    folder.mkdir(exist_ok=True)
    meta = iris_model(folder)
    meta.update(description=description, tags=tags or {}, release=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    buf.seek(0)
    ctx.registry.register(name, buf, parse_metadata(meta))


CLOSED_READS = {"MODELCD_OPEN_READS": "false"}  # a page without a session redirects to the sign-in


def sign_in(client: FlaskClient, token: str) -> str:
    """Sign in; returns the session's CSRF token (read from a page, as a browser has it)."""
    r = client.post("/ui/login", data={"token": token})
    assert r.status_code == 303, r.data
    page = client.get("/ui/models").data.decode()
    m = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert m is not None
    return m.group(1)


def _user_token(ctx: Context, name: str, role: str) -> str:
    ctx.users.add(name, role)
    return ctx.users.create_token(name).token


def _release_at_gate(ctx: Context, model: str = "iris") -> str:
    """A release of v1 to production waiting at its approval gate (moved there as the runner would)."""
    from modelcd.releases.manual import start_release

    rid = start_release(ctx, model, 1, "production")
    assert ctx.releases.claim(rid)
    for phase in (Phase.DEPLOYING, Phase.SMOKE_TESTING, Phase.AWAITING_APPROVAL):
        ctx.releases.advance(rid, phase)
    return rid


@pytest.fixture
def world(ctx: Context, tmp_path: Path) -> dict[str, Any]:
    """A store with something on every page: a model with hostile text, a release with jobs,
    events, a canary's steps and a log, an endpoint with a deployment, a dead delivery, a policy."""
    _register(ctx, tmp_path, "iris", description=XSS, tags={"team": XSS})
    rid = _release_at_gate(ctx)
    job = ctx.jobs.create(JobType.PROMOTE, release_id=rid, model="iris", version=1, environment="production")
    ctx.jobs.transition(job.id, JobState.RUNNING)
    ctx.jobs.log(job.id, f"log line with {XSS}")
    ctx.jobs.log(job.id, "step held 5s: 200 scoring requests, 2 failed, p95 12.5 ms")
    ctx.jobs.event(None, rid, "canary.step", "10% of traffic to v1")
    with ctx.db.write() as conn:
        conn.execute(schema.deployments.insert().values(
            id="d-0123456789ab", model="iris", version=1, environment="production", target="process",
            state="serving", url=None, release_id=rid, created_at=now(), updated_at=now()))
        conn.execute(schema.endpoints.insert().values(model="iris", environment="production",
                                                      traffic={"d-0123456789ab": 100}, auth="key", updated_at=now()))
        conn.execute(schema.inbox.insert().values(
            source="generic", delivery_id="dead-1", received_at=now(), headers={}, body=b"{}", state="dead",
            attempts=5, next_attempt_at=0.0, last_error=f"cannot fetch {XSS}"))
    ctx.policies.put("name: web\nmatch: {models: ['web-*']}\n")
    ctx.registry.put_evaluation("iris", 1, data_uri="/data/holdout.csv", data_digest=None, label=XSS,
                                result={"task": "classification", "rows": 30, "metrics": {"accuracy": 0.9667}},
                                job_id=None)
    with ctx.db.read() as conn:
        dead = conn.execute(select(schema.inbox.c.id)).scalar()
    return {"release": rid, "job": job.id, "delivery": dead}


def _pages(world: dict[str, Any]) -> list[str]:
    return ["/ui/models", "/ui/models?q=ir&tag=team&source=native", "/ui/models/iris", "/ui/models/iris/versions/1",
            "/ui/models/iris/versions/1/deploy", "/ui/models/iris/versions/1/deploy?environment=production",
            "/ui/releases", f"/ui/releases/{world['release']}", "/ui/endpoints", "/ui/endpoints/iris/production",
            "/ui/jobs", "/ui/jobs?type=promote&state=running", f"/ui/jobs/{world['job']}", "/ui/inbox",
            "/ui/inbox?state=dead", "/ui/policies", "/ui/policies?name=web"]


@pytest.mark.parametrize("app_env", [CLOSED_READS])
def test_unsigned_pages_redirect_to_login_with_the_page_to_return_to(client: FlaskClient, world: dict[str, Any]
                                                                     ) -> None:
    for page in _pages(world):
        r = client.get(page)
        assert r.status_code == 303, page
        assert r.headers["Location"].startswith("/ui/login?next=/ui/"), page
    assert client.post(f"/ui/releases/{world['release']}/stop").status_code == 403
    for asset in ("/ui/static/console.css", "/ui/static/console.js"):
        assert client.get(asset).status_code == 200, asset
    login = client.get("/ui/login").data.decode()
    assert '<input type="password" name="token" id="token"' in login and 'id="sign-in"' in login


def test_with_open_reads_pages_show_read_only_without_signing_in(client: FlaskClient, world: dict[str, Any]
                                                               ) -> None:
    """Reads open (the default on loopback): every page answers without a session, as a viewer
    sees it — no action, no form but the search filters — with a link to sign in that returns
    here; every POST still needs a session."""
    for page in _pages(world):
        r = client.get(page)
        body = r.data.decode()
        assert r.status_code == 200, (page, body[:300])
        assert "not signed in (read only)" in body and 'id="sign-in-link"' in body, page
        assert 'name="csrf_token"' not in body and 'data-action="sign-out"' not in body, page
        assert TOKEN not in body, page
    jobs = client.get("/ui/jobs?state=failed").data.decode()
    assert 'href="/ui/login?next=/ui/jobs%3Fstate%3Dfailed"' in jobs
    assert client.post(f"/ui/releases/{world['release']}/stop").status_code == 403
    assert client.post("/ui/endpoints/iris/production/rollback").status_code == 403


def test_sign_in_sets_a_strict_http_only_cookie_and_returns_to_the_page(client: FlaskClient) -> None:
    wrong = client.post("/ui/login", data={"token": "not-the-token"})
    assert wrong.status_code == 401 and b"not valid" in wrong.data and "Set-Cookie" not in wrong.headers
    r = client.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs?state=failed"})
    assert r.status_code == 303 and r.headers["Location"] == "/ui/jobs?state=failed"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("modelcd_session=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert flag in cookie
    assert "Secure" not in cookie  # plain http on loopback
    assert TOKEN not in cookie
    elsewhere = client.post("/ui/login", data={"token": TOKEN, "next": "https://evil.example/x"})
    assert elsewhere.headers["Location"] == "/ui/models"


def test_the_cookie_is_secure_over_https(app: Any) -> None:
    client = app.test_client()
    r = client.post("/ui/login", data={"token": TOKEN}, base_url="https://localhost")
    assert "Secure" in r.headers["Set-Cookie"]


def test_every_page_renders_signed_in_escaped_and_without_the_token(ctx: Context, client: FlaskClient,
                                                                    world: dict[str, Any]) -> None:
    user_token = _user_token(ctx, "vera", "viewer")
    sign_in(client, TOKEN)
    for page in _pages(world):
        r = client.get(page)
        body = r.data.decode()
        assert r.status_code == 200, (page, body[:500])
        assert "<script>alert" not in body, page
        assert TOKEN not in body and user_token not in body, page
        assert 'role="status"' not in body or 'id="flash"' in body
        assert r.headers["Cache-Control"] == "no-store"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        for nav in ("Models", "Releases", "Endpoints", "Jobs", "Inbox", "Policies"):
            assert f">{nav}</a>" in body, (page, nav)
        assert "admin (admin)" in body
    version = client.get("/ui/models/iris/versions/1").data.decode()
    assert 'id="evaluations"' in version and "accuracy=0.9667" in version
    missing = client.get("/ui/no/such/page")
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    model = client.get("/ui/models/iris").data.decode()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in model  # shown as text
    release = client.get(f"/ui/releases/{world['release']}").data.decode()
    assert '<span id="release-phase" data-phase="awaiting_approval"' in release
    assert '<li data-stage="promote" data-state="running"' in release
    assert 'class="event" data-kind="canary.step"' in release
    assert release.count("<svg") == 4 and "traffic share" in release and "p95 latency" in release
    assert "1.00%" in release  # 2 of 200 failed in the canary step
    assert '<time datetime="' in release and 'UTC">' in release


def test_admin_sees_every_action_and_a_viewer_none_and_is_refused(ctx: Context, client: FlaskClient,
                                                                 world: dict[str, Any]) -> None:
    rid, job, dead = world["release"], world["job"], world["delivery"]
    sign_in(client, TOKEN)
    seen = set()
    for page in _pages(world):
        seen |= set(ACTION.findall(client.get(page).data.decode()))
    assert seen >= {"deploy", "stop", "approve", "reject", "rollback", "retry", "validate", "apply", "sign-out"}
    client.delete_cookie("modelcd_session", path="/ui")
    csrf = sign_in(client, _user_token(ctx, "vic", "viewer"))
    for page in _pages(world):
        assert set(ACTION.findall(client.get(page).data.decode())) <= {"sign-out"}, page
    posts = [("/ui/models/iris/versions/1/deploy", {"environment": "production"}), (f"/ui/releases/{rid}/stop", {}),
             (f"/ui/releases/{rid}/approve", {}), (f"/ui/releases/{rid}/reject", {}),
             (f"/ui/releases/{rid}/rollback", {}), ("/ui/endpoints/iris/production/rollback", {}),
             ("/ui/endpoints/iris/production/keys", {"slot": "primary"}), (f"/ui/jobs/{job}/stop", {}),
             (f"/ui/inbox/{dead}/retry", {}), ("/ui/policies/validate", {"policy": "name: x\n"}),
             ("/ui/policies/apply", {"policy": "name: x\n"})]
    for path, form in posts:
        r = client.post(path, data={**form, "csrf_token": csrf})
        assert r.status_code == 403, path
        assert b"viewer" in r.data
    assert ctx.releases.get(rid).phase is Phase.AWAITING_APPROVAL
    assert ctx.inbox.get(dead).state == "dead"


def test_a_post_without_the_right_csrf_token_is_refused(ctx: Context, client: FlaskClient,
                                                        world: dict[str, Any]) -> None:
    csrf = sign_in(client, TOKEN)
    stop = f"/ui/releases/{world['release']}/stop"
    assert client.post(stop).status_code == 403
    assert client.post(stop, data={"csrf_token": csrf[:-1] + "x"}).status_code == 403
    assert client.post(stop, data={"csrf_token": csrf}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert not ctx.releases.get(world["release"]).cancel_requested
    r = client.post(stop, data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["Location"] == f"/ui/releases/{world['release']}"
    assert ctx.releases.get(world["release"]).cancel_requested
    page = client.get(r.headers["Location"]).data.decode()
    assert '<div role="status" id="flash">Stop requested' in page
    assert 'id="flash"' not in client.get(r.headers["Location"]).data.decode()  # shown once


@pytest.mark.parametrize("app_env", [CLOSED_READS])
def test_sign_out_and_a_revoked_token_end_the_session(ctx: Context, client: FlaskClient) -> None:
    csrf = sign_in(client, TOKEN)
    assert client.post("/ui/logout", data={"csrf_token": csrf}).status_code == 303
    assert client.get("/ui/models").status_code == 303
    ctx.users.add("dora", "deployer")
    new = ctx.users.create_token("dora")
    sign_in(client, new.token)
    assert b"dora (deployer)" in client.get("/ui/models").data
    ctx.users.set_role("dora", "viewer")
    assert b"dora (viewer)" in client.get("/ui/models").data
    ctx.users.revoke_token(new.info.id)
    r = client.get("/ui/models")
    assert r.status_code == 303 and r.headers["Location"].startswith("/ui/login")
    with ctx.db.read() as conn:
        assert conn.execute(select(schema.ui_sessions).where(schema.ui_sessions.c.principal == "dora")).first() is None


def test_deploy_approve_retry_stop_and_policies_from_the_console(ctx: Context, client: FlaskClient,
                                                                 world: dict[str, Any]) -> None:
    csrf = sign_in(client, TOKEN)
    plan = client.get("/ui/models/iris/versions/1/deploy?environment=production").data.decode()
    assert 'id="plan-summary"' in plan and "a promote of v1 to production" in plan
    r = client.post("/ui/models/iris/versions/1/deploy", data={"environment": "production", "csrf_token": csrf})
    assert r.status_code == 303 and re.fullmatch(r"/ui/releases/r-[0-9a-f]{12}", r.headers["Location"])
    rel = ctx.releases.get(r.headers["Location"].rsplit("/", 1)[1])
    assert (rel.model, rel.version, rel.environment, rel.phase) == ("iris", 1, "production", Phase.QUEUED)

    client.delete_cookie("modelcd_session", path="/ui")
    approver = sign_in(client, _user_token(ctx, "alice", "approver"))
    page = client.get(f"/ui/releases/{world['release']}").data.decode()
    assert set(ACTION.findall(page)) == {"approve", "reject", "sign-out"}
    assert 'name="comment"' in page
    r = client.post(f"/ui/releases/{world['release']}/approve", data={"csrf_token": approver, "comment": "looks good"})
    assert r.status_code == 303
    assert ctx.releases.get(world["release"]).phase is Phase.PROMOTING
    events = client.get(f"/ui/releases/{world['release']}").data.decode()
    approved = re.search(r'<li class="event" data-kind="release.approved".*?</li>', events, re.S)
    assert approved is not None and '<span class="actor">alice</span>' in approved.group(0)
    assert "looks good" in approved.group(0)

    client.delete_cookie("modelcd_session", path="/ui")
    csrf = sign_in(client, TOKEN)
    r = client.post(f"/ui/inbox/{world['delivery']}/retry", data={"csrf_token": csrf})
    assert r.status_code == 303 and ctx.inbox.get(world["delivery"]).state == "pending"
    assert f'data-delivery="{world["delivery"]}" data-state="pending"' in client.get("/ui/inbox").data.decode()
    job = ctx.jobs.create(JobType.STATISTICS, model="iris", version=1)
    ctx.jobs.transition(job.id, JobState.RUNNING)
    assert 'data-action="stop"' in client.get(f"/ui/jobs/{job.id}").data.decode()
    r = client.post(f"/ui/jobs/{job.id}/stop", data={"csrf_token": csrf})
    assert r.status_code == 303 and ctx.jobs.get(job.id).cancel_requested
    again = client.post(f"/ui/inbox/{world['delivery']}/retry", data={"csrf_token": csrf})
    assert "Refused: delivery" in client.get(again.headers["Location"]).data.decode()

    bad = client.post("/ui/policies/validate", data={"csrf_token": csrf, "policy": "name: web\nbogus: 1\n"})
    assert bad.status_code == 200 and 'id="validation-error"' in bad.data.decode()
    good = client.post("/ui/policies/validate", data={"csrf_token": csrf, "policy": "name: web2\n"})
    assert 'id="validation-ok"' in good.data.decode()
    r = client.post("/ui/policies/apply", data={"csrf_token": csrf, "policy": "name: web2\n"})
    assert r.status_code == 303 and ctx.policies.get("web2")["revision"] == 1
    with ctx.db.read() as conn:
        ev = schema.events
        audit = {(e.kind, e.actor) for e in conn.execute(select(ev).where(ev.c.release_id.is_(None)))}
    assert {("policy.applied", "admin"), ("delivery.retried", "admin")} <= audit
    assert ("job.stop_requested", "admin") in {(e["kind"], e.get("actor")) for e in ctx.jobs.events(job_id=job.id)}


def test_long_lists_paginate(ctx: Context, client: FlaskClient) -> None:
    with ctx.db.write() as conn:
        conn.execute(schema.models.insert(), [{"name": f"m{i:03d}", "description": "", "created_at": now()}
                                              for i in range(60)])
    sign_in(client, TOKEN)
    first = client.get("/ui/models").data.decode()
    assert first.count("<tr data-model=") == 50 and 'href="/ui/models?page=2"' in first
    second = client.get("/ui/models?page=2").data.decode()
    assert second.count("<tr data-model=") == 10 and 'rel="next"' not in second and "m059" in second
    assert client.get("/ui/models?q=m05").data.decode().count("<tr data-model=") == 10


def _read_events(resp: Any, out: list[tuple[float, str]]) -> None:
    for chunk in resp.response:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        out.append((time.monotonic(), text))


def test_the_job_log_stream_sends_new_lines_and_ends_with_the_job(ctx: Context, client: FlaskClient,
                                                                  world: dict[str, Any]) -> None:
    sign_in(client, TOKEN)
    job = world["job"]
    after = re.search(r'data-after="([0-9-]+)"', client.get(f"/ui/jobs/{job}").data.decode())
    assert after is not None and after.group(1) != "0-0"
    gone = threading.Event()  # what the server's bridge sets when the browser hangs up
    resp = client.get(f"/ui/jobs/{job}/log/stream?after={after.group(1)}", buffered=False,
                      environ_overrides={DISCONNECTED: gone})
    assert resp.mimetype == "text/event-stream"
    got: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_events, args=(resp, got), daemon=True)
    reader.start()
    try:
        time.sleep(0.2)
        written = time.monotonic()
        ctx.jobs.log(job, "a brand new line")
        deadline = time.monotonic() + 5
        while not any("a brand new line" in t for _, t in got) and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = next(at for at, t in got if "a brand new line" in t)
        assert arrived - written < 0.5
        ctx.jobs.transition(job, JobState.SUCCEEDED)
        reader.join(5)
        assert not reader.is_alive()
    finally:
        gone.set()
        reader.join(5)
    text = "".join(t for _, t in got)
    assert "event: state" in text and "event: end" in text
    assert "step held" not in text  # only the lines after the page's cursor


def test_a_stream_ends_when_its_client_hangs_up(client: FlaskClient, world: dict[str, Any]) -> None:
    sign_in(client, TOKEN)
    gone = threading.Event()
    resp = client.get(f"/ui/jobs/{world['job']}/log/stream", buffered=False, environ_overrides={DISCONNECTED: gone})
    got: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_events, args=(resp, got), daemon=True)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()
    gone.set()
    reader.join(2)
    assert not reader.is_alive()
    assert stream._slots.acquire(blocking=False)  # its slot was given back
    stream._slots.release()


def test_streams_are_capped_and_a_busy_one_asks_to_come_back(ctx: Context, client: FlaskClient,
                                                             world: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(stream, "STREAM_S", 1.0)
    sign_in(client, TOKEN)
    held = [stream._slots.acquire(blocking=False) for _ in range(stream.MAX_STREAMS)]
    try:
        assert all(held)
        busy = client.get(f"/ui/releases/{world['release']}/stream").data.decode()
        assert busy.startswith("retry: ") and "event:" not in busy
    finally:
        for _ in held:
            stream._slots.release()
    started = time.monotonic()
    full = client.get(f"/ui/releases/{world['release']}/stream?after=0-0").data.decode()
    assert time.monotonic() - started < 3  # ended after STREAM_S, the browser reconnects
    assert "event: phase" in full and '"phase":"awaiting_approval"' in full
    assert "event: stage" in full and "event: event" in full and "step held" in full


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_service(tmp_path_factory.mktemp("console")) as svc:
        yield svc


@pytest.mark.timeout(120)
def test_a_new_log_line_reaches_the_browser_within_200_ms_through_the_server(served: Any) -> None:
    """Through uvicorn and the WSGI bridge: sign in over HTTP, follow a job's log, write lines."""
    from modelcd.context import build_context

    ctx = build_context(served.settings)
    try:
        job = ctx.jobs.create(JobType.STATISTICS, model="iris")
        ctx.jobs.transition(job.id, JobState.RUNNING)
        session = requests.Session()
        r = session.post(f"{served.url}/ui/login", data={"token": SERVICE_TOKEN}, allow_redirects=False, timeout=10)
        assert r.status_code == 303 and "modelcd_session" in session.cookies
        delays = []
        with session.get(f"{served.url}/ui/jobs/{job.id}/log/stream", stream=True, timeout=10) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines(decode_unicode=True)
            assert next(lines).startswith("retry: ")
            for i in range(5):
                written = time.monotonic()
                ctx.jobs.log(job.id, f"line {i}")
                for line in lines:
                    if line == f'data: {{"job_id":"{job.id}","line":"line {i}"}}':
                        delays.append(time.monotonic() - written)
                        break
        delays.sort()
        assert delays[2] < 0.2, delays
        assert delays[-1] < 0.5, delays
        assert SERVICE_TOKEN not in r.text
    finally:
        ctx.db.dispose()


def _served_session(served: Any) -> tuple[requests.Session, str]:
    session = requests.Session()
    r = session.post(f"{served.url}/ui/login", data={"token": SERVICE_TOKEN}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and "modelcd_session" in session.cookies
    m = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{served.url}/ui/models", timeout=10).text)
    assert m is not None
    return session, m.group(1)


@pytest.mark.timeout(120)
def test_streams_whose_browser_left_give_their_slot_back_through_the_server(served: Any) -> None:
    """Through uvicorn: streams closed by the client end at once (the bridge tells them), so
    the next page's stream is served rather than told to come back."""
    from modelcd.context import build_context

    ctx = build_context(served.settings)
    try:
        job = ctx.jobs.create(JobType.STATISTICS, model="iris")
        ctx.jobs.transition(job.id, JobState.RUNNING)
        session, _ = _served_session(served)
        url = f"{served.url}/ui/jobs/{job.id}/log/stream"
        for _ in range(2):
            opened = [session.get(url, stream=True, timeout=10) for _ in range(stream.MAX_STREAMS)]
            firsts = [next(r.iter_lines(decode_unicode=True)) for r in opened]
            assert all(f == "retry: 500" for f in firsts), firsts
            for r in opened:
                r.close()
            time.sleep(0.5)  # a poll or two: each stream sees its client gone
        with session.get(url, stream=True, timeout=10) as r:
            assert next(r.iter_lines(decode_unicode=True)) == "retry: 500"  # served, not "come back later"
    finally:
        ctx.db.dispose()


@pytest.mark.timeout(120)
def test_a_regenerated_key_is_shown_once_and_never_stored(served: Any) -> None:
    from modelcd.store.db import Database

    db = Database(served.settings.db_url)
    try:
        with db.write() as conn:
            conn.execute(schema.endpoints.insert().values(model="keyed", environment="production", traffic={},
                                                          auth="key", updated_at=now()))
        session, csrf = _served_session(served)
        page = f"{served.url}/ui/endpoints/keyed/production"
        assert 'data-action="regenerate"' in session.get(page, timeout=10).text
        r = session.post(f"{page}/keys", data={"csrf_token": csrf, "slot": "primary"}, timeout=30)
        m = re.search(r"primary: ([A-Za-z0-9_-]{20,})", r.text)
        assert r.status_code == 200 and m is not None and 'id="flash"' in r.text, r.text[-2000:]
        with db.read() as conn:
            stored = [str(row._mapping) for row in conn.execute(select(schema.ui_sessions))]
            keys = [row.slot for row in conn.execute(select(schema.endpoint_keys))]
        assert stored and all(m.group(1) not in row for row in stored)
        assert keys == ["primary"] or sorted(keys) == ["primary", "secondary"]
        again = session.get(page, timeout=10).text
        assert m.group(1) not in again and "••••" in again
    finally:
        db.dispose()


@pytest.mark.parametrize("app_env", [CLOSED_READS])
def test_a_session_of_the_api_token_ends_when_the_token_changes(app: Any, ctx: Context, client: FlaskClient) -> None:
    sign_in(client, TOKEN)
    with ctx.db.read() as conn:
        refs = [r.token_id for r in conn.execute(select(schema.ui_sessions))]
    assert len(refs) == 1 and refs[0].startswith("api-") and TOKEN not in refs[0]
    assert client.get("/ui/models").status_code == 200
    app.extensions["modelcd_token"] = ctx.users.api_token = "another-token-0123456789"  # as a restart with a new one
    assert client.get("/ui/models").status_code == 303


@pytest.mark.parametrize("app_env", [CLOSED_READS])
def test_a_stale_session_row_expires(ctx: Context, client: FlaskClient) -> None:
    sign_in(client, TOKEN)
    with ctx.db.write() as conn:
        conn.execute(update(schema.ui_sessions).values(expires_at=time.time() - 1))
    assert client.get("/ui/models").status_code == 303


def test_a_sleeping_deployment_shows_asleep_and_is_not_asked_for_its_figures(ctx: Context, client: FlaskClient,
                                                                           world: dict[str, Any]) -> None:
    """Scaled to zero: the endpoint page says so (and does not report it as not answering,
    since nothing is asked of a process that is not there)."""
    with ctx.db.write() as conn:
        conn.execute(update(schema.deployments).where(schema.deployments.c.id == "d-0123456789ab").values(
            url="http://127.0.0.1:9", sleeping={"since": now(), "wake_timeout_s": 3}))
    sign_in(client, TOKEN)
    page = client.get("/ui/endpoints/iris/production").data.decode()
    row = page[page.index('data-deployment="d-0123456789ab"'):]
    row = row[:row.index("</tr>")]
    assert "state-serving" in row and "state-asleep" in row, row
    assert "asleep: the next request wakes it" in row and "not answering" not in row, row
