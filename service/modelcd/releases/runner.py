"""The local runner: worker threads in the service process that advance releases through
the release engine (``engine.run_release``).

One release per endpoint runs at a time (``Releases.claim``); a newer queued version
supersedes an older queued one (``Releases.create_in``). After a restart, releases that
were in flight resume at their current phase; each stage is safe to run again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import Conflict
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.releases.engine import run_release
from modelcd.releases.machine import Phase
from modelcd.releases.policy import DEFAULT_APPROVAL_TIMEOUT_S

log = logging.getLogger(__name__)


class LocalRunner:
    """Dispatches the outbox, claims queued releases, and runs the local ones on a pool of
    worker threads. Releases another driver runs (a pipeline) are claimed here and left to it;
    ``also`` are that driver's ticks, called from this loop."""

    def __init__(self, ctx: Context, workers: int | None = None, poll_s: float = 0.5,
                 also: Sequence[Callable[[], None]] = ()) -> None:
        self.ctx = ctx
        self.also = tuple(also)
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
                for tick in self.also:
                    tick()
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
                limit = rel.environment_policy.approval_timeout_s or DEFAULT_APPROVAL_TIMEOUT_S
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
