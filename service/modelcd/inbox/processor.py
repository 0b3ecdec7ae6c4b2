"""Draining the inbox: normalise each stored delivery with its source adapter, import what it
announces, and record the outcome, a batch at a time in the order the deliveries were stored:
the deliveries with nothing to fetch in one transaction per run (``inbox.batch``), one with
files to fetch on its own. Transient failures retry with exponential backoff; after
``hooks_max_attempts`` tries (or at once for a failure that cannot heal) the delivery goes to
the dead letter, with its error, for `modelcd inbox retry`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from modelcd.context import Context
from modelcd.errors import ArtifactStoreError, InvalidInput, ModelcdError, NotFound
from modelcd.inbox.batch import Planned, plan, record_run, result_of
from modelcd.inbox.importer import import_event
from modelcd.inbox.store import Delivery, DeliveryState, Inbox

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
BATCH = 50  # deliveries taken from the inbox at a time (and the most one write transaction records)


def backoff(attempt: int) -> float:
    """Seconds before the next try after ``attempt`` failed tries (1 → 1 s, 2 → 2 s, … capped)."""
    return min(BACKOFF_BASE_S * 2 ** max(attempt - 1, 0), BACKOFF_CAP_S)


def _transient(e: Exception) -> bool:
    if isinstance(e, requests.RequestException | ArtifactStoreError | ConnectionError | TimeoutError):
        return True
    if getattr(e, "code", None) == "source_unavailable":
        return True
    return not isinstance(e, InvalidInput | NotFound) and not isinstance(e, ModelcdError)


def failure(ctx: Context, d: Delivery, e: Exception) -> tuple[int, float, str, bool]:
    """(row id, next attempt at, error, dead) of a failed try of ``d``: dead at once for a failure
    that cannot heal, else after ``hooks_max_attempts`` tries."""
    message = e.message if isinstance(e, ModelcdError) else f"{type(e).__name__}: {e}"
    attempts = d.attempts + 1
    dead = not _transient(e) or attempts >= ctx.settings.hooks_max_attempts
    return d.id, time.time() + backoff(attempts), ctx.redact(message), dead


def process(ctx: Context, inbox: Inbox, d: Delivery) -> str:
    """Process one delivery on its own (fetching any files it announces); return the state it ended in."""
    return _import(ctx, inbox, plan(ctx, d, {}))


def _import(ctx: Context, inbox: Inbox, p: Planned) -> str:
    d, results = p.delivery, []
    if p.error is None:
        try:
            for event, meta in zip(p.events, p.metas, strict=True):
                if meta is None:
                    results.append({"ignored": event.reason})
                    continue
                results.append(result_of(event, import_event(ctx, event)))
        except Exception as e:
            if not isinstance(e, ModelcdError):
                log.exception("inbox delivery %s (%s %s)", d.id, d.source, d.delivery_id)
            p.error = e
    if p.error is not None:
        row_id, at, message, dead = failure(ctx, d, p.error)
        inbox.retry_later(row_id, at, message, dead)
        return DeliveryState.DEAD if dead else DeliveryState.PENDING
    state = DeliveryState.DONE if any("version" in r for r in results) else DeliveryState.IGNORED
    inbox.finish(d.id, state, results)
    ctx.wake.set()
    return state


def process_due(ctx: Context, inbox: Inbox, limit: int = BATCH,
                after_each: Callable[[], object] | None = None) -> int:
    """Process up to ``limit`` due deliveries in the order they were stored: each run of deliveries
    with nothing to fetch in one transaction (``inbox.batch``), a delivery with files to fetch on
    its own between them. ``after_each`` is called after each commit. Returns how many were due."""
    rows = inbox.due(time.time(), limit)
    sources: dict[str, Any] = {}
    run: list[Planned] = []
    for d in rows:
        p = plan(ctx, d, sources)
        if not p.needs_fetch:
            run.append(p)
            continue
        _record(ctx, inbox, run, after_each)
        run = []
        _import(ctx, inbox, p)
        if after_each is not None:
            after_each()
    _record(ctx, inbox, run, after_each)
    return len(rows)


def _record(ctx: Context, inbox: Inbox, run: list[Planned], after_each: Callable[[], object] | None) -> None:
    """One transaction for ``run``; should it fail, one delivery at a time, so that the delivery
    that made it fail goes to its own retry (or the dead letter) and the others are recorded."""
    if not run:
        return
    failed = [failure(ctx, p.delivery, p.error) for p in run if p.error is not None]
    try:
        with ctx.db.write() as conn:
            record_run(conn, run, failed)
    except Exception:
        log.exception("recording %d inbox deliveries together failed; recording them one at a time", len(run))
        for p in run:
            _import(ctx, inbox, plan(ctx, p.delivery, {}))
    ctx.wake.set()
    if after_each is not None:
        after_each()
