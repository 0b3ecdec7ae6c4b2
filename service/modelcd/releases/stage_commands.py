"""Stages run on request: what ``modelcd build|deploy|smoke|promote|rollback --release ID``
does when a pipeline (GitHub Actions, Azure Pipelines) drives a release, and what
``modelcd report`` tells the service.

The work is the release engine's (``engine.run_stage``): a pipeline run and a local run do
exactly the same thing, with the same jobs, events and logs. A stage asked for twice (a CI
retry) answers with what happened the first time instead of running again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from modelcd.context import Context
from modelcd.errors import Conflict, InvalidInput
from modelcd.releases.deployments import runner_started
from modelcd.releases.engine import STAGE_PHASE, busy, done_before, release_lock, run_stage, stage_name
from modelcd.releases.machine import NEXT_ON_SUCCESS, Phase
from modelcd.releases.runner_reports import target_instance
from modelcd.releases.service import Release

OUTCOMES = ("succeeded", "failed", "cancelled")
_guard = threading.Lock()
# Stages asked for over HTTP run here, not in the request: a build can outlast any proxy's
# idle timeout, so the request waits a little and then answers "running" (the CLI polls).
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage")
_inflight: dict[tuple[str, str], Future[dict[str, Any]]] = {}
MAX_WAIT_S = 30.0


def _check_stage(stage: str) -> None:
    if stage not in STAGE_PHASE:
        raise InvalidInput(f"unknown stage {stage!r}; one of {', '.join(STAGE_PHASE)}", field="stage")


def start_stage_command(ctx: Context, release_id: str, stage: str, wait_s: float = 20.0) -> dict[str, Any]:
    """Run ``stage`` in the background and wait up to ``wait_s`` for it: its result, or
    ``{"outcome": "running", ...}`` to be asked again with ``stage_command_status``."""
    _check_stage(stage)
    rel = ctx.releases.get(release_id)
    _check_external(rel)
    key = (release_id, stage)
    with _guard:
        future = _inflight.get(key)
        if future is None or future.done():
            future = _pool.submit(_in_flight, ctx, release_id, stage)
            _inflight[key] = future
    return _wait(future, rel, stage, min(max(wait_s, 0.0), MAX_WAIT_S))


def stage_command_status(ctx: Context, release_id: str, stage: str, wait_s: float = 20.0) -> dict[str, Any]:
    """The result of the stage last started for the release (waiting up to ``wait_s`` while it
    runs), or what the release's phase says of the stage when none was started here."""
    _check_stage(stage)
    rel = ctx.releases.get(release_id)
    with _guard:
        future = _inflight.get((release_id, stage))
    if future is not None:
        return _wait(future, rel, stage, min(max(wait_s, 0.0), MAX_WAIT_S))
    wanted = STAGE_PHASE[stage]
    if rel.phase is wanted:
        return _result(stage, rel, "pending")
    if stage != "rollback" and done_before(rel.phase, wanted):
        return _result(stage, rel, "succeeded", already=True)
    return _result(stage, rel, "failed" if rel.phase in (Phase.FAILED, Phase.CANCELLED) else "pending",
                   already=True)


def _in_flight(ctx: Context, release_id: str, stage: str) -> dict[str, Any]:
    """``run_stage_command`` marked busy for the engine until its closing report is written
    (a stage command in flight is a sign of life of its pipeline)."""
    with busy(release_id):
        return run_stage_command(ctx, release_id, stage)


def _wait(future: Future[dict[str, Any]], rel: Release, stage: str, wait_s: float) -> dict[str, Any]:
    try:
        return future.result(timeout=wait_s)
    except FutureTimeout:
        return _result(stage, rel, "running")


def run_stage_command(ctx: Context, release_id: str, stage: str) -> dict[str, Any]:
    """Run ``stage`` of the release now (blocking) and return its outcome:
    ``{"stage", "outcome": succeeded|failed|skipped, "phase", "error", "already"}``."""
    _check_stage(stage)
    wanted = STAGE_PHASE[stage]
    ctx.pipeline_runs.reported(release_id)  # the pipeline is alive (no-op for a release it does not drive)
    try:
        with release_lock(release_id):  # one stage of a release at a time, even if the pipeline retries meanwhile
            return _run_locked(ctx, release_id, stage, wanted)
    finally:
        ctx.pipeline_runs.reported(release_id)


def _check_external(rel: Release) -> None:
    """Stage commands drive releases whose policy hands the stages to a pipeline; the local
    runner's own releases are already being run by the service (running them twice races)."""
    if not rel.external:
        raise Conflict(f"release {rel.id} is run by the service's local runner (policy {rel.policy_name}); stage "
                       "commands drive releases whose policy has runner: github or azure", field="release_id")


def _run_locked(ctx: Context, release_id: str, stage: str, wanted: Phase) -> dict[str, Any]:
    rel = ctx.releases.get(release_id)
    _check_external(rel)
    if rel.phase is Phase.QUEUED:
        raise Conflict(f"release {release_id} is queued behind another release of {rel.model}/{rel.environment}; "
                       "retry when it starts", field="release_id")
    if stage == "rollback":
        return _rollback(ctx, rel)
    if rel.phase is wanted:
        run_stage(ctx, release_id, wanted, ctx.jobs.cancel_event(release_id))
        after = ctx.releases.get(release_id)
        ok = after.phase is NEXT_ON_SUCCESS[wanted]
        ctx.wake.set()
        return _result(stage, after, "succeeded" if ok else "failed")
    if done_before(rel.phase, wanted):
        return _result(stage, rel, "succeeded", already=True)
    if rel.phase.terminal or rel.phase is Phase.ROLLING_BACK:
        return _result(stage, rel, "failed", already=True)
    raise Conflict(f"release {release_id} is {rel.phase}: stage {stage} cannot run before "
                   f"{stage_name(rel.phase)}", field="stage")


def _rollback(ctx: Context, rel: Release) -> dict[str, Any]:
    if rel.phase is Phase.SUCCEEDED:
        return _result("rollback", rel, "skipped", already=True)
    if rel.phase.terminal:
        return _result("rollback", rel, "succeeded", already=True)
    if rel.phase is not Phase.ROLLING_BACK:  # the pipeline failed outside a modelcd stage
        ctx.releases.advance(rel.id, Phase.ROLLING_BACK, "the pipeline asked for a rollback",
                             error=rel.error or f"the pipeline failed before {stage_name(rel.phase)} finished")
    run_stage(ctx, rel.id, Phase.ROLLING_BACK, ctx.jobs.cancel_event(rel.id))
    after = ctx.releases.get(rel.id)
    ctx.wake.set()
    return {**_result("rollback", after, "succeeded" if after.phase.terminal else "failed"),
            **_runner_deployment(ctx, after)}


def _runner_deployment(ctx: Context, rel: Release) -> dict[str, Any]:
    """For a release whose runner started its deployment: what the runner's rollback command
    needs to stop the container on its own engine (the service's instance label)."""
    if not rel.deployment_id:
        return {}
    dep = ctx.deployments.get(rel.deployment_id)
    if not runner_started(dep):
        return {}
    return {"deployment_id": dep.id, "runner_deployment": target_instance(ctx, dep.target)}


def report(ctx: Context, release_id: str, stage: str, outcome: str, message: str = "") -> dict[str, Any]:
    """Record what the pipeline says of a stage. A failed or cancelled stage that the release
    is still in moves it to rolling back (the pipeline's rollback job, or the service's
    deadline, then undoes what it started)."""
    if stage not in (*STAGE_PHASE, "pipeline"):
        raise InvalidInput(f"unknown stage {stage!r}; one of {', '.join(STAGE_PHASE)}, pipeline", field="stage")
    if outcome not in OUTCOMES:
        raise InvalidInput(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}", field="outcome")
    message = " ".join(str(message).split())[:500]
    rel = ctx.releases.get(release_id)
    _check_external(rel)
    ctx.jobs.event(None, release_id, f"pipeline.{stage}.{outcome}", message or f"the pipeline reports {stage} "
                   f"{outcome}")
    ctx.pipeline_runs.reported(release_id)
    in_stage = stage == "pipeline" or STAGE_PHASE.get(stage) is rel.phase
    if outcome != "succeeded" and in_stage and rel.phase.active and rel.phase is not Phase.ROLLING_BACK:
        if outcome == "cancelled":
            ctx.releases.request_cancel(release_id)
        ctx.releases.advance(release_id, Phase.ROLLING_BACK, f"the pipeline reports {stage} {outcome}",
                             error=f"{stage} {outcome} in the pipeline" + (f": {message}" if message else ""))
        ctx.wake.set()
    return ctx.releases.get(release_id).to_dict()


def _result(stage: str, rel: Release, outcome: str, already: bool = False) -> dict[str, Any]:
    return {"stage": stage, "outcome": outcome, "already": already, "release_id": rel.id, "phase": str(rel.phase),
            "model": rel.model, "version": rel.version, "environment": rel.environment, "error": rel.error}
