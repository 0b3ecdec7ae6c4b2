"""The instant rollback's outbox event. `modelcd rollback` with the previous deployments still
warm switches traffic without a release, so no release phase tells the observers; this event
does. It carries a ``ReleaseMoved`` of the release whose deployment serves again, with the
pseudo-phase ``rolled_back``, and the dispatcher hands it to the same observers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from modelcd.errors import NotFound
from modelcd.releases.observers import ReleaseMoved
from modelcd.store import schema
from modelcd.store.db import now

if TYPE_CHECKING:
    from modelcd.context import Context

log = logging.getLogger(__name__)

ENDPOINT_ROLLED_BACK = "endpoint.rolled_back"  # outbox kind
ROLLED_BACK = "rolled_back"  # not a release phase: the release's deployment serves its endpoint again


def serving_deployment(split: dict[str, int]) -> str | None:
    """The deployment that carries the most of ``split`` (the first such id on a tie)."""
    live = sorted((d for d, w in split.items() if w > 0), key=lambda d: (-split[d], d))
    return live[0] if live else None


def record_rollback(ctx: Context, model: str, environment: str, split: dict[str, int]) -> None:
    """Write the event for an instant rollback that restored ``split`` (after it committed).
    The rollback is done whatever happens here: a failure is logged, not raised."""
    try:
        _record(ctx, model, environment, split)
    except Exception:
        log.exception("rollback of %s/%s: cannot tell the release observers", model, environment)


def _record(ctx: Context, model: str, environment: str, split: dict[str, int]) -> None:
    dep_id = serving_deployment(split)
    if dep_id is None:
        return
    dep = ctx.deployments.get(dep_id)
    runner, trigger = "local", "rollback"
    if dep.release_id:
        try:
            runner = str(ctx.releases.get(dep.release_id).runner)
        except NotFound:
            pass
    moved = ReleaseMoved(release_id=dep.release_id or "", model=model, version=dep.version, environment=environment,
                         phase=ROLLED_BACK, trigger=trigger, runner=runner, deployment_id=dep_id)
    with ctx.db.write() as conn:
        conn.execute(schema.outbox.insert().values(kind=ENDPOINT_ROLLED_BACK, payload=moved.to_payload(),
                                                   created_at=now()))
    ctx.wake.set()
