"""Server-sent events for the live parts: a release's phase, stages, events and job logs, and a
job's log. Each stream polls the store (indexed reads of rows after a cursor: log lines every
``POLL_S``, the rest every ``SLOW_EVERY`` polls) and sends what is new; the cursor travels as
the event ``id``, so the browser's reconnect (``Last-Event-ID``) resumes where it was.

A stream holds one of the server's request threads while it lasts, so at most ``MAX_STREAMS``
run at once (another gets ``retry`` and ends: the browser comes back a little later), each
ends after ``STREAM_S`` (the browser reconnects at once), and a stream whose client hung up
ends at its next poll."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request
from sqlalchemy import select

from modelcd.app.ui import bp, ctx
from modelcd.app.ui.pages import JOB_ID, RELEASE_ID, _id
from modelcd.app.ui.queries import events_after, logs_after
from modelcd.app.wsgi_bridge import DISCONNECTED
from modelcd.context import Context
from modelcd.store import schema

POLL_S = 0.05  # new log lines are read this often (at once when this process writes one)
SLOW_EVERY = 5  # phase, stages, events and a job's state every 5th read (250 ms)
TERMINAL_JOB = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_RELEASE = frozenset({"succeeded", "failed", "cancelled", "superseded"})
STREAM_S = 60.0
MAX_STREAMS = 4
BUSY_RETRY_MS = 3000
_slots = threading.BoundedSemaphore(MAX_STREAMS)
_CURSOR = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")


def sse(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _cursor(default: str) -> tuple[int, int]:
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or default
    m = _CURSOR.fullmatch(raw)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _stream(body: Callable[[Callable[[], bool]], Iterator[str]], cursor: str) -> Response:
    """A text/event-stream response running ``body(stopped)`` in one of the stream slots; its
    first message sets the browser's last event id to ``cursor`` (a reconnect resumes there)."""
    gone: threading.Event | None = request.environ.get(DISCONNECTED)

    def generate() -> Iterator[str]:
        if not _slots.acquire(blocking=False):
            yield f"retry: {BUSY_RETRY_MS}\n: busy, come back later\n\n"
            return
        try:
            deadline = time.monotonic() + STREAM_S
            yield f"retry: 500\nid: {cursor}\n: open\n\n"

            def stopped() -> bool:
                return time.monotonic() >= deadline or (gone is not None and gone.is_set())

            yield from body(stopped)
        finally:
            _slots.release()

    return Response(generate(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@bp.get("/jobs/<job_id>/log/stream")
def job_log_stream(job_id: str) -> Response:
    _id(job_id, JOB_ID, "job")
    c = ctx()
    c.jobs.get(job_id)  # 404 for an unknown job
    _, after = _cursor("0-0")

    def body(stopped: Callable[[], bool]) -> Iterator[str]:
        nonlocal after
        state = ""  # the first look sends the state: the job may have moved since the page was rendered
        tick = 0
        while not stopped():
            rows = logs_after(c.db, [job_id], after)
            for row in rows:
                after = row["id"]
                yield sse("log", {"job_id": job_id, "line": row["line"]}, f"0-{after}")
            if tick % SLOW_EVERY == 0:
                current = _job_state(c, job_id)
                if current != state:
                    state = current
                    yield sse("state", {"job_id": job_id, "state": state}, f"0-{after}")
                if not rows and current in TERMINAL_JOB:
                    yield sse("end", {"state": current}, f"0-{after}")
                    return
            tick += 1
            if not rows:
                c.jobs.wait_for_log(POLL_S)

    return _stream(body, f"0-{after}")


def _job_state(c: Context, job_id: str) -> str:
    with c.db.read() as conn:
        return str(conn.execute(select(schema.jobs.c.state).where(schema.jobs.c.id == job_id)).scalar())


def _stages(c: Context, release_id: str) -> dict[str, dict[str, Any]]:
    """job id → {stage, state, started_at, finished_at} of the release's jobs."""
    j = schema.jobs
    with c.db.read() as conn:
        return {r.id: {"stage": r.type, "state": r.state, "job_id": r.id, "started_at": r.started_at,
                       "finished_at": r.finished_at}
                for r in conn.execute(select(j.c.id, j.c.type, j.c.state, j.c.started_at, j.c.finished_at)
                                      .where(j.c.release_id == release_id).order_by(j.c.created_at))}


def _phase(c: Context, release_id: str) -> dict[str, Any]:
    r = schema.releases
    with c.db.read() as conn:
        row = conn.execute(select(r.c.phase, r.c.error).where(r.c.id == release_id)).first()
    return {"phase": row.phase, "error": row.error} if row is not None else {"phase": "unknown", "error": None}


@bp.get("/releases/<release_id>/stream")
def release_stream(release_id: str) -> Response:
    from modelcd.app.ui import duration

    _id(release_id, RELEASE_ID, "release")
    c = ctx()
    c.releases.get(release_id)
    after_event, after_log = _cursor("0-0")

    def body(stopped: Callable[[], bool]) -> Iterator[str]:
        nonlocal after_event, after_log
        phase: dict[str, Any] = {}
        stages: dict[str, dict[str, Any]] = {}
        tick = 0
        while not stopped():
            sent = False
            slow = tick % SLOW_EVERY == 0
            tick += 1
            if slow:
                now_phase = _phase(c, release_id)
                if now_phase != phase:
                    phase = now_phase
                    yield sse("phase", phase, f"{after_event}-{after_log}")
                    sent = True
                now_stages = _stages(c, release_id)
                for job_id, stage in now_stages.items():
                    if stages.get(job_id) != stage:
                        yield sse("stage", {**stage, "duration": duration(stage["started_at"],
                                                                          stage["finished_at"])},
                                  f"{after_event}-{after_log}")
                        sent = True
                stages = now_stages
                for e in events_after(c.db, release_id, after_event):
                    after_event = e["id"]
                    yield sse("event", {"id": e["id"], "kind": e["kind"], "message": e["message"], "ts": e["ts"],
                                        "actor": e.get("actor") or "modelcd"}, f"{after_event}-{after_log}")
                    sent = True
            if stages:
                for row in logs_after(c.db, list(stages), after_log):
                    after_log = row["id"]
                    yield sse("log", {"job_id": row["job_id"], "line": row["line"]}, f"{after_event}-{after_log}")
                    sent = True
            if slow and not sent and phase.get("phase") in TERMINAL_RELEASE:
                yield sse("end", phase, f"{after_event}-{after_log}")
                return
            if not sent:
                c.jobs.wait_for_log(POLL_S)

    return _stream(body, f"{after_event}-{after_log}")
