"""Deployment records: what the control plane started on a target, enough to re-adopt it
or to start the very same deployment again (its whole spec is kept from the start)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, update

from modelcd.config import Settings
from modelcd.domain import Bundle, Deployment, DeploymentState
from modelcd.errors import DeployError, ModelcdError, NotFound
from modelcd.releases.policy import Environment
from modelcd.store import schema
from modelcd.store.db import Database, new_id, now
from modelcd.targets.base import DeploySpec, RunningDeployment, Target

SET = "(set)"  # what reads show instead of an environment variable's value

LIVE_STATES = [str(s) for s in DeploymentState if s.live]


def deployment_from_row(row: Any) -> Deployment:
    m = row._mapping
    return Deployment(
        id=m["id"], model=m["model"], version=m["version"], environment=m["environment"], target=m["target"],
        state=DeploymentState(m["state"]), url=m["url"], pid=m["pid"], port=m["port"], bundle=m["bundle"],
        release_id=m["release_id"], created_at=m["created_at"], spec=dict(m["spec"] or {}),
        sleeping=m["sleeping"] or None,
    )


def masked_env(env: Mapping[str, Any] | None) -> dict[str, str]:
    """Environment variables as reads show them: each name, never its value."""
    return {name: SET for name in (env or {})}


def deployment_to_dict(d: Deployment) -> dict[str, Any]:
    out = dict(d.__dict__)
    out["state"] = str(d.state)
    out["spec"] = {**d.spec, "env": masked_env(d.spec.get("env"))}
    return out


def load_bundle(path: str | Path) -> Bundle:
    """The bundle the build stage wrote at ``path``."""
    path = Path(path)
    try:
        meta = json.loads((path / "bundle.json").read_text())
    except (OSError, ValueError) as e:
        raise DeployError(f"bundle {path} is missing or damaged ({e}); the build stage must run again") from e
    return Bundle(path=path, python=Path(meta["python"]), env_key=meta["env_key"], reused_env=True,
                  image=meta.get("image"), image_id=meta.get("image_id"))


def resolve_env(env: Mapping[str, Any], home: Path) -> dict[str, str]:
    """The variables a deployment starts with: text as it is; a secret reference read now, from
    the service's environment (``secret_env``) or ``home/secrets/`` (``secret_file``), so its
    value is never in the policy, the store or a log. DeployError names the reference."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            out[name] = value
        elif value.get("secret_env"):
            found = os.environ.get(value["secret_env"])
            if not found:
                raise DeployError(f"env.{name}: secret_env {value['secret_env']} is not set in the service's "
                                  "environment; set it and restart `modelcd serve`", field=f"env.{name}")
            out[name] = found
        else:
            path = home / "secrets" / str(value.get("secret_file"))
            try:
                found = path.read_text().rstrip("\r\n")
            except OSError as e:
                raise DeployError(f"env.{name}: cannot read secret_file {path} ({e.strerror}); write the value "
                                  "there (mode 0600)", field=f"env.{name}") from None
            if not found:
                raise DeployError(f"env.{name}: secret_file {path} is empty", field=f"env.{name}")
            out[name] = found
    return out


def spec_values(env: Environment, settings: Settings, bundle: str) -> dict[str, Any]:
    """What a deployment of policy environment ``env`` records when it is created: all that
    ``deploy_spec`` needs to start it (and start it again after a restart) the same way."""
    variables = {k: v if isinstance(v, str) else v.model_dump(exclude_none=True) for k, v in env.env.items()}
    return {"bundle": bundle, "workers": env.scoring_workers or settings.scoring_workers,
            "health_timeout_s": settings.health_timeout_s, "env": variables,
            "cpu": env.resources.cpu, "memory": env.resources.memory,
            "network": str(env.network) if env.network else None}


def deploy_spec(d: Deployment, settings: Settings) -> DeploySpec:
    """The one constructor of a ``DeploySpec``: from the deployment's record. Records made
    before specs were kept get the service's defaults."""
    s = d.spec
    return DeploySpec(deployment_id=d.id, model=d.model, version=d.version, environment=d.environment,
                      bundle=load_bundle(s.get("bundle") or d.bundle or ""),
                      workers=int(s.get("workers") or settings.scoring_workers),
                      health_timeout_s=float(s.get("health_timeout_s") or settings.health_timeout_s),
                      env=resolve_env(s.get("env") or {}, settings.home), cpu=s.get("cpu"), memory=s.get("memory"),
                      network=s.get("network"))


class Deployments:
    """CRUD over the deployments table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, model: str, version: int, environment: str, target: str, release_id: str | None,
               spec: dict[str, Any]) -> Deployment:
        """Record a deployment about to start (``starting``), with its whole ``spec_values``."""
        dep_id = new_id("d")
        ts = now()
        with self.db.write() as conn:
            conn.execute(schema.deployments.insert().values(
                id=dep_id, model=model, version=version, environment=environment, target=target,
                state=str(DeploymentState.STARTING), bundle=spec["bundle"], spec=spec, release_id=release_id,
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


def runner_started(d: Deployment) -> bool:
    """Started by a pipeline's runner (``pipeline.stages.deploy: runner``) on an engine the
    service may not reach: the service neither restarts nor adopts it."""
    return d.spec.get("started_by") == "runner"


def stop_deployment(target: Target, d: Deployment, home: Path, log: Callable[[str], None]) -> None:
    """Stop ``d`` on ``target``. One a runner started is stopped here when this service reaches
    its engine (its container carries this service's labels); otherwise that is said, not raised:
    the pipeline's rollback job stops it where it runs."""
    try:
        target.delete(handle_of(d, home))
    except ModelcdError as e:
        if not runner_started(d):
            raise
        log(f"deployment {d.id} was started by the pipeline's runner and cannot be stopped from here ({e.message}); "
            "the runner's `modelcd rollback` stops it, or stop container modelcd-" + d.id + " on its engine")
