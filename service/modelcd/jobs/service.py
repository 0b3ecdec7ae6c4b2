"""Jobs: units of work with a lifecycle, timestamped events and a log.

Every state change is committed before it is reported. Log lines pass through the
redactor so a secret handed to a job never reaches the store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from modelcd.domain import JobState, JobType
from modelcd.errors import Cancelled, Conflict, ModelcdError, NotFound
from modelcd.store import schema
from modelcd.store.db import Database, new_id, now

# created → scheduled → running → succeeded | failed | cancelled
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELLED}),
    JobState.SCHEDULED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Redactor:
    """Replaces every registered secret by ``***`` in text bound for logs and events."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 6:
            with self._lock:
                self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text


@dataclass(frozen=True)
class Job:
    id: str
    type: JobType
    state: JobState
    release_id: str | None
    model: str | None
    version: int | None
    environment: str | None
    error: str | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    runs_in: str = "service"  # or "runner": a pipeline's runner does the work and reports it

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, JobType | JobState) else v) for k, v in self.__dict__.items()}


def _job(row: Any) -> Job:
    m = row._mapping
    return Job(
        id=m["id"], type=JobType(m["type"]), state=JobState(m["state"]), release_id=m["release_id"],
        model=m["model"], version=m["version"], environment=m["environment"], error=m["error"],
        cancel_requested=bool(m["cancel_requested"]), created_at=m["created_at"],
        started_at=m["started_at"], finished_at=m["finished_at"], runs_in=m["runs_in"] or "service",
    )


class Jobs:
    """Create jobs, move them through their lifecycle, record their events and logs."""

    def __init__(self, db: Database, redact: Redactor | None = None) -> None:
        self.db = db
        self.redact = redact or Redactor()
        self._cancel_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._logged = threading.Condition()  # notified when this process writes a log line

    def create(self, type_: JobType, *, release_id: str | None = None, model: str | None = None,
               version: int | None = None, environment: str | None = None, runs_in: str | None = None,
               actor: str | None = None) -> Job:
        """A new job (``actor``: the user who asked for it; None: the engine)."""
        job_id = new_id("j")
        ts = now()
        with self.db.write() as conn:
            conn.execute(schema.jobs.insert().values(
                id=job_id, release_id=release_id, type=str(type_), state=str(JobState.CREATED),
                model=model, version=version, environment=environment, cancel_requested=False,
                runs_in=runs_in, created_at=ts))
            conn.execute(schema.events.insert().values(
                release_id=release_id, job_id=job_id, ts=ts, kind="job.created",
                message=f"{type_} job created" + (" (runs in the pipeline's runner)" if runs_in == "runner" else ""),
                actor=actor))
        return self.get(job_id)

    def transition(self, job_id: str, state: JobState, message: str = "", error: str | None = None) -> Job:
        """Move a job to ``state``; refuse an illegal move; write an event."""
        ts = now()
        with self.db.write() as conn:
            row = conn.execute(select(schema.jobs).where(schema.jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id} not found", field="job_id")
            current = JobState(row._mapping["state"])
            if state not in JOB_TRANSITIONS[current]:
                raise Conflict(f"job {job_id} cannot go from {current} to {state}")
            values: dict[str, Any] = {"state": str(state)}
            if state is JobState.RUNNING:
                values["started_at"] = ts
            if state.terminal:
                values["finished_at"] = ts
            if error is not None:
                values["error"] = self.redact(error)
            conn.execute(update(schema.jobs).where(schema.jobs.c.id == job_id).values(**values))
            conn.execute(schema.events.insert().values(
                release_id=row._mapping["release_id"], job_id=job_id, ts=ts, kind=f"job.{state}",
                message=self.redact(message or error or "")))
        return self.get(job_id)

    def log(self, job_id: str, line: str) -> None:
        with self.db.write() as conn:
            conn.execute(schema.job_logs.insert().values(job_id=job_id, ts=now(), line=self.redact(line)))
        with self._logged:
            self._logged.notify_all()

    def wait_for_log(self, timeout_s: float) -> None:
        """Wait until this process logs a line, or ``timeout_s`` (what a follower of the logs
        sleeps on between reads: lines written here wake it at once, others are read on time)."""
        with self._logged:
            self._logged.wait(timeout_s)

    def logger(self, job_id: str) -> Callable[[str], None]:
        """A ``log(line)`` callable bound to one job, splitting multi-line text."""

        def log(text: str) -> None:
            for line in str(text).splitlines() or [""]:
                self.log(job_id, line.rstrip())

        return log

    def event(self, job_id: str | None, release_id: str | None, kind: str, message: str,
              actor: str | None = None) -> None:
        """Record an event; ``actor``: the user who caused it (None: the engine itself)."""
        with self.db.write() as conn:
            conn.execute(schema.events.insert().values(
                release_id=release_id, job_id=job_id, ts=now(), kind=kind, message=self.redact(message), actor=actor))

    def get(self, job_id: str) -> Job:
        with self.db.read() as conn:
            row = conn.execute(select(schema.jobs).where(schema.jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} not found; list jobs with `modelcd jobs list`", field="job_id")
        return _job(row)

    def list(self, *, release_id: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        q = select(schema.jobs).order_by(schema.jobs.c.created_at.desc()).limit(limit)
        if release_id:
            q = q.where(schema.jobs.c.release_id == release_id)
        if state:
            q = q.where(schema.jobs.c.state == state)
        with self.db.read() as conn:
            return [_job(r) for r in conn.execute(q)]

    def events(self, *, job_id: str | None = None, release_id: str | None = None) -> list[dict[str, Any]]:
        q = select(schema.events).order_by(schema.events.c.id)
        if job_id:
            q = q.where(schema.events.c.job_id == job_id)
        if release_id:
            q = q.where(schema.events.c.release_id == release_id)
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def logs(self, job_id: str, after: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        q = (select(schema.job_logs).where(schema.job_logs.c.job_id == job_id, schema.job_logs.c.id > after)
             .order_by(schema.job_logs.c.id).limit(limit))
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def end_interrupted(self, type_: JobType, error: str, echo: Callable[[str], None] | None = None, *,
                        of_releases: bool = True) -> list[str]:
        """At start: the open jobs of ``type_`` a dead process left end with ``error`` (failed
        when running, else cancelled); only those of no release when ``of_releases`` is False.
        Each is told to ``echo``; returns their ids."""
        open_states = [str(JobState.CREATED), str(JobState.SCHEDULED), str(JobState.RUNNING)]
        q = select(schema.jobs.c.id, schema.jobs.c.state).where(schema.jobs.c.type == str(type_),
                                                                schema.jobs.c.state.in_(open_states))
        if not of_releases:
            q = q.where(schema.jobs.c.release_id.is_(None))
        with self.db.read() as conn:
            rows = conn.execute(q).all()
        for job_id, state in rows:
            self.transition(job_id, JobState.FAILED if state == str(JobState.RUNNING) else JobState.CANCELLED,
                            error=error)
            if echo is not None:
                echo(f"{type_} job {job_id}: {error}")
        return [job_id for job_id, _ in rows]

    # cancellation: an in-process Event for speed, a column for other processes and restarts
    def run_to_end(self, job_id: str, running: str, body: Callable[[Job, Callable[[str], None], threading.Event], str],
                   what: str) -> bool:
        """Run a scheduled job of this process to its end: cancelled when Stop came first; else
        running (``running`` as the message), ``body(job, log, cancel)`` and succeeded with the
        message it returns; cancelled on ``Cancelled``; failed on a ModelcdError (its message,
        and its field when the message does not name it) or any other error ("``what`` failed:
        ..."), the cause written to the job's log too. True when it succeeded."""
        job = self.get(job_id)
        cancel = self.cancel_event(job_id)
        write = self.logger(job_id)
        try:
            if cancel.is_set() or job.cancel_requested:
                self.transition(job_id, JobState.CANCELLED, "stopped before it ran")
                return False
            self.transition(job_id, JobState.RUNNING, running)
            self.transition(job_id, JobState.SUCCEEDED, body(job, write, cancel))
            return True
        except Cancelled as e:
            write(f"stopped: {e.message}")
            self.transition(job_id, JobState.CANCELLED, e.message)
        except ModelcdError as e:
            message = e.message + (f" [{e.field}]" if e.field and f"{e.field}:" not in e.message else "")
            write(message)
            self.transition(job_id, JobState.FAILED, error=message)
        except Exception as e:
            message = f"{what} failed: {type(e).__name__}: {e}"
            write(message)
            self.transition(job_id, JobState.FAILED, error=message)
        finally:
            self.forget_cancel([job_id])
        return False

    def cancel_event(self, key: str) -> threading.Event:
        with self._lock:
            return self._cancel_events.setdefault(key, threading.Event())

    def forget_cancel(self, keys: Iterable[str]) -> None:
        with self._lock:
            for k in keys:
                self._cancel_events.pop(k, None)

    def request_cancel(self, job_id: str, by: str | None = None) -> Job:
        job = self.get(job_id)
        if job.state.terminal:
            raise Conflict(f"job {job_id} already {job.state}; nothing to stop")
        with self.db.write() as conn:
            conn.execute(update(schema.jobs).where(schema.jobs.c.id == job_id).values(cancel_requested=True))
        self.event(job_id, job.release_id, "job.stop_requested", f"stop requested by {by}" if by else "stop requested",
                   actor=by)
        self.cancel_event(job.release_id or job_id).set()
        return self.get(job_id)
