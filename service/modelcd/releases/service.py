"""Release records: create (superseding older queued ones), read, advance phase by phase."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import select, update

from modelcd.errors import Conflict, InvalidInput, NotFound
from modelcd.jobs.service import Jobs
from modelcd.releases.machine import Phase, check_transition
from modelcd.releases.observers import RELEASE_PHASE, ReleaseMoved
from modelcd.releases.policy import Environment, Policy, Runner, Strategy
from modelcd.store import schema
from modelcd.store.db import Database, new_id, now


@dataclass(frozen=True)
class Release:
    """One attempt to take one model version to one environment under one policy revision."""

    id: str
    model: str
    version: int
    environment: str
    policy_name: str
    policy: Policy  # the validated snapshot of the policy revision it runs under
    env_index: int
    trigger: str
    phase: Phase
    cancel_requested: bool
    error: str | None
    deployment_id: str | None
    bundle: str | None
    image: str | None  # built in the pipeline's runner: the reference it pushed (releases.runner_stages)
    image_digest: str | None  # …and the image's digest, which the deploy report must name
    analysis: list[dict[str, Any]] | None  # verdicts on what the candidate predicted, per step (releases.judging)
    previous_traffic: dict[str, int] | None  # the endpoint's split when this release first moved traffic
    endpoint_previous: dict[str, int] | None  # the endpoint's previous_traffic then (restored on rollback)
    created_at: str
    updated_at: str
    finished_at: str | None

    @property
    def runner(self) -> Runner:
        """Who runs the stages: ``local`` (this service) or a pipeline (``github``, ``azure``)."""
        return self.policy.runner

    @property
    def external(self) -> bool:
        """Its stages run in a pipeline; the service starts and watches it (``releases.external``)."""
        return self.runner is not Runner.LOCAL

    @property
    def environment_policy(self) -> Environment:
        """The policy's step for this release's environment: target, strategy, gates…"""
        return self.policy.environments[self.env_index]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["phase"] = str(self.phase)
        d["policy"] = self.policy.to_dict()
        return d


@lru_cache(maxsize=256)
def _policy(text: str) -> Policy:
    """Snapshots are validated once per process, not on every read of a release."""
    return Policy.from_dict(json.loads(text))


def _release(row: Any) -> Release:
    m = dict(row._mapping)
    m["phase"] = Phase(m["phase"])
    m["cancel_requested"] = bool(m["cancel_requested"])
    m["policy"] = _policy(json.dumps(m["policy"], sort_keys=True))
    return Release(**m)


def _moved(conn: Any, release_id: str, ts: str) -> None:
    """The outbox event of the phase the release just entered, in the caller's transaction
    (``releases.observers``: registry write-back, GitHub deployments)."""
    rel = _release(conn.execute(select(schema.releases).where(schema.releases.c.id == release_id)).one())
    moved = ReleaseMoved(release_id=rel.id, model=rel.model, version=rel.version, environment=rel.environment,
                         phase=str(rel.phase), trigger=rel.trigger, runner=str(rel.runner),
                         deployment_id=rel.deployment_id, error=rel.error)
    conn.execute(schema.outbox.insert().values(kind=RELEASE_PHASE, payload=moved.to_payload(), created_at=ts))


class Releases:
    """Persisted release state machines."""

    def __init__(self, db: Database, jobs: Jobs) -> None:
        self.db = db
        self.jobs = jobs

    def create_in(self, conn: Any, *, model: str, version: int, environment: str, policy: Policy, env_index: int,
                  trigger: str, by: str | None = None) -> str:
        """Insert a queued release inside the caller's transaction (``by``: the user who asked,
        None for the engine). Older queued releases of the same endpoint are superseded: only
        the newest waiting version matters."""
        rid = new_id("r")
        ts = now()
        older = conn.execute(select(schema.releases.c.id).where(
            schema.releases.c.model == model, schema.releases.c.environment == environment,
            schema.releases.c.phase == str(Phase.QUEUED))).all()
        for (old_id,) in older:
            conn.execute(update(schema.releases).where(schema.releases.c.id == old_id).values(
                phase=str(Phase.SUPERSEDED), updated_at=ts, finished_at=ts,
                error=f"superseded by {model} v{version} ({rid})"))
            conn.execute(schema.events.insert().values(
                release_id=old_id, ts=ts, kind="release.superseded", message=f"superseded by release {rid}", actor=by))
        conn.execute(schema.releases.insert().values(
            id=rid, model=model, version=version, environment=environment, policy_name=policy.name,
            policy=policy.to_dict(), env_index=env_index, trigger=trigger, phase=str(Phase.QUEUED),
            cancel_requested=False, created_at=ts, updated_at=ts))
        conn.execute(schema.events.insert().values(
            release_id=rid, ts=ts, kind="release.queued",
            message=f"{model} v{version} → {environment} ({trigger}, policy {policy.name})", actor=by))
        return rid

    def get(self, release_id: str) -> Release:
        with self.db.read() as conn:
            row = conn.execute(select(schema.releases).where(schema.releases.c.id == release_id)).first()
        if row is None:
            raise NotFound(f"release {release_id} not found; list them with `modelcd releases list`",
                           field="release_id")
        return _release(row)

    def list(self, *, model: str | None = None, environment: str | None = None, phase: str | None = None,
             limit: int = 100) -> list[Release]:
        q = select(schema.releases).order_by(schema.releases.c.created_at.desc()).limit(limit)
        if model:
            q = q.where(schema.releases.c.model == model)
        if environment:
            q = q.where(schema.releases.c.environment == environment)
        if phase:
            q = q.where(schema.releases.c.phase == phase)
        with self.db.read() as conn:
            return [_release(r) for r in conn.execute(q)]

    def in_phases(self, phases: set[Phase]) -> list[Release]:
        q = (select(schema.releases).where(schema.releases.c.phase.in_([str(p) for p in phases]))
             .order_by(schema.releases.c.created_at))
        with self.db.read() as conn:
            return [_release(r) for r in conn.execute(q)]

    def claim(self, release_id: str) -> bool:
        """Atomically move a queued release to building, unless its endpoint is busy."""
        ts = now()
        with self.db.write() as conn:
            row = conn.execute(select(schema.releases).where(schema.releases.c.id == release_id)).first()
            if row is None or row._mapping["phase"] != str(Phase.QUEUED):
                return False
            r = row._mapping
            busy = conn.execute(select(schema.releases.c.id).where(
                schema.releases.c.model == r["model"], schema.releases.c.environment == r["environment"],
                schema.releases.c.phase.in_([str(p) for p in Phase if p.active]))).first()
            if busy is not None:
                return False
            conn.execute(update(schema.releases).where(schema.releases.c.id == release_id)
                         .values(phase=str(Phase.BUILDING), updated_at=ts))
            conn.execute(schema.events.insert().values(
                release_id=release_id, ts=ts, kind=f"release.{Phase.BUILDING}", message="started"))
            _moved(conn, release_id, ts)
        return True

    def advance(self, release_id: str, to: Phase, message: str = "", *, by: str | None = None,
                **values: Any) -> Release:
        """Move a release to ``to`` (refusing an illegal move), store ``values``, write an event
        (``by``: the user who caused the move; None: the engine)."""
        ts = now()
        with self.db.write() as conn:
            row = conn.execute(select(schema.releases).where(schema.releases.c.id == release_id)).first()
            if row is None:
                raise NotFound(f"release {release_id} not found", field="release_id")
            check_transition(Phase(row._mapping["phase"]), to)
            values.update(phase=str(to), updated_at=ts)
            if to.terminal:
                values["finished_at"] = ts
            if values.get("error"):
                values["error"] = self.jobs.redact(values["error"])
            conn.execute(update(schema.releases).where(schema.releases.c.id == release_id).values(**values))
            conn.execute(schema.events.insert().values(
                release_id=release_id, ts=ts, kind=f"release.{to}", message=self.jobs.redact(message), actor=by))
            _moved(conn, release_id, ts)
        return self.get(release_id)

    def update(self, release_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(schema.releases).where(schema.releases.c.id == release_id)
                         .values(updated_at=now(), **values))

    def approve(self, release_id: str, comment: str = "", by: str | None = None) -> Release:
        """A person (``by``) lets a release waiting at its approval gate move traffic."""
        return self._answer_gate(release_id, Phase.PROMOTING, "approved", comment, by)

    def reject(self, release_id: str, comment: str = "", by: str | None = None) -> Release:
        """A person (``by``) refuses a release waiting at its approval gate: it rolls back and fails."""
        return self._answer_gate(release_id, Phase.ROLLING_BACK, "rejected", comment, by)

    def _answer_gate(self, release_id: str, to: Phase, verb: str, comment: str, by: str | None) -> Release:
        if not isinstance(comment, str) or len(comment) > 1000:
            raise InvalidInput("comment must be text of at most 1000 characters", field="comment")
        rel = self.get(release_id)
        if rel.phase is not Phase.AWAITING_APPROVAL:
            raise Conflict(f"release {release_id} is {rel.phase}, not awaiting approval; only a release waiting at "
                           "its approval gate can be approved or rejected", field="release_id")
        said = f"{verb} by {by or 'a person'}" + (f": {comment}" if comment else "")
        try:
            values = {} if to is Phase.PROMOTING else {"error": said}
            rel = self.advance(release_id, to, said, by=by, **values)
        except Conflict:
            raise Conflict(f"release {release_id} left the approval gate meanwhile; nothing {verb}",
                           field="release_id") from None
        with self.db.write() as conn:
            conn.execute(schema.events.insert().values(release_id=release_id, ts=now(), kind=f"release.{verb}",
                                                       message=self.jobs.redact(said), actor=by))
        return rel

    def cancel_queued_in(self, conn: Any, release_id: str, why: str) -> None:
        """End a queued release inside the caller's transaction (it never started: nothing to
        undo), ``why`` its error and event. A release no longer queued is left alone."""
        ts = now()
        done = conn.execute(update(schema.releases).where(
            schema.releases.c.id == release_id, schema.releases.c.phase == str(Phase.QUEUED)).values(
            phase=str(Phase.CANCELLED), cancel_requested=True, error=self.jobs.redact(why), updated_at=ts,
            finished_at=ts))
        if done.rowcount:
            conn.execute(schema.events.insert().values(
                release_id=release_id, ts=ts, kind=f"release.{Phase.CANCELLED}", message=self.jobs.redact(why)))
            _moved(conn, release_id, ts)

    def request_cancel(self, release_id: str, by: str | None = None) -> Release:
        """Stop a release (``by``: who asked): queued ones end at once; running ones roll back at
        the next check."""
        rel = self.get(release_id)
        if rel.phase.terminal:
            raise Conflict(f"release {release_id} already {rel.phase}; nothing to stop")
        if rel.phase is Phase.PROMOTING and rel.environment_policy.strategy is not Strategy.CANARY:  # between steps
            raise Conflict(f"release {release_id} is promoting; traffic is moving and cannot be stopped now. "
                           f"Use `modelcd rollback {rel.model} --env {rel.environment}` afterwards")
        with self.db.write() as conn:
            conn.execute(update(schema.releases).where(schema.releases.c.id == release_id)
                         .values(cancel_requested=True, updated_at=now()))
            conn.execute(schema.events.insert().values(
                release_id=release_id, ts=now(), kind="release.stop_requested",
                message=f"stop requested by {by}" if by else "stop requested", actor=by))
        if rel.phase is Phase.QUEUED:
            try:
                self.advance(release_id, Phase.CANCELLED, "stopped before it started", by=by)
            except Conflict:
                pass  # the runner claimed it meanwhile; it sees cancel_requested
        self.jobs.cancel_event(release_id).set()
        return self.get(release_id)
