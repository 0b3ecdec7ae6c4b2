"""Operations a person starts: promote a given version, roll an endpoint back."""

from __future__ import annotations

from typing import Any

from modelcd.context import Context
from modelcd.domain import JobState, JobType
from modelcd.errors import Conflict
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.releases.deployments import handle_of


def start_release(ctx: Context, model: str, version: int, environment: str, trigger: str = "manual") -> str:
    """Queue a release of ``model`` v``version`` to ``environment`` under the model's policy
    (the environment's step in it, or blue-green on the process target if it has none)."""
    validate_model_name(model)
    validate_environment_name(environment, field="environment")
    v = ctx.registry.get_version(model, version)
    policy = ctx.policies.select(model, v.tags, str(v.source)).to_dict()
    names = [e["name"] for e in policy["environments"]]
    if environment in names:
        index = names.index(environment)
    else:
        policy["environments"].append({"name": environment, "target": "process", "strategy": "blue-green",
                                       "steps": None, "scoring_workers": ctx.settings.scoring_workers})
        index = len(names)
    with ctx.db.write() as conn:
        rid = ctx.releases.create_in(conn, model=model, version=version, environment=environment,
                                     policy_name=policy["name"], policy=policy, env_index=index, trigger=trigger)
    ctx.wake.set()
    return rid


def rollback_endpoint(ctx: Context, model: str, environment: str) -> dict[str, Any]:
    """Send the endpoint's traffic back to its previous split. Instant when the previous
    deployment is still warm; otherwise a release of the previous version is queued."""
    endpoint = ctx.traffic.get(model, environment)
    previous = endpoint.previous_traffic
    if not previous:
        raise Conflict(f"{model}/{environment} has no previous version to roll back to", field="environment")
    job = ctx.jobs.create(JobType.ROLLBACK, model=model, environment=environment)
    ctx.jobs.transition(job.id, JobState.RUNNING, f"rolling back {model}/{environment} to {previous}")
    log = ctx.jobs.logger(job.id)
    try:
        records = {d.id: d for d in ctx.deployments.list(model=model, environment=environment, live_only=True)}
        warm = all(dep_id in records and ctx.target(records[dep_id].target).is_alive(handle_of(records[dep_id],
                                                                                             ctx.home))
                   for dep_id, w in previous.items() if w > 0)
        if warm:
            ctx.traffic.switch(model, environment, previous, log)
            ctx.jobs.transition(job.id, JobState.SUCCEEDED, "traffic restored")
            ep = ctx.traffic.get(model, environment)
            return {"job_id": job.id, "release_id": None, "traffic": ep.to_dict()["traffic"]}
        versions = sorted({d.version for d in ctx.deployments.list(model=model, environment=environment)
                           if d.id in previous and previous[d.id] > 0})
        if not versions:
            raise Conflict(f"the previous deployments of {model}/{environment} are unknown; "
                           f"promote a version instead: `modelcd promote {model} VERSION --env {environment}`")
        rid = start_release(ctx, model, versions[-1], environment, trigger="rollback")
        log(f"previous deployment was retired; queued release {rid} of v{versions[-1]}")
        ctx.jobs.transition(job.id, JobState.SUCCEEDED, f"queued release {rid}")
        return {"job_id": job.id, "release_id": rid, "traffic": endpoint.to_dict()["traffic"]}
    except Exception as e:
        ctx.jobs.transition(job.id, JobState.FAILED, error=getattr(e, "message", str(e)))
        raise
