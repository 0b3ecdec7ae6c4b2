"""Operations a person starts: promote a given version, roll an endpoint back."""

from __future__ import annotations

from typing import Any

from modelcd.context import Context
from modelcd.domain import Deployment, JobState, JobType
from modelcd.errors import Conflict
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.releases.deployments import handle_of
from modelcd.releases.endpoint_keys import SLOTS, KeysShown, create_missing_keys, key_slots, regenerate_key
from modelcd.releases.policy import Environment
from modelcd.releases.retirement import archived_refusal
from modelcd.releases.rollback_event import rollback_moved, write_rollback_event


def start_release(ctx: Context, model: str, version: int, environment: str, trigger: str = "manual",
                  by: str | None = None) -> str:
    """Queue a release of ``model`` v``version`` to ``environment`` under the model's policy
    (the environment's step in it, or blue-green on the process target if it has none);
    ``by``: the user who asked (None: the engine)."""
    validate_model_name(model)
    validate_environment_name(environment, field="environment")
    v = ctx.registry.get_version(model, version)
    policy = ctx.policies.select(model, v.tags, str(v.source))
    names = [e.name for e in policy.environments]
    if environment in names:
        index = names.index(environment)
    else:  # an environment the policy does not name: blue-green on the process target
        policy = policy.model_copy(update={"environments": (
            *policy.environments, Environment(name=environment, scoring_workers=ctx.settings.scoring_workers))})
        index = len(names)
    with ctx.db.write() as conn:
        refused = archived_refusal(conn, model)  # in the transaction: an archive cannot slip in between
        if refused is not None:
            raise refused
        rid = ctx.releases.create_in(conn, model=model, version=version, environment=environment, policy=policy,
                                     env_index=index, trigger=trigger, by=by)
    ctx.wake.set()
    return rid


def rollback_endpoint(ctx: Context, model: str, environment: str, by: str | None = None) -> dict[str, Any]:
    """Send the endpoint back to what served before its last release (or rollback) began.
    Instant when those deployments are still warm (retention keeps them), and then the split
    being left becomes the previous one, so a second rollback returns; otherwise a release of
    the previous version is queued. Conflict when there is nothing to return to."""
    endpoint = ctx.traffic.get(model, environment)
    if endpoint.retired_at:
        raise Conflict(f"{model}/{environment} was retired at {endpoint.retired_at}: nothing serves to roll back "
                       f"from; a release serves it again: `modelcd promote {model} VERSION --env {environment}`",
                       field="environment")
    previous = {d: w for d, w in (endpoint.previous_traffic or {}).items() if w > 0}
    if not previous:
        raise Conflict(f"{model}/{environment} has nothing to roll back to: no release replaced what it serves "
                       "(the first version is still the only one)", field="environment")
    if previous == {d: w for d, w in endpoint.traffic.items() if w > 0}:
        raise Conflict(f"{model}/{environment} already serves its previous split {previous}; nothing to roll back",
                       field="environment")
    records = {d.id: d for d in ctx.deployments.list(model=model, environment=environment)}
    warm = all(dep_id in records and records[dep_id].state.live
               and (records[dep_id].sleeping  # scaled to zero: the router wakes it on the first request
                    or ctx.target(records[dep_id].target).is_alive(handle_of(records[dep_id], ctx.home)))
               for dep_id in previous)
    version = None if warm else _previous_version(model, environment, endpoint.versions, previous, records)
    job = ctx.jobs.create(JobType.ROLLBACK, model=model, environment=environment, actor=by)
    ctx.jobs.transition(job.id, JobState.RUNNING, f"rolling back {model}/{environment} to {previous}"
                        + (f" (asked by {by})" if by else ""))
    log = ctx.jobs.logger(job.id)
    try:
        if version is None:
            moved = rollback_moved(ctx, model, environment, previous)  # no release moves: tell the observers
            ctx.traffic.switch(model, environment, endpoint.previous_traffic or {}, log,
                               also=(lambda conn: write_rollback_event(conn, moved)) if moved else None)
            ctx.wake.set()
            ctx.jobs.transition(job.id, JobState.SUCCEEDED, "traffic restored")
            ep = ctx.traffic.get(model, environment)
            return {"job_id": job.id, "release_id": None, "traffic": ep.to_dict()["traffic"]}
        rid = start_release(ctx, model, version, environment, trigger="rollback", by=by)
        log(f"the previous deployment was stopped; queued release {rid} of v{version}")
        ctx.jobs.transition(job.id, JobState.SUCCEEDED, f"queued release {rid}")
        return {"job_id": job.id, "release_id": rid, "traffic": endpoint.to_dict()["traffic"]}
    except Exception as e:
        ctx.jobs.transition(job.id, JobState.FAILED, error=getattr(e, "message", str(e)))
        raise


def _previous_version(model: str, environment: str, live: dict[int, int], previous: dict[str, int],
                      records: dict[str, Deployment]) -> int:
    """The version to release again when the previous deployments are gone; never the live one."""
    versions = sorted({records[d].version for d in previous if d in records})
    if not versions:
        raise Conflict(f"the previous deployments of {model}/{environment} are unknown; "
                       f"promote a version instead: `modelcd promote {model} VERSION --env {environment}`",
                       field="environment")
    live_versions = {v for v, w in live.items() if w > 0}
    if set(versions) <= live_versions:
        raise Conflict(f"{model}/{environment} already serves v{versions[-1]}, the version it served before; "
                       "nothing to roll back", field="environment")
    return max(v for v in versions if v not in live_versions)


def endpoint_keys(ctx: Context, model: str, environment: str, regenerate: str | None = None) -> KeysShown:
    """The endpoint's keys: made (and shown, this once) when it has none, or one regenerated.
    A change reaches the router, verified, before it is committed: the old key stops working
    when this returns, and the other one never does."""
    endpoint = ctx.traffic.get(model, environment)
    if regenerate is not None or not _has_keys(ctx, model, environment):
        what = f"keys of {model}/{environment}"
        shown, _ = ctx.traffic.change(what, lambda conn: regenerate_key(conn, model, environment, regenerate)
                                      if regenerate is not None else create_missing_keys(conn, model, environment))
    else:
        shown = {}
    with ctx.db.read() as conn:
        slots = key_slots(conn, model, environment)
    return KeysShown(model=model, environment=environment, auth=endpoint.auth, shown=shown, slots=slots)


def _has_keys(ctx: Context, model: str, environment: str) -> bool:
    with ctx.db.read() as conn:
        return len(key_slots(conn, model, environment)) == len(SLOTS)
