"""Releases driven by an external runner (policy ``runner: github`` or ``azure``).

The service claims the release as for the local runner, then, instead of running the stages
itself, mints a per-release token and starts the model's pipeline through the CI system's API
(``modelcd.pipelines.providers``). The pipeline's jobs run ``modelcd build|deploy|smoke|
promote --release ID`` and, when something fails, ``modelcd rollback --release ID``: the same
stage functions, jobs and events as a local run (the release engine runs them for both).

This driver only watches: it retries a trigger that failed transiently until
``pipeline.start_timeout_s``; it asks the CI system for the run's status every
``pipeline.poll_interval_s`` when reports stop coming, and when the run finished without
finishing the release, or nothing was reported for ``pipeline.report_timeout_s``, it fails the
release and rolls back here (traffic as before, the release's deployment stopped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from modelcd.context import Context
from modelcd.domain import JobState
from modelcd.errors import ModelcdError
from modelcd.pipelines.providers import PipelineProvider, RunStatus, get_provider
from modelcd.releases.engine import fail_and_roll_back, is_busy
from modelcd.releases.machine import Phase
from modelcd.releases.policy import PipelineSpec
from modelcd.releases.service import Release

log = logging.getLogger(__name__)
_FINISHED_GRACE_S = 15.0  # a run that just finished may still have its last report in flight

ProviderFactory = Callable[[Context, Release], PipelineProvider]


class ExternalDriver:
    """Starts and watches the pipeline runs of external-runner releases (``tick`` from the
    runner's loop)."""

    def __init__(self, ctx: Context, provider_factory: ProviderFactory = get_provider) -> None:
        self.ctx = ctx
        self.provider_factory = provider_factory
        self._next_poll: dict[str, float] = {}
        self._finished_seen: dict[str, float] = {}

    def tick(self) -> None:
        for rel in self.ctx.releases.in_phases({p for p in Phase if p.active}):
            if not rel.external:
                continue
            try:
                self._watch(rel)
            except Exception:
                log.exception("external release %s", rel.id)
        self._close_finished()

    def _watch(self, rel: Release) -> None:
        spec = rel.policy.pipeline or PipelineSpec()
        run = self.ctx.pipeline_runs.get(rel.id)
        if run is None or run.state == "minted":
            self._trigger(rel, spec, run.attempts if run else 0, run.created_at if run else None)
            return
        # a stage in flight is a sign of life; checked before the last report is read, because
        # a stage command records its report before it stops counting as in flight
        # (a stage the runner does itself shows its life by its reports: log lines, heartbeats)
        busy = is_busy(rel.id) or any(job.state is JobState.RUNNING and job.runs_in != "runner"
                                      for job in self.ctx.jobs.list(release_id=rel.id))
        run = self.ctx.pipeline_runs.get(rel.id) or run
        silent_s = time.time() - _ts(run.last_report_at or run.triggered_at or run.created_at)
        if silent_s > spec.report_timeout_s and not busy:
            self._fail(rel, f"pipeline run {run.run_id or '?'} reported nothing for {silent_s:.0f}s "
                            f"(pipeline.report_timeout_s); production untouched")
            return
        if time.monotonic() < self._next_poll.get(rel.id, 0.0):
            return
        self._next_poll[rel.id] = time.monotonic() + spec.poll_interval_s
        run_id = run.run_id or self._locate(rel, run.triggered_at or run.created_at)
        if run_id is None:
            return
        status = self._status(rel, run_id)
        if status is None or not status.finished:
            self._finished_seen.pop(rel.id, None)
            return
        seen = self._finished_seen.setdefault(rel.id, time.monotonic())
        grace = min(_FINISHED_GRACE_S, 3 * spec.poll_interval_s)
        if time.monotonic() - seen < grace:
            self._next_poll[rel.id] = seen + grace
            return
        current = self.ctx.releases.get(rel.id)
        if current.phase.active:
            stages = f" [{status.describe()}]" if status.describe() else ""
            self._fail(current, f"pipeline run {run_id} finished ({status.conclusion}){stages} before the release "
                                f"did; {status.url or ''}".rstrip("; "))

    def _trigger(self, rel: Release, spec: PipelineSpec, attempts: int, created_at: str | None) -> None:
        if attempts and created_at:
            waited = time.time() - _ts(created_at)
            if waited > spec.start_timeout_s:
                self._fail(rel, f"the pipeline could not be started within {waited:.0f}s "
                                f"(pipeline.start_timeout_s); last error: {self.ctx.pipeline_runs.get(rel.id).error}")
                return
            if waited < min(60.0, 2.0 ** attempts):  # back off between attempts
                return
        try:
            provider = self.provider_factory(self.ctx, rel)
        except ModelcdError as e:  # a credential the policy names is missing: nothing to retry
            self._fail(rel, f"the pipeline could not be started: {e.message}")
            return
        token = self.ctx.pipeline_runs.mint(rel.id, provider.name)
        self.ctx.redact.add(token)
        callback = spec.callback_url or self.ctx.settings.url
        try:
            ref = provider.trigger(rel, token, callback)
        except ModelcdError as e:
            retryable = bool(getattr(e, "retryable", False))
            self.ctx.pipeline_runs.update(rel.id, attempts=attempts + 1, error=self.ctx.redact(e.message))
            self.ctx.jobs.event(None, rel.id, "pipeline.trigger_failed", e.message)
            if not retryable:
                self._fail(rel, f"the pipeline could not be started: {e.message}")
            return
        self.ctx.pipeline_runs.update(rel.id, state="triggered", run_id=ref.run_id, url=ref.url, attempts=attempts + 1,
                                      triggered_at=_now(), error=None)
        self.ctx.jobs.event(None, rel.id, "pipeline.triggered",
                            f"{provider.name} run {ref.run_id or '(id unknown yet)'} started {ref.url or ''}".strip())

    def _locate(self, rel: Release, since: str) -> str | None:
        """The id of a run the trigger did not name (repository_dispatch), once it shows up."""
        try:
            ref = self.provider_factory(self.ctx, rel).locate(rel, datetime.fromisoformat(since) - timedelta(seconds=5))
        except ModelcdError as e:
            self.ctx.jobs.event(None, rel.id, "pipeline.poll_failed", e.message)
            return None
        if ref is None or ref.run_id is None:
            return None
        self.ctx.pipeline_runs.update(rel.id, run_id=ref.run_id, url=ref.url)
        self.ctx.jobs.event(None, rel.id, "pipeline.found", f"run {ref.run_id} {ref.url or ''}".strip())
        return ref.run_id

    def _status(self, rel: Release, run_id: str) -> RunStatus | None:
        try:
            return self.provider_factory(self.ctx, rel).status(run_id)
        except ModelcdError as e:
            self.ctx.jobs.event(None, rel.id, "pipeline.poll_failed", e.message)
            return None

    def _fail(self, rel: Release, reason: str) -> None:
        """Fail the release here: roll back what it started, production as before."""
        fail_and_roll_back(self.ctx, rel.id, reason)

    def _close_finished(self) -> None:
        """Revoke the tokens of releases that finished (their pipeline has nothing left to do)."""
        for rel_id in self.ctx.pipeline_runs.unfinished():
            if self.ctx.releases.get(rel_id).phase.terminal:
                self.ctx.pipeline_runs.update(rel_id, state="finished")
                self._next_poll.pop(rel_id, None)
                self._finished_seen.pop(rel_id, None)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
