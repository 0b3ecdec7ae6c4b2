"""Draining the inbox: normalise each stored delivery with its source adapter, import what it
announces, and record the outcome. Transient failures retry with exponential backoff; after
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
from modelcd.inbox.importer import import_event
from modelcd.inbox.store import Delivery, DeliveryState, Inbox

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0


def backoff(attempt: int) -> float:
    """Seconds before the next try after ``attempt`` failed tries (1 → 1 s, 2 → 2 s, … capped)."""
    return min(BACKOFF_BASE_S * 2 ** max(attempt - 1, 0), BACKOFF_CAP_S)


def _transient(e: Exception) -> bool:
    if isinstance(e, requests.RequestException | ArtifactStoreError | ConnectionError | TimeoutError):
        return True
    if getattr(e, "code", None) == "source_unavailable":
        return True
    return not isinstance(e, InvalidInput | NotFound) and not isinstance(e, ModelcdError)


def process(ctx: Context, inbox: Inbox, d: Delivery) -> str:
    """Process one delivery; return the state it ended in."""
    from modelcd.sources.base import Ignored, get_source

    try:
        source = get_source(d.source, ctx.settings)
        results: list[dict[str, Any]] = []
        for event in source.normalise(d.body, d.headers):
            if isinstance(event, Ignored):
                results.append({"ignored": event.reason})
                continue
            version = import_event(ctx, event)
            results.append({"model": version.model, "version": version.version, "status": version.status,
                            "external_ref": version.external_ref, "release": event.release})
        state = DeliveryState.DONE if any("version" in r for r in results) else DeliveryState.IGNORED
        inbox.finish(d.id, state, results)
        ctx.wake.set()
        return state
    except Exception as e:
        message = e.message if isinstance(e, ModelcdError) else f"{type(e).__name__}: {e}"
        message = ctx.redact(message)
        attempts = d.attempts + 1
        dead = not _transient(e) or attempts >= ctx.settings.hooks_max_attempts
        if not isinstance(e, ModelcdError):
            log.exception("inbox delivery %s (%s %s)", d.id, d.source, d.delivery_id)
        inbox.retry_later(d.id, time.time() + backoff(attempts), message, dead)
        return DeliveryState.DEAD if dead else DeliveryState.PENDING


def process_due(ctx: Context, inbox: Inbox, limit: int = 50, after_each: Callable[[], object] | None = None) -> int:
    """Process up to ``limit`` due deliveries in order, calling ``after_each`` after each one."""
    rows = inbox.due(time.time(), limit)
    for d in rows:
        process(ctx, inbox, d)
        if after_each is not None:
            after_each()
    return len(rows)
