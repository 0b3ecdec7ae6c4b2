"""Group commit of inbox rows on a real SQLite file: deliveries waiting together share one
transaction, each is acknowledged only once its row is committed (seen by another
connection), duplicates are told apart, a failed transaction acknowledges nobody, and the
writer lock queues processes, not only threads."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from modelcd.inbox.committer import Checkpointer, GroupCommitter
from modelcd.inbox.store import Inbox, new_row
from modelcd.store.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'modelcd.db'}")
    yield database
    database.dispose()


@pytest.fixture(params=[True, False], ids=["own-sqlite-connection", "sqlalchemy"])
def committer(db: Database, request: pytest.FixtureRequest) -> Iterator[GroupCommitter]:
    """Both write paths: plain SQL on the committer's own SQLite connection, and SQLAlchemy
    (what PostgreSQL uses)."""
    c = GroupCommitter(db, own_connection=request.param).start()
    assert c.own_connection is request.param
    yield c
    c.stop()


def _row(i: int | str) -> dict[str, object]:
    return new_row("generic", f"d-{i}", {"content-type": "application/json"}, f'{{"n": "{i}"}}'.encode())


def _stored(db: Database) -> list[str]:
    assert db.sqlite_path is not None
    with sqlite3.connect(db.sqlite_path) as conn:  # another connection: sees only what is committed
        return [r[0] for r in conn.execute("SELECT delivery_id FROM inbox ORDER BY id")]


def test_deliveries_waiting_together_share_one_commit_and_are_acknowledged_after_it(
        db: Database, committer: GroupCommitter) -> None:
    with db.write_lock():  # another writer holds the store: deliveries pile up
        futures = [committer.submit(_row(i)) for i in range(50)]
        time.sleep(0.2)
        assert not any(f.done() for f in futures)  # nothing acknowledged before its commit
        assert _stored(db) == []
    assert [f.result(timeout=10) for f in futures] == [True] * 50
    assert _stored(db) == [f"d-{i}" for i in range(50)]
    assert committer.batches <= 2  # the first row may have been taken alone before the rest queued


def test_duplicates_are_acknowledged_as_such_within_and_across_batches(db: Database,
                                                                       committer: GroupCommitter) -> None:
    with db.write_lock():
        futures = [committer.submit(_row(i % 10)) for i in range(30)]
    assert [f.result(timeout=10) for f in futures] == [True] * 10 + [False] * 20
    assert committer.submit(_row(3)).result(timeout=10) is False
    assert len(_stored(db)) == 10


def test_concurrent_threads_and_an_event_loop_all_get_their_answer(db: Database, committer: GroupCommitter) -> None:
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: committer.submit(_row(f"t{i % 100}")).result(timeout=10), range(200)))

    async def burst() -> list[bool]:
        return list(await asyncio.gather(*(committer.submit_async(_row(f"a{i % 50}")) for i in range(100))))

    looped = asyncio.run(burst())
    assert threaded.count(True) == 100 and looped.count(True) == 50
    assert len(_stored(db)) == 150


def test_a_failed_transaction_acknowledges_nobody_and_the_next_batch_works(db: Database,
                                                                         committer: GroupCommitter) -> None:
    bad = _row("bad")
    bad["source"] = None  # NOT NULL: the whole transaction fails
    with db.write_lock():
        futures = [committer.submit(_row(1)), committer.submit(bad), committer.submit(_row(2))]
    outcomes: list[bool | None] = []  # None: the future carried the transaction's error
    for f in futures:
        try:
            outcomes.append(f.result(timeout=10))
        except (sqlite3.IntegrityError, IntegrityError):
            outcomes.append(None)
    assert outcomes[1] is None and outcomes.count(None) >= 2  # the bad row's whole batch failed
    stored = _stored(db)
    assert [o is True for o in outcomes] == [f"d-{i}" in stored for i in (1, "bad", 2)]  # acked == stored
    assert committer.submit(_row(3)).result(timeout=10) is True
    assert "d-3" in _stored(db)


def test_inbox_accept_goes_through_the_committer_while_it_runs(db: Database) -> None:
    inbox = Inbox(db)
    assert inbox.accept("generic", "before", {}, b"{}") is True  # no committer: one transaction each
    committer = inbox.start_group_commit()
    try:
        assert inbox.accept("generic", "during", {}, b"{}") is True
        assert inbox.accept("generic", "before", {}, b"{}") is False
        assert committer.rows == 2
    finally:
        inbox.stop_group_commit()
    assert inbox.committer is None and inbox.accept("generic", "after", {}, b"{}") is True
    assert {d.delivery_id for d in inbox.list()} == {"before", "during", "after"}
    assert inbox.get(inbox.list()[-1].id).headers == {}


def test_another_process_holding_the_writer_lock_is_waited_for_then_handed_over_at_once(
        db: Database, committer: GroupCommitter) -> None:
    hold = ("import sys, time\nfrom modelcd.store.db import Database\n"
            "db = Database(sys.argv[1])\nwith db.write_lock():\n    print('held', flush=True)\n    time.sleep(1.0)\n"
            "print('released', flush=True)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, db.url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        fut = committer.submit(_row("x"))
        assert fut.result(timeout=10) is True
        waited = time.monotonic() - t0
        holder.wait(timeout=10)
        assert 0.7 < waited < 1.5, waited  # waited for the other process, and not a busy-handler sleep more
    finally:
        holder.kill()
        holder.wait()


def test_stop_commits_what_is_queued_and_refuses_later_rows(db: Database) -> None:
    c = GroupCommitter(db).start()
    with db.write_lock():
        futures = [c.submit(_row(i)) for i in range(5)]
    c.stop()
    assert all(f.result(timeout=1) for f in futures)
    with pytest.raises(RuntimeError, match="stopped"):
        c.submit(_row(9)).result(timeout=1)


def test_commits_leave_the_wal_to_the_checkpointer_which_copies_it_into_the_database(db: Database) -> None:
    assert db.sqlite_path is not None
    c = GroupCommitter(db).start()
    try:
        assert c.checkpointer is not None
        c.checkpointer.stop()  # commits alone must not checkpoint
        size = Path(db.sqlite_path).stat().st_size
        for chunk in range(20):
            for f in [c.submit(_row(f"{chunk}-{i}")) for i in range(100)]:
                assert f.result(timeout=10)
        assert Path(db.sqlite_path).stat().st_size == size  # 2000 rows, all still in the WAL only
        path = Path(db.sqlite_path)
        checkpointer = Checkpointer(db.sqlite_path, every_s=0.1).start()
        try:
            _until_true(lambda: path.stat().st_size > size)
        finally:
            checkpointer.stop()
        assert len(_stored(db)) == 2000
    finally:
        c.stop()


def _until_true(predicate: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")
