"""Group commit of inbox rows: deliveries that arrive together share one write transaction.

Each caller hands its row to ``GroupCommitter.submit`` and gets a future; one thread takes
every row waiting at that moment, inserts them in one transaction (``ON CONFLICT DO NOTHING``
on (source, delivery id), so a duplicate costs no rollback) and resolves each future only
after the commit: True for a new row, False for a duplicate. A delivery is therefore never
acknowledged before it is stored, and under load one commit serves many deliveries."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Insert

from modelcd.store import schema
from modelcd.store.db import Database

log = logging.getLogger(__name__)

MAX_BATCH = 256


def insert_ignoring_duplicates(db: Database) -> Insert:
    """``INSERT INTO inbox ... ON CONFLICT (source, delivery_id) DO NOTHING`` for the store's dialect."""
    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert(schema.inbox).on_conflict_do_nothing(index_elements=["source", "delivery_id"])


_Item = tuple[dict[str, Any], "Future[bool]"]


class GroupCommitter:
    """The one thread that writes new inbox rows while it runs (see the module doc)."""

    def __init__(self, db: Database, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.max_batch = max_batch
        self._insert = insert_ignoring_duplicates(db)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbox-commit", daemon=True)
        self._stopping = False
        self.batches = 0  # commits made (for tests and measurements)
        self.rows = 0

    def start(self) -> GroupCommitter:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, row: dict[str, Any]) -> Future[bool]:
        """Queue one inbox row; the future says True (stored) or False (duplicate) after the
        commit, or carries the error that made the transaction fail."""
        fut: Future[bool] = Future()
        if self._stopping:
            fut.set_exception(RuntimeError("the inbox committer has stopped"))
            return fut
        self._queue.put((row, fut))
        return fut

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then end the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout_s)

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
        import time as _t
        _t0 = _t.perf_counter()
        try:
            with self.db.write() as conn:
                results = [conn.execute(self._insert, row).rowcount == 1 for row, _ in batch]
        except Exception as e:  # the whole transaction failed: nobody is acknowledged
            log.exception("inbox group commit of %d deliveries failed", len(batch))
            for _, fut in batch:
                fut.set_exception(e)
            return
        self.batches += 1
        _dt = _t.perf_counter() - _t0
        if _dt > 0.005:
            log.warning("DEBUG slow commit %.1f ms batch %d", _dt * 1000, len(batch))
        self.rows += len(batch)
        for (_, fut), new in zip(batch, results, strict=True):
            fut.set_result(new)
