"""The console's pages (GET): each reads one page of rows and renders one template."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flask import Response, abort, g, redirect, render_template, request

from modelcd.access import ACTIONS
from modelcd.app.api import public_policy
from modelcd.app.ui import ANONYMOUS, bp, ctx, page_number, principal, sessions
from modelcd.app.ui.charts import release_steps, step_chart, traffic_bar
from modelcd.app.ui.queries import (
    deployment_versions,
    endpoints_query,
    inbox_counts,
    inbox_query,
    jobs_query,
    live_deployments,
    log_tail,
    models_query,
    page_of,
    recent_events,
    releases_query,
    serving_by_version,
    version_summaries,
    versions_query,
)
from modelcd.domain import JobState, JobType, Source
from modelcd.errors import ModelcdError, NotFound
from modelcd.inbox.store import DeliveryState
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.releases.machine import Phase
from modelcd.sources.base import KNOWN_SOURCES

RELEASE_ID = re.compile(r"r-[0-9a-z]{1,30}")
JOB_ID = re.compile(r"j-[0-9a-z]{1,30}")
STAGES = ("build", "evaluate", "deploy", "smoke", "promote", "rollback")  # in the order a release runs them
OPTIONAL_STAGES = frozenset({"evaluate", "rollback"})
MAX_FILES = 200
LOG_LINES = 500


def render(template: str, **values: Any) -> str:
    """``template`` with what every page shows: the nav's principal, the flash, the CSRF secret
    and which actions the principal may take (``may.deploy`` …)."""
    session = g.ui_session
    if session.flash:
        sessions().set_flash(session, None)
    who = session.principal
    flash = g.get("ui_flash") or session.flash
    return render_template(template, who=who, csrf=session.csrf, flash=flash, anonymous=session is ANONYMOUS,
                           may={a: who.can(a) for a in ACTIONS}, **values)


def _choice(name: str, choices: Any) -> str | None:
    raw = request.args.get(name) or None
    if raw is not None and raw not in {str(c) for c in choices}:
        abort(400, f"{name} must be one of {', '.join(sorted(str(c) for c in choices))}")
    return raw


def _id(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise NotFound(f"no {what} {value[:40]!r}", field=what)
    return value


@bp.get("/")
def home() -> Response:
    return redirect("/ui/models", code=303)  # type: ignore[return-value]


@bp.get("/models")
def models() -> str:
    q = (request.args.get("q") or "")[:100]
    tag = (request.args.get("tag") or "")[:200]
    source = _choice("source", Source) or ""
    page = page_of(ctx().db, models_query(q, tag, source), page_number())
    summaries = version_summaries(ctx().db, [r["name"] for r in page.rows])
    return render("models.html", page=page, summaries=summaries, q=q, tag=tag, source=source,
                  sources=[str(s) for s in Source])


@bp.get("/models/<name>")
def model(name: str) -> str:
    validate_model_name(name, field="name")
    c = ctx()
    info = c.registry.get_model(name)
    page = page_of(c.db, versions_query(name), page_number())
    return render("model.html", model=info, page=page, serving=serving_by_version(c.db, name),
                  deployments=live_deployments(c.db, name))


def _files(root: Path) -> tuple[list[tuple[str, int]], bool]:
    out: list[tuple[str, int]] = []
    if not root.is_dir():
        return out, False
    for path in sorted(root.rglob("*")):
        if path.is_file():
            if len(out) >= MAX_FILES:
                return out, True
            out.append((str(path.relative_to(root)), path.stat().st_size))
    return out, False


@bp.get("/models/<name>/versions/<int:number>")
def version(name: str, number: int) -> str:
    validate_model_name(name, field="name")
    c = ctx()
    v = c.registry.get_version(name, number)
    files, more = _files(c.registry.files_dir(v.digest)) if v.digest else ([], False)
    try:
        stats: dict[str, Any] | None = c.registry.get_statistics(name, number)
    except NotFound:
        stats = None
    releases = page_of(c.db, releases_query(model=name, version=number), page_number(), size=20)
    return render("version.html", v=v, files=files, more_files=more, stats=stats, releases=releases,
                  evaluations=c.registry.evaluations(name, number, limit=20),
                  serving=serving_by_version(c.db, name).get(number, []))


@bp.get("/models/<name>/versions/<int:number>/deploy")
def deploy_form(name: str, number: int) -> str:
    from modelcd.releases.plan import plan_release

    validate_model_name(name, field="name")
    environment = request.args.get("environment") or None
    if environment is not None:
        validate_environment_name(environment, field="environment")
    c = ctx()
    v = c.registry.get_version(name, number)
    plan = plan_release(c, name, number, environment).to_dict() if environment else None
    chain = plan["chain"] if plan else [e.name for e in c.policies.select(name, v.tags, str(v.source)).environments]
    return render("deploy.html", v=v, chain=chain, environment=environment, plan=plan)


@bp.get("/releases")
def releases() -> str:
    model = request.args.get("model") or None
    environment = request.args.get("environment") or None
    if model:
        validate_model_name(model, field="model")
    if environment:
        validate_environment_name(environment, field="environment")
    phase = _choice("phase", Phase)
    page = page_of(ctx().db, releases_query(model=model, environment=environment, phase=phase), page_number())
    return render("releases.html", page=page, model=model or "", environment=environment or "", phase=phase or "",
                  phases=[str(p) for p in Phase])


def stage_rows(jobs: list[Any], evaluated: bool = False) -> list[dict[str, Any]]:
    """The release's stages in order, each with its latest job (pending: none yet); evaluate when
    the environment has an evaluation gate (or ran it), rollback when it ran."""
    by_type: dict[str, Any] = {}
    for job in jobs:
        by_type[str(job.type)] = job
    names = [s for s in STAGES if s not in OPTIONAL_STAGES or s in by_type or (s == "evaluate" and evaluated)]
    return [{"stage": s, "job": by_type.get(s), "state": str(by_type[s].state) if s in by_type else "pending"}
            for s in names]


@bp.get("/releases/<release_id>")
def release(release_id: str) -> str:
    _id(release_id, RELEASE_ID, "release")
    c = ctx()
    rel = c.releases.get(release_id)
    jobs = sorted(c.jobs.list(release_id=release_id, limit=200), key=lambda j: j.created_at)
    events = recent_events(c.db, release_id=release_id)
    logs = {j.id: log_tail(c.db, j.id, LOG_LINES) for j in jobs}
    promote = [j for j in jobs if j.type is JobType.PROMOTE]
    steps = release_steps(events, [row["line"] for j in promote for row in logs[j.id]], rel.analysis)
    charts = []
    if steps:
        charts = [step_chart("traffic share", steps, "share", "%", maximum=100.0),
                  step_chart("error rate", steps, "error_rate", "%", scale=100.0),
                  step_chart("p95 latency", steps, "p95_ms", " ms"),
                  step_chart("agreement", steps, "agreement", "%", scale=100.0, maximum=100.0)]
    last_event = events[-1]["id"] if events else 0
    last_log = max((rows[-1]["id"] for rows in logs.values() if rows), default=0)
    can_stop = not rel.phase.terminal
    gated = rel.policy.evaluation_gate(rel.environment_policy) is not None
    return render("release.html", rel=rel, jobs=jobs, stages=stage_rows(jobs, gated), events=events, logs=logs,
                  steps=steps, charts=charts, cursor=f"{last_event}-{last_log}", can_stop=can_stop,
                  gate=rel.phase is Phase.AWAITING_APPROVAL, policy=public_policy(rel.policy.to_dict()))


@bp.get("/endpoints")
def endpoints() -> str:
    c = ctx()
    page = page_of(c.db, endpoints_query(), page_number())
    ids = [d for row in page.rows for d in (row["traffic"] or {})]
    deps = deployment_versions(c.db, ids)
    bars = {}
    for row in page.rows:
        # oldest version first, as on the endpoint's page (so a version keeps its colour)
        traffic = sorted((row["traffic"] or {}).items(), key=lambda dw: (dw[0] not in deps, deps.get(dw[0], {}).get(
            "version", 0), dw[0]))
        segments = [(f"v{deps[d]['version']}" if d in deps else d, float(w)) for d, w in traffic]
        bars[(row["model"], row["environment"])] = traffic_bar(segments, f"traffic of {row['model']}/"
                                                                         f"{row['environment']}")
    return render("endpoints.html", page=page, bars=bars, uri=c.router.endpoint_uri)


@bp.get("/endpoints/<model>/<environment>")
def endpoint(model: str, environment: str) -> str:
    from modelcd.app.ui.metrics import deployment_figures
    from modelcd.releases.endpoint_keys import key_slots

    validate_model_name(model, field="model")
    validate_environment_name(environment, field="environment")
    c = ctx()
    ep = c.traffic.get(model, environment)
    deployments = live_deployments(c.db, model, environment)
    segments = [(f"v{v}", float(w)) for v, w in sorted(ep.versions.items())]
    with c.db.read() as conn:
        slots = key_slots(conn, model, environment)
    figures = {d["id"]: deployment_figures(d) for d in deployments}
    return render("endpoint.html", ep=ep, deployments=deployments, bar=traffic_bar(segments, "traffic split"),
                  slots=slots, figures=figures)


@bp.get("/jobs")
def jobs() -> str:
    type_ = _choice("type", JobType)
    state = _choice("state", JobState)
    page = page_of(ctx().db, jobs_query(type_, state), page_number())
    return render("jobs.html", page=page, type=type_ or "", state=state or "", types=[str(t) for t in JobType],
                  states=[str(s) for s in JobState])


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    _id(job_id, JOB_ID, "job")
    c = ctx()
    j = c.jobs.get(job_id)
    lines = log_tail(c.db, job_id, 2000)
    return render("job.html", job=j, events=recent_events(c.db, job_id=job_id), lines=lines,
                  cursor=lines[-1]["id"] if lines else 0)


@bp.get("/inbox")
def inbox() -> str:
    states = (DeliveryState.PENDING, DeliveryState.DONE, DeliveryState.IGNORED, DeliveryState.DEAD)
    state = _choice("state", states)
    source = _choice("source", KNOWN_SOURCES)
    c = ctx()
    page = page_of(c.db, inbox_query(state, source), page_number())
    return render("inbox.html", page=page, counts=inbox_counts(c.db), states=states, sources=sorted(KNOWN_SOURCES),
                  state=state or "", source=source or "")


@bp.get("/policies")
def policies() -> str:
    from modelcd.app.api import _public_policy_text

    c = ctx()
    listed = c.policies.list()
    name = request.args.get("name") or (listed[0]["name"] if listed else None)
    shown: dict[str, Any] | None = None
    if name:
        try:
            doc = c.policies.get(name)
            shown = {"name": name, "revision": doc["revision"], "text": _public_policy_text(doc["text"]),
                     "updated_at": doc.get("updated_at")}
        except ModelcdError as e:
            abort(404, e.message)
    return render("policies.html", policies=listed, shown=shown, draft="", result=None, who_admin=principal().can(
        "admin"))


@bp.get("/<path:rest>")
def not_found(rest: str) -> str:
    """Any other /ui/ address: the console's own 404 page, not the API's JSON."""
    abort(404, f"no page /ui/{rest[:80]}; start from the models")
