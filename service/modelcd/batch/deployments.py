"""Batch deployments: a model (a fixed version, or whatever version serves an environment at
run time) scoring an input dataset into an output, on a schedule (``batch.schedules``) or when
asked. Kept in the store (``batch_deployments``); each run is a ``batch_prediction`` job with
a ``batch_runs`` row whose (deployment, occurrence) is unique, inserted in the transaction
that creates the job: an occurrence runs once, whatever restarts or other schedulers do.

A deployment runs one run at a time: a manual run is refused (409 naming the run) while one
is in progress, a scheduled occurrence waits for it (then runs late, once). Delete is refused
while a run is in progress (stop it first: ``modelcd jobs stop JOB``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from modelcd.batch.schedules import Schedule, iso, parse_schedule
from modelcd.domain import JobState, JobType
from modelcd.errors import Conflict, InvalidInput, NotFound
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.store import schema
from modelcd.store.db import new_id, now

if TYPE_CHECKING:
    from modelcd.context import Context

FORMATS = ("csv", "parquet", "jsonl")
CATCH_UP = ("once", "skip")
URI_MAX = 1024
MAX_KEYS = 32
OPEN_STATES = (str(JobState.CREATED), str(JobState.SCHEDULED), str(JobState.RUNNING))


@dataclass(frozen=True)
class BatchDeployment:
    name: str
    model: str
    version: int | None
    environment: str | None
    input_uri: str
    output_uri: str
    format: str | None
    keys: tuple[str, ...]
    max_errors: int | None
    schedule: str
    zone: str
    catch_up: str
    paused: bool
    cursor: float
    created_at: str
    updated_at: str

    @property
    def plan(self) -> Schedule:
        return Schedule(self.schedule, self.zone)

    def next_run_at(self, once_done: bool = False) -> str | None:
        """When the next scheduled run is due (ISO UTC); None when paused or manual."""
        kind = self.plan.kind
        if self.paused or kind == "manual" or (kind == "once" and once_done):
            return None
        if kind == "once":
            return self.created_at
        return iso(self.plan.next_after(self.cursor))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "cursor"}
        d["keys"] = list(self.keys)
        d["input"] = d.pop("input_uri")
        d["output"] = d.pop("output_uri")
        return d


def _deployment(row: Any) -> BatchDeployment:
    m = row._mapping
    return BatchDeployment(
        name=m["name"], model=m["model"], version=m["version"], environment=m["environment"],
        input_uri=m["input_uri"], output_uri=m["output_uri"], format=m["format"], keys=tuple(m["keys"] or ()),
        max_errors=m["max_errors"], schedule=m["schedule"], zone=m["zone"], catch_up=m["catch_up"],
        paused=bool(m["paused"]), cursor=float(m["cursor"]), created_at=m["created_at"],
        updated_at=m["updated_at"])


def _text(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} is missing: give {what}", field=field)
    text = value.strip()
    if len(text) > URI_MAX or any(ord(c) < 32 for c in text):
        raise InvalidInput(f"{field} must be at most {URI_MAX} printable characters: give {what}", field=field)
    return text


def validate_spec(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """The row values of a new batch deployment from a request body; InvalidInput or NotFound
    naming the field and the fix."""
    name = validate_model_name(body.get("name") if isinstance(body.get("name"), str) else "", field="name")
    model = validate_model_name(body.get("model") if isinstance(body.get("model"), str) else "", field="model")
    try:
        ctx.registry.get_model(model)
    except NotFound as e:
        raise NotFound(e.message, field="model") from None
    version, environment = body.get("version"), body.get("environment")
    if (version is None) == (environment is None):
        raise InvalidInput("give exactly one of version (a fixed version: --version N) or environment (the version "
                           "that serves it at run time: --env ENV)", field="version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidInput(f"version must be a whole number from 1 (got {str(version)[:40]!r})", field="version")
        ctx.registry.get_version(model, version)  # NotFound naming the version
    else:
        if not isinstance(environment, str):
            raise InvalidInput("environment must be a name such as production", field="environment")
        environment = validate_environment_name(environment, field="environment")
        with ctx.db.read() as conn:
            known = conn.execute(select(schema.endpoints.c.environment).where(
                schema.endpoints.c.model == model)).scalars().all()
        if environment not in known:
            where = ", ".join(sorted(known)) or "none yet"
            raise NotFound(f"model {model!r} has no endpoint in environment {environment!r} (it has: {where}); "
                           "promote a version there first, or pass --version N", field="environment")
    fmt = body.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)} (got {str(fmt)[:40]!r}); or leave it out to "
                           "take it from the input's suffix", field="format")
    keys = body.get("keys") or []
    if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(
            isinstance(k, str) and k.strip() and len(k) <= 256 for k in keys):
        raise InvalidInput(f"keys must be a list of at most {MAX_KEYS} column names (--key COLUMN, repeatable)",
                           field="keys")
    max_errors = body.get("max_errors")
    if max_errors is not None and (isinstance(max_errors, bool) or not isinstance(max_errors, int)
                                   or not 0 <= max_errors <= 2**31):
        raise InvalidInput(f"max_errors must be a whole number from 0 (got {str(max_errors)[:40]!r})",
                           field="max_errors")
    catch_up = body.get("catch_up") or "once"
    if catch_up not in CATCH_UP:
        raise InvalidInput(f"catch_up must be once (a missed occurrence runs once after downtime) or skip (got "
                           f"{str(catch_up)[:40]!r})", field="catch_up")
    schedule_value = body.get("schedule")
    zone_value = body.get("zone")
    if schedule_value is not None and not isinstance(schedule_value, str):
        raise InvalidInput("schedule must be text such as '0 * * * *' or @daily", field="schedule")
    if zone_value is not None and not isinstance(zone_value, str):
        raise InvalidInput("zone must be an IANA time zone such as Europe/Paris", field="zone")
    plan = parse_schedule(schedule_value, zone_value)
    return {"name": name, "model": model, "version": version, "environment": environment,
            "input_uri": _text(body.get("input"), "input", "the dataset to score: a file, folder or URI"),
            "output_uri": _text(body.get("output"), "output", "where the predictions go: a file, folder or URI"),
            "format": fmt, "keys": [k.strip() for k in keys], "max_errors": max_errors,
            "schedule": plan.spec, "zone": plan.zone, "catch_up": catch_up}


class BatchDeployments:
    """Batch deployments and their runs in the store. ``clock`` gives unix time (injectable)."""

    def __init__(self, ctx: Context, clock: Any = time.time) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.clock = clock

    def create(self, body: dict[str, Any]) -> BatchDeployment:
        values = validate_spec(self.ctx, body)
        ts = now()
        try:
            with self.db.write() as conn:
                if conn.execute(select(schema.batch_deployments.c.name).where(
                        schema.batch_deployments.c.name == values["name"])).first() is not None:
                    raise Conflict(f"batch deployment {values['name']!r} already exists; choose another name or "
                                   f"delete it first (`modelcd batch delete {values['name']}`)", field="name")
                conn.execute(schema.batch_deployments.insert().values(
                    **values, paused=False, cursor=self.clock(), created_at=ts, updated_at=ts))
        except IntegrityError:
            raise Conflict(f"batch deployment {values['name']!r} already exists", field="name") from None
        return self.get(values["name"])

    def get(self, name: str, conn: Connection | None = None) -> BatchDeployment:
        q = select(schema.batch_deployments).where(schema.batch_deployments.c.name == name)
        if conn is None:
            with self.db.read() as c:
                row = c.execute(q).first()
        else:
            row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"batch deployment {name!r} not found; list them with `modelcd batch list`", field="name")
        return _deployment(row)

    def list(self) -> list[BatchDeployment]:
        with self.db.read() as conn:
            return [_deployment(r) for r in conn.execute(
                select(schema.batch_deployments).order_by(schema.batch_deployments.c.name))]

    def runs(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The deployment's newest runs with their jobs' state, newest first."""
        r, j = schema.batch_runs, schema.jobs
        q = (select(r.c.job_id, r.c.occurrence, r.c.trigger, r.c.created_at, j.c.state, j.c.version, j.c.error,
                    j.c.started_at, j.c.finished_at)
             .join(j, j.c.id == r.c.job_id).where(r.c.deployment == name)
             .order_by(r.c.created_at.desc()).limit(limit))
        with self.db.read() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def once_done(self, name: str, conn: Connection | None = None) -> bool:
        q = select(schema.batch_runs.c.job_id).where(schema.batch_runs.c.deployment == name,
                                                     schema.batch_runs.c.occurrence == "once")
        if conn is not None:
            return conn.execute(q).first() is not None
        with self.db.read() as c:
            return c.execute(q).first() is not None

    def show(self, name: str) -> dict[str, Any]:
        d = self.get(name)
        return {**d.to_dict(), "next_run_at": d.next_run_at(self.once_done(name)), "runs": self.runs(name)}

    @staticmethod
    def in_progress(conn: Connection, name: str) -> str | None:
        """The job id of the deployment's run in progress (created, scheduled or running), if any."""
        r, j = schema.batch_runs, schema.jobs
        return conn.execute(select(r.c.job_id).join(j, j.c.id == r.c.job_id).where(
            r.c.deployment == name, j.c.state.in_(OPEN_STATES))).scalar()

    def set_paused(self, name: str, paused: bool) -> BatchDeployment:
        """Pause or resume. Resuming starts from now: what fell due while paused does not run."""
        with self.db.write() as conn:
            d = self.get(name, conn)
            values: dict[str, Any] = {"paused": paused, "updated_at": now()}
            if d.paused and not paused:
                values["cursor"] = max(d.cursor, self.clock())
            conn.execute(update(schema.batch_deployments).where(schema.batch_deployments.c.name == name)
                         .values(**values))
        return self.get(name)

    def delete(self, name: str) -> None:
        """Delete the deployment and its run rows (the jobs stay); 409 naming the run while
        one is in progress."""
        with self.db.write() as conn:
            self.get(name, conn)
            running = self.in_progress(conn, name)
            if running:
                raise Conflict(f"batch deployment {name!r} has a run in progress (job {running}); stop it first with "
                               f"`modelcd jobs stop {running}`, then delete", field="name")
            conn.execute(delete(schema.batch_runs).where(schema.batch_runs.c.deployment == name))
            conn.execute(delete(schema.batch_deployments).where(schema.batch_deployments.c.name == name))

    def claim(self, name: str, occurrence: str, trigger: str, *, cursor: float | None = None,
              check: Any = None, job_id: str | None = None, by: str | None = None) -> str | None:
        """In one write transaction: the deployment still wants this run (``check(deployment,
        conn)``, when given), no run of it is in progress, then the run row (unique on
        deployment + occurrence), its job (scheduled) and the deployment's new ``cursor``.
        Returns the job id, or None when the occurrence is not (or no longer) to run. ``by``: the
        user who asked for a manual run."""
        job_id = job_id or new_id("j")
        ts = now()
        try:
            with self.db.write() as conn:
                d = self.get(name, conn)
                if check is not None and not check(d, conn):
                    return None
                running = self.in_progress(conn, name)
                if running:
                    if trigger == "manual":
                        raise Conflict(f"batch deployment {name!r} already has a run in progress (job {running}); "
                                       f"wait for it or stop it with `modelcd jobs stop {running}`", field="name")
                    return None
                conn.execute(schema.batch_runs.insert().values(
                    job_id=job_id, deployment=name, occurrence=occurrence, trigger=trigger, created_at=ts))
                conn.execute(schema.jobs.insert().values(
                    id=job_id, release_id=None, type=str(JobType.BATCH_PREDICTION), state=str(JobState.SCHEDULED),
                    model=d.model, version=d.version, environment=d.environment, cancel_requested=False,
                    runs_in=None, created_at=ts))
                what = "manual run" if trigger == "manual" else f"{trigger} occurrence {occurrence}"
                conn.execute(schema.events.insert().values(
                    release_id=None, job_id=job_id, ts=ts, kind="job.created",
                    message=f"batch_prediction job created: {name} ({what})", actor=by))
                conn.execute(schema.events.insert().values(
                    release_id=None, job_id=job_id, ts=ts, kind="job.scheduled",
                    message=f"{what} of batch deployment {name}"))
                if cursor is not None:
                    conn.execute(update(schema.batch_deployments).where(schema.batch_deployments.c.name == name)
                                 .values(cursor=cursor))
        except IntegrityError:  # another scheduler claimed the same occurrence first
            return None
        return job_id

    def advance(self, name: str, cursor: float) -> None:
        """Move the cursor without a run (catch_up skip)."""
        with self.db.write() as conn:
            conn.execute(update(schema.batch_deployments).where(
                schema.batch_deployments.c.name == name, schema.batch_deployments.c.cursor < cursor)
                .values(cursor=cursor))

    def run_now(self, name: str, by: str | None = None) -> str:
        """A manual run (``by``: who asked): the job (scheduled) that the scheduler starts."""
        job_id = new_id("j")
        claimed = self.claim(name, f"manual:{job_id}", "manual", job_id=job_id, by=by)
        assert claimed is not None
        return claimed

    def deployment_of(self, job_id: str) -> str | None:
        with self.db.read() as conn:
            return conn.execute(select(schema.batch_runs.c.deployment).where(
                schema.batch_runs.c.job_id == job_id)).scalar()
