"""REST API under ``/api/v1``. Every route declares what it needs (``requires``): reads need
a token with ``read`` unless ``MODELCD_OPEN_READS`` opens them; writes need
``Authorization: Bearer`` with a token whose role grants the action (401 without one that
works, 403 naming the roles that would). Handlers parse, call the domain, and return JSON."""

from __future__ import annotations

import functools
import math
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from flask import Blueprint, Response, current_app, g, jsonify, request, send_file

from modelcd.access import Action, Principal, refusal, roles_for
from modelcd.auth import bearer
from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import Conflict, Forbidden, InvalidInput, NotFound, PayloadTooLarge, Unauthorized
from modelcd.inbox.store import DeliveryState
from modelcd.jobs.images import prune_images
from modelcd.registry.archive import write_tree_archive
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.registry.service import parse_metadata, version_to_dict
from modelcd.releases.deployments import deployment_to_dict
from modelcd.releases.machine import Phase
from modelcd.releases.manual import endpoint_keys, rollback_endpoint, start_release
from modelcd.releases.retirement import archive_info, archive_model, retire_endpoint, unarchive_model
from modelcd.releases.service import Release
from modelcd.sources.base import KNOWN_SOURCES
from modelcd.users import principal_for

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _ctx() -> Context:
    return current_app.extensions["modelcd"]


API_TOKEN_HINT = ("missing or wrong API token: send `Authorization: Bearer <token>` "
                  "(the token is in $MODELCD_HOME/token or MODELCD_TOKEN, or a user's token from "
                  "`modelcd tokens create`)")
RELEASE_TOKEN_HINT = ("missing or wrong token: send `Authorization: Bearer <token>` with the API token, a "
                      "deployer's token or this release's pipeline token (MODELCD_RELEASE_TOKEN)")
AUTH = "modelcd_auth"  # attribute of a view function: what it needs (see ``requires``)
OPEN = "open"  # no token ever (health checks)
RELEASE = "release"  # deploy, or the pipeline token of the release in the path
RELEASE_READ = "release_read"  # read, or the pipeline token of the release in the path
SIGNED_IN = "token"  # any user's token, even when reads are open (their own tokens)
_KIND_ACTIONS = {RELEASE: "deploy", RELEASE_READ: "read", SIGNED_IN: "read"}
_RELEASE_KINDS = (RELEASE, RELEASE_READ)


def auth_kind(view: Callable[..., Any] | None) -> str | None:
    """What a view needs (an action, ``RELEASE`` or ``OPEN``; None: not declared), so a server
    can check it before reading a body."""
    return getattr(view, AUTH, None)


def admit(ctx: Context, kind: str, header: str | None, release_id: str | None = None) -> Principal | None:
    """Who a request with Authorization ``header`` acts as, for a view that needs ``kind``:
    the principal of its token (None: no token needed, or a release's pipeline token).
    Unauthorized without a token that works, Forbidden when its role lacks the action."""
    if kind == OPEN:
        return None
    token = bearer(header)
    principal = principal_for(ctx, token)
    if kind in ("read", RELEASE_READ) and principal is None and ctx.settings.reads_open:
        return None
    if principal is None:
        if kind in _RELEASE_KINDS and release_id is not None and ctx.pipeline_runs.token_valid(release_id, token):
            # a pipeline token is a secret in every log and error it reaches (minted by an earlier
            # process, after a restart, it is known here only now)
            ctx.redact.add(token)
            return None
        raise Unauthorized(RELEASE_TOKEN_HINT if kind in _RELEASE_KINDS else API_TOKEN_HINT)
    why = refusal(principal, _KIND_ACTIONS.get(kind, kind))
    if why is not None:
        raise Forbidden(why)
    return principal


def requires(action: Action | str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A view needing ``action`` (``access.ACTIONS``, or ``SIGNED_IN``); ``flask.g.principal``
    is who asks."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g.principal = admit(_ctx(), action, request.headers.get("Authorization"))
            return fn(*args, **kwargs)

        setattr(wrapper, AUTH, action)
        return wrapper

    return decorate


read = requires("read")  # open or not by MODELCD_OPEN_READS
write = requires("deploy")  # register, release, stop, rollback, batch...
approve = requires("approve")
admin = requires("admin")


def open_route(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A view anyone may call (health checks)."""
    setattr(fn, AUTH, OPEN)
    return fn


def _for_release(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A view of the release in the path that its pipeline's run may call with the release's
    own token (it drives that release's stages and nothing else), as well as a person whose
    role grants ``_KIND_ACTIONS[kind]``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(release_id: str, *args: Any, **kwargs: Any) -> Any:
            g.principal = admit(_ctx(), kind, request.headers.get("Authorization"), release_id)
            return fn(release_id, *args, **kwargs)

        setattr(wrapper, AUTH, kind)
        return wrapper

    return decorate


release_write = _for_release(RELEASE)
release_read = _for_release(RELEASE_READ)


def by() -> str | None:
    """The name of who asks (None: a pipeline token or an anonymous read), for the events a
    request causes."""
    principal: Principal | None = g.get("principal")
    return principal.name if principal is not None else None


def audit(kind: str, message: str) -> None:
    """An event naming who asked, for a change whose domain call records none itself."""
    _ctx().jobs.event(None, None, kind, message, actor=by())


MAX_INT = 2**63 - 1  # SQLite's INTEGER: a larger number names nothing stored
JSON_MAX_BYTES = 1024 * 1024  # JSON and YAML bodies (artifacts are multipart, capped by MODELCD_MAX_ARTIFACT_BYTES)
LIST_LIMIT_MAX = 1000
MAX_WAIT_S = 30.0
SET = "(set)"  # what reads show instead of a policy env value
_DIGITS = re.compile(r"[0-9]{1,19}")
_IDS = {"release_id": (re.compile(r"r-[0-9a-f]{12}"), "a release id such as r-3f9a1c2b7d10 (`modelcd releases list`)"),
        "job_id": (re.compile(r"j-[0-9a-f]{12}"), "a job id such as j-3f9a1c2b7d10 (`modelcd jobs list`)")}


def _check_id(value: str, field: str) -> str:
    pattern, what = _IDS[field]
    if not pattern.fullmatch(value):
        raise InvalidInput(f"{field} {value[:80]!r} is not {what}", field=field)
    return value


@bp.url_value_preprocessor
def _check_path_values(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Refuse path values that cannot name anything, before any handler (or token check) runs."""
    values = values or {}
    for field in ("release_id", "job_id"):
        if field in values:
            _check_id(values[field], field)
    for field in ("name", "model"):
        if field in values:
            validate_model_name(values[field], field=field)
    if "environment" in values:
        validate_environment_name(values["environment"], field="environment")
    if values.get("number", 0) > MAX_INT:
        name = values.get("name")
        raise NotFound(f"model {name!r} has no version {values['number']}; list them with `modelcd versions {name}`",
                       field="version")
    if values.get("row_id", 0) > MAX_INT:
        raise NotFound(f"delivery {values['row_id']} not found; list them with `modelcd inbox list`", field="id")


def _json_body() -> dict[str, Any]:
    """The request body as a JSON object: 400 naming ``body`` for anything else (NaN, Infinity,
    nesting too deep, not JSON), 413 past ``JSON_MAX_BYTES``."""
    if (request.content_length or 0) > JSON_MAX_BYTES:
        raise PayloadTooLarge(f"request body over {JSON_MAX_BYTES} bytes; send a small JSON object", field="body")
    raw = request.get_data(cache=True)
    try:
        body = current_app.json.loads(raw) if raw.strip() else None
    except ValueError as e:
        raise InvalidInput(f"request body is not valid JSON ({e}); send a JSON object", field="body") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", field="body")
    return body


def _int(value: Any, field: str) -> int:
    """A whole number from 1 to MAX_INT, given as a JSON integer or a string of digits."""
    text = value.strip() if isinstance(value, str) else value
    ok = (isinstance(text, int) and not isinstance(text, bool)) or (isinstance(text, str) and _DIGITS.fullmatch(text))
    number = int(text) if ok else 0
    if not 1 <= number <= MAX_INT:
        raise InvalidInput(f"{field} must be a whole number from 1 to {MAX_INT} (got {str(value)[:40]!r})",
                           field=field)
    return number


def _arg_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    number = int(raw) if _DIGITS.fullmatch(raw) else low - 1
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be a whole number from {low} to {high} (got {raw[:40]!r})", field=name)
    return number


def _limit() -> int:
    return _arg_int("limit", 100, 1, LIST_LIMIT_MAX)


def _arg_choice(name: str, choices: Iterable[str]) -> str | None:
    raw = request.args.get(name)
    known = sorted(str(c) for c in choices)
    if raw is not None and raw not in known:
        raise InvalidInput(f"{name} must be one of {', '.join(known)} (got {raw[:40]!r})", field=name)
    return raw


def _arg_bool(name: str) -> bool:
    raw = (request.args.get(name) or "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise InvalidInput(f"{name} must be true or false (got {raw[:40]!r})", field=name)
    return raw in ("1", "true", "yes")


def _arg_model() -> str | None:
    model = request.args.get("model")
    return validate_model_name(model, field="model") if model is not None else None


def _arg_environment() -> str | None:
    environment = request.args.get("environment")
    return validate_environment_name(environment, field="environment") if environment is not None else None


def public_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """A policy as the API shows it: each environment's ``env`` variables as set, never their
    values (the stored policy keeps them for the deploy stage). Every route that answers with
    a policy, or a release carrying one, goes through this."""
    environments = policy.get("environments")
    if not isinstance(environments, list | tuple):
        return policy
    return {**policy, "environments": [_public_environment(e) for e in environments]}


def _public_environment(environment: Any) -> Any:
    if not isinstance(environment, dict) or not environment.get("env"):
        return environment
    return {**environment, "env": {name: SET for name in environment["env"]}}


def _public_policy_text(text: str) -> str:
    """The policy's YAML as stored, or, when it sets env values, re-written without them."""
    try:
        data = yaml.safe_load(text) if "env" in text else None
    except yaml.YAMLError:
        return "# (hidden: the stored text could not be read back)\n"
    if not isinstance(data, dict) or public_policy(data) == data:
        return text
    return "# env values hidden; names kept\n" + yaml.safe_dump(public_policy(data), sort_keys=False)


def _release_doc(rel: Release | dict[str, Any]) -> dict[str, Any]:
    doc = rel.to_dict() if isinstance(rel, Release) else dict(rel)
    if isinstance(doc.get("policy"), dict):
        doc["policy"] = public_policy(doc["policy"])
    return doc


@bp.get("/openapi.json")
@read
def openapi() -> Response:
    """The OpenAPI document, each operation marked with what its route declares it needs:
    ``x-modelcd-action`` (read, deploy, approve, admin, release...) and ``x-modelcd-roles``."""
    from modelcd.app.openapi import document

    doc = document()
    for rule in current_app.url_map.iter_rules():
        if not rule.rule.startswith(bp.url_prefix or ""):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule.removeprefix(bp.url_prefix or ""))
        kind = auth_kind(current_app.view_functions[rule.endpoint])
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            op = doc["paths"].get(path.replace("{number}", "{version}").replace("{row_id}", "{id}"), {}).get(
                method.lower())
            if op is not None and kind is not None:
                op["x-modelcd-action"] = kind
                op["x-modelcd-roles"] = roles_for(_KIND_ACTIONS.get(kind, kind))
    return jsonify(doc)


# models and versions
@bp.get("/models")
@read
def list_models() -> Response:
    return jsonify({"models": _ctx().registry.list_models()})


@bp.get("/models/<name>")
@read
def get_model(name: str) -> Response:
    return jsonify({**_ctx().registry.get_model(name), **archive_info(_ctx(), name)})


def _job_doc(job_id: str) -> dict[str, Any]:
    """A job as retire / archive / unarchive answer it: with its events and log."""
    ctx = _ctx()
    return {**ctx.jobs.get(job_id).to_dict(), "events": ctx.jobs.events(job_id=job_id),
            "log": [line["line"] for line in ctx.jobs.logs(job_id)]}


@bp.post("/models/<name>/archive")
@write
def archive(name: str) -> Response:
    """Stop new releases of the model (409 while one runs); versions are still recorded."""
    return jsonify(_job_doc(archive_model(_ctx(), name, who="a person (API)", by=by()).id))


@bp.post("/models/<name>/unarchive")
@write
def unarchive(name: str) -> Response:
    return jsonify(_job_doc(unarchive_model(_ctx(), name, who="a person (API)", by=by()).id))


@bp.get("/models/<name>/versions")
@read
def list_versions(name: str) -> Response:
    return jsonify({"versions": [version_to_dict(v) for v in _ctx().registry.list_versions(name)]})


@bp.get("/models/<name>/versions/<int:number>")
@read
def get_version(name: str, number: int) -> Response:
    ctx = _ctx()
    doc = version_to_dict(ctx.registry.get_version(name, number))
    return jsonify({**doc, "evaluations": ctx.registry.evaluations(name, number, limit=5)})


@bp.get("/models/<name>/versions/<int:number>/plan")
@read
def plan_version(name: str, number: int) -> Response:
    """What a release of the version would do (``?environment=``: a promote there); changes nothing."""
    from modelcd.releases.plan import plan_release

    return jsonify(plan_release(_ctx(), name, number, _arg_environment()).to_dict())


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
    audit("version.registered", f"{name} v{version.version} registered")
    ctx.wake.set()
    return jsonify(version_to_dict(version)), 201


@bp.post("/models/<name>/versions/<int:number>/statistics")
@write
def compute_version_statistics(name: str, number: int) -> tuple[Response, int]:
    """Training-data statistics of the version from the `data` file part (CSV, Parquet, JSON
    lines), computed by a `statistics` job: 202 with the job."""
    from modelcd.jobs.statistics import start_statistics_job

    upload = request.files.get("data")
    if upload is None:
        raise InvalidInput("missing the `data` part: send multipart/form-data with the training data (CSV with a "
                           "header row, Parquet or JSON lines) as `data`", field="data")
    job = start_statistics_job(_ctx(), name, number, upload.stream, upload.filename, by=by())
    return jsonify(job.to_dict()), 202


@bp.get("/models/<name>/versions/<int:number>/statistics")
@read
def get_version_statistics(name: str, number: int) -> Response:
    return jsonify(_ctx().registry.get_statistics(name, number))


@bp.post("/models/<name>/versions/<int:number>/evaluations")
@write
def evaluate_version(name: str, number: int) -> tuple[Response, int]:
    """Evaluate the version on labelled data ({data, label, metrics, format, connection,
    max_errors}) in an `evaluate` job: 202 with the job."""
    from modelcd.jobs.evaluation import start_evaluation_job

    job = start_evaluation_job(_ctx(), name, number, _json_body(), by=by())
    return jsonify(job.to_dict()), 202


@bp.get("/models/<name>/versions/<int:number>/evaluations")
@read
def list_version_evaluations(name: str, number: int) -> Response:
    limit = _arg_int("limit", 20, 1, LIST_LIMIT_MAX)
    return jsonify({"evaluations": _ctx().registry.evaluations(name, number, limit=limit)})


# releases and jobs
@bp.get("/releases")
@read
def list_releases() -> Response:
    rels = _ctx().releases.list(model=_arg_model(), environment=_arg_environment(),
                                phase=_arg_choice("phase", Phase), limit=_limit())
    return jsonify({"releases": [_release_doc(r) for r in rels]})


@bp.get("/releases/<release_id>")
@read
def get_release(release_id: str) -> Response:
    ctx = _ctx()
    rel = ctx.releases.get(release_id)
    jobs = sorted(ctx.jobs.list(release_id=release_id), key=lambda j: j.created_at)
    return jsonify({**_release_doc(rel), "jobs": [j.to_dict() for j in jobs],
                    "events": ctx.jobs.events(release_id=release_id)})


@bp.post("/releases")
@write
def create_release() -> tuple[Response, int]:
    body = _json_body()
    for key in ("model", "version", "environment"):
        if key not in body:
            raise InvalidInput(f"missing `{key}`: send {{model, version, environment}}", field=key)
    model = validate_model_name(body["model"], field="model")
    environment = validate_environment_name(body["environment"], field="environment")
    rid = start_release(_ctx(), model, _int(body["version"], "version"), environment, by=by())
    return jsonify(_release_doc(_ctx().releases.get(rid))), 202


@bp.post("/releases/<release_id>/stop")
@write
def stop_release(release_id: str) -> tuple[Response, int]:
    return jsonify(_release_doc(_ctx().releases.request_cancel(release_id, by=by()))), 202


@bp.post("/releases/<release_id>/approve")
@approve
def approve_release(release_id: str) -> tuple[Response, int]:
    rel = _ctx().releases.approve(release_id, _comment(), by=by())
    _ctx().wake.set()
    return jsonify(_release_doc(rel)), 200


@bp.post("/releases/<release_id>/reject")
@approve
def reject_release(release_id: str) -> tuple[Response, int]:
    rel = _ctx().releases.reject(release_id, _comment(), by=by())
    _ctx().wake.set()
    return jsonify(_release_doc(rel)), 200


def _comment() -> str:
    """The optional ``comment`` of a JSON body (an empty body is no comment)."""
    if not request.get_data():
        return ""
    comment = _json_body().get("comment", "")
    if not isinstance(comment, str):
        raise InvalidInput("comment must be text", field="comment")
    return comment


def _wait_arg() -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 20.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT_S):
        raise InvalidInput(f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g} (got {raw[:40]!r})",
                           field="wait")
    return wait


@bp.post("/releases/<release_id>/stages/<stage>")
@release_write
def run_release_stage(release_id: str, stage: str) -> tuple[Response, int]:
    from modelcd.releases.stage_commands import start_stage_command

    result = start_stage_command(_ctx(), release_id, stage, _wait_arg())
    return jsonify(result), 202 if result["outcome"] == "running" else 200


@bp.get("/releases/<release_id>/stages/<stage>")
@release_read
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
    return jsonify(_release_doc(report(_ctx(), release_id, str(body["stage"]), str(body["outcome"]),
                                       str(body.get("message", "")))))


@bp.post("/releases/<release_id>/stages/<stage>/begin")
@release_write
def begin_runner_stage(release_id: str, stage: str) -> Response:
    from modelcd.releases.runner_reports import begin

    return jsonify(begin(_ctx(), release_id, stage))


@bp.post("/releases/<release_id>/jobs/<job_id>/log")
@release_write
def runner_stage_log(release_id: str, job_id: str) -> Response:
    from modelcd.releases.runner_reports import append_log

    return jsonify(append_log(_ctx(), release_id, job_id, _json_body().get("lines")))


@bp.post("/releases/<release_id>/jobs/<job_id>/finish")
@release_write
def finish_runner_stage(release_id: str, job_id: str) -> Response:
    from modelcd.releases.runner_reports import finish

    body = _json_body()
    if "outcome" not in body:
        raise InvalidInput("missing `outcome`: send {outcome, error, report}", field="outcome")
    return jsonify(finish(_ctx(), release_id, job_id, str(body["outcome"]), str(body.get("error") or ""),
                          body.get("report", {})))


@bp.get("/releases/<release_id>/files")
@release_write
def release_files(release_id: str) -> Response:
    """The version's files as a tar.gz (what a runner builds the image from)."""
    ctx = _ctx()
    rel = ctx.releases.get(release_id)
    version = ctx.registry.get_version(rel.model, rel.version)
    if version.status != "ready":
        raise Conflict(f"{rel.model} v{rel.version} is referenced only: its files stay in the {version.source} "
                       "registry", field="release_id")
    archive = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)  # noqa: SIM115 (closed by send_file)
    write_tree_archive(ctx.registry.materialize(version), archive)
    archive.seek(0)
    response = send_file(archive, mimetype="application/gzip", download_name=f"{rel.model}-{rel.version}.tar.gz")
    response.headers["X-Modelcd-Digest"] = version.digest
    return response


@bp.get("/jobs")
@read
def list_jobs() -> Response:
    release_id = request.args.get("release_id")
    jobs = _ctx().jobs.list(release_id=_check_id(release_id, "release_id") if release_id is not None else None,
                            state=_arg_choice("state", JobState), limit=_limit())
    return jsonify({"jobs": [j.to_dict() for j in jobs]})


@bp.get("/jobs/<job_id>")
@read
def get_job(job_id: str) -> Response:
    ctx = _ctx()
    return jsonify({**ctx.jobs.get(job_id).to_dict(), "events": ctx.jobs.events(job_id=job_id)})


@bp.get("/jobs/<job_id>/logs")
@read
def job_logs(job_id: str) -> Response:
    ctx = _ctx()
    after = _arg_int("after", 0, 0, MAX_INT)
    ctx.jobs.get(job_id)
    return jsonify({"logs": ctx.jobs.logs(job_id, after=after)})


@bp.post("/jobs/<job_id>/stop")
@write
def stop_job(job_id: str) -> tuple[Response, int]:
    ctx = _ctx()
    job = ctx.jobs.get(job_id)
    if job.release_id:
        ctx.releases.request_cancel(job.release_id, by=by())
    return jsonify(ctx.jobs.request_cancel(job_id, by=by()).to_dict()), 202


# endpoints and deployments
@bp.get("/endpoints")
@read
def list_endpoints() -> Response:
    return jsonify({"endpoints": [e.to_dict() for e in _ctx().traffic.list(model=_arg_model(), limit=_limit())]})


@bp.get("/endpoints/<model>/<environment>")
@read
def get_endpoint(model: str, environment: str) -> Response:
    return jsonify(_ctx().traffic.get(model, environment).to_dict())


@bp.post("/endpoints/<model>/<environment>/promote")
@write
def promote(model: str, environment: str) -> tuple[Response, int]:
    body = _json_body()
    rid = start_release(_ctx(), model, _int(body.get("version"), "version"), environment, by=by())
    return jsonify(_release_doc(_ctx().releases.get(rid))), 202


@bp.post("/endpoints/<model>/<environment>/rollback")
@write
def rollback(model: str, environment: str) -> Response:
    return jsonify(rollback_endpoint(_ctx(), model, environment, by=by()))


@bp.post("/endpoints/<model>/<environment>/retire")
@write
def retire(model: str, environment: str) -> Response:
    """Drain the endpoint (409 while a release of it runs): traffic to zero, deployments stopped."""
    return jsonify(_job_doc(retire_endpoint(_ctx(), model, environment, who="a person (API)", by=by()).id))


@bp.post("/endpoints/<model>/<environment>/keys")
@admin
def keys(model: str, environment: str) -> Response:
    """The endpoint's keys, shown once: made on the first call, or one regenerated."""
    slot = _json_body().get("regenerate")
    if slot is not None and not isinstance(slot, str):
        raise InvalidInput(f"regenerate must be primary or secondary (got {slot!r})", field="regenerate")
    keys_now = endpoint_keys(_ctx(), model, environment, slot)
    if keys_now.shown:
        audit("keys.shown", f"keys of {model}/{environment}: " + (f"{slot} regenerated" if slot else "made"))
    return jsonify(keys_now.to_dict())


@bp.get("/deployments")
@read
def list_deployments() -> Response:
    deps = _ctx().deployments.list(model=_arg_model(), environment=_arg_environment(), live_only=_arg_bool("live"))
    return jsonify({"deployments": [deployment_to_dict(d) for d in deps]})


# the data plane (router and deployments)
@bp.post("/data-plane/stop")
@admin
def stop_data_plane() -> Response:
    """Stop the router and every deployment; this service leaves them down until it restarts."""
    stop: Callable[[], list[str]] | None = current_app.extensions.get("modelcd_data_plane_stop")
    if stop is None:
        raise Conflict("this server does not supervise a data plane (only `modelcd serve` does); "
                       "run `modelcd shutdown` where no service runs")
    audit("data_plane.stopped", "router and deployments stopped until the service restarts")
    return jsonify({"stopped": stop()})


@bp.post("/images/prune")
@admin
def prune_images_route() -> Response:
    """Remove the scoring images nothing needs (no live deployment, not on an endpoint, no release);
    ``{"dry_run": true}`` says what would go."""
    dry_run = _json_body().get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidInput(f"dry_run must be true or false (got {dry_run!r})", field="dry_run")
    return jsonify(_job_doc(prune_images(_ctx(), dry_run=dry_run, by=by()).id))


# external registries
@bp.post("/sources/mlflow/connect")
@admin
def connect_mlflow_source() -> Response:
    """Create or update the MLflow webhook that calls this service; its secret and the
    tracking URI are saved in settings.yaml and used from now on, without a restart."""
    from modelcd.sources.connect import connect_mlflow, reload_sources

    body = _json_body()
    uri, url = body.get("tracking_uri"), body.get("url")
    if not isinstance(uri, str) or not uri:
        raise InvalidInput("tracking_uri: give the MLflow tracking server's URL, e.g. http://127.0.0.1:5000",
                           field="tracking_uri")
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise InvalidInput("url: where MLflow reaches modelcd, an http(s) URL (default MODELCD_URL)", field="url")
    done = connect_mlflow(_ctx().settings, uri, url)
    audit("source.connected", f"MLflow webhook at {uri.rstrip('/')} connected")
    overridden = reload_sources(_ctx(), current_app.extensions["modelcd_intake"],
                                {"mlflow_tracking_uri": uri.rstrip("/")})
    return jsonify({**done.to_dict(), "overridden": list(overridden), "live": True})


# policies
@bp.get("/policies")
@read
def list_policies() -> Response:
    return jsonify({"policies": _ctx().policies.list()})


@bp.get("/policies/<name>")
@read
def get_policy(name: str) -> Response:
    doc = _ctx().policies.get(name)
    return jsonify({**doc, "policy": public_policy(doc["policy"]), "text": _public_policy_text(doc["text"])})


@bp.put("/policies")
@admin
def put_policy() -> tuple[Response, int]:
    if (request.content_length or 0) > JSON_MAX_BYTES:
        raise PayloadTooLarge(f"policy over {JSON_MAX_BYTES} bytes; send a smaller YAML document", field="body")
    text = request.get_data(as_text=True)
    if not text.strip():
        raise InvalidInput("send the policy YAML as the request body", field="body")
    try:
        policy, revision = _ctx().policies.put(text, "request body")
    except RecursionError:
        raise InvalidInput("request body: the policy YAML is nested too deeply", field="body") from None
    audit("policy.applied", f"policy {policy.name} revision {revision} applied")
    return jsonify({"name": policy.name, "revision": revision, "policy": public_policy(policy.to_dict())}), 200


@bp.post("/policies/plan")
@write
def plan_policy() -> Response:
    """Which current versions a policy (YAML body) would change, without storing it."""
    from modelcd.releases.plan import plan_policy_change

    if (request.content_length or 0) > JSON_MAX_BYTES:
        raise PayloadTooLarge(f"policy over {JSON_MAX_BYTES} bytes; send a smaller YAML document", field="body")
    text = request.get_data(as_text=True)
    if not text.strip():
        raise InvalidInput("send the policy YAML as the request body", field="body")
    try:
        return jsonify(plan_policy_change(_ctx(), text, "request body").to_dict())
    except RecursionError:
        raise InvalidInput("request body: the policy YAML is nested too deeply", field="body") from None


@bp.delete("/policies/<name>")
@admin
def delete_policy(name: str) -> tuple[Response, int]:
    _ctx().policies.delete(name)
    audit("policy.deleted", f"policy {name} deleted")
    return jsonify({"deleted": name}), 200


# webhook inbox (dead letters included)
@bp.get("/inbox")
@read
def list_inbox() -> Response:
    states = (DeliveryState.PENDING, DeliveryState.DONE, DeliveryState.IGNORED, DeliveryState.DEAD)
    rows = _ctx().inbox.list(state=_arg_choice("state", states), source=_arg_choice("source", KNOWN_SOURCES),
                             limit=_limit())
    return jsonify({"deliveries": [d.to_dict() for d in rows]})


@bp.get("/inbox/<int:row_id>")
@read
def get_inbox(row_id: int) -> Response:
    return jsonify(_ctx().inbox.get(row_id).to_dict(body=True))


@bp.post("/inbox/<int:row_id>/retry")
@write
def retry_inbox(row_id: int) -> tuple[Response, int]:
    ctx = _ctx()
    delivery = ctx.inbox.revive(row_id)
    audit("delivery.retried", f"webhook delivery {row_id} sent back for processing")
    ctx.inbox_wake.set()
    return jsonify(delivery.to_dict()), 202


# batch deployments (batch.deployments, batch.scheduler)
def _batch() -> Any:
    from modelcd.batch.deployments import BatchDeployments

    return BatchDeployments(_ctx())


@bp.post("/batch")
@write
def create_batch() -> tuple[Response, int]:
    from modelcd.batch.scheduler import wake

    deployment = _batch().create(_json_body())
    audit("batch.created", f"batch deployment {deployment.name} created")
    wake()
    return jsonify(_batch().show(deployment.name)), 201


@bp.get("/batch")
@read
def list_batch() -> Response:
    store = _batch()
    return jsonify({"batch": [{**d.to_dict(), "next_run_at": d.next_run_at(store.once_done(d.name))}
                              for d in store.list()]})


@bp.get("/batch/<name>")
@read
def get_batch(name: str) -> Response:
    return jsonify(_batch().show(name))


@bp.delete("/batch/<name>")
@write
def delete_batch(name: str) -> tuple[Response, int]:
    _batch().delete(name)
    audit("batch.deleted", f"batch deployment {name} deleted")
    return jsonify({"deleted": name}), 200


@bp.post("/batch/<name>/run")
@write
def run_batch(name: str) -> tuple[Response, int]:
    from modelcd.batch.scheduler import wake

    job_id = _batch().run_now(name, by=by())
    wake()
    return jsonify(_ctx().jobs.get(job_id).to_dict()), 202


@bp.post("/batch/<name>/pause")
@write
def pause_batch(name: str) -> Response:
    paused = _batch().set_paused(name, True)
    audit("batch.paused", f"batch deployment {name} paused")
    return jsonify(paused.to_dict())


@bp.post("/batch/<name>/resume")
@write
def resume_batch(name: str) -> Response:
    from modelcd.batch.scheduler import wake

    deployment = _batch().set_paused(name, False)
    audit("batch.resumed", f"batch deployment {name} resumed")
    wake()
    return jsonify(deployment.to_dict())


# named SQL connections of batch datasets (batch.datasets): the URL stays in the service's environment
@bp.post("/connections")
@admin
def add_connection() -> tuple[Response, int]:
    from modelcd.batch.datasets import Connections

    body = _json_body()
    if "url" in body:
        raise InvalidInput("give url_env, the name of the environment variable holding the URL, not the URL",
                           field="url")
    added = Connections(_ctx().db).add(body.get("name"), body.get("url_env"))  # type: ignore[arg-type]
    audit("connection.added", f"connection {added['name']} added (URL in ${added['url_env']})")
    return jsonify(added), 201


@bp.get("/connections")
@read
def list_connections() -> Response:
    from modelcd.batch.datasets import Connections

    return jsonify({"connections": Connections(_ctx().db).list()})


@bp.delete("/connections/<name>")
@admin
def remove_connection(name: str) -> Response:
    from modelcd.batch.datasets import Connections

    Connections(_ctx().db).remove(name)
    audit("connection.removed", f"connection {name} removed")
    return jsonify({"deleted": name})
