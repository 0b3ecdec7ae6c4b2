"""Database access: one engine, short transactions, writes serialised.

On SQLite (the embedded default) the file runs in WAL mode, and every write transaction
starts with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing on a lock
upgrade. Writers queue on locks that hand over the moment the last one commits: a lock for
the threads of this process, and an ``flock`` on ``<database>-writer.lock`` for the processes
that share the file (the service and its inbox worker); SQLite's busy timeout, which sleeps
and polls (1, 2, 5, 10 … 100 ms a turn), remains only for writers that do not take it.
PostgreSQL uses its own transactions unchanged."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from modelcd.store import schema
from modelcd.store.migrate import add_missing_columns


def now() -> str:
    """Current UTC time, ISO-8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_id(prefix: str) -> str:
    """A short random id with a readable prefix, e.g. ``r-3f9a1c2b7d10``."""
    return f"{prefix}-{secrets.token_hex(6)}"


class Database:
    """The store: ``read()`` and ``write()`` yield a connection inside a transaction that
    commits on success and rolls back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock: threading.RLock | contextlib.nullcontext[None] = (
            threading.RLock() if self.is_sqlite else contextlib.nullcontext())
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        self._file_lock: _FileLock | None = None
        self.sqlite_path: str | None = None  # the database file, when it is one
        if self.is_sqlite:
            self._sqlite_pragmas()
            database = self.engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                self.sqlite_path = database
                self._file_lock = _FileLock(f"{database}-writer.lock")
        schema.metadata.create_all(self.engine)
        add_missing_columns(self.engine)
        if self.sqlite_path is not None:
            _make_private(self.sqlite_path)

    def _sqlite_pragmas(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Wait for this store's turn to write (threads of this process, then processes), without
        a transaction: for a writer with a SQLite connection of its own."""
        # SQLite has one writer at a time; queueing writers of this process on a lock wakes the
        # next one the moment the last commits, where SQLite's busy handler would sleep and poll
        # (up to 100 ms a turn). The file lock does the same between processes.
        with self._write_lock, self._file_lock or contextlib.nullcontext():
            yield

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.write_lock(), self.engine.connect() as conn:
            conn.info["immediate"] = True
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.info.pop("immediate", None)

    def next_counter(self, conn: Connection, key: str) -> int:
        """Increment and return a named counter inside the caller's write transaction."""
        row = conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == key)).first()
        if row is None:
            if self.is_sqlite:
                conn.execute(sqlite_insert(schema.meta).values(key=key, value=1))
            else:
                conn.execute(schema.meta.insert().values(key=key, value=1))
            return 1
        value = int(row[0]) + 1
        conn.execute(update(schema.meta).where(schema.meta.c.key == key).values(value=value))
        return value

    def dispose(self) -> None:
        self.engine.dispose()
        if self._file_lock is not None:
            self._file_lock.close()


class _FileLock:
    """An exclusive ``flock`` on one file, re-entrant for the thread that holds the caller's
    thread lock (only the outermost exit releases it). Blocked waiters wake when it is released."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None and self._depth == 0:
            os.close(self._fd)
            self._fd = None


def _make_private(database: str) -> None:
    """The database file (and the WAL files SQLite gives the same mode) for this user only,
    even when an older version or another umask made it readable to others."""
    for path in (database, f"{database}-wal", f"{database}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)
