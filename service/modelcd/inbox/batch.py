"""Deliveries that need nothing fetched (versions referenced only, ignored events) recorded in
one write transaction for a whole run of them: their versions, outbox events and inbox
outcomes in a few statements, however many deliveries the run holds.

Each delivery is first read on its own (``plan``: normalise, check the names and metadata), so
one that cannot be read fails alone and the others go on; its failure is recorded in the same
transaction. Versions are numbered in delivery order, so the versions of one model keep the
order their deliveries were stored in. A crash before the commit leaves every delivery of the
run pending, to be processed again as a whole; after it, none is."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from modelcd.context import Context
from modelcd.domain import ModelVersion
from modelcd.errors import ModelcdError
from modelcd.inbox.importer import event_metadata
from modelcd.inbox.store import Delivery, DeliveryState, finish_many, retry_many
from modelcd.registry.names import validate_model_name
from modelcd.registry.service import (
    RegisterMetadata,
    Registry,
    find_external_in,
    record_versions,
    reference_row,
    release_later_in,
)

log = logging.getLogger(__name__)


@dataclass
class Planned:
    """One delivery read: its events (with their metadata), or why it could not be read."""

    delivery: Delivery
    events: list[Any] = field(default_factory=list)
    metas: list[RegisterMetadata | None] = field(default_factory=list)  # None for an Ignored event
    error: Exception | None = None

    @property
    def needs_fetch(self) -> bool:
        """True when an event has files to fetch: that delivery is imported on its own."""
        return self.error is None and any(m is not None and e.artifact_uri for e, m in zip(self.events, self.metas,
                                                                                           strict=True))


def plan(ctx: Context, d: Delivery, sources: dict[str, Any]) -> Planned:
    """Normalise ``d`` with its source adapter (kept in ``sources`` for the batch) and check what
    it announces; any error is kept in the result, for that delivery alone."""
    from modelcd.sources.base import Ignored, get_source

    p = Planned(d)
    try:
        source = sources.get(d.source) or sources.setdefault(d.source, get_source(d.source, ctx.settings))
        for event in source.normalise(d.body, d.headers):
            meta = None
            if not isinstance(event, Ignored):
                validate_model_name(event.model)
                meta = event_metadata(event)
                Registry.check_meta(meta)
            p.events.append(event)
            p.metas.append(meta)
    except Exception as e:
        if not isinstance(e, ModelcdError):
            log.exception("inbox delivery %s (%s %s)", d.id, d.source, d.delivery_id)
        p.error = e
    return p


def record_run(conn: Connection, run: list[Planned], failed: list[tuple[int, float, str, bool]]) -> None:
    """Record the versions of ``run`` (none needs a fetch) and every delivery's outcome inside
    ``conn``'s transaction; ``failed`` are ``store.retry_many``'s tuples of those that failed."""
    found = find_external_in(conn, [_key(e, m) for p in run if p.error is None
                                    for e, m in zip(p.events, p.metas, strict=True) if m and m.external_ref])
    made: dict[tuple[str, str, str], dict[str, Any]] = {}  # this run's new versions, by key
    rows: list[dict[str, Any]] = []
    releases: list[bool] = []
    entries: list[tuple[Planned, list[Any]]] = []  # per delivery: its results, a row or a version in each
    for p in run:
        if p.error is not None:
            continue
        results: list[Any] = []
        for event, meta in zip(p.events, p.metas, strict=True):
            if meta is None:
                results.append({"ignored": event.reason})
                continue
            key = _key(event, meta) if meta.external_ref else None
            existing = found.get(key) if key else None
            if existing is not None:
                if event.release:  # e.g. recorded while pending approval, approved now
                    release_later_in(conn, existing)
                results.append((event, existing))
                continue
            row = made.get(key) if key else None
            if row is None:
                row = reference_row(event.model, meta)
                rows.append(row)
                releases.append(meta.release)
                if key:
                    made[key] = row
            results.append((event, row))
        entries.append((p, results))
    if rows:
        record_versions(conn, rows, releases)
    done = []
    for p, results in entries:
        out = [r if isinstance(r, dict) else result_of(*r) for r in results]
        state = DeliveryState.DONE if any("version" in r for r in out) else DeliveryState.IGNORED
        done.append((p.delivery.id, state, out))
    finish_many(conn, done)
    retry_many(conn, failed)


def _key(event: Any, meta: RegisterMetadata) -> tuple[str, str, str]:
    return event.model, str(meta.source), meta.external_ref or ""


def result_of(event: Any, version: ModelVersion | dict[str, Any]) -> dict[str, Any]:
    """What the inbox row keeps of a version an event made (or found)."""
    if isinstance(version, ModelVersion):
        version = {"model": version.model, "version": version.version, "status": version.status,
                   "external_ref": version.external_ref}
    return {"model": version["model"], "version": version["version"], "status": version["status"],
            "external_ref": version["external_ref"], "release": event.release}
