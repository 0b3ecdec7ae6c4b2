"""Taking things out of service on purpose: retiring an endpoint, archiving a model. Each is a
job with events and a log, refused (409, naming the release and how to stop it) while a
release of it runs.

``retire_endpoint`` drains an endpoint: its queued releases are cancelled (they have not
started; left alone, one would bring the endpoint back right after), then in one transaction,
applied to the router and read back before it commits, its traffic goes to zero, it is marked
retired (the router answers 410 naming the retirement instead of routing) and its live
deployments are marked stopped; then their processes are stopped (gracefully: requests in
flight finish). Every record stays: the endpoint (with the split it served as
``previous_traffic``), its deployments (state stopped), releases, jobs, and its keys (kept, so
a later release serves the clients that hold them; regenerate them to cut those clients off).
A later release of any version to the environment serves it again.

``archive_model`` stops new releases of a model: its queued releases are cancelled, and while
it is archived versions are still recorded (registrations, webhook deliveries) but no release
starts: the dispatcher skips the auto release with a ``release.skipped`` event ("model
archived") on the archive job, and a manual promote answers 409 naming ``modelcd models
unarchive``. What already serves keeps serving: retire the endpoints to stop that too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select, update

from modelcd.context import Context
from modelcd.domain import Deployment, DeploymentState, JobState, JobType
from modelcd.errors import Conflict, ModelcdError
from modelcd.jobs.service import Job
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.releases.deployments import LIVE_STATES, deployment_from_row, stop_deployment
from modelcd.releases.machine import Phase
from modelcd.store import schema
from modelcd.store.db import now

ACTIVE = [str(p) for p in Phase if p.active]  # holding an endpoint: started and not finished
# a retirement stops these: no release holds the endpoint, so a starting one is a leftover
STOPPABLE = [*LIVE_STATES, str(DeploymentState.STARTING)]
WORK = (JobType.RETIRE, JobType.ARCHIVE, JobType.UNARCHIVE)


def _releases(conn: Connection, phases: list[str], model: str, environment: str | None = None) -> list[Any]:
    r = schema.releases.c
    q = select(r.id, r.model, r.version, r.environment, r.phase).where(r.model == model, r.phase.in_(phases))
    if environment is not None:
        q = q.where(r.environment == environment)
    return list(conn.execute(q.order_by(r.created_at)))


def _busy(what: str, running: list[Any], field: str) -> Conflict:
    """The refusal while releases run: which, and how to end them."""
    first = running[0]
    names = ", ".join(f"{r.id} ({r.model} v{r.version} → {r.environment}, {r.phase})" for r in running)
    how = f"stop it with `modelcd releases stop {first.id}`"
    if first.phase == str(Phase.AWAITING_APPROVAL):
        how += f" or reject it with `modelcd releases reject {first.id}`"
    elif first.phase == str(Phase.PROMOTING):
        how = "wait for it to end (traffic is moving)"
    return Conflict(f"cannot {what} while a release of it runs: {names}; {how}, then {what} again", field=field)


def _cancel_queued(ctx: Context, conn: Connection, queued: list[Any], why: str) -> list[str]:
    """Cancel them in the caller's transaction; what to log once it committed (a log line is a
    write of its own)."""
    for r in queued:
        ctx.releases.cancel_queued_in(conn, r.id, why)
    return [f"cancelled queued release {r.id} ({r.model} v{r.version} → {r.environment}): it had not started"
            for r in queued]


def _finish(ctx: Context, job: Job, error: ModelcdError | None, message: str = "") -> Job:
    if error is not None:
        return ctx.jobs.transition(job.id, JobState.FAILED, error=error.message)
    return ctx.jobs.transition(job.id, JobState.SUCCEEDED, message)


def retire_endpoint(ctx: Context, model: str, environment: str, who: str = "a person", by: str | None = None) -> Job:
    """Drain ``model``'s endpoint in ``environment`` (see the module); the finished job (``by``:
    the user who asked, recorded on its events)."""
    validate_model_name(model, field="model")
    validate_environment_name(environment, field="environment")
    key = f"{model}/{environment}"
    endpoint = ctx.traffic.get(model, environment)  # NotFound: nothing was ever promoted there
    if endpoint.retired_at:
        raise Conflict(f"{key} was retired at {endpoint.retired_at} already; a release serves it again: "
                       f"`modelcd promote {model} VERSION --env {environment}`", field="environment")
    with ctx.db.read() as conn:
        running = _releases(conn, ACTIVE, model, environment)
    if running:
        raise _busy(f"retire {key}", running, "environment")
    job = ctx.jobs.create(JobType.RETIRE, model=model, environment=environment, actor=by)
    ctx.jobs.transition(job.id, JobState.RUNNING, f"retiring {key} (asked by {by or who})")
    log = ctx.jobs.logger(job.id)
    serving = {f"v{v}": w for v, w in endpoint.versions.items()}
    log(f"{key} serves {serving or 'nothing'}; draining it: traffic to zero, then its deployments stop")

    def drain(conn: Connection) -> tuple[list[Deployment], list[str], Conflict | None]:
        busy = _releases(conn, ACTIVE, model, environment)  # one claimed since the check above
        if busy:
            return [], [], _busy(f"retire {key}", busy, "environment")
        said = _cancel_queued(ctx, conn, _releases(conn, [str(Phase.QUEUED)], model, environment),
                              f"cancelled: {key} was retired (job {job.id})")
        ts = now()
        e = schema.endpoints.c
        conn.execute(update(schema.endpoints).where(e.model == model, e.environment == environment).values(
            traffic={}, previous_traffic=endpoint.traffic or None, retired_at=ts, updated_at=ts))
        d = schema.deployments.c
        stopping = [deployment_from_row(r) for r in conn.execute(select(schema.deployments).where(
            d.model == model, d.environment == environment, d.state.in_(STOPPABLE)).order_by(d.created_at))]
        for dep in stopping:  # before the processes stop, so nothing starts them again
            ctx.deployments.update(dep.id, conn, state=DeploymentState.STOPPED)
        conn.execute(schema.events.insert().values(
            job_id=job.id, ts=ts, kind="endpoint.retired", actor=by,
            message=f"{key}: traffic to zero, the router answers 410; {len(stopping)} deployment(s) to stop"))
        return stopping, said, None

    try:
        (stopping, said, refused), generation = ctx.traffic.change(f"retirement of {key}", drain)
    except ModelcdError as e:
        _finish(ctx, job, e)
        raise
    if refused is not None:
        _finish(ctx, job, refused)
        raise refused
    for line in said:
        log(line)
    log(f"router applied generation {generation}: {key} has no traffic and answers 410 (retired)")
    failed = _stop_all(ctx, job, stopping)
    log("endpoint keys kept: a later release serves clients that hold them; cut them off with "
        f"`modelcd endpoints keys {model} --env {environment} --regenerate primary` (and secondary)")
    if failed:
        return _finish(ctx, job, ModelcdError(
            f"{key} is retired (no traffic) but {len(failed)} deployment(s) did not stop: " + "; ".join(failed)))
    return _finish(ctx, job, None, f"{key} retired; {len(stopping)} deployment(s) stopped, records kept")


def _stop_all(ctx: Context, job: Job, deployments: list[Deployment]) -> list[str]:
    """Stop each deployment's process (SIGTERM: requests in flight finish); the failures."""
    log = ctx.jobs.logger(job.id)
    failed = []
    for dep in deployments:
        log(f"stopping deployment {dep.id} (v{dep.version}, {dep.target}, pid {dep.pid})")
        try:
            stop_deployment(ctx.target(dep.target), dep, ctx.home, log)
        except ModelcdError as e:
            log(f"deployment {dep.id} did not stop: {e.message}")
            failed.append(f"{dep.id}: {e.message}")
            continue
        ctx.jobs.event(job.id, None, "deployment.stopped", f"{dep.id} (v{dep.version}) stopped; its record is kept")
    return failed


def archive_model(ctx: Context, model: str, who: str = "a person", by: str | None = None) -> Job:
    """Stop new releases of ``model`` (see the module); the finished job (``by``: who asked)."""
    validate_model_name(model, field="name")
    found = ctx.registry.get_model(model)  # NotFound names `modelcd models`
    if found.get("archived_at"):
        raise Conflict(f"model {model} was archived at {found['archived_at']} already; "
                       f"`modelcd models unarchive {model}` lets releases start again", field="name")
    with ctx.db.read() as conn:
        running = _releases(conn, ACTIVE, model)
    if running:
        raise _busy(f"archive model {model}", running, "name")
    job = ctx.jobs.create(JobType.ARCHIVE, model=model, actor=by)
    ctx.jobs.transition(job.id, JobState.RUNNING, f"archiving model {model} (asked by {by or who})")
    log = ctx.jobs.logger(job.id)
    refused: Conflict | None = None
    said: list[str] = []
    with ctx.db.write() as conn:
        busy = _releases(conn, ACTIVE, model)
        if busy:
            refused = _busy(f"archive model {model}", busy, "name")
        else:
            said = _cancel_queued(ctx, conn, _releases(conn, [str(Phase.QUEUED)], model),
                                  f"cancelled: model {model} was archived (job {job.id})")
            ts = now()
            conn.execute(update(schema.models).where(schema.models.c.name == model).values(archived_at=ts))
            conn.execute(schema.events.insert().values(
                job_id=job.id, ts=ts, kind="model.archived", actor=by,
                message=f"model {model} archived: versions are still recorded, no release starts"))
    if refused is not None:
        _finish(ctx, job, refused)
        raise refused
    for line in said:
        log(line)
    log(f"model {model} archived: new versions are recorded but not released (auto releases are skipped with "
        f"an event here; a promote answers 409). What serves keeps serving: `modelcd endpoints retire {model} "
        "--env ENV` stops that")
    return _finish(ctx, job, None, f"model {model} archived")


def unarchive_model(ctx: Context, model: str, who: str = "a person", by: str | None = None) -> Job:
    """Let releases of ``model`` start again. Versions recorded while it was archived are not
    released by this: the log names them, to promote by hand."""
    validate_model_name(model, field="name")
    found = ctx.registry.get_model(model)
    since = found.get("archived_at")
    if not since:
        raise Conflict(f"model {model} is not archived; nothing to unarchive", field="name")
    job = ctx.jobs.create(JobType.UNARCHIVE, model=model, actor=by)
    ctx.jobs.transition(job.id, JobState.RUNNING, f"unarchiving model {model} (asked by {by or who})")
    log = ctx.jobs.logger(job.id)
    with ctx.db.write() as conn:
        ts = now()
        conn.execute(update(schema.models).where(schema.models.c.name == model).values(archived_at=None))
        conn.execute(schema.events.insert().values(
            job_id=job.id, ts=ts, kind="model.unarchived", actor=by,
            message=f"model {model} unarchived: releases start again"))
        v, r = schema.versions.c, schema.releases.c
        released = select(r.version).where(r.model == model)
        waiting = [int(n) for (n,) in conn.execute(select(v.version).where(
            v.model == model, v.created_at >= since, v.status == "ready", v.version.not_in(released))
            .order_by(v.version))]
    for n in waiting:
        log(f"v{n} was registered while archived and has no release: `modelcd promote {model} {n} --env ENV`")
    return _finish(ctx, job, None, f"model {model} unarchived")


def archived_refusal(conn: Connection, model: str) -> Conflict | None:
    """Why no release of ``model`` may start (it is archived), read in the caller's transaction."""
    since = conn.execute(select(schema.models.c.archived_at).where(schema.models.c.name == model)).scalar()
    if not since:
        return None
    return Conflict(f"model {model} is archived (since {since}): no release starts; "
                    f"`modelcd models unarchive {model}` first", field="model")


def skip_if_archived(conn: Connection, model: str, version: int) -> str | None:
    """In the dispatcher's transaction: when ``model`` is archived, record that the auto release
    of ``version`` is skipped (an event on the archive job) and return the note; else None."""
    since = conn.execute(select(schema.models.c.archived_at).where(schema.models.c.name == model)).scalar()
    if not since:
        return None
    j = schema.jobs.c
    job_id = conn.execute(select(j.id).where(j.model == model, j.type == str(JobType.ARCHIVE))
                          .order_by(j.created_at.desc()).limit(1)).scalar()
    note = (f"{model} v{version} recorded, no release: model archived (since {since}); "
            f"`modelcd models unarchive {model}`, then `modelcd promote {model} {version} --env ENV`")
    conn.execute(schema.events.insert().values(job_id=job_id, ts=now(), kind="release.skipped", message=note))
    return note


def archive_info(ctx: Context, model: str) -> dict[str, Any]:
    """What ``models show`` adds: archived or not, the archive job and the releases it skipped."""
    with ctx.db.read() as conn:
        since = conn.execute(select(schema.models.c.archived_at).where(schema.models.c.name == model)).scalar()
        j = schema.jobs.c
        job_id = conn.execute(select(j.id).where(j.model == model, j.type == str(JobType.ARCHIVE))
                              .order_by(j.created_at.desc()).limit(1)).scalar() if since else None
    skipped = [e["message"] for e in ctx.jobs.events(job_id=job_id) if e["kind"] == "release.skipped"] \
        if job_id else []
    return {"archived": bool(since), "archived_at": since, "archive_job": job_id, "skipped_releases": skipped}


def resume_interrupted(ctx: Context, say: Callable[[str], None] | None = None) -> list[str]:
    """After a restart: finish the retire / archive / unarchive jobs a dead process left
    running. A retirement whose transaction committed stops what it marked stopped (stopping
    is idempotent); one that did not changed nothing. Returns the jobs it closed."""
    closed = []
    for job in ctx.jobs.list(state=str(JobState.RUNNING), limit=1000):
        if job.type not in WORK:
            continue
        error: ModelcdError | None = None
        if job.type is JobType.RETIRE and job.model and job.environment:
            try:
                retired_at = ctx.traffic.get(job.model, job.environment).retired_at
            except ModelcdError:
                retired_at = None
            if retired_at and retired_at >= job.created_at:
                d = schema.deployments.c
                with ctx.db.read() as conn:
                    marked = [deployment_from_row(r) for r in conn.execute(select(schema.deployments).where(
                        d.model == job.model, d.environment == job.environment,
                        d.state == str(DeploymentState.STOPPED), d.updated_at >= job.created_at))]
                failed = _stop_all(ctx, job, marked)
                if failed:
                    error = ModelcdError("retired, but after a restart these did not stop: " + "; ".join(failed))
            else:
                error = ModelcdError("interrupted by a restart before traffic moved; nothing changed: retire again")
        elif job.type is not JobType.RETIRE:
            try:
                since = ctx.registry.get_model(job.model or "").get("archived_at")
            except ModelcdError:
                since = None
            took = bool(since and since >= job.created_at) if job.type is JobType.ARCHIVE else not since
            if not took:
                error = ModelcdError("interrupted by a restart before it took effect; nothing changed: ask again")
        _finish(ctx, job, error, "finished after a restart of the service")
        closed.append(job.id)
        if say is not None:
            say(f"closed {job.type} job {job.id} left running by a restart")
    return closed
