"""Deployment records: what the control plane started on a target, enough to re-adopt it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, update

from modelcd.domain import Deployment, DeploymentState
from modelcd.errors import NotFound
from modelcd.store import schema
from modelcd.store.db import Database, new_id, now
from modelcd.targets.base import RunningDeployment

LIVE_STATES = [str(s) for s in DeploymentState if s.live]


def deployment_from_row(row: Any) -> Deployment:
    m = row._mapping
    return Deployment(
        id=m["id"], model=m["model"], version=m["version"], environment=m["environment"], target=m["target"],
        state=DeploymentState(m["state"]), url=m["url"], pid=m["pid"], port=m["port"], bundle=m["bundle"],
        release_id=m["release_id"], created_at=m["created_at"],
    )


def deployment_to_dict(d: Deployment) -> dict[str, Any]:
    out = dict(d.__dict__)
    out["state"] = str(d.state)
    return out


class Deployments:
    """CRUD over the deployments table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, model: str, version: int, environment: str, target: str, release_id: str | None,
               bundle: str | None) -> Deployment:
        dep_id = new_id("d")
        ts = now()
        with self.db.write() as conn:
            conn.execute(schema.deployments.insert().values(
                id=dep_id, model=model, version=version, environment=environment, target=target,
                state=str(DeploymentState.STARTING), bundle=bundle, release_id=release_id,
                created_at=ts, updated_at=ts))
        return self.get(dep_id)

    def get(self, dep_id: str) -> Deployment:
        with self.db.read() as conn:
            row = conn.execute(select(schema.deployments).where(schema.deployments.c.id == dep_id)).first()
        if row is None:
            raise NotFound(f"deployment {dep_id} not found", field="deployment_id")
        return deployment_from_row(row)

    def update(self, dep_id: str, conn: Connection | None = None, **values: Any) -> None:
        if "state" in values:
            values["state"] = str(values["state"])
        stmt = update(schema.deployments).where(schema.deployments.c.id == dep_id).values(updated_at=now(), **values)
        if conn is not None:
            conn.execute(stmt)
            return
        with self.db.write() as c:
            c.execute(stmt)

    def list(self, *, model: str | None = None, environment: str | None = None, live_only: bool = False,
             version: int | None = None) -> list[Deployment]:
        q = select(schema.deployments).order_by(schema.deployments.c.created_at)
        if model:
            q = q.where(schema.deployments.c.model == model)
        if environment:
            q = q.where(schema.deployments.c.environment == environment)
        if version is not None:
            q = q.where(schema.deployments.c.version == version)
        if live_only:
            q = q.where(schema.deployments.c.state.in_(LIVE_STATES))
        with self.db.read() as conn:
            return [deployment_from_row(r) for r in conn.execute(q)]


def handle_of(d: Deployment, home: Path) -> RunningDeployment:
    """The target's handle for a recorded deployment (what ``Target.delete`` and ``is_alive`` take)."""
    return RunningDeployment(deployment_id=d.id, target=d.target, url=d.url or "", pid=d.pid or 0,
                             port=d.port or 0, log_path=home / "deployments" / f"{d.id}.log")
