"""The batch scheduler: durable (schedules and each deployment's cursor live in the store),
ticked by its own thread in ``modelcd serve``, which sleeps until the next occurrence (at
most ``POLL_S``) or until woken (a deployment created, resumed or run by hand).

A tick, for each deployment that is not paused:

- ``@once``: the occurrence ``once`` is claimed (a unique row: it runs once, ever);
- a cron spec: the latest occurrence at or before now, when it is after the cursor, is claimed
  and becomes the cursor — so after downtime the missed occurrences run **once** (the latest
  stands for them all), not once per missed slot; with ``catch_up: skip`` an occurrence more
  than ``SKIP_AFTER_S`` late is passed over instead. While a run of the deployment is in
  progress the occurrence waits (it runs once, late, after that run).

Claims happen in one write transaction each (``BatchDeployments.claim``): the cursor read
again, the (deployment, occurrence) row inserted, the job created — two schedulers on one
store, or a restart between two ticks, never run an occurrence twice. Then the tick starts
scheduled ``batch_prediction`` jobs (these claims and manual runs) on worker threads, at most
``MAX_RUNNING`` at once; taking a job to ``running`` is itself checked in the store, so one
process runs it. The clock (unix seconds) is injectable for tests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from modelcd.batch.deployments import BatchDeployment, BatchDeployments
from modelcd.batch.schedules import iso
from modelcd.domain import JobState, JobType
from modelcd.errors import Cancelled, Conflict, ModelcdError, NotFound
from modelcd.store import schema

if TYPE_CHECKING:
    from modelcd.context import Context

log = logging.getLogger(__name__)

POLL_S = 0.5  # longest sleep between ticks (an occurrence is also waited for exactly)
SKIP_AFTER_S = 10.0  # catch_up skip: an occurrence that could not start within this is passed over
MAX_RUNNING = 2  # batch runs at once in one process; more wait as scheduled
Scorer = Callable[..., Any]  # batch.scoring.score_dataset's signature
_wake = threading.Event()  # set by the API when a deployment is created, resumed or run


def wake() -> None:
    _wake.set()


def _default_scorer() -> Scorer:
    from modelcd.batch.scoring import score_dataset

    return score_dataset


class BatchScheduler:
    def __init__(self, ctx: Context, *, clock: Callable[[], float] = time.time, scorer: Scorer | None = None,
                 max_running: int = MAX_RUNNING, wake_event: threading.Event | None = None) -> None:
        self.ctx = ctx
        self.clock = clock
        self.scorer = scorer
        self.store = BatchDeployments(ctx, clock=clock)
        self.max_running = max_running
        self.wake = wake_event or _wake
        self.pool = ThreadPoolExecutor(max_running, thread_name_prefix="batch")
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: list[tuple[str, str, float]] = []  # (deployment, occurrence, clock at claim): benches read it

    # the thread
    def start(self) -> BatchScheduler:
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = False) -> None:
        self._stop.set()
        self.wake.set()
        if wait and self._thread is not None:
            self._thread.join(10)
        self.pool.shutdown(wait=wait, cancel_futures=False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            delay = POLL_S
            try:
                self.tick()
                delay = self.seconds_to_next(POLL_S)
            except Exception:
                log.exception("batch scheduler tick")
            self.wake.wait(delay)
            self.wake.clear()

    def seconds_to_next(self, cap: float) -> float:
        """How long to sleep: until the soonest occurrence of an active deployment, at most ``cap``."""
        now = self.clock()
        soonest = now + cap
        for d in self.store.list():
            if not d.paused and d.plan.kind == "cron":
                soonest = min(soonest, d.plan.next_after(d.cursor))
        return max(0.0, min(cap, soonest - now))

    # one tick
    def tick(self) -> list[str]:
        """Claim what is due, then start scheduled runs; returns the job ids claimed."""
        claimed = []
        for d in self.store.list():
            job_id = self._due(d)
            if job_id:
                claimed.append(job_id)
        self.start_scheduled()
        return claimed

    def _due(self, d: BatchDeployment) -> str | None:
        if d.paused:
            return None
        kind = d.plan.kind
        if kind == "manual":
            return None
        if kind == "once":
            if self.store.once_done(d.name):
                return None
            return self._claim(d.name, "once", "once", None, lambda row, conn: not row.paused)
        now = self.clock()
        latest = d.plan.latest_at_or_before(now)
        if latest <= d.cursor:
            return None
        if d.catch_up == "skip" and now - latest > SKIP_AFTER_S:
            self.store.advance(d.name, latest)
            log.info("batch %s: occurrence %s skipped (%.0f s late; catch_up skip)", d.name, iso(latest), now - latest)
            return None

        def still_due(row: BatchDeployment, _conn: Any) -> bool:
            return not row.paused and row.cursor < latest and row.schedule == d.schedule

        return self._claim(d.name, iso(latest), "schedule", latest, still_due)

    def _claim(self, name: str, occurrence: str, trigger: str, cursor: float | None,
               check: Callable[[BatchDeployment, Any], bool]) -> str | None:
        job_id = self.store.claim(name, occurrence, trigger, cursor=cursor, check=check)
        if job_id:
            self.fired.append((name, occurrence, self.clock()))
            log.info("batch %s: %s %s → job %s", name, trigger, occurrence, job_id)
        return job_id

    def start_scheduled(self) -> list[str]:
        """Start scheduled batch runs (oldest first) while fewer than ``max_running`` run here."""
        with self.ctx.db.read() as conn:
            waiting = conn.execute(select(schema.jobs.c.id, schema.jobs.c.cancel_requested).where(
                schema.jobs.c.type == str(JobType.BATCH_PREDICTION),
                schema.jobs.c.state == str(JobState.SCHEDULED)).order_by(schema.jobs.c.created_at)).all()
        started = []
        for job_id, cancel_requested in waiting:
            if cancel_requested:
                try:
                    self.ctx.jobs.transition(job_id, JobState.CANCELLED, "stopped before it ran")
                except Conflict:
                    pass
                continue
            with self._lock:
                if len(self._running) >= self.max_running or job_id in self._running:
                    continue
                try:
                    self.ctx.jobs.transition(job_id, JobState.RUNNING, "started")
                except (Conflict, NotFound):
                    continue  # another process took it, or it was stopped meanwhile
                self._running.add(job_id)
            try:
                self.pool.submit(self._run, job_id)
            except RuntimeError:  # shutting down: the job is failed as interrupted at the next start
                with self._lock:
                    self._running.discard(job_id)
                break
            started.append(job_id)
        return started

    def _run(self, job_id: str) -> None:
        try:
            run_batch_job(self.ctx, job_id, self.scorer or _default_scorer())
        except Exception:
            log.exception("batch job %s", job_id)
        finally:
            with self._lock:
                self._running.discard(job_id)
            self.wake.set()  # a waiting occurrence or run may start now

    def running(self) -> set[str]:
        with self._lock:
            return set(self._running)


def serving_version(ctx: Context, model: str, environment: str) -> int:
    """The version that serves the endpoint now: the one with the largest weight (NotFound
    naming the environment when nothing serves there)."""
    versions = ctx.traffic.get(model, environment).versions
    live = {v: w for v, w in versions.items() if w > 0}
    if not live:
        raise NotFound(f"no version of {model} serves {environment} now; promote one there, or give the batch "
                       "deployment a fixed --version", field="environment")
    return max(live.items(), key=lambda vw: (vw[1], vw[0]))[0]


def run_batch_job(ctx: Context, job_id: str, scorer: Scorer) -> bool:
    """Run one batch job (already ``running``): resolve the version, score, log the figures;
    the job ends succeeded, failed (the cause in its error and log) or cancelled (Stop).
    True when it succeeded."""
    write = ctx.jobs.logger(job_id)
    cancel = ctx.jobs.cancel_event(job_id)
    name = BatchDeployments(ctx).deployment_of(job_id)
    try:
        if name is None:
            raise NotFound(f"job {job_id} belongs to no batch deployment (deleted?)", field="name")
        d = BatchDeployments(ctx).get(name)
        if ctx.jobs.get(job_id).cancel_requested:
            cancel.set()
        version = d.version if d.version is not None else serving_version(ctx, d.model, d.environment or "")
        with ctx.db.write() as conn:
            conn.execute(update(schema.jobs).where(schema.jobs.c.id == job_id).values(version=version))
        source = f" (serving {d.environment})" if d.environment else ""
        write(f"batch {name}: {d.model} v{version}{source}, input {d.input_uri} → output {d.output_uri}"
              + (f", format {d.format}" if d.format else "") + (f", keys {', '.join(d.keys)}" if d.keys else ""))
        if cancel.is_set():
            raise Cancelled("stopped before it ran")
        result = scorer(ctx, model=d.model, version=version, input_uri=d.input_uri, output_uri=d.output_uri,
                        fmt=d.format, keys=list(d.keys), max_errors=d.max_errors, log=write, cancel=cancel)
        seconds = float(result.seconds)
        rate = result.rows_scored / seconds if seconds > 0 else float(result.rows_scored)
        write(f"rows read {result.rows_read}, rows scored {result.rows_scored}, rows/s {rate:.0f}, "
              f"errors {result.errors}, seconds {seconds:.2f}")
        for line in list(result.first_errors)[:20]:
            write(f"  error: {line}")
        write(f"output {result.output}")
        ctx.jobs.transition(job_id, JobState.SUCCEEDED,
                            f"{result.rows_scored} of {result.rows_read} rows scored ({result.errors} errors) "
                            f"by {d.model} v{version} into {result.output}")
        return True
    except Cancelled as e:
        write(f"stopped: {e.message}; no output written")
        _end(ctx, job_id, JobState.CANCELLED, message=f"stopped by a person: {e.message}")
    except ModelcdError as e:
        where = f" [{e.field}]" if e.field else ""
        write(f"failed: {e.message}{where}")
        _end(ctx, job_id, JobState.FAILED, error=f"{e.message}{where}")
    except Exception as e:
        message = f"batch run failed: {type(e).__name__}: {e}"
        write(message)
        _end(ctx, job_id, JobState.FAILED, error=message)
    finally:
        ctx.jobs.forget_cancel([job_id])
    return False


def _end(ctx: Context, job_id: str, state: JobState, message: str = "", error: str | None = None) -> None:
    try:
        ctx.jobs.transition(job_id, state, message, error=error)
    except Conflict:
        log.warning("batch job %s already ended", job_id)


def fail_interrupted(ctx: Context, echo: Callable[[str], None] | None = None) -> list[str]:
    """At start: batch runs a dead process left ``running`` fail (their output was never
    committed); scheduled ones stay scheduled and run now. Returns the failed ids."""
    with ctx.db.read() as conn:
        ids = conn.execute(select(schema.jobs.c.id).where(
            schema.jobs.c.type == str(JobType.BATCH_PREDICTION),
            schema.jobs.c.state == str(JobState.RUNNING))).scalars().all()
    for job_id in ids:
        _end(ctx, job_id, JobState.FAILED, error="interrupted by a restart of the service; run it again with "
                                                 "`modelcd batch run NAME`")
        if echo is not None:
            echo(f"batch job {job_id}: interrupted by a restart")
    return list(ids)
