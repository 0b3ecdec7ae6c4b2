"""Group commit of inbox rows: deliveries that arrive together share one write transaction.

Each caller hands its row to ``GroupCommitter.submit`` (or ``submit_async`` on an event loop)
and gets a future; one thread takes every row waiting at that moment, inserts them in one
transaction (``ON CONFLICT DO NOTHING`` on (source, delivery id), so a duplicate costs no
rollback) and resolves each future only after the commit: True for a new row, False for a
duplicate. A delivery is therefore never acknowledged before it is stored, and under load one
commit serves many deliveries.

On SQLite the thread writes through a connection of its own with plain SQL (no statement
building per row) and takes its turn on the store's writer locks like every other writer.
That connection never checkpoints the WAL inside a commit (a checkpoint copies pages into the
database file and syncs it: tens of milliseconds on a busy disk, which every delivery of the
batch would wait for); a ``Checkpointer`` thread does it beside the writers instead."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import sqlite3
import threading
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Insert

from modelcd.store import schema
from modelcd.store.db import Database

log = logging.getLogger(__name__)

MAX_BATCH = 256
COLUMNS = ("source", "delivery_id", "received_at", "headers", "body", "state", "attempts", "next_attempt_at")
SQLITE_INSERT = (f"INSERT INTO inbox ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
                 "ON CONFLICT (source, delivery_id) DO NOTHING")


class _Item:
    __slots__ = ("fut", "loop", "row")

    def __init__(self, row: dict[str, Any], fut: Future[bool] | asyncio.Future[bool],
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.row, self.fut, self.loop = row, fut, loop


class GroupCommitter:
    """The one thread that writes new inbox rows while it runs (see the module doc)."""

    def __init__(self, db: Database, max_batch: int = MAX_BATCH, own_connection: bool = True) -> None:
        self.db = db
        self.max_batch = max_batch
        self.own_connection = own_connection and db.sqlite_path is not None  # else through SQLAlchemy
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbox-commit", daemon=True)
        self._stopping = False
        self._conn: sqlite3.Connection | None = None
        self.checkpointer: Checkpointer | None = None
        self.batches = 0  # commits made (for tests and measurements)
        self.rows = 0

    def start(self) -> GroupCommitter:
        if self.own_connection:
            assert self.db.sqlite_path is not None
            self._conn = _sqlite_connect(self.db.sqlite_path)
            self.checkpointer = Checkpointer(self.db.sqlite_path).start()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, row: dict[str, Any]) -> Future[bool]:
        """Queue one inbox row; the future says True (stored) or False (duplicate) after the
        commit, or carries the error that made the transaction fail."""
        fut: Future[bool] = Future()
        self._put(_Item(row, fut, None))
        return fut

    def submit_async(self, row: dict[str, Any]) -> asyncio.Future[bool]:
        """``submit`` for a coroutine: the future belongs to the running loop, and one batch
        resolves all of its futures on that loop with one wake-up."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._put(_Item(row, fut, loop))
        return fut

    def _put(self, item: _Item) -> None:
        if self._stopping:
            _resolve([item], RuntimeError("the inbox committer has stopped"))
            return
        self._queue.put(item)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then end the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self._conn is not None and not self._thread.is_alive():
            self._conn.close()

    def _run(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            batch: list[_Item] = []
            if first is None:
                done = True
            else:
                batch.append(first)
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    continue
                batch.append(item)
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Item]) -> None:
        rows = [item.row for item in batch]
        try:
            results = self._insert_sqlite(rows) if self._conn is not None else self._insert_sqlalchemy(rows)
        except Exception as e:  # the whole transaction failed: nobody is acknowledged
            log.exception("inbox group commit of %d deliveries failed", len(batch))
            _resolve(batch, e)
            return
        self.batches += 1
        self.rows += len(batch)
        _resolve(batch, results)

    def _insert_sqlite(self, rows: list[dict[str, Any]]) -> list[bool]:
        conn = self._conn
        assert conn is not None
        params = [(r["source"], r["delivery_id"], r["received_at"], json.dumps(r["headers"]), r["body"], r["state"],
                   r["attempts"], r["next_attempt_at"]) for r in rows]
        with self.db.write_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [conn.execute(SQLITE_INSERT, p).rowcount == 1 for p in params]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return results

    def _insert_sqlalchemy(self, rows: list[dict[str, Any]]) -> list[bool]:
        with self.db.write() as conn:
            return [conn.execute(self._statement, row).rowcount == 1 for row in rows]

    @functools.cached_property
    def _statement(self) -> Insert:
        """``INSERT ... ON CONFLICT (source, delivery_id) DO NOTHING`` in the store's dialect."""
        if self.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(schema.inbox).on_conflict_do_nothing(index_elements=["source", "delivery_id"])


def _resolve(batch: list[_Item], outcome: list[bool] | BaseException) -> None:
    """Settle every future of ``batch``: plain ones here, each loop's in one callback there."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], bool | BaseException]]] = {}
    for i, item in enumerate(batch):
        value = outcome if isinstance(outcome, BaseException) else outcome[i]
        if item.loop is None:
            assert isinstance(item.fut, Future)
            if isinstance(value, BaseException):
                item.fut.set_exception(value)
            else:
                item.fut.set_result(value)
        else:
            assert isinstance(item.fut, asyncio.Future)
            by_loop.setdefault(item.loop, []).append((item.fut, value))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # that loop has closed: nobody waits any more
            pass


def _settle(settled: list[tuple[asyncio.Future[bool], bool | BaseException]]) -> None:
    for fut, value in settled:
        if fut.done():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


def _sqlite_connect(path: str, autocheckpoint: int = 0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
    return conn


class Checkpointer:
    """Copies the WAL back into the database file every ``every_s`` with
    ``PRAGMA wal_checkpoint(PASSIVE)``, which never blocks a writer (and costs next to nothing
    when there is nothing to copy)."""

    def __init__(self, path: str, every_s: float = 1.0) -> None:
        self.path, self.every_s = path, every_s
        self.stopped = threading.Event()
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn = _sqlite_connect(self.path, autocheckpoint=1000)
        try:
            while not self.stopped.wait(self.every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as e:
                    log.warning("WAL checkpoint: %s", e)
        finally:
            conn.close()
