"""The release engine: the one place that runs a stage of a release, in the order the state
machine's table gives, and that fails a release and rolls it back.

Three drivers use it and none imports another: the local runner (``runner.py``: worker
threads advance releases stage after stage), the external-pipeline driver (``external.py``:
a GitHub/Azure run asks for the stages, the driver watches the run) and the stage-command
API (``stage_commands.py``: what such a run calls). Whoever drives, a stage is the same job
with the same events and log; one stage of a release runs at a time (``release_lock``).
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import Cancelled, ModelcdError
from modelcd.releases.machine import NEXT_ON_SUCCESS, STAGE_OF, Phase, after_rollback, after_success
from modelcd.releases.service import Release
from modelcd.releases.stages import STAGES, StageRun


def _stage_order() -> tuple[Phase, ...]:
    """The phases a successful release goes through, from the state machine's table; a stage
    only some releases take (evaluating) sits before the phase it leads to."""
    order = [Phase.BUILDING]
    while order[-1] in NEXT_ON_SUCCESS:
        order.append(NEXT_ON_SUCCESS[order[-1]])
    for phase, nxt in NEXT_ON_SUCCESS.items():
        if phase not in order and nxt in order:
            order.insert(order.index(nxt), phase)
    return tuple(order)


STAGE_ORDER = _stage_order()  # building → (evaluating) → deploying → smoke_testing → promoting → succeeded
STAGE_PHASE: dict[str, Phase] = {str(job): phase for phase, job in STAGE_OF.items()}  # "build" → BUILDING …

_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}
_busy: Counter[str] = Counter()


def release_lock(release_id: str) -> threading.Lock:
    """The lock held while a stage of the release runs: one at a time, whoever asks."""
    with _guard:
        return _locks.setdefault(release_id, threading.Lock())


@contextmanager
def busy(release_id: str) -> Iterator[None]:
    """Mark work on the release in flight (a stage asked for and not yet answered)."""
    with _guard:
        _busy[release_id] += 1
    try:
        yield
    finally:
        with _guard:
            _busy[release_id] -= 1
            if _busy[release_id] <= 0:
                del _busy[release_id]


def is_busy(release_id: str) -> bool:
    """Whether work on the release is in flight in this process (a sign of life of its driver)."""
    with _guard:
        return _busy[release_id] > 0


def stage_name(phase: Phase) -> str:
    """``build`` for BUILDING…; the phase itself for phases without a stage."""
    return str(STAGE_OF[phase]) if phase in STAGE_OF else str(phase)


def done_before(phase: Phase, wanted: Phase) -> bool:
    """Whether a release in ``phase`` has already gone past the stage of ``wanted``."""
    return phase in STAGE_ORDER and wanted in STAGE_ORDER and STAGE_ORDER.index(phase) > STAGE_ORDER.index(wanted)


def run_release(ctx: Context, release_id: str) -> Phase:
    """Advance one release stage by stage until it is terminal or waits at its approval gate;
    return the phase it stopped in."""
    cancel = ctx.jobs.cancel_event(release_id)
    try:
        while True:
            rel = ctx.releases.get(release_id)
            if rel.phase.terminal or rel.phase is Phase.AWAITING_APPROVAL:
                return rel.phase
            with release_lock(release_id):
                run_stage(ctx, release_id, rel.phase, cancel)
    finally:
        ctx.jobs.forget_cancel([release_id])


def run_stage(ctx: Context, release_id: str, phase: Phase, cancel: threading.Event) -> Release:
    """Run the stage of ``phase`` as a job and move the release on: to the next phase when it
    succeeds, to rolling back when it fails or is stopped, to its end after a rollback.
    Returns the release as it is afterwards. The caller holds ``release_lock``."""
    rel = ctx.releases.get(release_id)
    job_id = begin_stage(ctx, rel, phase)
    job_log = ctx.jobs.logger(job_id)
    run = StageRun(ctx=ctx, release=rel, log=job_log, cancel=cancel)
    try:
        if phase is not Phase.ROLLING_BACK and phase is not Phase.PROMOTING:
            run.check_cancel()
        values = STAGES[phase](run)
    except Exception as e:
        if not isinstance(e, ModelcdError):
            job_log(traceback.format_exc())
        return end_stage(ctx, release_id, phase, job_id, e)
    return end_stage(ctx, release_id, phase, job_id, None, values)


def begin_stage(ctx: Context, rel: Release, phase: Phase, runs_in: str | None = None) -> str:
    """Open the job of ``phase``'s stage (running) and return its id: whoever does the work,
    the service or a pipeline's runner (``runs_in="runner"``), it is recorded the same way.
    One stage runs at a time: a runner's job still open (its step died without a report, and
    the pipeline went on to roll back) is closed first."""
    close_runner_jobs(ctx, rel.id, f"the release went on to {STAGE_OF[phase]} without this stage's report")
    job = ctx.jobs.create(STAGE_OF[phase], release_id=rel.id, model=rel.model, version=rel.version,
                          environment=rel.environment, runs_in=runs_in)
    ctx.jobs.transition(job.id, JobState.SCHEDULED)
    ctx.jobs.transition(job.id, JobState.RUNNING)
    return job.id


def end_stage(ctx: Context, release_id: str, phase: Phase, job_id: str, error: Exception | None,
              values: dict[str, Any] | None = None) -> Release:
    """Close the stage's job and move the release on (see ``run_stage``): ``error`` None is a
    success storing ``values`` on the release; ``Cancelled`` a stop; anything else a failure."""
    rel = ctx.releases.get(release_id)
    job_log = ctx.jobs.logger(job_id)
    if isinstance(error, Cancelled):
        job_log(f"stopped: {error.message}")
        ctx.jobs.transition(job_id, JobState.CANCELLED, error.message)
        return ctx.releases.advance(rel.id, Phase.ROLLING_BACK, f"{STAGE_OF[phase]} stopped; rolling back",
                                    error=f"{STAGE_OF[phase]} stopped by a person")
    if error is not None:
        message = error.message if isinstance(error, ModelcdError) else \
            f"internal error: {type(error).__name__}: {error}"
        job_log(f"failed: {message}")
        ctx.jobs.transition(job_id, JobState.FAILED, error=message)
        if phase is Phase.ROLLING_BACK:
            return ctx.releases.advance(rel.id, after_rollback(rel.cancel_requested), "rollback incomplete",
                                        error=f"{rel.error or ''}; rollback incomplete: {message}".lstrip("; "))
        return ctx.releases.advance(rel.id, Phase.ROLLING_BACK, f"{STAGE_OF[phase]} failed; rolling back",
                                    error=f"{STAGE_OF[phase]} failed: {message}")
    ctx.jobs.transition(job_id, JobState.SUCCEEDED)
    if phase is Phase.ROLLING_BACK:
        return ctx.releases.advance(rel.id, after_rollback(rel.cancel_requested), "rolled back; production as before")
    # a rollback a person asked for redeploys what served before: no second question, no evaluation
    asked = rel.trigger != "rollback"
    nxt = after_success(phase, rel.environment_policy.approval and asked,
                        evaluation=asked and rel.policy.evaluation_gate(rel.environment_policy) is not None)
    message = f"{STAGE_OF[phase]} succeeded"
    if nxt is Phase.AWAITING_APPROVAL:
        message += "; waiting for a person to approve (modelcd releases approve) before traffic moves"
    return ctx.releases.advance(rel.id, nxt, message, **(values or {}))


def fail_and_roll_back(ctx: Context, release_id: str, reason: str) -> Release:
    """Fail an active release here and undo what it started (traffic as before, its own
    deployment stopped). A release that already ended is left as it is."""
    with release_lock(release_id):
        rel = ctx.releases.get(release_id)
        if not rel.phase.active:
            return rel
        close_runner_jobs(ctx, rel.id, reason)
        if rel.phase is not Phase.ROLLING_BACK:
            ctx.releases.advance(rel.id, Phase.ROLLING_BACK, reason, error=reason)
        after = run_stage(ctx, rel.id, Phase.ROLLING_BACK, ctx.jobs.cancel_event(rel.id))
    ctx.wake.set()
    return after


def close_runner_jobs(ctx: Context, release_id: str, reason: str) -> None:
    """Fail the release's jobs still open for a pipeline's runner: the service gave up on it,
    so a report the runner sends later finds its job closed."""
    for job in ctx.jobs.list(release_id=release_id, state=str(JobState.RUNNING)):
        if job.runs_in == "runner":
            ctx.jobs.logger(job.id)(f"closed by the service: {reason}")
            ctx.jobs.transition(job.id, JobState.FAILED, error=reason)
