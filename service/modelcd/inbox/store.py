"""Inbox rows: accept (deduplicated by source + delivery id), claim due ones, record outcomes."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from modelcd.errors import Conflict, NotFound
from modelcd.inbox.committer import GroupCommitter
from modelcd.store import schema
from modelcd.store.db import Database, now


class DeliveryState:
    PENDING = "pending"  # stored, waiting for (another) attempt
    DONE = "done"  # processed: versions recorded
    IGNORED = "ignored"  # authentic but not about a new version (reason in result)
    DEAD = "dead"  # failed max attempts, or cannot ever succeed; `modelcd inbox retry` revives it


@dataclass(frozen=True)
class Delivery:
    id: int
    source: str
    delivery_id: str
    received_at: str
    headers: dict[str, str]
    body: bytes
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    result: Any
    processed_at: str | None

    def to_dict(self, body: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "body"}
        d["body_bytes"] = len(self.body)
        if body:
            d["body"] = self.body.decode("utf-8", "replace")
        return d


def _delivery(row: Any) -> Delivery:
    return Delivery(**{k: row._mapping[k] for k in Delivery.__dataclass_fields__})


_INSERT = schema.inbox.insert()
# Due deliveries in two queries that each walk ix_inbox_due: the never-tried ones (attempt time
# 0, so the index holds them in id order: no sort of the whole backlog per batch) and the retries
# whose time has come (few).
_PENDING = schema.inbox.c.state == DeliveryState.PENDING
_FRESH = (select(schema.inbox).where(_PENDING, schema.inbox.c.next_attempt_at == 0.0)
          .order_by(schema.inbox.c.id).limit(bindparam("limit")))
_RETRIES = (select(schema.inbox).where(_PENDING, schema.inbox.c.next_attempt_at > 0.0,
                                       schema.inbox.c.next_attempt_at <= bindparam("at"))
            .order_by(schema.inbox.c.id).limit(bindparam("limit")))
_ROW = schema.inbox.c.id == bindparam("row_id")
_FINISH = update(schema.inbox).where(_ROW).values(
    state=bindparam("state"), result=bindparam("result"), last_error=None, processed_at=bindparam("at"),
    attempts=schema.inbox.c.attempts + 1)
_RETRY = update(schema.inbox).where(_ROW).values(
    state=bindparam("state"), next_attempt_at=bindparam("at"), last_error=bindparam("error"),
    attempts=schema.inbox.c.attempts + 1)


def finish_many(conn: Connection, outcomes: list[tuple[int, str, Any]]) -> None:
    """Record (row id, state, result) of processed deliveries inside ``conn``'s write transaction."""
    if outcomes:
        ts = now()
        conn.execute(_FINISH, [{"row_id": i, "state": state, "result": result, "at": ts}
                               for i, state, result in outcomes])


def retry_many(conn: Connection, failures: list[tuple[int, float, str, bool]]) -> None:
    """Record (row id, next attempt at, error, dead) of failed tries inside ``conn``'s write transaction."""
    if failures:
        conn.execute(_RETRY, [{"row_id": i, "at": at, "error": error,
                               "state": DeliveryState.DEAD if dead else DeliveryState.PENDING}
                              for i, at, error, dead in failures])


def new_row(source: str, delivery_id: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The inbox row of a delivery just received."""
    return {"source": source, "delivery_id": delivery_id, "received_at": now(), "headers": headers, "body": body,
            "state": DeliveryState.PENDING, "attempts": 0, "next_attempt_at": 0.0}


class Inbox:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.committer: GroupCommitter | None = None  # set while the service runs: inserts share commits

    def start_group_commit(self) -> GroupCommitter:
        """From now on, ``accept`` and ``submit`` go through one committer thread."""
        self.committer = GroupCommitter(self.db).start()
        return self.committer

    def stop_group_commit(self) -> None:
        committer, self.committer = self.committer, None
        if committer is not None:
            committer.stop()

    def submit(self, source: str, delivery_id: str, headers: dict[str, str], body: bytes) -> Future[bool]:
        """Store a delivery; the future says True once it is committed, False for a duplicate."""
        row = new_row(source, delivery_id, headers, body)
        committer = self.committer
        if committer is not None and committer.running:
            return committer.submit(row)
        fut: Future[bool] = Future()
        try:
            fut.set_result(self._insert_one(row))
        except Exception as e:
            fut.set_exception(e)
        return fut

    async def submit_async(self, source: str, delivery_id: str, headers: dict[str, str], body: bytes) -> bool:
        """``submit`` awaited on an event loop (one wake-up of the loop per committed batch)."""
        committer = self.committer
        if committer is not None and committer.running:
            return await committer.submit_async(new_row(source, delivery_id, headers, body))
        return await asyncio.wrap_future(self.submit(source, delivery_id, headers, body))

    def accept(self, source: str, delivery_id: str, headers: dict[str, str], body: bytes) -> bool:
        """Store a delivery; False when (source, delivery id) was already stored (a duplicate)."""
        return self.submit(source, delivery_id, headers, body).result()

    def _insert_one(self, row: dict[str, Any]) -> bool:
        try:
            with self.db.write() as conn:
                conn.execute(_INSERT, row)  # one statement compiled once
        except IntegrityError:
            return False
        return True

    def due(self, at: float, limit: int = 50) -> list[Delivery]:
        """Up to ``limit`` pending deliveries due at ``at``, in the order they were stored."""
        with self.db.read() as conn:
            fresh = conn.execute(_FRESH, {"limit": limit}).all()
            retries = conn.execute(_RETRIES, {"at": at, "limit": limit}).all()
        rows = sorted(fresh + retries, key=lambda r: r.id)[:limit] if retries else fresh
        return [_delivery(r) for r in rows]

    def finish(self, row_id: int, state: str, result: Any = None) -> None:
        with self.db.write() as conn:
            finish_many(conn, [(row_id, state, result)])

    def retry_later(self, row_id: int, at: float, error: str, dead: bool) -> None:
        with self.db.write() as conn:
            retry_many(conn, [(row_id, at, error, dead)])

    def get(self, row_id: int) -> Delivery:
        with self.db.read() as conn:
            row = conn.execute(select(schema.inbox).where(schema.inbox.c.id == row_id)).first()
        if row is None:
            raise NotFound(f"inbox delivery {row_id} not found; list them with `modelcd inbox list`", field="id")
        return _delivery(row)

    def list(self, state: str | None = None, source: str | None = None, limit: int = 100) -> list[Delivery]:
        q = select(schema.inbox).order_by(schema.inbox.c.id.desc()).limit(limit)
        if state:
            q = q.where(schema.inbox.c.state == state)
        if source:
            q = q.where(schema.inbox.c.source == source)
        with self.db.read() as conn:
            return [_delivery(r) for r in conn.execute(q)]

    def revive(self, row_id: int) -> Delivery:
        """Send a dead delivery back for processing (attempts start again)."""
        d = self.get(row_id)
        if d.state != DeliveryState.DEAD:
            raise Conflict(f"delivery {row_id} is {d.state}; only dead deliveries can be retried", field="id")
        with self.db.write() as conn:
            conn.execute(update(schema.inbox).where(schema.inbox.c.id == row_id).values(
                state=DeliveryState.PENDING, attempts=0, next_attempt_at=0.0))
        return self.get(row_id)
