"""REST API under ``/api/v1``. Reads are open; every write needs ``Authorization: Bearer``.
Handlers parse, call the domain, and return JSON."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from modelcd.auth import bearer, token_matches
from modelcd.context import Context
from modelcd.errors import InvalidInput, Unauthorized
from modelcd.registry.service import parse_metadata, version_to_dict
from modelcd.releases.deployments import deployment_to_dict
from modelcd.releases.manual import rollback_endpoint, start_release

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _ctx() -> Context:
    return current_app.extensions["modelcd"]


def write(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Require the API token."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not token_matches(current_app.extensions["modelcd_token"], request.headers.get("Authorization")):
            raise Unauthorized("missing or wrong API token: send `Authorization: Bearer <token>` "
                               "(the token is in $MODELCD_HOME/token or MODELCD_TOKEN)")
        return fn(*args, **kwargs)

    return wrapper


def release_write(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Require the API token or the per-release token of the release in the path (what a
    pipeline run holds: it drives that release's stages and nothing else)."""

    @functools.wraps(fn)
    def wrapper(release_id: str, *args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization")
        if not (token_matches(current_app.extensions["modelcd_token"], header)
                or _ctx().pipeline_runs.token_valid(release_id, bearer(header))):
            raise Unauthorized("missing or wrong token: send `Authorization: Bearer <token>` with the API token "
                               "or this release's pipeline token (MODELCD_RELEASE_TOKEN)")
        return fn(release_id, *args, **kwargs)

    return wrapper


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", field="body")
    return body


def _int(value: Any, field: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field} must be an integer (got {value!r})", field=field) from None
    if number < 1:
        raise InvalidInput(f"{field} must be 1 or more (got {number})", field=field)
    return number


@bp.get("/openapi.json")
def openapi() -> Response:
    from modelcd.app.openapi import document

    return jsonify(document())


# models and versions
@bp.get("/models")
def list_models() -> Response:
    return jsonify({"models": _ctx().registry.list_models()})


@bp.get("/models/<name>")
def get_model(name: str) -> Response:
    return jsonify(_ctx().registry.get_model(name))


@bp.get("/models/<name>/versions")
def list_versions(name: str) -> Response:
    return jsonify({"versions": [version_to_dict(v) for v in _ctx().registry.list_versions(name)]})


@bp.get("/models/<name>/versions/<int:number>")
def get_version(name: str, number: int) -> Response:
    return jsonify(version_to_dict(_ctx().registry.get_version(name, number)))


@bp.post("/models/<name>/versions")
@write
def register_version(name: str) -> tuple[Response, int]:
    upload = request.files.get("artifact")
    if upload is None:
        raise InvalidInput("missing the `artifact` part: send multipart/form-data with a tar.gz of the model's "
                           "files as `artifact` and optional JSON `metadata`", field="artifact")
    meta = parse_metadata(request.form.get("metadata"))
    ctx = _ctx()
    version = ctx.registry.register(name, upload.stream, meta)
    ctx.wake.set()
    return jsonify(version_to_dict(version)), 201


# releases and jobs
@bp.get("/releases")
def list_releases() -> Response:
    args = request.args
    rels = _ctx().releases.list(model=args.get("model"), environment=args.get("environment"),
                                phase=args.get("phase"), limit=min(int(args.get("limit", 100)), 1000))
    return jsonify({"releases": [r.to_dict() for r in rels]})


@bp.get("/releases/<release_id>")
def get_release(release_id: str) -> Response:
    ctx = _ctx()
    rel = ctx.releases.get(release_id)
    jobs = sorted(ctx.jobs.list(release_id=release_id), key=lambda j: j.created_at)
    return jsonify({**rel.to_dict(), "jobs": [j.to_dict() for j in jobs],
                    "events": ctx.jobs.events(release_id=release_id)})


@bp.post("/releases")
@write
def create_release() -> tuple[Response, int]:
    body = _json_body()
    for key in ("model", "version", "environment"):
        if key not in body:
            raise InvalidInput(f"missing `{key}`: send {{model, version, environment}}", field=key)
    rid = start_release(_ctx(), str(body["model"]), _int(body["version"], "version"), str(body["environment"]))
    return jsonify(_ctx().releases.get(rid).to_dict()), 202


@bp.post("/releases/<release_id>/stop")
@write
def stop_release(release_id: str) -> tuple[Response, int]:
    return jsonify(_ctx().releases.request_cancel(release_id).to_dict()), 202


@bp.post("/releases/<release_id>/approve")
@write
def approve_release(release_id: str) -> tuple[Response, int]:
    rel = _ctx().releases.approve(release_id, _comment())
    _ctx().wake.set()
    return jsonify(rel.to_dict()), 200


@bp.post("/releases/<release_id>/reject")
@write
def reject_release(release_id: str) -> tuple[Response, int]:
    rel = _ctx().releases.reject(release_id, _comment())
    _ctx().wake.set()
    return jsonify(rel.to_dict()), 200


def _comment() -> str:
    """The optional ``comment`` of a JSON body (an empty body is no comment)."""
    if not request.get_data():
        return ""
    comment = _json_body().get("comment", "")
    if not isinstance(comment, str):
        raise InvalidInput("comment must be text", field="comment")
    return comment


def _wait_arg() -> float:
    try:
        return float(request.args.get("wait", 20))
    except ValueError:
        raise InvalidInput("wait must be a number of seconds (0-30)", field="wait") from None


@bp.post("/releases/<release_id>/stages/<stage>")
@release_write
def run_release_stage(release_id: str, stage: str) -> tuple[Response, int]:
    from modelcd.releases.stage_commands import start_stage_command

    result = start_stage_command(_ctx(), release_id, stage, _wait_arg())
    return jsonify(result), 202 if result["outcome"] == "running" else 200


@bp.get("/releases/<release_id>/stages/<stage>")
def release_stage_status(release_id: str, stage: str) -> tuple[Response, int]:
    from modelcd.releases.stage_commands import stage_command_status

    result = stage_command_status(_ctx(), release_id, stage, _wait_arg())
    return jsonify(result), 202 if result["outcome"] == "running" else 200


@bp.post("/releases/<release_id>/report")
@release_write
def report_release_stage(release_id: str) -> Response:
    from modelcd.releases.stage_commands import report

    body = _json_body()
    for key in ("stage", "outcome"):
        if key not in body:
            raise InvalidInput(f"missing `{key}`: send {{stage, outcome, message}}", field=key)
    return jsonify(report(_ctx(), release_id, str(body["stage"]), str(body["outcome"]), str(body.get("message", ""))))


@bp.get("/jobs")
def list_jobs() -> Response:
    args = request.args
    jobs = _ctx().jobs.list(release_id=args.get("release_id"), state=args.get("state"),
                            limit=min(int(args.get("limit", 100)), 1000))
    return jsonify({"jobs": [j.to_dict() for j in jobs]})


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    ctx = _ctx()
    return jsonify({**ctx.jobs.get(job_id).to_dict(), "events": ctx.jobs.events(job_id=job_id)})


@bp.get("/jobs/<job_id>/logs")
def job_logs(job_id: str) -> Response:
    ctx = _ctx()
    ctx.jobs.get(job_id)
    return jsonify({"logs": ctx.jobs.logs(job_id, after=int(request.args.get("after", 0)))})


@bp.post("/jobs/<job_id>/stop")
@write
def stop_job(job_id: str) -> tuple[Response, int]:
    ctx = _ctx()
    job = ctx.jobs.get(job_id)
    if job.release_id:
        ctx.releases.request_cancel(job.release_id)
    return jsonify(ctx.jobs.request_cancel(job_id).to_dict()), 202


# endpoints and deployments
@bp.get("/endpoints")
def list_endpoints() -> Response:
    return jsonify({"endpoints": [e.to_dict() for e in _ctx().traffic.list()]})


@bp.get("/endpoints/<model>/<environment>")
def get_endpoint(model: str, environment: str) -> Response:
    return jsonify(_ctx().traffic.get(model, environment).to_dict())


@bp.post("/endpoints/<model>/<environment>/promote")
@write
def promote(model: str, environment: str) -> tuple[Response, int]:
    body = _json_body()
    rid = start_release(_ctx(), model, _int(body.get("version"), "version"), environment)
    return jsonify(_ctx().releases.get(rid).to_dict()), 202


@bp.post("/endpoints/<model>/<environment>/rollback")
@write
def rollback(model: str, environment: str) -> Response:
    return jsonify(rollback_endpoint(_ctx(), model, environment))


@bp.get("/deployments")
def list_deployments() -> Response:
    args = request.args
    deps = _ctx().deployments.list(model=args.get("model"), environment=args.get("environment"),
                                   live_only=args.get("live") in ("1", "true"))
    return jsonify({"deployments": [deployment_to_dict(d) for d in deps]})


# policies
@bp.get("/policies")
def list_policies() -> Response:
    return jsonify({"policies": _ctx().policies.list()})


@bp.get("/policies/<name>")
def get_policy(name: str) -> Response:
    return jsonify(_ctx().policies.get(name))


@bp.put("/policies")
@write
def put_policy() -> tuple[Response, int]:
    text = request.get_data(as_text=True)
    if not text.strip():
        raise InvalidInput("send the policy YAML as the request body", field="body")
    policy, revision = _ctx().policies.put(text, "request body")
    return jsonify({"name": policy.name, "revision": revision, "policy": policy.to_dict()}), 200


@bp.delete("/policies/<name>")
@write
def delete_policy(name: str) -> tuple[Response, int]:
    _ctx().policies.delete(name)
    return jsonify({"deleted": name}), 200


# webhook inbox (dead letters included)
@bp.get("/inbox")
def list_inbox() -> Response:
    args = request.args
    rows = _ctx().inbox.list(state=args.get("state"), source=args.get("source"),
                             limit=min(int(args.get("limit", 100)), 1000))
    return jsonify({"deliveries": [d.to_dict() for d in rows]})


@bp.get("/inbox/<int:row_id>")
def get_inbox(row_id: int) -> Response:
    return jsonify(_ctx().inbox.get(row_id).to_dict(body=True))


@bp.post("/inbox/<int:row_id>/retry")
@write
def retry_inbox(row_id: int) -> tuple[Response, int]:
    ctx = _ctx()
    delivery = ctx.inbox.revive(row_id)
    ctx.inbox_wake.set()
    return jsonify(delivery.to_dict()), 202
