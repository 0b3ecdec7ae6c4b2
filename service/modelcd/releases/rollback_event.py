"""The instant rollback's outbox event. `modelcd rollback` with the previous deployments still
warm switches traffic without a release, so no release phase tells the observers; this event
does. It carries a ``ReleaseMoved`` of the release whose deployment serves again, with the
pseudo-phase ``rolled_back``, and the dispatcher hands it to the same observers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection

from modelcd.errors import NotFound
from modelcd.releases.observers import ReleaseMoved
from modelcd.store import schema
from modelcd.store.db import now

if TYPE_CHECKING:
    from modelcd.context import Context

ENDPOINT_ROLLED_BACK = "endpoint.rolled_back"  # outbox kind
ROLLED_BACK = "rolled_back"  # not a release phase: the release's deployment serves its endpoint again


def serving_deployment(split: dict[str, int]) -> str | None:
    """The deployment that carries the most of ``split`` (the first such id on a tie)."""
    live = sorted((d for d, w in split.items() if w > 0), key=lambda d: (-split[d], d))
    return live[0] if live else None


def rollback_moved(ctx: Context, model: str, environment: str, split: dict[str, int]) -> ReleaseMoved | None:
    """The event of an instant rollback that restores ``split`` (None when nothing serves)."""
    dep_id = serving_deployment(split)
    if dep_id is None:
        return None
    dep = ctx.deployments.get(dep_id)
    runner = "local"
    if dep.release_id:
        try:
            runner = str(ctx.releases.get(dep.release_id).runner)
        except NotFound:
            pass
    return ReleaseMoved(release_id=dep.release_id or "", model=model, version=dep.version, environment=environment,
                        phase=ROLLED_BACK, trigger="rollback", runner=runner, deployment_id=dep_id)


def write_rollback_event(conn: Connection, moved: ReleaseMoved) -> None:
    """Insert the event in the caller's transaction: the one that switches the traffic, so the
    observers hear of the rollback exactly when it happened."""
    conn.execute(schema.outbox.insert().values(kind=ENDPOINT_ROLLED_BACK, payload=moved.to_payload(),
                                               created_at=now()))
