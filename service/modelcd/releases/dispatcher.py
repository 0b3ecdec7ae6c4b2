"""The outbox dispatcher: turns ``model_version.registered`` events into releases, and hands
``release.phase`` events to the observers (``releases.observers``).

Runs at least once per event: the release rows and the event's ``processed_at`` are
written in one transaction, so a crash either did both or neither."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update

from modelcd.context import Context
from modelcd.registry.service import NOT_RELEASED, REGISTERED
from modelcd.releases.observers import RELEASE_PHASE, notify
from modelcd.releases.retirement import skip_if_archived
from modelcd.releases.rollback_event import ENDPOINT_ROLLED_BACK
from modelcd.store import schema
from modelcd.store.db import now

log = logging.getLogger(__name__)


def dispatch_outbox(ctx: Context, limit: int = 100) -> int:
    """Process pending outbox events in order; return how many were handled."""
    with ctx.db.read() as conn:
        rows = conn.execute(select(schema.outbox).where(schema.outbox.c.processed_at.is_(None))
                            .order_by(schema.outbox.c.id).limit(limit)).all()
    for row in rows:
        _handle(ctx, dict(row._mapping))
    if rows:
        ctx.wake.set()
    return len(rows)


def _handle(ctx: Context, event: dict[str, Any]) -> None:
    note = None
    payload = event["payload"]
    try:
        if event["kind"] == REGISTERED:
            note = _on_registered(ctx, event["id"], payload)
            return
        if event["kind"] in (RELEASE_PHASE, ENDPOINT_ROLLED_BACK):  # the instant rollback: observers too
            note = notify(ctx, payload)
        else:
            note = f"ignored: unknown event kind {event['kind']}"
    except Exception as e:  # a bad event must not block the ones after it
        log.exception("outbox event %s failed", event["id"])
        note = f"error: {type(e).__name__}: {e}"
    _mark(ctx, event["id"], note)


def _mark(ctx: Context, event_id: int, note: str | None, conn: Any = None) -> None:
    stmt = (update(schema.outbox).where(schema.outbox.c.id == event_id, schema.outbox.c.processed_at.is_(None))
            .values(processed_at=now(), error=note))
    if conn is not None:
        conn.execute(stmt)
        return
    with ctx.db.write() as c:
        c.execute(stmt)


def _on_registered(ctx: Context, event_id: int, payload: dict[str, Any]) -> str | None:
    model, version = payload["model"], int(payload["version"])
    policy = ctx.policies.select(model, payload.get("tags") or {}, payload.get("source") or "native")
    with ctx.db.write() as conn:
        done = conn.execute(select(schema.outbox.c.processed_at).where(schema.outbox.c.id == event_id)).scalar()
        if done is not None:
            return None  # another dispatcher got here first
        if payload.get("release") is False:
            _mark(ctx, event_id, NOT_RELEASED, conn)  # written so by an earlier version
            return None
        skipped = skip_if_archived(conn, model, version)  # an event on the archive job says so
        if skipped is not None:
            _mark(ctx, event_id, skipped, conn)
            return None
        if not policy.auto:
            _mark(ctx, event_id, f"policy {policy.name} has auto: false; release by hand", conn)
            return None
        env = policy.environments[0]
        ctx.releases.create_in(conn, model=model, version=version, environment=env.name, policy=policy,
                               env_index=0, trigger="auto")
        _mark(ctx, event_id, None, conn)
    return None
