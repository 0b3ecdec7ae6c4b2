"""The local runner: worker threads in the service process that advance releases.

One release per endpoint runs at a time (``Releases.claim``); a newer queued version
supersedes an older queued one (``Releases.create_in``). After a restart, releases that
were in flight resume at their current phase; each stage is safe to run again."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import Cancelled, Conflict, ModelcdError
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.releases.machine import STAGE_OF, Phase, after_rollback, after_success
from modelcd.releases.policy import DEFAULT_APPROVAL_TIMEOUT_S
from modelcd.releases.stages import STAGES, StageRun

log = logging.getLogger(__name__)


def run_release(ctx: Context, release_id: str) -> Phase:
    """Advance one release stage by stage until it is terminal or waits at its approval gate;
    return the phase it stopped in."""
    cancel = ctx.jobs.cancel_event(release_id)
    try:
        while True:
            rel = ctx.releases.get(release_id)
            if rel.phase.terminal or rel.phase is Phase.AWAITING_APPROVAL:
                return rel.phase
            run_stage(ctx, release_id, rel.phase, cancel)
    finally:
        ctx.jobs.forget_cancel([release_id])


def run_stage(ctx: Context, release_id: str, phase: Phase, cancel: threading.Event) -> None:
    rel = ctx.releases.get(release_id)
    job = ctx.jobs.create(STAGE_OF[phase], release_id=rel.id, model=rel.model, version=rel.version,
                          environment=rel.environment)
    ctx.jobs.transition(job.id, JobState.SCHEDULED)
    ctx.jobs.transition(job.id, JobState.RUNNING)
    job_log = ctx.jobs.logger(job.id)
    run = StageRun(ctx=ctx, release=rel, log=job_log, cancel=cancel)
    try:
        if phase is not Phase.ROLLING_BACK and phase is not Phase.PROMOTING:
            run.check_cancel()
        values = STAGES[phase](run)
    except Cancelled as e:
        job_log(f"stopped: {e.message}")
        ctx.jobs.transition(job.id, JobState.CANCELLED, e.message)
        ctx.releases.advance(rel.id, Phase.ROLLING_BACK, f"{STAGE_OF[phase]} stopped; rolling back",
                             error=f"{STAGE_OF[phase]} stopped by a person")
        return
    except Exception as e:
        message = e.message if isinstance(e, ModelcdError) else f"internal error: {type(e).__name__}: {e}"
        if not isinstance(e, ModelcdError):
            job_log(traceback.format_exc())
        job_log(f"failed: {message}")
        ctx.jobs.transition(job.id, JobState.FAILED, error=message)
        if phase is Phase.ROLLING_BACK:
            ctx.releases.advance(rel.id, after_rollback(rel.cancel_requested), "rollback incomplete",
                                 error=f"{rel.error or ''}; rollback incomplete: {message}".lstrip("; "))
        else:
            ctx.releases.advance(rel.id, Phase.ROLLING_BACK, f"{STAGE_OF[phase]} failed; rolling back",
                                 error=f"{STAGE_OF[phase]} failed: {message}")
        return
    ctx.jobs.transition(job.id, JobState.SUCCEEDED)
    if phase is Phase.ROLLING_BACK:
        ctx.releases.advance(rel.id, after_rollback(rel.cancel_requested), "rolled back; production as before")
    else:
        # a rollback a person asked for redeploys what served before: no second question
        nxt = after_success(phase, bool(rel.env_spec.get("approval")) and rel.trigger != "rollback")
        message = f"{STAGE_OF[phase]} succeeded"
        if nxt is Phase.AWAITING_APPROVAL:
            message += "; waiting for a person to approve (modelcd releases approve) before traffic moves"
        ctx.releases.advance(rel.id, nxt, message, **values)


class LocalRunner:
    """Dispatches the outbox and runs queued releases on a pool of worker threads."""

    def __init__(self, ctx: Context, workers: int | None = None, poll_s: float = 0.5) -> None:
        from modelcd.releases.external import ExternalDriver

        self.ctx = ctx
        self.external = ExternalDriver(ctx)  # releases whose pipeline runs in GitHub Actions / Azure Pipelines
        self.workers = workers or ctx.settings.runner_workers
        self.poll_s = poll_s
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="release")
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.resume()
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = False) -> None:
        self._stop.set()
        self.ctx.wake.set()
        self.pool.shutdown(wait=wait, cancel_futures=True)

    def resume(self) -> list[str]:
        """Pick up releases a previous process left in flight; their interrupted jobs fail."""
        resumed = []
        for rel in self.ctx.releases.in_phases({p for p in Phase if p.active}):
            for job in self.ctx.jobs.list(release_id=rel.id):
                if not job.state.terminal:
                    again = "the pipeline may ask for the stage again" if rel.external else "the stage runs again"
                    self.ctx.jobs.transition(job.id, JobState.FAILED if job.state is JobState.RUNNING
                                             else JobState.CANCELLED,
                                             error=f"interrupted by a restart of the service; {again}")
            if rel.external:
                continue  # its pipeline runs the stages; the external driver watches it
            self.ctx.jobs.event(None, rel.id, "release.resumed", f"resuming at {rel.phase} after a restart")
            self._submit(rel.id)
            resumed.append(rel.id)
        return resumed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                dispatch_outbox(self.ctx)
                self.schedule()
                self.gates()
                self.external.tick()
            except Exception:
                log.exception("runner loop")
            self.ctx.wake.wait(self.poll_s)
            self.ctx.wake.clear()

    def schedule(self) -> None:
        """Claim queued releases whose endpoint is free, while workers are free."""
        for rel in self.ctx.releases.in_phases({Phase.QUEUED}):
            with self._lock:
                if len(self._active) >= self.workers:
                    return
            if self.ctx.releases.claim(rel.id) and not rel.external:
                self._submit(rel.id)

    def gates(self) -> None:
        """Releases at their approval gate: a stop or an expired gate rolls them back; one a
        person approved (PROMOTING) or rejected (ROLLING_BACK) is run on from there."""
        for rel in self.ctx.releases.in_phases({Phase.AWAITING_APPROVAL, Phase.PROMOTING, Phase.ROLLING_BACK}):
            if rel.external or rel.id in self.active:
                continue
            if rel.phase is Phase.AWAITING_APPROVAL:
                limit = float(rel.env_spec.get("approval_timeout_s") or DEFAULT_APPROVAL_TIMEOUT_S)
                waited = time.time() - datetime.fromisoformat(rel.updated_at).timestamp()
                why = None
                if rel.cancel_requested:
                    why = ("stopped by a person at the approval gate", "approval gate: stopped")
                elif waited > limit:
                    why = (f"not approved within {limit:g}s (approval_timeout_s); production untouched",
                           "approval gate: timed out")
                if why is None:
                    continue
                try:
                    self.ctx.releases.advance(rel.id, Phase.ROLLING_BACK, why[1], error=why[0])
                except Conflict:
                    continue  # a person answered meanwhile
            self._submit(rel.id)

    def _submit(self, release_id: str) -> None:
        with self._lock:
            if release_id in self._active:
                return
            self._active.add(release_id)
        self.pool.submit(self._run, release_id)

    def _run(self, release_id: str) -> None:
        try:
            run_release(self.ctx, release_id)
        except Exception:
            log.exception("release %s", release_id)
        finally:
            with self._lock:
                self._active.discard(release_id)
            self.ctx.wake.set()

    @property
    def active(self) -> set[str]:
        with self._lock:
            return set(self._active)
