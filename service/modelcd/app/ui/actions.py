"""Sign-in, sign-out and the console's actions (POST): each checks the role (403 otherwise),
calls the domain as the API does, and redirects back with a flash message. A domain refusal
(409, 400…) becomes the flash, not an error page, so the reader sees why on the page they were on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Response, g, make_response, redirect, render_template, request

from modelcd.app.ui import bp, ctx, flash_and_redirect, principal, principal_for_token, require, safe_next, sessions
from modelcd.app.ui.pages import JOB_ID, RELEASE_ID, _id, render
from modelcd.app.ui.sessions import COOKIE, SESSION_S, api_token_ref
from modelcd.errors import ModelcdError
from modelcd.registry.names import validate_environment_name, validate_model_name

MAX_POLICY_CHARS = 1024 * 1024


def _login_page(status: int = 200, error: str | None = None) -> Response:
    body = render_template("login.html", error=error, next=safe_next(request.values.get("next")))
    return make_response(body, status)


@bp.get("/login")
def login() -> Response:
    return _login_page()


@bp.post("/login")
def login_post() -> Response:
    token = request.form.get("token") or ""
    who = principal_for_token(token)
    if who is None:
        return _login_page(401, "That token is not valid (or was revoked). Paste an API token: `modelcd tokens "
                                "create` makes one, or use the service's token in $MODELCD_HOME/token.")
    session_id = sessions().create(who, who.token_id or api_token_ref(token))
    resp = redirect(safe_next(request.form.get("next")), code=303)
    resp.set_cookie(COOKIE, session_id, max_age=SESSION_S, path="/ui", httponly=True, samesite="Strict",
                    secure=request.is_secure)
    return resp  # type: ignore[return-value]


@bp.post("/logout")
def logout() -> Response:
    sessions().end(g.ui_session)
    resp = redirect("/ui/login", code=303)
    resp.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="Strict", secure=request.is_secure)
    return resp  # type: ignore[return-value]


def _act(back: str, done: Callable[[], str]) -> Response:
    """Run ``done`` (returns the flash); a domain refusal is flashed instead."""
    try:
        message = done()
    except ModelcdError as e:
        message = f"Refused: {e.message}"
    return flash_and_redirect(message, back)


def _audit(kind: str, message: str) -> None:
    """An event naming who did it, for a change whose domain call records none itself (as the API)."""
    ctx().jobs.event(None, None, kind, message, actor=principal().name)


@bp.post("/models/<name>/versions/<int:number>/deploy")
def deploy(name: str, number: int) -> Response:
    from modelcd.releases.manual import start_release

    who = require("deploy")
    validate_model_name(name, field="name")
    environment = validate_environment_name(request.form.get("environment") or "", field="environment")
    try:
        rid = start_release(ctx(), name, number, environment, by=who.name)
    except ModelcdError as e:
        return flash_and_redirect(f"Refused: {e.message}", f"/ui/models/{name}/versions/{number}/deploy"
                                  f"?environment={environment}")
    return flash_and_redirect(f"Release {rid} of {name} v{number} to {environment} queued", f"/ui/releases/{rid}")


@bp.post("/releases/<release_id>/stop")
def stop_release(release_id: str) -> Response:
    who = require("deploy")
    _id(release_id, RELEASE_ID, "release")

    def done() -> str:
        rel = ctx().releases.request_cancel(release_id, by=who.name)
        return f"Stop requested: release {release_id} is {rel.phase}"

    return _act(f"/ui/releases/{release_id}", done)


def _answer(release_id: str, verb: str) -> Response:
    who = require("approve")
    _id(release_id, RELEASE_ID, "release")
    comment = request.form.get("comment") or ""
    c = ctx()
    fn = c.releases.approve if verb == "approve" else c.releases.reject

    def done() -> str:
        rel = fn(release_id, comment, by=who.name)
        c.wake.set()
        return f"Release {release_id} {verb}d: now {rel.phase}"

    return _act(f"/ui/releases/{release_id}", done)


@bp.post("/releases/<release_id>/approve")
def approve(release_id: str) -> Response:
    return _answer(release_id, "approve")


@bp.post("/releases/<release_id>/reject")
def reject(release_id: str) -> Response:
    return _answer(release_id, "reject")


def _rollback(model: str, environment: str, back: str) -> Response:
    from modelcd.releases.manual import rollback_endpoint

    def done() -> str:
        result = rollback_endpoint(ctx(), model, environment, by=principal().name)
        if result.get("release_id"):
            return f"Rolling back {model}/{environment}: release {result['release_id']} queued"
        split = ", ".join(f"v{v} {w}%" for v, w in result["traffic"].items())
        return f"Rolled back {model}/{environment}: traffic now {split}"

    return _act(back, done)


@bp.post("/releases/<release_id>/rollback")
def rollback_release(release_id: str) -> Response:
    require("deploy")
    _id(release_id, RELEASE_ID, "release")
    rel = ctx().releases.get(release_id)
    return _rollback(rel.model, rel.environment, f"/ui/releases/{release_id}")


@bp.post("/endpoints/<model>/<environment>/rollback")
def rollback_endpoint_action(model: str, environment: str) -> Response:
    require("deploy")
    validate_model_name(model, field="model")
    validate_environment_name(environment, field="environment")
    return _rollback(model, environment, f"/ui/endpoints/{model}/{environment}")


@bp.post("/endpoints/<model>/<environment>/keys")
def regenerate(model: str, environment: str) -> Response:
    from modelcd.releases.manual import endpoint_keys

    require("admin")
    validate_model_name(model, field="model")
    validate_environment_name(environment, field="environment")
    slot = request.form.get("slot") or ""

    try:
        shown = endpoint_keys(ctx(), model, environment, slot).shown
        _audit("keys.shown", f"keys of {model}/{environment}: {slot} regenerated")
    except ModelcdError as e:
        return flash_and_redirect(f"Refused: {e.message}", f"/ui/endpoints/{model}/{environment}")
    # the new key is shown on this answer only (never stored, never in a redirect's flash)
    from modelcd.app.ui.pages import endpoint

    g.ui_flash = "New key, shown this once (copy it now): " + ", ".join(f"{s}: {k}" for s, k in shown.items())
    return make_response(endpoint(model, environment))


@bp.post("/jobs/<job_id>/stop")
def stop_job(job_id: str) -> Response:
    who = require("deploy")
    _id(job_id, JOB_ID, "job")
    c = ctx()

    def done() -> str:
        job = c.jobs.get(job_id)
        if job.release_id and not c.releases.get(job.release_id).phase.terminal:
            c.releases.request_cancel(job.release_id, by=who.name)
        return f"Stop requested for job {c.jobs.request_cancel(job_id, by=who.name).id}"

    return _act(f"/ui/jobs/{job_id}", done)


@bp.post("/inbox/<int:row_id>/retry")
def retry(row_id: int) -> Response:
    require("deploy")
    c = ctx()

    def done() -> str:
        d = c.inbox.revive(row_id)
        c.inbox_wake.set()
        _audit("delivery.retried", f"webhook delivery {row_id} sent back for processing")
        return f"Delivery {d.id} ({d.source}) sent back for processing"

    return _act("/ui/inbox", done)


def _policy_text() -> str:
    text = request.form.get("policy") or ""
    if not text.strip():
        raise ValueError("paste the policy YAML first")
    if len(text) > MAX_POLICY_CHARS:
        raise ValueError(f"the policy is over {MAX_POLICY_CHARS} characters")
    return text


@bp.post("/policies/validate")
def validate_policy() -> str | Response:
    from modelcd.releases.plan import plan_policy_change

    require("admin")
    try:
        text = _policy_text()
        plan = plan_policy_change(ctx(), text, "the policy").to_dict()
        result: dict[str, Any] = {"ok": True, "plan": plan}
    except ValueError as e:
        result, text = {"ok": False, "message": str(e)}, request.form.get("policy") or ""
    except (ModelcdError, RecursionError) as e:
        result = {"ok": False, "message": getattr(e, "message", "the policy YAML is nested too deeply")}
    return render("policies.html", policies=ctx().policies.list(), shown=None, draft=text, result=result,
                  who_admin=True)


@bp.post("/policies/apply")
def apply_policy() -> Response:
    require("admin")

    def done() -> str:
        try:
            text = _policy_text()
        except ValueError as e:
            return f"Refused: {e}"
        policy, revision = ctx().policies.put(text, "the policy")
        _audit("policy.applied", f"policy {policy.name} revision {revision} applied")
        return f"Policy {policy.name} applied (revision {revision})"

    return _act("/ui/policies", done)
