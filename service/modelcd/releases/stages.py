"""The work of each release phase, for the local runner. Each function is safe to run again
after a crash (keyed by the release and what it recorded), returns the values to store on
the release, and raises a StageFailed subtype or Cancelled."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from modelcd.analysis.canary import hold_step, step_traffic
from modelcd.analysis.smoke import SmokeChecks, run_smoke
from modelcd.builders import BuildSpec, get_builder
from modelcd.context import Context
from modelcd.domain import DeploymentState
from modelcd.errors import BuildError, NotFound, RouterError, StageFailed
from modelcd.releases.deployments import deploy_spec, handle_of, runner_started, spec_values, stop_deployment
from modelcd.releases.evaluation_gate import evaluate
from modelcd.releases.judging import CanaryMirror, shadow_phase, stop_mirror
from modelcd.releases.machine import Phase
from modelcd.releases.policy import Strategy, deployments_kept
from modelcd.releases.service import Release
from modelcd.releases.stage_run import StageRun
from modelcd.targets import TARGETS


def check_supported(run: StageRun) -> None:
    """Refuse, with the fix, what the stages cannot do yet."""
    if run.env.target not in TARGETS:
        raise StageFailed(f"policy {run.policy.name}: target {run.env.target} is not available; use one of "
                          f"{', '.join(sorted(TARGETS))}", field="target")


def build(run: StageRun) -> dict[str, Any]:
    check_supported(run)
    rel = run.release
    version = run.ctx.registry.get_version(rel.model, rel.version)
    if version.status != "ready":
        raise BuildError(f"{rel.model} v{rel.version} is referenced only ({version.external_ref}): its files stay in "
                         f"the {version.source} registry, so there is nothing to build here")
    run.log(f"building {rel.model} v{rel.version} ({version.flavor}, digest {version.digest12})")
    files = run.ctx.registry.materialize(version)
    run.check_cancel()
    bundle = get_builder(run.env.target, run.ctx.settings).build(BuildSpec(version, files), run.log, run.cancel)
    return {"bundle": str(bundle.path)}


def deploy(run: StageRun) -> dict[str, Any]:
    rel, ctx = run.release, run.ctx
    target = ctx.target(run.env.target)
    for d in ctx.deployments.list(model=rel.model, environment=rel.environment, version=rel.version, live_only=True):
        if d.bundle == rel.bundle and target.adopt(d) is not None:
            run.log(f"reusing live deployment {d.id} of v{d.version} at {d.url}")
            return {"deployment_id": d.id}
    if rel.deployment_id:  # started before a restart: adopt it or start afresh
        rec = ctx.deployments.get(rel.deployment_id)
        if rec.state in (DeploymentState.STARTING, DeploymentState.READY) and target.adopt(rec) is not None:
            run.log(f"adopted deployment {rec.id} (pid {rec.pid}) started before the restart")
            return {"deployment_id": rec.id}
        target.delete(handle_of(rec, ctx.home))
        ctx.deployments.update(rec.id, state=DeploymentState.FAILED)
    if not rel.bundle:
        raise BuildError("release has no bundle; the build stage did not finish")
    env = run.env
    dep = ctx.deployments.create(model=rel.model, version=rel.version, environment=rel.environment,
                                 target=target.name, release_id=rel.id,
                                 spec=spec_values(env, ctx.settings, rel.bundle))
    ctx.releases.update(rel.id, deployment_id=dep.id)  # recorded before starting: findable after a crash
    spec = deploy_spec(dep, ctx.settings)
    for name, value in dep.spec["env"].items():
        if not isinstance(value, str):  # a secret's value: never in this release's logs or events
            ctx.redact.add(spec.env[name])
    if target.name == "process" and (spec.cpu or spec.memory):
        run.log("resources (cpu, memory) are not enforced on the process target; use target: docker for limits")
    try:
        rd = target.create(spec, run.log, run.cancel)
    except BaseException:
        ctx.deployments.update(dep.id, state=DeploymentState.FAILED)
        raise
    ctx.deployments.update(dep.id, state=DeploymentState.READY, url=rd.url, pid=rd.pid, port=rd.port,
                           log_path=str(rd.log_path))
    run.log(f"deployment {dep.id} ready at {rd.url} (pid {rd.pid})")
    return {"deployment_id": dep.id}


def smoke(run: StageRun) -> dict[str, Any]:
    rel, ctx = run.release, run.ctx
    dep = ctx.deployments.get(rel.deployment_id or "")
    version = ctx.registry.get_version(rel.model, rel.version)
    checks = SmokeChecks.from_policy(run.policy.smoke)
    report = run_smoke(dep.url or "", version.sample, version.expected, checks, None, run.log, run.cancel)
    report.raise_for_outcome()
    run.log(f"smoke checks passed against {dep.url}")
    return {}


def promote(run: StageRun) -> dict[str, Any]:
    rel, ctx = run.release, run.ctx
    dep_id = rel.deployment_id or ""
    env = run.env
    current = ctx.traffic.current(rel.model, rel.environment)
    previous = record_previous(run)
    wanted = {dep_id: 100}
    if current == wanted:
        run.log(f"{rel.model}/{rel.environment} already sends all traffic to {dep_id}")
        ctx.traffic.sync_router()
    else:
        if env.strategy == Strategy.CANARY:
            _canary_steps(run, dep_id, previous)
        elif env.strategy == Strategy.SHADOW:
            _shadow(run, dep_id, previous)
        _switch(run, wanted, previous)
    _watch_from_now(run)
    keep = deployments_kept(run.policy, env)
    ctx.traffic.retire(rel.model, rel.environment, keep, ctx.target(env.target), ctx.home, run.log)
    _queue_next_environment(run)
    return {}


def _watch_from_now(run: StageRun) -> None:
    """The endpoint's sampling for the production watch: the policy's rate, or none."""
    rel, ctx, env = run.release, run.ctx, run.env
    rate = env.watch.sample_rate if env.watch is not None else 0.0
    if ctx.traffic.get(rel.model, rel.environment).sample_rate == rate:
        return
    try:
        ctx.traffic.set_sampling(rel.model, rel.environment, rate, run.log)
    except RouterError as e:  # traffic already moved: the watch starts with the router's next table
        run.log(f"could not set the watch's sampling yet ({e.message}); the next change of the endpoint does")


def record_previous(run: StageRun) -> dict[str, int]:
    """The split that served before this release first moved traffic: recorded once (with the
    endpoint's own previous split), so every later step, a restart mid-canary and the
    rollback all return to it."""
    rel, ctx = run.release, run.ctx
    if rel.previous_traffic is not None:
        return rel.previous_traffic
    try:
        endpoint = ctx.traffic.get(rel.model, rel.environment)
        previous, before = endpoint.traffic, endpoint.previous_traffic
    except NotFound:
        previous, before = {}, None
    ctx.releases.update(rel.id, previous_traffic=previous, endpoint_previous=before)
    return previous


def _switch(run: StageRun, traffic: dict[str, int], previous: dict[str, int]) -> None:
    rel, ctx = run.release, run.ctx
    try:
        ctx.traffic.switch(rel.model, rel.environment, traffic, run.log, previous=previous or None,
                           auth=str(run.env.auth))
    except RouterError as e:
        run.log(f"router refused the switch: {e.message}; restoring {previous}")
        _restore(run, previous)
        raise StageFailed(f"traffic switch failed: {e.message}") from e


def _shadow(run: StageRun, dep_id: str, previous: dict[str, int]) -> None:
    """Strategy shadow: judge the candidate on copies of live requests before any traffic moves."""
    if not any(w > 0 for d, w in previous.items() if d != dep_id):
        run.log("shadow: nothing served before, so there is no champion to compare with; all traffic moves at once")
        return
    shadow_phase(run, dep_id)


def _canary_steps(run: StageRun, dep_id: str, previous: dict[str, int]) -> None:
    """Move traffic to the new deployment through the policy's steps below 100%, holding
    each while its answers to real traffic stay within ``max_error_rate``. A failed step
    raises: the rollback stage puts ``previous`` back."""
    rel, ctx = run.release, run.ctx
    env = run.env  # validated: the canary defaults are filled in
    if not any(w > 0 for d, w in previous.items() if d != dep_id):
        run.log("canary: nothing served before, so all traffic moves at once")
        return
    assert env.steps is not None and env.step_hold_s is not None and env.max_error_rate is not None
    steps = [p for p in env.steps if p < 100]
    limits = f"max_error_rate {env.max_error_rate:.1%}" + (f", max_p95_ms {env.max_p95_ms:g}" if env.max_p95_ms
                                                          else "")
    url = ctx.deployments.get(dep_id).url or ""
    with contextlib.ExitStack() as stack:
        mirror = stack.enter_context(CanaryMirror(run, dep_id)) if env.mirror else None
        for i, percent in enumerate(steps, 1):
            run.log(f"canary step {i}/{len(steps) + 1}: {percent}% of traffic to v{rel.version} for "
                    f"{env.step_hold_s:g}s ({limits}{', answers compared on copies' if mirror else ''})")
            _switch(run, step_traffic(dep_id, percent, previous), previous)
            ctx.jobs.event(None, rel.id, "canary.step", f"{percent}% of traffic to v{rel.version}")
            stopped = run.stopped
            if mirror is not None:
                mirror.step = f"canary step {i} ({percent}%)"
                stopped = (lambda m=mirror: run.stopped() or m.check())  # noqa: E731
            hold_step(url, env.step_hold_s, env.max_error_rate, stopped, run.log, max_p95_ms=env.max_p95_ms)
        if mirror is not None:
            mirror.finish()
    run.log(f"canary step {len(steps) + 1}/{len(steps) + 1}: 100% of traffic to v{rel.version}")


def _restore(run: StageRun, previous: dict[str, int]) -> None:
    """Put the endpoint back as it was before this release: its split and its previous split."""
    rel, ctx = run.release, run.ctx
    try:
        ctx.traffic.switch(rel.model, rel.environment, previous, run.log,
                           previous=ctx.releases.get(rel.id).endpoint_previous)
    except RouterError as e:
        run.log(f"could not restore traffic yet ({e.message}); the router gets the stored table on its next sync")


def _queue_next_environment(run: StageRun) -> None:
    rel, ctx = run.release, run.ctx
    envs = rel.policy.environments
    if rel.trigger != "auto" or rel.env_index + 1 >= len(envs):
        return
    nxt = envs[rel.env_index + 1].name
    with ctx.db.write() as conn:
        rid = ctx.releases.create_in(conn, model=rel.model, version=rel.version, environment=nxt,
                                     policy=rel.policy, env_index=rel.env_index + 1, trigger="auto")
    run.log(f"queued release {rid}: v{rel.version} → {nxt}")
    ctx.wake.set()


def rollback(run: StageRun) -> dict[str, Any]:
    """Undo what this release started: traffic back to where it was, its own deployment stopped."""
    rel, ctx = run.release, run.ctx
    dep_id = rel.deployment_id
    if dep_id and _mirrors(ctx, rel, dep_id):
        stop_mirror(run)
    current = ctx.traffic.current(rel.model, rel.environment)
    if dep_id and current.get(dep_id, 0) > 0 and rel.previous_traffic is not None and current != rel.previous_traffic:
        run.log(f"restoring traffic of {rel.model}/{rel.environment} to {rel.previous_traffic}")
        ctx.traffic.switch(rel.model, rel.environment, rel.previous_traffic, run.log,
                           previous=rel.endpoint_previous)
    if dep_id:
        dep = ctx.deployments.get(dep_id)
        serving = ctx.traffic.current(rel.model, rel.environment).get(dep_id, 0) > 0
        if dep.release_id == rel.id and not serving and dep.state is not DeploymentState.STOPPED:
            target = ctx.target(dep.target)
            rd = handle_of(dep, ctx.home)
            if dep.pid and not runner_started(dep):
                tail = target.logs(rd, tail=20)
                if tail.strip():
                    run.log("last lines of the deployment's log:\n" + tail)
            # recorded stopped before its process stops, so the reconciler (which starts again a serving
            # deployment whose process is gone) does not take the stop for a crash
            ctx.deployments.update(dep_id, state=DeploymentState.STOPPED)
            stop_deployment(target, dep, ctx.home, run.log)
            run.log(f"stopped deployment {dep_id}; production untouched")
    run.log("rollback complete")
    return {}


def _mirrors(ctx: Context, rel: Release, dep_id: str) -> bool:
    """Whether the endpoint still copies requests to ``dep_id`` (a shadow cut short)."""
    try:
        return ctx.traffic.get(rel.model, rel.environment).mirror == dep_id
    except NotFound:
        return False


STAGES: dict[Phase, Callable[[StageRun], dict[str, Any]]] = {
    Phase.BUILDING: build,
    Phase.EVALUATING: evaluate,
    Phase.DEPLOYING: deploy,
    Phase.SMOKE_TESTING: smoke,
    Phase.PROMOTING: promote,
    Phase.ROLLING_BACK: rollback,
}
