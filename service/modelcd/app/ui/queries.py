"""The console's reads: every list is one page of rows in SQL (``LIMIT n+1 OFFSET``: the extra
row says whether an older page exists, so no page counts the whole table), on indexed columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select

from modelcd.domain import DeploymentState
from modelcd.store import schema
from modelcd.store.db import Database

PAGE_SIZE = 50
LIVE = [str(s) for s in DeploymentState if s.live]


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    number: int
    has_next: bool

    @property
    def has_previous(self) -> bool:
        return self.number > 1


def page_of(db: Database, q: Select[Any], number: int, size: int = PAGE_SIZE) -> Page:
    with db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q.limit(size + 1).offset((number - 1) * size))]
    return Page(rows[:size], number, len(rows) > size)


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def models_query(q: str, tag: str, source: str) -> Select[Any]:
    """Models whose name or description holds ``q``, with a version tagged ``tag`` (``key`` or
    ``key=value``) and from ``source``; each with its version count and latest version."""
    m, v = schema.models, schema.versions
    stmt = select(m.c.name, m.c.description, m.c.created_at, m.c.archived_at).order_by(m.c.name)
    if q:
        stmt = stmt.where(or_(m.c.name.like(_like(q), escape="\\"), m.c.description.like(_like(q), escape="\\")))
    conditions = []
    if tag:
        key, _, value = tag.partition("=")
        conditions.append(v.c.tags[key].as_string() == value if value else v.c.tags[key].as_string().is_not(None))
    if source:
        conditions.append(v.c.source == source)
    if conditions:
        stmt = stmt.where(exists().where(v.c.model == m.c.name, *conditions))
    return stmt


def version_summaries(db: Database, names: list[str]) -> dict[str, dict[str, Any]]:
    """name → {versions, latest_version} for the models of one page."""
    v = schema.versions
    if not names:
        return {}
    with db.read() as conn:
        rows = conn.execute(select(v.c.model, func.count().label("versions"), func.max(v.c.version).label("latest"))
                            .where(v.c.model.in_(names)).group_by(v.c.model))
        return {r.model: {"versions": r.versions, "latest_version": r.latest} for r in rows}


def versions_query(model: str) -> Select[Any]:
    v = schema.versions
    return (select(v.c.version, v.c.digest, v.c.flavor, v.c.source, v.c.status, v.c.metrics, v.c.tags,
                   v.c.description, v.c.created_at, v.c.external_ref)
            .where(v.c.model == model).order_by(v.c.version.desc()))


def live_deployments(db: Database, model: str, environment: str | None = None) -> list[dict[str, Any]]:
    d = schema.deployments
    q = select(d).where(d.c.model == model, d.c.state.in_(LIVE)).order_by(d.c.environment, d.c.created_at)
    if environment is not None:
        q = q.where(d.c.environment == environment)
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def serving_by_version(db: Database, model: str) -> dict[int, list[str]]:
    """version → the environments whose traffic gives it a share (what "deployed" means to a reader)."""
    out: dict[int, list[str]] = {}
    e = schema.endpoints
    with db.read() as conn:
        endpoints = conn.execute(select(e.c.environment, e.c.traffic).where(e.c.model == model)).all()
    deployments = {d["id"]: d for d in live_deployments(db, model)}
    for env, traffic in endpoints:
        for dep_id, weight in (traffic or {}).items():
            dep = deployments.get(dep_id)
            if dep is not None and weight > 0 and env not in out.setdefault(dep["version"], []):
                out[dep["version"]].append(env)
    return out


def releases_query(model: str | None = None, version: int | None = None, environment: str | None = None,
                   phase: str | None = None) -> Select[Any]:
    r = schema.releases
    q = select(r.c.id, r.c.model, r.c.version, r.c.environment, r.c.trigger, r.c.phase, r.c.error, r.c.created_at,
               r.c.finished_at, r.c.policy_name).order_by(r.c.created_at.desc())
    for column, value in ((r.c.model, model), (r.c.version, version), (r.c.environment, environment),
                          (r.c.phase, phase)):
        if value is not None:
            q = q.where(column == value)
    return q


def jobs_query(type_: str | None, state: str | None) -> Select[Any]:
    j = schema.jobs
    q = select(j).order_by(j.c.created_at.desc())
    if type_:
        q = q.where(j.c.type == type_)
    if state:
        q = q.where(j.c.state == state)
    return q


def endpoints_query() -> Select[Any]:
    e = schema.endpoints
    return select(e).order_by(e.c.model, e.c.environment)


def deployment_versions(db: Database, ids: list[str]) -> dict[str, dict[str, Any]]:
    d = schema.deployments
    if not ids:
        return {}
    with db.read() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(
            select(d.c.id, d.c.version, d.c.state, d.c.url).where(d.c.id.in_(ids)))}


def inbox_query(state: str | None, source: str | None) -> Select[Any]:
    i = schema.inbox
    q = select(i.c.id, i.c.source, i.c.delivery_id, i.c.received_at, i.c.state, i.c.attempts, i.c.last_error,
               i.c.result, i.c.processed_at).order_by(i.c.id.desc())
    if state:
        q = q.where(i.c.state == state)
    if source:
        q = q.where(i.c.source == source)
    return q


def inbox_counts(db: Database) -> dict[str, dict[str, int]]:
    """source → state → deliveries."""
    i = schema.inbox
    out: dict[str, dict[str, int]] = {}
    with db.read() as conn:
        for source, state, n in conn.execute(select(i.c.source, i.c.state, func.count()).group_by(i.c.source,
                                                                                                  i.c.state)):
            out.setdefault(source, {})[state] = n
    return out


def recent_events(db: Database, *, release_id: str | None = None, job_id: str | None = None,
                  limit: int = 300) -> list[dict[str, Any]]:
    """The newest ``limit`` events of a release or a job, oldest first."""
    ev = schema.events
    cond = ev.c.release_id == release_id if release_id is not None else ev.c.job_id == job_id
    with db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(ev).where(cond).order_by(ev.c.id.desc()).limit(limit))]
    return rows[::-1]


def events_after(db: Database, release_id: str, after: int, limit: int = 200) -> list[dict[str, Any]]:
    ev = schema.events
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(ev).where(and_(ev.c.release_id == release_id, ev.c.id > after)).order_by(ev.c.id).limit(limit))]


def log_tail(db: Database, job_id: str, limit: int = 500) -> list[dict[str, Any]]:
    """The last ``limit`` lines of a job's log, oldest first."""
    lg = schema.job_logs
    with db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            select(lg.c.id, lg.c.ts, lg.c.line).where(lg.c.job_id == job_id).order_by(lg.c.id.desc()).limit(limit))]
    return rows[::-1]


def logs_after(db: Database, job_ids: list[str], after: int, limit: int = 500) -> list[dict[str, Any]]:
    lg = schema.job_logs
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(lg.c.id, lg.c.job_id, lg.c.line).where(lg.c.job_id.in_(job_ids), lg.c.id > after)
            .order_by(lg.c.id).limit(limit))]
